"""`RSAM`: Riemannian SAM on manifolds, with a local diagonal metric."""

import keras
from keras import ops

from keras_sam import manifolds as sam_manifolds
from keras_sam._keras_compat import built_variables
from keras_sam._keras_compat import variable_index
from keras_sam._validation import check_choice
from keras_sam._validation import check_float
from keras_sam._validation import check_rho
from keras_sam.optimizers import manifold_keys
from keras_sam.optimizers.sam import SAM
from keras_sam.optimizers.sam import is_weight_like

_METRICS = ("identity", "adaptive", "fisher")
_FISHER_TINY = 1e-30


@keras.saving.register_keras_serializable(package="keras_sam")
class RSAM(SAM):
    """Riemannian SAM: sharpness-aware steps on manifolds, local metrics.

    Each variable lies on a manifold (`Euclidean` unless mapped otherwise)
    with tangent projection `P_w` and retraction `R_w`, and carries a
    diagonal metric `D`. The neighbourhood is a ball of radius `rho` in the
    metric `D`, taken along the manifold:

    ```
    g     = grad L(w)
    xi    = P_w(D^-1 g)                  # Riemannian gradient
    eps   = rho * xi / (||xi||_D + 1e-12)  # ||xi||_D^2 = sum xi * D * xi
    g_adv = P_w(grad L(R_w(eps)))        # pulled back to the tangent space at w
    w     = R_w(inner_optimizer.update(w, g_adv) - w)
    ```

    With `flat_rho` set, the manifold variables (`M`) and the flat
    (Euclidean) ones (`E`) are two groups, each perturbed with its own
    radius and normalized by its own norm, as when the paper trains the
    Stiefel factor with RSAM and the rest of the network with SAM:

    ```
    eps_M = rho      * xi_M / (||xi_M||_D + 1e-12)
    eps_E = flat_rho * xi_E / (||xi_E||_D + 1e-12)
    ```

    A manifold with a metric of its own (`Stiefel(metric="canonical")`,
    the default of `keras_sam.layers.StiefelDense`/`StiefelConv2D`) uses it
    in place of `D` for its variables, both in the ascent (`xi` is its
    Riemannian gradient, the norm its inner product) and in the descent
    (`g_adv` is pulled back as its Riemannian gradient at `w`,
    `G - U G^T U` for the canonical metric), as in the paper's Algorithm 1.

    Metrics: `"identity"` (`D = I`), `"adaptive"` (ASAM's `D = T^-2`,
    `T = |w| + eta` on weight-like variables, `1` on biases) and `"fisher"`
    (`D = EMA(g^2) + damping`, the EMA kept as optimizer variables and
    updated from the clean gradient of each step). With every variable
    Euclidean, RSAM is SAM (`"identity"`) or ASAM (`"adaptive"`).

    Variables are mapped to manifolds by `manifold`, a dict whose keys are
    - a layer name (no `/`): that layer's weight-like variables (kernels,
      embeddings, gamma; not biases),
    - a variable path or its tail, e.g. `"conv2/kernel"`,
    - a predicate `fn(variable) -> bool`,
    and whose values are `keras_sam.manifolds` objects or names
    (`"euclidean"`, `"sphere"`, `"stiefel"`). A variable whose constraint is
    a `keras_sam.manifolds.ManifoldConstraint` (see
    `keras_sam.manifolds.stiefel_kernel()`) takes that manifold. Unmatched
    variables are Euclidean. At build time every key must match a variable,
    and every constrained variable must fit its manifold and lie on it (the
    last check needs concrete values: Keras' TensorFlow loop builds the
    optimizer inside its first trace, so call `optimizer.build(
    model.trainable_variables)` first to have it there too). The factor
    `U` of the layers in `keras_sam.layers` carries such a constraint, so
    RSAM finds it with no `manifold=` entry. On the plain
    steps of `sam_every > 1` the inner optimizer gets the Euclidean
    gradient; the retraction still keeps each variable on its manifold.

    Args:
        optimizer: The inner optimizer: a `keras.optimizers.Optimizer`
            instance or a name/config accepted by `keras.optimizers.get`.
            Defaults to `"sgd"`.
        rho: Float >= 0, the radius of the neighbourhood in the metric `D`:
            of all variables, or, with `flat_rho` set, of the manifold
            variables only. `rho=0` (and `flat_rho=0`) is exactly the inner
            optimizer made Riemannian: Riemannian SGD around SGD.
            Defaults to `0.05`.
        flat_rho: Optional float >= 0, the radius of the flat (Euclidean)
            variables, normalized apart from the manifold ones. `0` leaves
            them unperturbed (plain inner optimizer on them). Cannot be
            combined with a `keras_sam.LearnedRadius` `rho`. Stored as a
            non-trainable variable. Defaults to `None` (one neighbourhood
            of radius `rho` over all variables).
        manifold: Optional dict (or list of pairs) mapping layer names,
            variable paths or predicates to manifolds. Defaults to `None`
            (all Euclidean, apart from declared constraints).
        metric: `"identity"`, `"adaptive"` or `"fisher"`.
            Defaults to `"identity"`.
        eta: Float > 0, the offset of the adaptive scale `T = |w| + eta`.
            Defaults to `0.01`.
        damping: Float > 0 added to the Fisher diagonal. Defaults to `1e-3`.
        fisher_decay: Float in `[0, 1)`, the decay of the EMA of `g^2`.
            The EMA is debiased, so its first value is `g^2`.
            Defaults to `0.95`.
        name: String, the name of the optimizer. Defaults to `"rsam"`.
        **kwargs: Further arguments of `keras_sam.optimizers.SAM` (e.g.
            `sam_every`).

    Example:

    >>> conv = keras.layers.Conv2D(
    ...     32, 3, name="conv2", **keras_sam.manifolds.stiefel_kernel())
    >>> optimizer = keras_sam.optimizers.RSAM(
    ...     keras.optimizers.SGD(0.05, momentum=0.9), rho=0.05,
    ...     manifold={"dense": "sphere"}, metric="identity")
    >>> # The paper's setting: a Stiefel layer, its own radius for U.
    >>> layer = keras_sam.layers.StiefelConv2D(32, 3, padding="same")
    >>> optimizer = keras_sam.optimizers.RSAM(
    ...     keras.optimizers.SGD(0.05, momentum=0.9), rho=0.5, flat_rho=0.05)

    References:
        - Truong et al., RSAM: Learning on Manifolds with Riemannian
          Sharpness-aware Minimization, arXiv 2309.17215 (v1).
        - Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for
          Scale-Invariant Learning of Deep Neural Networks, ICML 2021.
        - Kim et al., Fisher SAM: Information Geometry and Sharpness Aware
          Minimisation, ICML 2022.
    """

    def __init__(
        self,
        optimizer="sgd",
        rho=0.05,
        manifold=None,
        flat_rho=None,
        metric="identity",
        eta=0.01,
        damping=1e-3,
        fisher_decay=0.95,
        name=None,
        **kwargs,
    ):
        metric = check_choice("metric", metric, _METRICS)
        eta = check_float("eta", eta, low=0.0, low_open=True)
        damping = check_float("damping", damping, low=0.0, low_open=True)
        fisher_decay = check_float("fisher_decay", fisher_decay, 0.0, 1.0)
        spec = manifold_keys.spec(manifold)
        if flat_rho is not None:
            flat_rho = check_rho(flat_rho, "flat_rho")
        super().__init__(optimizer, rho=rho, name=name, **kwargs)
        if flat_rho is not None and self.radius is not None:
            raise ValueError(
                "`flat_rho` cannot be combined with a learned radius "
                "(`rho=keras_sam.LearnedRadius(...)`), which learns one "
                f"radius for all variables. Received: flat_rho={flat_rho}"
            )
        self.initial_flat_rho = flat_rho
        self.flat_rho = None
        if flat_rho is not None:
            self.flat_rho = self._scalar("flat_rho", flat_rho)
        self.manifold_spec = spec
        self.metric = metric
        self.eta = eta
        self.damping = damping
        self.fisher_decay = fisher_decay
        self._manifolds = None
        self._fisher = None
        self._before_update = None
        if metric == "fisher":
            # Total weight of the EMA, 1 - decay^t: debiases the EMA.
            self.fisher_weight = self.add_variable(
                shape=(),
                initializer="zeros",
                dtype="float32",
                name="fisher_weight",
            )

    # ---- manifolds of the variables, resolved once at build ----

    def build(self, var_list):
        if self.built:
            return
        var_list = list(var_list)
        manifolds = manifold_keys.resolve(self.manifold_spec, var_list)
        super().build(var_list)
        self._manifolds = manifolds
        if self.metric == "fisher":
            self._fisher = [
                self.add_variable_from_reference(v, name="fisher")
                for v in var_list
            ]

    def manifold_of(self, variable):
        """The manifold of a trainable variable (Euclidean before build)."""
        if self._manifolds is None:
            return sam_manifolds.Euclidean()
        return self._manifolds[variable_index(self, variable)]

    # ---- the update: Riemannian gradient, inner step, retraction ----

    def apply(self, grads, trainable_variables=None):
        if not self.built and trainable_variables is not None:
            self.build(list(trainable_variables))
        if self.built:
            variables = (
                built_variables(self)
                if trainable_variables is None
                else list(trainable_variables)
            )
            # Keep w of the manifold variables for the retraction after the
            # inner update.
            before = {}
            for i, v in enumerate(variables):
                m = self.manifold_of(v)
                if not isinstance(m, sam_manifolds.Euclidean):
                    before[i] = (m, ops.copy(v.value))
            self._before_update = before
        super().apply(grads, trainable_variables)

    def _after_update(self, trainable_variables):
        super()._after_update(trainable_variables)
        before, self._before_update = self._before_update, None
        for i, v in enumerate(trainable_variables):
            if not before or i not in before:
                continue
            # Retract back onto the manifold: w = R_w(w_new - w).
            m, w = before[i]
            v.assign(m.retract(w, ops.subtract(v.value, w)))

    # ---- the Fisher metric's state ----

    def _after_clean(self, grad_at, g):
        super()._after_clean(grad_at, g)
        if self.metric != "fisher":
            return
        decay = self.fisher_decay
        for g_i, v in zip(grad_at.shared(g), grad_at.variables):
            if g_i is None:
                continue
            f = self._fisher[variable_index(self, v)]
            g2 = ops.square(ops.cast(g_i, f.dtype))
            f.assign(ops.add(ops.multiply(f, decay), (1.0 - decay) * g2))
        self.fisher_weight.assign(
            ops.add(ops.multiply(self.fisher_weight, decay), 1.0 - decay)
        )

    # ---- the perturbation: per-manifold metrics, per-group radii ----

    def _direction(self, variable, value, grad):
        """xi = P_w(D^-1 g) and ||xi||^2 in the variable's metric."""
        m = self.manifold_of(variable)
        if m.has_metric:
            xi = m.riemannian_gradient(value, grad)
            return xi, m.inner(value, xi, xi)
        return super()._direction(variable, value, grad)

    def _group(self, variable):
        """With `flat_rho`, the flat variables are a radius group apart."""
        return self.flat_rho is not None and isinstance(
            self.manifold_of(variable), sam_manifolds.Euclidean
        )

    def _radius(self, group):
        return self.flat_rho if group else self.rho

    def pull_back(self, grads, trainable_variables, values=None):
        """g_adv at w: its Riemannian gradient where the manifold has a
        metric of its own, else its tangent projection at w."""
        if values is None:
            values = [v.value for v in trainable_variables]
        return [
            None if g is None else self.manifold_of(v).riemannian_gradient(w, g)
            for g, v, w in zip(grads, trainable_variables, values)
        ]

    # ---- the three hooks of the perturbation ----

    def _metric(self, variable, value, grad):
        if self.metric == "identity":
            return None, None
        if self.metric == "adaptive":
            if not is_weight_like(variable):
                return None, None
            t2 = ops.square(ops.add(ops.abs(value), self.eta))
            return t2, ops.reciprocal(t2)
        f = ops.cast(self._fisher[variable_index(self, variable)], "float32")
        weight = ops.maximum(
            ops.cast(self.fisher_weight, "float32"), _FISHER_TINY
        )
        d = ops.add(ops.divide(f, weight), self.damping)
        return ops.reciprocal(d), d

    def _project(self, variable, value, vector):
        return self.manifold_of(variable).project(value, vector)

    def _retract(self, variable, value, step):
        return self.manifold_of(variable).retract(value, step)

    # ---- config ----

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "manifold": manifold_keys.serialize(self.manifold_spec),
                "flat_rho": self.initial_flat_rho,
                "metric": self.metric,
                "eta": self.eta,
                "damping": self.damping,
                "fisher_decay": self.fisher_decay,
            }
        )
        return config

    def log_values(self):
        values = super().log_values()
        if self.flat_rho is not None:
            values["flat_rho"] = self.flat_rho
        return values
