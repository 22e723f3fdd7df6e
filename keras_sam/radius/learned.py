"""`LearnedRadius`: rho learned by a hypergradient (LETS).

The state (rho on the optimizer, dw/drho, the controller's moments) lives in
optimizer variables; the math is in `keras_sam.radius.hypergradient`, the
held-out data in `keras_sam.radius.validation`. The step calls the hooks
below; they assign the new values they compute.
"""

import warnings

import keras
from keras import ops

from keras_sam._validation import check_choice
from keras_sam._validation import check_float
from keras_sam._validation import check_positive_int
from keras_sam._validation import check_seed
from keras_sam.radius import hypergradient as hg
from keras_sam.radius.validation import ValidationSet

_HYPERGRADIENTS = ("secant", "diagonal")
_OBJECTIVES = ("gap", "validation")
_RHO_STEPS = ("normalized", "plain")
_VALIDATION_MODES = ("training", "inference")


_CONFIG = (
    "initial",
    "learning_rate",
    "update_every",
    "bounds",
    "batch_size",
    "seed",
    "hypergradient",
    "rho_step",
    "validation_mode",
    "objective",
)


def checked_config(
    initial,
    learning_rate,
    update_every,
    bounds,
    batch_size,
    seed,
    hypergradient="secant",
    rho_step="normalized",
    validation_mode="training",
    objective="gap",
):
    """The constructor arguments, checked (defaults for older configs)."""
    config = {
        "objective": check_choice("objective", objective, _OBJECTIVES),
        "hypergradient": check_choice(
            "hypergradient", hypergradient, _HYPERGRADIENTS
        ),
        "rho_step": check_choice("rho_step", rho_step, _RHO_STEPS),
        "validation_mode": check_choice(
            "validation_mode", validation_mode, _VALIDATION_MODES
        ),
        "initial": check_float("initial", initial, 0.0, low_open=True),
        "learning_rate": check_float("learning_rate", learning_rate, 0.0),
        "update_every": check_positive_int("update_every", update_every),
        "batch_size": check_positive_int("batch_size", batch_size),
        "seed": check_seed(seed),
    }
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError(
            "`bounds` must be a pair `(min, max)`. "
            f"Received: bounds={bounds!r}"
        )
    low = check_float("bounds[0]", bounds[0], 0.0, low_open=True)
    high = check_float("bounds[1]", bounds[1], 0.0, low_open=True)
    if not low <= config["initial"] <= high:
        raise ValueError(
            "`bounds` must satisfy min <= initial <= max. Received: "
            f"bounds={tuple(bounds)!r}, initial={config['initial']}"
        )
    config["bounds"] = (low, high)
    return config


@keras.saving.register_keras_serializable(package="keras_sam")
class LearnedRadius:
    """A perturbation radius learned from held-out data (LETS).

    Pass it as `rho` to a sharpness-aware optimizer. rho then follows the
    hypergradient of an objective measured right after each step (the
    one-step unroll of a bilevel problem):

    ```
    gap     = L_val(w_t) - L_train(w_t)          # after the step from w_{t-1}
    dw/drho = -lr * (g_adv - g) / rho            # "secant", stored at t-1
            = -lr * g_adv * g_adv * g / ||g||    # "diagonal" (the paper's)
    dF/drho = gap * (grad L_val - grad L_train) . dw/drho  # "gap": gap^2/2
            = grad L_val . dw/drho               # "validation": L_val
    # rho_step="normalized" (default): Adam on log rho (scale-free)
    m, v    = Adam moments of d = rho * dF/drho  # d = dF/d(log rho)
    rho     = clip(rho * exp(-learning_rate * m_hat / sqrt(v_hat)), bounds)
    # rho_step="plain" (the paper's): gradient descent on rho
    rho     = clip(rho - learning_rate * dF/drho, bounds)
    ```

    `"secant"` replaces `H(w + eps) g/||g||` of the exact derivative by the
    finite difference SAM already computed; `"diagonal"` is the paper's
    diagonal `g_adv * g_adv`, applied to `deps/drho = g / ||g||` (`g` when
    the optimizer has `normalize=False`). `lr` is the inner optimizer's
    learning rate (exact for SGD, approximate for adaptive optimizers).
    The normalized step moves log rho by about `learning_rate` per update
    whatever the scale of rho or of the loss; the plain step's
    `learning_rate` depends on both. The squared gap is small for a
    collapsed model too, so `"gap"` does not lower a too-large rho;
    `"validation"` can (measured in `benchmarks/README.md`).

    Each update costs one validation forward/backward on a window of the
    data given here (shuffled once), in training mode by default like the
    clean pass. The state lives in optimizer variables (saved with the
    model); the data is not saved: a restored radius keeps rho fixed (and
    warns) until `set_validation_data` is called. `logs` carry `rho`,
    `gap`, `rho_grad` (dF/drho) and `rho_momentum` (`m`).

    Args:
        initial: Float > 0, the starting radius (within `bounds`).
            Defaults to `0.05`.
        learning_rate: Float >= 0, the step size on log rho. `0` keeps rho
            at `initial` (plain SAM). Defaults to `0.01`.
        validation_data: Held-out data, given once: `(x, y)`,
            `(x, y, sample_weight)` of arrays, or a batched
            `tf.data.Dataset` (or other iterable) yielding such tuples,
            which is read into memory once. NaN or inf raise a
            `ValueError`. Required.
        update_every: Integer >= 1. Update rho (and run the validation
            pass) every `update_every` steps. Defaults to `1`.
        bounds: Tuple `(min, max)` with `0 < min <= initial <= max`; rho
            is clipped to it. Defaults to `(1e-4, 10.0)`.
        batch_size: Integer >= 1, validation samples per update (all of
            them if there are fewer). Defaults to `32`.
        seed: Optional integer for the shuffled order of validation
            samples. Defaults to `None` (numpy's global generator).
        hypergradient: `"secant"` (`dw/drho = -lr (g_adv - g) / rho`) or
            `"diagonal"` (the paper's diagonal Hessian approximation,
            `dw/drho = -lr g_adv * g_adv * deps/drho`).
            Defaults to `"secant"`.
        rho_step: `"normalized"` (Adam-normalized step on log rho) or
            `"plain"` (the paper's gradient step on rho,
            `rho - learning_rate * dF/drho`). Defaults to `"normalized"`.
        validation_mode: `"training"` or `"inference"`, the mode of the
            validation pass. `"training"` matches the clean pass that gives
            the train loss; `"inference"` (the behaviour before this
            option) takes the validation loss without dropout and with
            BatchNorm's moving statistics, which biases the gap of such
            models. Defaults to `"training"`.
        objective: `"gap"` (the paper's squared train/validation gap) or
            `"validation"` (the validation loss itself).
            Defaults to `"gap"`.

    Example:

    >>> radius = keras_sam.LearnedRadius(
    ...     initial=0.05, learning_rate=0.01, validation_data=(x_val, y_val))
    >>> model = keras_sam.SAMModel(base)
    >>> model.compile(
    ...     optimizer=keras_sam.optimizers.SAM(
    ...         keras.optimizers.SGD(0.1), rho=radius),
    ...     loss="sparse_categorical_crossentropy")
    >>> history = model.fit(x, y, epochs=5)
    >>> history.history["rho"]

    References:
        - Wang, Jiang, Fu, Zhang, Enhancing Sharpness-Aware Minimization by
          Learning Perturbation Radius, ECML-PKDD 2024.
    """

    def __init__(
        self,
        initial=0.05,
        learning_rate=0.01,
        validation_data=None,
        update_every=1,
        bounds=(1e-4, 10.0),
        batch_size=32,
        seed=None,
        hypergradient="secant",
        rho_step="normalized",
        validation_mode="training",
        objective="gap",
    ):
        config = dict(locals())
        del config["self"], config["validation_data"]
        self._configure(**config)
        self.set_validation_data(validation_data)

    def _configure(self, **config):
        self.__dict__.update(checked_config(**config))
        self._data = None
        self._optimizer = None

    def set_validation_data(self, validation_data):
        """Reads `validation_data` into memory (shuffled once).

        Call it before the first `fit`: a compiled step keeps the data it
        was traced with (else call `model.make_train_function(force=True)`).
        """
        self._data = ValidationSet(validation_data, self.seed)

    def check_model(self, model, y=None):
        """Checks the validation data against `model` and, when given, the
        training targets `y` (see `keras_sam._shapes.check_fits`)."""
        if self._data is not None:
            self._data.check_model(model, y)

    # ---- state, created through the optimizer ----

    def build(self, optimizer, var_list):
        """Creates the radius' variables as `optimizer` variables."""
        if self._optimizer is optimizer:
            return
        if self._optimizer is not None:
            raise ValueError(
                "A LearnedRadius serves one optimizer; create one per "
                "optimizer. Received: a second optimizer "
                f"{optimizer.name!r}"
            )
        self._optimizer = optimizer

        def scalar(name, value=0.0):
            return optimizer.add_variable(
                shape=(),
                initializer=keras.initializers.Constant(value),
                dtype="float32",
                aggregation="only_first_replica",
                name=name,
            )

        # dw_{t+1}/drho from the last adversarial pass, and whether it is
        # fresh (set by the adversarial pass, used by the next clean pass).
        self.dw_drho = [
            optimizer.add_variable_from_reference(v, name="lets_dw_drho")
            for v in var_list
        ]
        self.fresh = scalar("lets_fresh")
        self.gap = scalar("lets_gap")
        self.rho_grad = scalar("lets_rho_grad")
        self.momentum = scalar("lets_momentum")
        self.velocity = scalar("lets_velocity")
        self.updates = scalar("lets_updates")

    # ---- hooks (called by the optimizer's hooks inside the step) ----

    def auxiliary_due(self, optimizer):
        """Boolean tensor: does this step update rho?"""
        step = optimizer.iterations
        return ops.logical_and(
            ops.equal(ops.mod(step, self.update_every), 0),
            ops.greater(step, 0),
        )

    def auxiliary_batches(self, optimizer):
        """The validation batch of this step, chosen from the step counter."""
        if self._data is None:
            # Restored from a config (which holds no data): rho stays fixed
            # until `set_validation_data` is called.
            warnings.warn(
                "This LearnedRadius has no validation data (it was restored "
                "from a saved config, which does not hold data), so rho "
                "stays at its current value. Call "
                "`optimizer.radius.set_validation_data((x_val, y_val))` and "
                "`model.make_train_function(force=True)` to learn it again.",
                stacklevel=2,
            )
            return []
        # Consecutive windows of the shuffled data, one per update.
        update = ops.floor_divide(
            ops.cast(optimizer.iterations, "int32"), self.update_every
        )
        return [self._data.window(update, self.batch_size)]

    def on_clean_pass(self, optimizer, loss, grads, auxiliary):
        """Hypergradient at w_t, then the log-rho step (update steps only)."""
        if not auxiliary:
            # No validation data: rho stays fixed.
            self.fresh.assign(ops.zeros(()))
            return
        val_loss, val_grads = auxiliary[0]
        rho_grad, gap = hg.rho_gradient(
            self.objective,
            loss,
            grads,
            val_loss,
            val_grads,
            [ops.convert_to_tensor(dw) for dw in self.dw_drho],
        )
        rho = ops.cast(optimizer.rho, "float32")
        update = ops.logical_and(
            ops.logical_and(
                self.auxiliary_due(optimizer),
                ops.greater(ops.convert_to_tensor(self.fresh), 0.5),
            ),
            ops.isfinite(ops.multiply(rho_grad, rho)),
        )
        rho_grad = ops.where(update, rho_grad, 0.0)
        count = ops.add(ops.convert_to_tensor(self.updates), 1.0)
        new_rho, m, v = hg.rho_step(
            self.rho_step,
            rho,
            rho_grad,
            ops.convert_to_tensor(self.momentum),
            ops.convert_to_tensor(self.velocity),
            count,
            self.learning_rate,
            self.bounds,
        )

        def keep(new, variable):
            return ops.where(update, new, ops.convert_to_tensor(variable))

        optimizer.rho.assign(ops.cast(keep(new_rho, rho), "float32"))
        self.momentum.assign(keep(m, self.momentum))
        self.velocity.assign(keep(v, self.velocity))
        self.updates.assign(keep(count, self.updates))
        self.gap.assign(keep(gap, self.gap))
        self.rho_grad.assign(keep(rho_grad, self.rho_grad))
        # dw/drho refers to the last step only.
        self.fresh.assign(ops.zeros(()))

    def on_adversarial_pass(self, optimizer, grads, grads_adv):
        """Stores dw_{t+1}/drho: `-lr (g_adv - g) / rho` ("secant") or
        `-lr g_adv * g_adv * deps/drho` ("diagonal")."""
        values = hg.dw_drho(
            self.hypergradient,
            grads,
            grads_adv,
            optimizer.rho,
            optimizer.inner_optimizer.learning_rate,
            normalize=getattr(optimizer, "normalize", True),
        )
        for dw, value in zip(self.dw_drho, values):
            if value is None:
                dw.assign(ops.zeros_like(dw))
            else:
                dw.assign(ops.cast(value, dw.dtype))
        self.fresh.assign(ops.ones(()))

    def log_values(self):
        return {
            "gap": self.gap,
            "rho_grad": self.rho_grad,
            "rho_momentum": self.momentum,
        }

    # ---- config ----

    def get_config(self):
        """The constructor arguments except `validation_data` (not saved)."""
        config = {name: getattr(self, name) for name in _CONFIG}
        config["bounds"] = list(self.bounds)
        return config

    @classmethod
    def from_config(cls, config):
        """Rebuilds the radius without data; see `set_validation_data`."""
        config = dict(config)
        validation_data = config.pop("validation_data", None)
        radius = cls.__new__(cls)
        radius._configure(**config)
        if validation_data is not None:
            radius.set_validation_data(validation_data)
        return radius

    def __repr__(self):
        config = self.get_config()
        del config["seed"]
        n = 0 if self._data is None else self._data.num_samples
        items = ", ".join(f"{k}={v!r}" for k, v in config.items())
        return f"LearnedRadius({items}, samples={n})"
