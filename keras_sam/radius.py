"""Learned perturbation radius (LETS): rho learned by a bilevel hypergradient.

The lower level is the sharpness-aware step; the upper level chooses rho so
that the generalization gap after the step is small (DESIGN section 3):

```
F(rho)  = 1/2 * (L_val(w_{t+1}(rho)) - L_train(w_{t+1}(rho)))^2
dF/drho = gap * (grad L_val(w_{t+1}) - grad L_train(w_{t+1})) . dw_{t+1}/drho
dw_{t+1}/drho  = -lr * H(w_t + eps) deps/drho        # exact for SGD
  "secant":   ~= -lr * (g_adv - g) / rho              # (default)
  "diagonal": ~= -lr * g_adv * g_adv * deps/drho      # the paper's
```

with `deps/drho = g / ||g||` (`g` for an unnormalized optimizer). rho then
takes an Adam-normalized step on log rho (default) or the paper's plain
gradient step on rho.

The clean pass of step t+1 already gives the train loss and gradient at
`w_{t+1}`; the only extra work is one validation forward/backward on each
step that updates rho. Everything is written in `keras.ops`; the backend's
train step runs the passes and calls the optimizer's hooks, which delegate
here.
"""

import warnings

import keras
import numpy as np
from keras import ops

from keras_sam._data import validation_arrays
from keras_sam._shapes import check_fits
from keras_sam._shapes import trailing
from keras_sam._validation import check_choice
from keras_sam._validation import check_float
from keras_sam._validation import check_positive_int
from keras_sam._validation import check_seed

# Adam-style normalization of the log-rho step.
_BETA_1 = 0.9
_BETA_2 = 0.999
_EPSILON = 1e-12

_HYPERGRADIENTS = ("secant", "diagonal")
_RHO_STEPS = ("normalized", "plain")
_VALIDATION_MODES = ("training", "inference")


@keras.saving.register_keras_serializable(package="keras_sam")
class LearnedRadius:
    """A perturbation radius learned from held-out data (LETS).

    Pass it as `rho` to a sharpness-aware optimizer. rho then follows a
    hypergradient that shrinks the squared generalization gap measured right
    after each step (the one-step unroll of a bilevel problem):

    ```
    gap     = L_val(w_t) - L_train(w_t)          # after the step from w_{t-1}
    dw/drho = -lr * (g_adv - g) / rho            # "secant", stored at t-1
            = -lr * g_adv * g_adv * g / ||g||    # "diagonal" (the paper's)
    dF/drho = gap * (grad L_val(w_t) - grad L_train(w_t)) . dw/drho
    # rho_step="normalized" (default): Adam on log rho
    d       = rho * dF/drho                      # gradient w.r.t. log rho
    m, v    = Adam moments of d                  # controller state
    rho     = clip(rho * exp(-learning_rate * m_hat / sqrt(v_hat)), bounds)
    # rho_step="plain" (the paper's): gradient descent on rho
    rho     = clip(rho - learning_rate * dF/drho, bounds)
    ```

    The exact one-step derivative is `dw/drho = -lr H(w + eps) deps/drho`.
    `"secant"` replaces `H(w + eps) g/||g||` by the finite difference SAM
    already computed; `"diagonal"` is the paper's approximation of the
    Hessian by the diagonal `g_adv * g_adv` (an empirical-Fisher diagonal at
    `w + eps`), applied to `deps/drho = g / ||g||` (`g` when the optimizer
    has `normalize=False`) whatever the variant (ASAM, RSAM included).
    Neither is exact, and at a large rho neither is a guide (on a digits
    MLP their sign matches the true dF/drho 98-100% of the time at rho
    0.05-0.5, 63% and 38% at rho 2). Measured on digits with label noise
    (`benchmarks/lets_robustness.py`), LETS raises a too-small initial rho
    and recovers most of the accuracy of the best fixed rho, but does not
    lower a too-large one: once the network has collapsed the gap is near
    zero and rho drifts up.

    `lr` is the inner optimizer's current learning rate, so the unroll is
    exact for plain and heavy-ball SGD and approximate for adaptive
    optimizers. The normalized log-rho step divides by the running RMS of
    the hypergradient, so `learning_rate` is roughly how much log rho may
    move per update whatever the scale of the loss (a tiny, noisy
    hypergradient still makes full-size steps); the plain step moves rho
    by `learning_rate * dF/drho`, so its `learning_rate` depends on the
    scale of the loss. The train loss and gradient at `w_t` come from the
    clean pass of step t (training mode); each update costs one validation
    forward/backward on a batch drawn, inside the compiled step, from the
    data given here (cycled through in a fixed shuffled order), by default
    in training mode too, so that dropout and BatchNorm act alike on both
    sides of the gap (its BatchNorm statistics are dropped).

    The state (rho on the optimizer, the finite difference `dw/drho`, the
    moments, the last gap and hypergradient) lives in non-trainable
    optimizer variables: it is saved and restored with the model. The
    validation data is not saved: a restored radius keeps rho fixed (and
    warns) until it is given data again with `set_validation_data`.

    `logs` carry `rho`, `gap` (the last measured gap), `rho_grad` (the last
    hypergradient dF/drho) and `rho_momentum` (the first moment `m`).

    Args:
        initial: Float > 0, the starting radius (within `bounds`).
            Defaults to `0.05`.
        learning_rate: Float >= 0, the step size on log rho. `0` keeps rho
            at `initial` (plain SAM). Defaults to `0.01`.
        validation_data: Held-out data, given once: `(x, y)`,
            `(x, y, sample_weight)` of arrays, or a batched
            `tf.data.Dataset` (or other iterable) yielding such tuples,
            which is read into memory once. Required.
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
    ):
        self._configure(
            initial,
            learning_rate,
            update_every,
            bounds,
            batch_size,
            seed,
            hypergradient,
            rho_step,
            validation_mode,
        )
        self.set_validation_data(validation_data)

    def _configure(
        self,
        initial,
        learning_rate,
        update_every,
        bounds,
        batch_size,
        seed,
        hypergradient="secant",
        rho_step="normalized",
        validation_mode="training",
    ):
        self.hypergradient = check_choice(
            "hypergradient", hypergradient, _HYPERGRADIENTS
        )
        self.rho_step = check_choice("rho_step", rho_step, _RHO_STEPS)
        self.validation_mode = check_choice(
            "validation_mode", validation_mode, _VALIDATION_MODES
        )
        self.initial = check_float("initial", initial, 0.0, low_open=True)
        self.learning_rate = check_float("learning_rate", learning_rate, 0.0)
        self.update_every = check_positive_int("update_every", update_every)
        self.batch_size = check_positive_int("batch_size", batch_size)
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise ValueError(
                "`bounds` must be a pair `(min, max)`. "
                f"Received: bounds={bounds!r}"
            )
        low = check_float("bounds[0]", bounds[0], 0.0, low_open=True)
        high = check_float("bounds[1]", bounds[1], 0.0, low_open=True)
        if not low <= self.initial <= high:
            raise ValueError(
                "`bounds` must satisfy min <= initial <= max. Received: "
                f"bounds={tuple(bounds)!r}, initial={self.initial}"
            )
        self.bounds = (low, high)
        self.seed = check_seed(seed)
        self._data = None
        self._num_samples = 0
        self._optimizer = None
        self._checked = set()

    def set_validation_data(self, validation_data):
        """Reads `validation_data` into memory (shuffled once).

        Call it before the first `fit`: a compiled step keeps the data it
        was traced with (else call `model.make_train_function(force=True)`).
        """
        arrays, n = validation_arrays(validation_data)
        if self.seed is None:
            order = np.random.permutation(n)
        else:
            order = np.random.default_rng(self.seed).permutation(n)
        arrays = keras.tree.map_structure(
            lambda a: None if a is None else ops.convert_to_tensor(a[order]),
            arrays,
        )
        self._data = arrays
        self._num_samples = n
        self._checked = set()

    def check_model(self, model, y=None):
        """Checks the validation data against `model` and, when given, the
        training targets `y` (see `keras_sam._shapes.check_fits`)."""
        if self._data is None:
            return
        key = (id(model), None if y is None else trailing(y))
        if key not in self._checked:
            x_val, y_val, _ = self._data
            check_fits("LearnedRadius", x_val, y_val, model, y)
            self._checked.add(key)

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
        x, y, sample_weight = self._data
        n = self._num_samples
        if self.batch_size >= n:
            return [(x, y, sample_weight)]
        # Consecutive windows of the shuffled data, one per update.
        update = ops.floor_divide(
            ops.cast(optimizer.iterations, "int32"), self.update_every
        )
        start = ops.mod(
            ops.multiply(ops.mod(update, n), self.batch_size % n), n
        )
        index = ops.mod(ops.add(start, ops.arange(self.batch_size)), n)
        return [
            keras.tree.map_structure(
                lambda a: None if a is None else ops.take(a, index, axis=0),
                (x, y, sample_weight),
            )
        ]

    def on_clean_pass(self, optimizer, loss, grads, auxiliary):
        """Hypergradient at w_t, then the log-rho step (update steps only)."""
        if not auxiliary:
            # No validation data: rho stays fixed.
            self.fresh.assign(ops.zeros(()))
            return
        val_loss, val_grads = auxiliary[0]
        gap = ops.subtract(
            ops.cast(val_loss, "float32"), ops.cast(loss, "float32")
        )
        # (grad L_val - grad L_train) . dw/drho, global over all variables.
        dots = [
            ops.sum(
                ops.multiply(
                    ops.subtract(
                        ops.cast(gv, "float32"), ops.cast(g, "float32")
                    ),
                    ops.cast(dw, "float32"),
                )
            )
            for g, gv, dw in zip(grads, val_grads, self.dw_drho)
            if g is not None and gv is not None
        ]
        dot = ops.sum(ops.stack(dots)) if dots else ops.zeros(())
        rho_grad = ops.multiply(gap, dot)
        rho = ops.cast(optimizer.rho, "float32")
        d = ops.multiply(rho_grad, rho)  # dF/d(log rho)
        update = ops.logical_and(
            ops.logical_and(
                self.auxiliary_due(optimizer),
                ops.greater(ops.convert_to_tensor(self.fresh), 0.5),
            ),
            ops.isfinite(d),
        )
        d = ops.where(update, d, 0.0)

        count = ops.add(ops.convert_to_tensor(self.updates), 1.0)
        m = ops.add(
            ops.multiply(_BETA_1, ops.convert_to_tensor(self.momentum)),
            (1 - _BETA_1) * d,
        )
        v = ops.add(
            ops.multiply(_BETA_2, ops.convert_to_tensor(self.velocity)),
            (1 - _BETA_2) * ops.square(d),
        )
        if self.rho_step == "normalized":
            m_hat = ops.divide(m, ops.subtract(1.0, ops.power(_BETA_1, count)))
            v_hat = ops.divide(v, ops.subtract(1.0, ops.power(_BETA_2, count)))
            step = ops.multiply(
                self.learning_rate,
                ops.divide(m_hat, ops.add(ops.sqrt(v_hat), _EPSILON)),
            )
            # Multiplicative in rho: learning_rate = 0 leaves rho bit-exact.
            new_rho = ops.multiply(rho, ops.exp(ops.negative(step)))
        else:
            # The paper's gradient step on rho itself.
            step = ops.multiply(
                self.learning_rate, ops.where(update, rho_grad, 0.0)
            )
            new_rho = ops.subtract(rho, step)
        new_rho = ops.clip(new_rho, self.bounds[0], self.bounds[1])

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
        lr = ops.cast(optimizer.inner_optimizer.learning_rate, "float32")
        pairs = [
            (
                (None, None)
                if g is None or g_adv is None
                else (ops.cast(g, "float32"), ops.cast(g_adv, "float32"))
            )
            for g, g_adv in zip(grads, grads_adv)
        ]
        if self.hypergradient == "secant":
            rho = ops.cast(optimizer.rho, "float32")
            scale = ops.divide(ops.negative(lr), rho)
            values = [
                None if g is None else ops.multiply(ops.subtract(ga, g), scale)
                for g, ga in pairs
            ]
        else:
            # deps/drho = g / ||g|| (normalized) or g (unnormalized).
            scale = ops.negative(lr)
            if getattr(optimizer, "normalize", True):
                squares = [
                    ops.sum(ops.square(g)) for g, _ in pairs if g is not None
                ]
                if squares:
                    norm = ops.sqrt(ops.sum(ops.stack(squares)))
                    scale = ops.divide(scale, ops.add(norm, 1e-12))
            values = [
                (
                    None
                    if g is None
                    else ops.multiply(ops.multiply(ops.square(ga), g), scale)
                )
                for g, ga in pairs
            ]
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
        return {
            "initial": self.initial,
            "learning_rate": self.learning_rate,
            "update_every": self.update_every,
            "bounds": list(self.bounds),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "hypergradient": self.hypergradient,
            "rho_step": self.rho_step,
            "validation_mode": self.validation_mode,
        }

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
        return (
            f"LearnedRadius(initial={self.initial}, "
            f"learning_rate={self.learning_rate}, "
            f"update_every={self.update_every}, bounds={self.bounds}, "
            f"batch_size={self.batch_size}, "
            f"hypergradient={self.hypergradient!r}, "
            f"rho_step={self.rho_step!r}, "
            f"validation_mode={self.validation_mode!r}, "
            f"samples={self._num_samples})"
        )
