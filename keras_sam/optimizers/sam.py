"""`SAM`: the sharpness-aware optimizer every variant builds on.

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

The two forward/backward passes are `keras_sam.step`; these classes hold the
state (rho, counters) and the math, written in `keras.ops`, and their hooks
assign only their own variables (the step runs them on values).
"""

import contextlib

import keras
from keras import ops

from keras_sam import schedules as sam_schedules
from keras_sam._validation import check_bool
from keras_sam._validation import check_positive_int
from keras_sam._validation import check_rho
from keras_sam.optimizers.chain import describe
from keras_sam.optimizers.chain import find_optimizer
from keras_sam.radius import LearnedRadius

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


def _check_splits(sync_perturbation, num_batch_splits):
    sync_perturbation = check_bool("sync_perturbation", sync_perturbation)
    num_batch_splits = check_positive_int("num_batch_splits", num_batch_splits)
    if sync_perturbation and num_batch_splits > 1:
        raise ValueError(
            "`sync_perturbation=True` perturbs with the gradient of the "
            "whole global batch and cannot be combined with "
            "`num_batch_splits` > 1. Received: sync_perturbation=True, "
            f"num_batch_splits={num_batch_splits}"
        )
    return sync_perturbation, num_batch_splits


def get_inner(optimizer):
    if find_optimizer(optimizer, SAM) is not None:
        raise TypeError(
            "The inner optimizer of a sharpness-aware optimizer must be a "
            "stock Keras optimizer (in a LossScaleOptimizer or not), not "
            "another sharpness-aware optimizer. Received: "
            f"optimizer={describe(optimizer)}"
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
          = rho * g                          # normalize=False
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
            `sam_every`-th step and a plain step (one pass) otherwise:
            shorthand for `schedule=keras_sam.schedules.Every(sam_every)`.
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
        normalize: Boolean. `True` divides the ascent direction by its
            norm (`eps = rho * xi / ||xi||_D`, Foret et al.); `False` takes
            the unnormalized step `eps = rho * xi` of the analysis of
            Behdin and Mazumder (for ASAM `xi = T^2 g`, for RSAM the
            projected `D^-1 g`), so rho is then a step size, not a radius.
            Defaults to `True`.
        name: String, the name of the optimizer. Defaults to `"sam"`.
        schedule: Optional `keras_sam.schedules` object choosing which
            steps run the two passes: `Every(k)`, `Random(p, seed)` (RST)
            or `Adaptive(total_steps)` (AE-SAM). `Every` and `Random` are
            decided on the host, so a plain step runs a program compiled
            for one pass. `logs["sam_fraction"]` is the fraction of
            two-pass steps so far. Defaults to `None` (`Every(sam_every)`).

    Example:

    >>> model = keras_sam.SAMModel(keras.Sequential([keras.layers.Dense(1)]))
    >>> model.compile(
    ...     optimizer=keras_sam.optimizers.SAM(keras.optimizers.SGD(0.1)),
    ...     loss="mse")

    References:
        - Foret et al., Sharpness-Aware Minimization for Efficiently Improving
          Generalization, ICLR 2021.
        - Behdin, Mazumder, On Statistical Properties of Sharpness-Aware
          Minimization: Provable Guarantees, arXiv 2302.11836
          (`normalize=False`).
    """

    # SAMPa's step (two independent gradients) instead of the two-pass step.
    parallel_passes = False
    # Whether optimizer state shaped like a training batch is still to be
    # built (`build_batch`) before the step can run (SAMPa).
    keeps_batch = False

    def batch_shapes(self):
        """`[(shape, dtype), ...]` of state shaped like a training batch
        (none here; see `SAMPa`)."""
        return []

    def __init__(
        self,
        optimizer="sgd",
        rho=0.05,
        sam_every=1,
        name=None,
        sync_perturbation=False,
        num_batch_splits=1,
        normalize=True,
        schedule=None,
    ):
        super().__init__(learning_rate=0.0, name=name or self._default_name())
        self.normalize = check_bool("normalize", normalize)
        self.inner_optimizer = get_inner(optimizer)
        # A LearnedRadius drives the `rho` variable through the step hooks.
        self.radius = rho if isinstance(rho, LearnedRadius) else None
        self.initial_rho = check_rho(
            rho if self.radius is None else self.radius.initial
        )
        self.sam_every = check_positive_int("sam_every", sam_every)
        if schedule is not None and self.sam_every != 1:
            raise ValueError(
                "Give either `sam_every` or `schedule`, not both. Received: "
                f"sam_every={sam_every}, schedule={schedule!r}"
            )
        self.schedule = (
            sam_schedules.Every(self.sam_every)
            if schedule is None
            else sam_schedules.get(schedule)
        )
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
        # Steps whose adversarial gradient was non-finite (see `logs`).
        self.adv_nonfinite = self.add_variable(
            shape=(),
            initializer="zeros",
            dtype="float32",
            aggregation="only_first_replica",
            name="adv_nonfinite",
        )
        # Training steps taken, and how many of them ran two passes: the
        # schedule's clock (saved, so a resumed run takes the same
        # decisions) and `logs["sam_fraction"]`. Float32 counts exactly
        # up to 2^24 steps.
        self.steps = self._counter("steps")
        self.sam_steps = self._counter("sam_steps")
        self.schedule_state = self.schedule.create_variables(self)

    def _counter(self, name):
        return self.add_variable(
            shape=(),
            initializer="zeros",
            dtype="float32",
            aggregation="only_first_replica",
            name=name,
        )

    @classmethod
    def _default_name(cls):
        return cls.__name__.lower()

    # ---- wrapper plumbing (mirrors keras.optimizers.LossScaleOptimizer) ----

    def build(self, var_list):
        if self.built:
            return
        self.inner_optimizer.build(var_list)
        super().build(var_list)
        if self.radius is not None:
            self.radius.build(self, var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    @property
    def own_variables(self):
        """The variables of this wrapper (rho, counters, the hooks' state),
        not of its inner optimizer: what the step's hooks may change."""
        return list(self._variables)

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

    # ---- the schedule: which steps run two passes ----

    # The kind of step this optimizer's programs run: `"two"` and `"one"`
    # passes, chosen by the schedule, or `"single"`, one pass at a point
    # perturbed before it (MomentumSAM).
    single_pass = False

    def host_schedule(self, steps_per_execution=1):
        """Whether the host picks each step's program (two or one pass)."""
        return (
            not self.single_pass
            and not self.schedule.always
            and self.schedule.host
            and steps_per_execution == 1
        )

    def should_perturb(self, grad_sq=None):
        """Boolean tensor: is the current step a two-pass (SAM) step?

        The schedule decided inside the step (it may update its own
        statistics from `grad_sq`, `||g||^2` of the clean gradient).
        """
        return self.schedule.two_pass_in_graph(
            self.steps, grad_sq, self.schedule_state
        )

    def count_step(self, two_pass):
        """Counts a step, and whether it ran two passes."""
        self.steps.assign(ops.add(self.steps, 1.0))
        self.sam_steps.assign(
            ops.add(self.sam_steps, ops.cast(two_pass, "float32"))
        )

    def combine_gradients(self, grads, grads_adv, trainable_variables):
        """The gradient to apply on a two-pass step, from the unscaled
        clean `g` and adversarial `g_adv`; `None` (SAM) applies `g_adv`.
        GSAM returns its surrogate-gap gradient here."""
        return None

    def one_pass_gradients(self, grads, trainable_variables):
        """The gradient to apply on a one-pass step, from the unscaled
        clean `g`; `None` (SAM) applies `g`. LookSAM adds its stored
        direction here."""
        return None

    def perturbation(self, grads, trainable_variables, values=None):
        """eps per variable: `rho * xi / (||xi||_D + 1e-12)`, xi = P(D^-1 g)
        (`rho * xi` with `normalize=False`).

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
        scale = ops.cast(self.rho, "float32")
        if self.normalize:
            norm = ops.sqrt(ops.sum(ops.stack(squares)))
            scale = ops.divide(scale, ops.add(norm, _NORM_EPSILON))
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
        (in the mode `auxiliary_training` names, no state updates) and hands
        them to `on_clean_pass`. Defaults to none.
        """
        if self.radius is not None:
            return self.radius.auxiliary_batches(self)
        return []

    def auxiliary_training(self):
        """Whether the auxiliary passes run in training mode (a Python
        boolean; their model-state updates are dropped). Defaults to
        `False`."""
        if self.radius is not None:
            return self.radius.validation_mode == "training"
        return False

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

    def count_nonfinite(self, flag):
        """Counts a step whose adversarial gradient was non-finite."""
        self.adv_nonfinite.assign(
            ops.add(self.adv_nonfinite, ops.cast(flag, "float32"))
        )

    def log_values(self):
        """Scalars the step writes into `logs` (read after the update).

        Only what can change: `sam_fraction` under a schedule that skips
        steps, `adv_nonfinite` where there is an adversarial pass (every
        scalar in `logs` is one more device-to-host copy per
        `train_on_batch`, measured at about 0.5 ms on an H200).
        """
        values = {"rho": self.rho}
        if not self.single_pass:
            values["adv_nonfinite"] = self.adv_nonfinite
        if not self.schedule.always:
            values["sam_fraction"] = ops.divide(
                self.sam_steps, ops.maximum(self.steps, 1.0)
            )
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
            "normalize": self.normalize,
            "schedule": (
                None
                if self.sam_every != 1
                or (
                    isinstance(self.schedule, sam_schedules.Every)
                    and self.schedule.k == 1
                )
                else keras.saving.serialize_keras_object(self.schedule)
            ),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if "optimizer" not in config:
            raise ValueError(
                f"The config of a `{cls.__name__}` optimizer must hold the "
                "inner optimizer under the key 'optimizer'. Received: "
                f"config with keys {sorted(config)!r}"
            )
        config["optimizer"] = keras.saving.deserialize_keras_object(
            config["optimizer"], custom_objects=custom_objects
        )
        if isinstance(config.get("schedule"), dict):
            config["schedule"] = sam_schedules.get(config["schedule"])
        if isinstance(config.get("rho"), dict):
            config["rho"] = keras.saving.deserialize_keras_object(
                config["rho"], custom_objects=custom_objects
            )
        return cls(**config)
