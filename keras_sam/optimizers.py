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


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be an integer >= 1. Received: {name}={value!r}"
        )
    if value < 1:
        raise ValueError(
            f"`{name}` must be an integer >= 1. Received: {name}={value}"
        )
    return int(value)


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


def find_sam(optimizer):
    """The sharpness-aware optimizer in `optimizer`, unwrapping loss scaling.

    Returns `None` when there is none (a plain optimizer).
    """
    while optimizer is not None:
        if isinstance(optimizer, SAM):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return None


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

    def __init__(self, optimizer="sgd", rho=0.05, sam_every=1, name=None):
        super().__init__(learning_rate=0.0, name=name or self._default_name())
        self.inner_optimizer = _get_inner(optimizer)
        self.initial_rho = _check_rho(rho)
        self.sam_every = _check_positive_int("sam_every", sam_every)
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
        return []

    def on_clean_pass(self, loss, grads, trainable_variables, auxiliary):
        """After the clean pass: `auxiliary` is a list of `(loss, grads)`."""

    def on_adversarial_pass(self, grads, grads_adv, trainable_variables):
        """After the adversarial pass, before the update (SAM steps only)."""

    def log_values(self):
        """Scalars the step writes into `logs` (read after the update)."""
        return {"rho": self.rho}

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
            "rho": self.initial_rho,
            "sam_every": self.sam_every,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["optimizer"] = keras.saving.deserialize_keras_object(
            config["optimizer"], custom_objects=custom_objects
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
        name: String, the name of the optimizer. Defaults to `"asam"`.

    Example:

    >>> optimizer = keras_sam.optimizers.ASAM(
    ...     keras.optimizers.SGD(0.1, momentum=0.9), rho=1.0)

    References:
        - Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for
          Scale-Invariant Learning of Deep Neural Networks, ICML 2021.
    """

    def __init__(
        self, optimizer="sgd", rho=0.5, eta=0.01, sam_every=1, name=None
    ):
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
            raise TypeError(
                f"`eta` must be a float > 0. Received: eta={eta!r}"
            )
        if not math.isfinite(eta) or eta <= 0:
            raise ValueError(f"`eta` must be a float > 0. Received: eta={eta}")
        super().__init__(optimizer, rho=rho, sam_every=sam_every, name=name)
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
