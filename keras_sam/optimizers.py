"""Sharpness-aware optimizers: SAM and ASAM around any stock Keras optimizer.

Every variant computes the same perturbation (DESIGN section 2):

```
xi  = P_w(D^-1 g)                    # metric D, tangent projection P
eps = rho * xi / (||xi||_D + 1e-12)  # ||xi||_D = sqrt(sum xi * D * xi)
w_adv = R_w(eps)                     # retraction; w + eps on flat variables
```

and differs only in `_metric` (D), `_project` (P) and `_retract` (R). The
update itself is delegated to the wrapped (inner) optimizer, so learning-rate
schedules, momentum, weight decay, clipping, EMA and gradient accumulation
work as they do without SAM.

The two forward/backward passes live in `keras_sam.SAMModel`; these classes
hold the state (rho, counters) and the math, written in `keras.ops`.
"""

import contextlib
import math
import numbers

import keras
from keras import ops

from keras_sam import manifolds as sam_manifolds
from keras_sam.radius import LearnedRadius
from keras_sam._validation import check_positive_int

_NORM_EPSILON = 1e-12

# Variables that a weight-scaled (adaptive) metric leaves alone: T = 1.
_SHIFT_VARIABLE_NAMES = ("bias", "beta")


def _variable_name(variable):
    """Last component of a variable's path (`"dense/kernel"` -> `"kernel"`)."""
    path = getattr(variable, "path", None) or variable.name
    return path.split("/")[-1].split(":")[0]


def is_weight_like(variable):
    """True for kernels, embeddings, BN gamma; False for biases and beta."""
    return _variable_name(variable) not in _SHIFT_VARIABLE_NAMES


def _check_rho(rho):
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real):
        raise TypeError(
            f"`rho` must be a non-negative float. Received: rho={rho!r} "
            f"of type {type(rho).__name__}"
        )
    if not math.isfinite(rho) or rho < 0:
        raise ValueError(
            f"`rho` must be a finite number >= 0. Received: rho={rho}"
        )
    return float(rho)


def _check_splits(sync_perturbation, num_batch_splits):
    if not isinstance(sync_perturbation, bool):
        raise TypeError(
            "`sync_perturbation` must be a boolean. Received: "
            f"sync_perturbation={sync_perturbation!r}"
        )
    num_batch_splits = check_positive_int(
        "num_batch_splits", num_batch_splits
    )
    if sync_perturbation and num_batch_splits > 1:
        raise ValueError(
            "`sync_perturbation=True` perturbs with the gradient of the "
            "whole global batch and cannot be combined with "
            "`num_batch_splits` > 1. Received: sync_perturbation=True, "
            f"num_batch_splits={num_batch_splits}"
        )
    return sync_perturbation, num_batch_splits


def _get_inner(optimizer):
    if isinstance(optimizer, SAM):
        raise TypeError(
            "The inner optimizer of a sharpness-aware optimizer must be a "
            "stock Keras optimizer, not another sharpness-aware optimizer. "
            f"Received: optimizer={optimizer.__class__.__name__}"
        )
    try:
        inner = keras.optimizers.get(optimizer)
    except (ValueError, TypeError) as e:
        raise TypeError(
            "`optimizer` must be a Keras optimizer instance, name or config. "
            f"Received: optimizer={optimizer!r}"
        ) from e
    if not isinstance(inner, keras.optimizers.Optimizer):
        raise TypeError(
            "`optimizer` must be a Keras optimizer instance, name or config. "
            f"Received: optimizer={optimizer!r}"
        )
    return inner


def find_optimizer(optimizer, cls):
    """The first optimizer of type `cls` in a chain of wrappers.

    Follows `inner_optimizer` from `optimizer` (itself included), through
    sharpness-aware and loss-scale wrappers; `None` when there is none.
    """
    while optimizer is not None:
        if isinstance(optimizer, cls):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return None


def find_sam(optimizer):
    """The sharpness-aware optimizer in `optimizer`, unwrapping loss scaling.

    Returns `None` when there is none (a plain optimizer).
    """
    return find_optimizer(optimizer, SAM)


@keras.saving.register_keras_serializable(package="keras_sam")
class SAM(keras.optimizers.Optimizer):
    """Sharpness-Aware Minimization around a stock Keras optimizer.

    SAM seeks weights whose whole neighbourhood has low loss. Each step takes
    the gradient at weights perturbed towards higher loss and hands it to the
    inner optimizer, which updates the unperturbed weights:

    ```
    g     = grad L(w)
    eps   = rho * g / (||g|| + 1e-12)        # ||.|| global over all variables
    g_adv = grad L(w + eps)
    w     = inner_optimizer.update(w, g_adv)
    ```

    The two passes are run by `keras_sam.SAMModel`, which must wrap the
    model being trained; compiling this optimizer into a plain `keras.Model`
    raises an error on the first training step.

    Args:
        optimizer: The inner optimizer: a `keras.optimizers.Optimizer`
            instance or a name/config accepted by `keras.optimizers.get`.
            Defaults to `"sgd"`.
        rho: Float >= 0, the radius of the neighbourhood. `rho=0` gives
            exactly the inner optimizer. Stored as a non-trainable variable,
            so it can be changed during training without retracing.
            Defaults to `0.05`.
        sam_every: Integer >= 1. Run the two-pass step on every
            `sam_every`-th step and a plain step (one pass) otherwise.
            Defaults to `1`.
        sync_perturbation: Boolean. On several devices
            (`tf.distribute`, `keras.distribution`), each replica perturbs
            with the gradient of its own part of the batch by default
            (m-sharpness with m the per-replica batch). `True` averages `g`
            over all replicas before the norm, so every replica uses the
            perturbation of the global batch. Defaults to `False`.
        num_batch_splits: Integer >= 1. Split each (per-replica) batch into
            this many sub-batches, perturb each with its own gradient and
            average their adversarial gradients (m-sharpness on one device).
            Cannot be combined with `sync_perturbation=True`.
            Defaults to `1`.
        name: String, the name of the optimizer. Defaults to `"sam"`.

    Example:

    >>> model = keras_sam.SAMModel(keras.Sequential([keras.layers.Dense(1)]))
    >>> model.compile(
    ...     optimizer=keras_sam.optimizers.SAM(keras.optimizers.SGD(0.1)),
    ...     loss="mse")

    References:
        - Foret et al., Sharpness-Aware Minimization for Efficiently Improving
          Generalization, ICLR 2021.
    """

    def __init__(
        self,
        optimizer="sgd",
        rho=0.05,
        sam_every=1,
        name=None,
        sync_perturbation=False,
        num_batch_splits=1,
    ):
        super().__init__(learning_rate=0.0, name=name or self._default_name())
        self.inner_optimizer = _get_inner(optimizer)
        # A LearnedRadius drives the `rho` variable through the step hooks.
        self.radius = rho if isinstance(rho, LearnedRadius) else None
        self.initial_rho = _check_rho(
            rho if self.radius is None else self.radius.initial
        )
        self.sam_every = check_positive_int("sam_every", sam_every)
        self.sync_perturbation, self.num_batch_splits = _check_splits(
            sync_perturbation, num_batch_splits
        )
        self._in_step = False
        self.rho = self.add_variable(
            shape=(),
            initializer=keras.initializers.Constant(self.initial_rho),
            dtype="float32",
            aggregation="only_first_replica",
            name="rho",
        )

    @classmethod
    def _default_name(cls):
        return cls.__name__.lower()

    # ---- wrapper plumbing (mirrors keras.optimizers.LossScaleOptimizer) ----

    def build(self, var_list):
        self.inner_optimizer.build(var_list)
        super().build(var_list)
        if self.radius is not None:
            self.radius.build(self, var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    @contextlib.contextmanager
    def sharpness_aware_step(self):
        """Marks the code of a two-pass step; `apply` refuses to run outside."""
        previous, self._in_step = self._in_step, True
        try:
            yield
        finally:
            self._in_step = previous

    def apply(self, grads, trainable_variables=None):
        if not self._in_step:
            raise RuntimeError(
                f"`{self.__class__.__name__}` is a sharpness-aware optimizer: "
                "it needs the two forward/backward passes of "
                "`keras_sam.SAMModel`. Wrap the model before compiling it: "
                "`model = keras_sam.SAMModel(model)`."
            )
        if not self.built:
            self.build(list(trainable_variables))
        # The update rule is the inner optimizer's, applied with g_adv at w.
        self.inner_optimizer.apply(grads, trainable_variables)
        self._after_update(trainable_variables or self._trainable_variables)

    # ---- the sharpness-aware perturbation ----

    def should_perturb(self):
        """Boolean tensor: is the current step a two-pass (SAM) step?"""
        return ops.equal(ops.mod(self.iterations, self.sam_every), 0)

    def perturbation(self, grads, trainable_variables, values=None):
        """eps per variable: `rho * xi / (||xi||_D + 1e-12)`, xi = P(D^-1 g).

        Args:
            grads: list of (unscaled) gradients, `None` where a variable has
                no gradient.
            trainable_variables: the `keras.Variable`s the gradients belong
                to (used for their names and shapes).
            values: current values of those variables; defaults to reading
                them. A stateless (JAX) step passes its state here.

        Returns:
            List of perturbations, `None` where the gradient is `None`.
        """
        if values is None:
            values = [v.value for v in trainable_variables]
        xis, squares = [], []
        for g, v, w in zip(grads, trainable_variables, values):
            if g is None:
                xis.append(None)
                continue
            g = ops.cast(g, "float32")
            w = ops.cast(w, "float32")
            d_inv, d = self._metric(v, w, g)
            xi = g if d_inv is None else ops.multiply(d_inv, g)
            xi = self._project(v, w, xi)
            xis.append(xi)
            xi_d = xi if d is None else ops.multiply(d, xi)
            squares.append(ops.sum(ops.multiply(xi, xi_d)))
        if not squares:
            return xis
        norm = ops.sqrt(ops.sum(ops.stack(squares)))
        scale = ops.divide(
            ops.cast(self.rho, "float32"), ops.add(norm, _NORM_EPSILON)
        )
        return [
            None if xi is None else ops.cast(ops.multiply(xi, scale), w.dtype)
            for xi, w in zip(xis, values)
        ]

    def perturbed_values(self, grads, trainable_variables, values=None):
        """w_adv = R_w(eps) per variable; `None` where the gradient is `None`.

        Reads the variables unless `values` is given; assigns nothing.
        """
        if values is None:
            values = [v.value for v in trainable_variables]
        eps = self.perturbation(grads, trainable_variables, values)
        return [
            None if e is None else self._retract(v, w, e)
            for e, v, w in zip(eps, trainable_variables, values)
        ]

    def pull_back(self, grads, trainable_variables, values=None):
        """Maps g_adv, taken at w_adv, to the tangent space at w."""
        if values is None:
            values = [v.value for v in trainable_variables]
        return [
            None if g is None else self._project(v, w, g)
            for g, v, w in zip(grads, trainable_variables, values)
        ]

    # ---- hooks into the step (stateful variants: LETS, Fisher metric) ----
    #
    # The backends call these inside the step, in this order, with unscaled
    # gradients. They may `assign` the optimizer's own variables (a JAX step
    # runs them in a StatelessScope over its state and keeps the new values).

    def auxiliary_batches(self):
        """Extra `(x, y, sample_weight)` batches to differentiate at w.

        The step computes each one's loss and gradient at the clean weights
        in inference mode (`training=False`, no state updates) and hands
        them to `on_clean_pass`. Defaults to none.
        """
        if self.radius is not None:
            return self.radius.auxiliary_batches(self)
        return []

    def auxiliary_due(self):
        """Whether this step runs the auxiliary passes: `True` or a boolean
        tensor. When false the step skips them and hands zeros to
        `on_clean_pass`. Defaults to `True`.
        """
        if self.radius is not None:
            return self.radius.auxiliary_due(self)
        return True

    def on_clean_pass(self, loss, grads, trainable_variables, auxiliary):
        """After the clean pass: `auxiliary` is a list of `(loss, grads)`."""
        if self.radius is not None:
            if not self.built:
                self.build(list(trainable_variables))
            self.radius.on_clean_pass(self, loss, grads, auxiliary)

    def on_adversarial_pass(self, grads, grads_adv, trainable_variables):
        """After the adversarial pass, before the update (SAM steps only)."""
        if self.radius is not None:
            self.radius.on_adversarial_pass(self, grads, grads_adv)

    def log_values(self):
        """Scalars the step writes into `logs` (read after the update)."""
        values = {"rho": self.rho}
        if self.radius is not None:
            values.update(self.radius.log_values())
        return values

    # ---- the three hooks that tell the variants apart ----

    def _metric(self, variable, value, grad):
        """Diagonal metric as `(D^-1, D)`; `(None, None)` means identity."""
        return None, None

    def _project(self, variable, value, vector):
        """Projection onto the tangent space at `value`; identity when flat."""
        return vector

    def _retract(self, variable, value, step):
        """Moves `value` by the tangent `step`; `value + step` when flat."""
        return ops.add(value, step)

    def _after_update(self, trainable_variables):
        """Called after the inner update (manifold variants retract here)."""

    # ---- config ----

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer
            ),
            "rho": (
                self.initial_rho
                if self.radius is None
                else keras.saving.serialize_keras_object(self.radius)
            ),
            "sam_every": self.sam_every,
            "sync_perturbation": self.sync_perturbation,
            "num_batch_splits": self.num_batch_splits,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["optimizer"] = keras.saving.deserialize_keras_object(
            config["optimizer"], custom_objects=custom_objects
        )
        if isinstance(config.get("rho"), dict):
            config["rho"] = keras.saving.deserialize_keras_object(
                config["rho"], custom_objects=custom_objects
            )
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_sam")
class ASAM(SAM):
    """Adaptive SAM: a perturbation scaled by the size of each weight.

    The neighbourhood is measured relative to the weights, so it is invariant
    to rescaling a layer whose scale does not change the function:

    ```
    T     = |w| + eta   (kernels, embeddings, BN gamma);  1  (bias, beta)
    eps   = rho * T^2 g / (||T g|| + 1e-12)
    g_adv = grad L(w + eps)
    w     = inner_optimizer.update(w, g_adv)
    ```

    Args:
        optimizer: The inner optimizer: a `keras.optimizers.Optimizer`
            instance or a name/config accepted by `keras.optimizers.get`.
            Defaults to `"sgd"`.
        rho: Float >= 0, the radius of the adaptive neighbourhood; typical
            values are 0.5 to 2. Defaults to `0.5`.
        eta: Float > 0, keeps the scale of zero weights positive.
            Defaults to `0.01`.
        sam_every: Integer >= 1. Run the two-pass step on every
            `sam_every`-th step and a plain step otherwise. Defaults to `1`.
        sync_perturbation: Boolean, see `SAM`. Defaults to `False`.
        num_batch_splits: Integer >= 1, see `SAM`. Defaults to `1`.
        name: String, the name of the optimizer. Defaults to `"asam"`.

    Example:

    >>> optimizer = keras_sam.optimizers.ASAM(
    ...     keras.optimizers.SGD(0.1, momentum=0.9), rho=1.0)

    References:
        - Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for
          Scale-Invariant Learning of Deep Neural Networks, ICML 2021.
    """

    def __init__(
        self,
        optimizer="sgd",
        rho=0.5,
        eta=0.01,
        sam_every=1,
        name=None,
        sync_perturbation=False,
        num_batch_splits=1,
    ):
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
            raise TypeError(
                f"`eta` must be a float > 0. Received: eta={eta!r}"
            )
        if not math.isfinite(eta) or eta <= 0:
            raise ValueError(f"`eta` must be a float > 0. Received: eta={eta}")
        super().__init__(
            optimizer,
            rho=rho,
            sam_every=sam_every,
            name=name,
            sync_perturbation=sync_perturbation,
            num_batch_splits=num_batch_splits,
        )
        self.eta = float(eta)

    def scale(self, variable, value):
        """T for one variable: `|w| + eta`, or `None` (T = 1) for biases."""
        if not is_weight_like(variable):
            return None
        return ops.add(ops.abs(value), self.eta)

    def _metric(self, variable, value, grad):
        t = self.scale(variable, value)
        if t is None:
            return None, None
        t2 = ops.square(t)
        return t2, ops.reciprocal(t2)

    def get_config(self):
        config = super().get_config()
        config["eta"] = self.eta
        return config


_REGISTRY = {"sam": SAM, "asam": ASAM}


def register(name, cls):
    """Adds a sharpness-aware optimizer class to the string registry."""
    _REGISTRY[name] = cls


def serialize(optimizer):
    """Returns the Keras config of a sharpness-aware optimizer."""
    return keras.saving.serialize_keras_object(optimizer)


def deserialize(config, custom_objects=None):
    """Rebuilds a sharpness-aware optimizer from `serialize`'s output."""
    return keras.saving.deserialize_keras_object(
        config, custom_objects=custom_objects
    )


def get(identifier, optimizer="sgd", **kwargs):
    """Returns a sharpness-aware optimizer.

    Args:
        identifier: a SAM instance (returned as is), a registered name
            (`"sam"`, `"asam"`, ...) or a config dict.
        optimizer: the inner optimizer when `identifier` is a name.
        **kwargs: further constructor arguments when `identifier` is a name.
    """
    if isinstance(identifier, SAM):
        return identifier
    if isinstance(identifier, dict):
        return deserialize(identifier)
    if isinstance(identifier, str):
        key = identifier.lower()
        if key not in _REGISTRY:
            raise ValueError(
                "Unknown sharpness-aware optimizer. Expected one of "
                f"{sorted(_REGISTRY)}. Received: identifier={identifier!r}"
            )
        return _REGISTRY[key](optimizer, **kwargs)
    raise TypeError(
        "Could not interpret a sharpness-aware optimizer identifier. "
        f"Received: identifier={identifier!r}"
    )


def unscale_gradients(optimizer, grads):
    """Divides gradients of a scaled loss by the loss scale of `optimizer`.

    `optimizer.scale_loss` may multiply the loss by a `LossScaleOptimizer`'s
    dynamic scale and by an inner optimizer's `loss_scale_factor`; the
    perturbation norm must be taken on the true gradient.
    """
    scale = None
    while optimizer is not None:
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            factor = ops.cast(optimizer.dynamic_scale, "float32")
        elif getattr(optimizer, "loss_scale_factor", None):
            factor = float(optimizer.loss_scale_factor)
        else:
            factor = None
        if factor is not None:
            scale = factor if scale is None else ops.multiply(scale, factor)
        optimizer = getattr(optimizer, "inner_optimizer", None)
    if scale is None:
        return list(grads)
    return [
        None if g is None else ops.divide(g, ops.cast(scale, g.dtype))
        for g in grads
    ]


# ---------------------------------------------------------------------------
# RSAM: Riemannian SAM on manifolds, with a local diagonal metric.

_METRICS = ("identity", "adaptive", "fisher")
_FISHER_TINY = 1e-30


def _check_float(name, value, low, high=None, low_open=True):
    """Validates a float in `(low, high)` (or `[low, high)`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a float. Received: {name}={value!r}")
    too_low = value <= low if low_open else value < low
    too_high = high is not None and value >= high
    if not math.isfinite(value) or too_low or too_high:
        bound = f"> {low}" if low_open else f">= {low}"
        if high is not None:
            bound += f" and < {high}"
        raise ValueError(
            f"`{name}` must be a float {bound}. Received: {name}={value}"
        )
    return float(value)


def _manifold_spec(manifold):
    """`manifold=` as a list of `(key, Manifold)`; key a string or callable."""
    if manifold is None:
        return []
    if isinstance(manifold, dict):
        items = list(manifold.items())
    elif isinstance(manifold, (list, tuple)):
        items = list(manifold)
    else:
        raise TypeError(
            "`manifold` must be a dict mapping layer names, variable paths "
            "or predicates to manifolds. Received: "
            f"manifold={manifold!r}"
        )
    spec = []
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise TypeError(
                "`manifold` entries must be (key, manifold) pairs. "
                f"Received: {item!r} in manifold={manifold!r}"
            )
        key, value = item
        if isinstance(key, dict):
            # A predicate serialized by `get_config`.
            key = keras.saving.deserialize_keras_object(key)
        if not isinstance(key, str) and not callable(key):
            raise TypeError(
                "`manifold` keys must be layer names, variable paths or "
                f"predicates `fn(variable) -> bool`. Received: key={key!r}"
            )
        try:
            spec.append((key, sam_manifolds.get(value)))
        except (ValueError, TypeError) as e:
            raise type(e)(f"{e} (for the `manifold` key {key!r})") from e
    return spec


def _key_matches(key, variable):
    """Predicate, variable path (or its tail), or layer name (weights)."""
    if callable(key):
        return bool(key(variable))
    path = variable.path
    if "/" in key:
        return path == key or path.endswith("/" + key)
    return key in path.split("/")[:-1] and is_weight_like(variable)


def _key_name(key):
    return key if isinstance(key, str) else getattr(key, "__name__", repr(key))


def _concrete_value(variable):
    """The variable's value as numpy, or `None` inside a traced function."""
    try:
        return ops.convert_to_numpy(variable.value)
    except (TypeError, ValueError, AttributeError, NotImplementedError):
        return None


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
    model.trainable_variables)` first to have it there too). On the plain
    steps of `sam_every > 1` the inner optimizer gets the Euclidean
    gradient; the retraction still keeps each variable on its manifold.

    Args:
        optimizer: The inner optimizer: a `keras.optimizers.Optimizer`
            instance or a name/config accepted by `keras.optimizers.get`.
            Defaults to `"sgd"`.
        rho: Float >= 0, the radius of the neighbourhood in the metric `D`.
            Defaults to `0.05`.
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
        metric="identity",
        eta=0.01,
        damping=1e-3,
        fisher_decay=0.95,
        name=None,
        **kwargs,
    ):
        if not isinstance(metric, str) or metric not in _METRICS:
            raise ValueError(
                f"`metric` must be one of {list(_METRICS)}. "
                f"Received: metric={metric!r}"
            )
        eta = _check_float("eta", eta, 0.0)
        damping = _check_float("damping", damping, 0.0)
        fisher_decay = _check_float(
            "fisher_decay", fisher_decay, 0.0, 1.0, low_open=False
        )
        spec = _manifold_spec(manifold)
        super().__init__(optimizer, rho=rho, name=name, **kwargs)
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
        manifolds = self._resolve_manifolds(var_list)
        super().build(var_list)
        self._manifolds = manifolds
        if self.metric == "fisher":
            self._fisher = [
                self.add_variable_from_reference(v, name="fisher")
                for v in var_list
            ]

    def _resolve_manifolds(self, var_list):
        used = [False] * len(self.manifold_spec)
        manifolds = []
        for v in var_list:
            found = []
            for i, (key, m) in enumerate(self.manifold_spec):
                if _key_matches(key, v):
                    used[i] = True
                    found.append((_key_name(key), m))
            constraint = getattr(v, "constraint", None)
            if isinstance(constraint, sam_manifolds.ManifoldConstraint):
                found.append(("its constraint", constraint.manifold))
            distinct = []
            for _, m in found:
                if m not in distinct:
                    distinct.append(m)
            if len(distinct) > 1:
                raise ValueError(
                    f"Variable '{v.path}' is mapped to different manifolds: "
                    + ", ".join(f"{m!r} (from {k!r})" for k, m in found)
                )
            m = distinct[0] if distinct else sam_manifolds.Euclidean()
            if not isinstance(m, sam_manifolds.Euclidean):
                m.check_shape(tuple(v.shape), v.path)
                value = _concrete_value(v)
                if value is not None:
                    m.check(value, v.path)
            manifolds.append(m)
        for (key, _), was_used in zip(self.manifold_spec, used):
            if not was_used:
                paths = [v.path for v in var_list]
                raise ValueError(
                    f"No trainable variable matches the `manifold` key "
                    f"{_key_name(key)!r}. Keys are layer names, variable "
                    "paths (or their tails) and predicates. Variable paths: "
                    f"{paths[:20]}{' ...' if len(paths) > 20 else ''}"
                )
        return manifolds

    def manifold_of(self, variable):
        """The manifold of a trainable variable (Euclidean before build)."""
        if self._manifolds is None:
            return sam_manifolds.Euclidean()
        return self._manifolds[self._get_variable_index(variable)]

    # ---- the update: Riemannian gradient, inner step, retraction ----

    def apply(self, grads, trainable_variables=None):
        if not self.built and trainable_variables is not None:
            self.build(list(trainable_variables))
        if self.built:
            variables = (
                self._trainable_variables
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

    def on_clean_pass(self, loss, grads, trainable_variables, auxiliary):
        if not self.built:
            # Keras' TF loop builds the optimizer in the first trace, at
            # `apply`; the manifolds are needed before, for eps.
            self.build(list(trainable_variables))
        super().on_clean_pass(loss, grads, trainable_variables, auxiliary)
        if self.metric != "fisher":
            return
        decay = self.fisher_decay
        for g, v in zip(grads, trainable_variables):
            if g is None:
                continue
            f = self._fisher[self._get_variable_index(v)]
            g2 = ops.square(ops.cast(g, f.dtype))
            f.assign(ops.add(ops.multiply(f, decay), (1.0 - decay) * g2))
        self.fisher_weight.assign(
            ops.add(ops.multiply(self.fisher_weight, decay), 1.0 - decay)
        )

    # ---- the three hooks of the perturbation ----

    def _metric(self, variable, value, grad):
        if self.metric == "identity":
            return None, None
        if self.metric == "adaptive":
            if not is_weight_like(variable):
                return None, None
            t2 = ops.square(ops.add(ops.abs(value), self.eta))
            return t2, ops.reciprocal(t2)
        f = ops.cast(
            self._fisher[self._get_variable_index(variable)], "float32"
        )
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
                "manifold": [
                    [
                        (
                            key
                            if isinstance(key, str)
                            else keras.saving.serialize_keras_object(key)
                        ),
                        sam_manifolds.serialize(m),
                    ]
                    for key, m in self.manifold_spec
                ]
                or None,
                "metric": self.metric,
                "eta": self.eta,
                "damping": self.damping,
                "fisher_decay": self.fisher_decay,
            }
        )
        return config


register("rsam", RSAM)
