"""The contract between the step and a sharpness-aware optimizer.

A sharpness-aware optimizer is a gradient rule. The step
(`keras_sam.step`) hands it a gradient oracle, `grad_at`, and applies the
gradient it answers with, through the inner (stock Keras) optimizer:

```
class Rule(SharpnessAware):
    def gradient(self, grad_at, w):          # a step that sharpness counts in
        g = grad_at(w)                        # the first call is the kept pass
        return grad_at(lambda p, g: p + eps(g))
    def cheap_gradient(self, grad_at, w):    # a step a schedule makes cheap
        return grad_at(w)
```

The contract, in full:

- `gradient(grad_at, w)`: the rule, the true gradient to apply;
- `cheap_gradient(grad_at, w)`: the gradient on a step the schedule leaves
  plain (default `grad_at(w)`);
- `should_perturb(grad_sq)`: a schedule's decision inside the step, from
  `||g||^2` of the clean gradient;
- `count(two_pass, adv_nonfinite)`: the step's bookkeeping (steps, two-pass
  steps, steps whose other passes were non-finite);
- `log_values()`: the scalars for `logs`;
- `host_schedule(steps_per_execution)`: whether `SAMModel` picks each
  step's program on the host.

`grad_at` is `keras_sam._oracle.GradientOracle`: `grad_at(point)`,
`grad_at(point, non_trainable)` (that pass also at other values of
non-trainable variables, e.g. a frozen kernel plus noise; never committed),
`grad_at.pair(a, b, first_batch)` (two independent points, at once where
devices allow), `grad_at.elsewhere(batches, training, due)` (gradients on
other data at w), `grad_at.loss`, `grad_at.variables`,
`grad_at.non_trainable_variables`, `grad_at.state` (the values the step
starts from), `grad_at.batch`.
The rule runs on the optimizer's values: what it `assign`s to its own
variables is its new state, committed with the step (and dropped when a
pass was not finite). Geometry (`keras_sam.optimizers.geometry`) and the
radius (a float, `keras_sam.LearnedRadius`, GSAM's schedule) are parts a
rule holds; schedules (`keras_sam.schedules`) choose between `gradient`
and `cheap_gradient`.

`SharpnessAware` is the wrapper around the inner optimizer (as Keras'
`LossScaleOptimizer` is): its own variables plus the inner optimizer's,
`apply` delegating, `learning_rate` and `iterations` the inner ones.
"""

import contextlib

import keras
from keras import ops

from keras_sam import schedules as sam_schedules
from keras_sam._keras_compat import built_variables
from keras_sam._keras_compat import own_variables
from keras_sam._validation import check_rho
from keras_sam.optimizers.chain import describe
from keras_sam.optimizers.chain import find_optimizer


def get_inner(optimizer):
    if find_optimizer(optimizer, SharpnessAware) is not None:
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


class SharpnessAware(keras.optimizers.Optimizer):
    """A gradient rule around a stock Keras optimizer (see the module)."""

    # Whether the rule spreads its passes over the devices itself (SAMPa),
    # so the step must not run once per replica.
    parallel_passes = False
    # State shaped like a training batch (SAMPa's previous batch), which
    # `SAMModel` builds from a batch's shapes (`build_batch`) before the
    # train function reads the state, and saves (`batch_shapes`).
    keeps_batch = False
    radius = None
    sync_perturbation = False
    num_batch_splits = 1

    def __init__(self, optimizer, rho, name, schedule=None):
        super().__init__(learning_rate=0.0, name=name or self._default_name())
        self.inner_optimizer = get_inner(optimizer)
        self.initial_rho = check_rho(rho)
        self.schedule = (
            sam_schedules.Every(1)
            if schedule is None
            else sam_schedules.get(schedule)
        )
        self._in_step = False
        self.rho = self._scalar("rho", self.initial_rho)
        # Steps whose other passes were non-finite (see `logs`).
        self.adv_nonfinite = self._scalar("adv_nonfinite")
        # Training steps taken, and how many ran two passes: the
        # schedule's clock (saved, so a resumed run takes the same
        # decisions) and `logs["sam_fraction"]`. Float32 counts exactly up
        # to 2^24 steps.
        self.steps = self._scalar("steps")
        self.sam_steps = self._scalar("sam_steps")
        self.schedule_state = self.schedule.create_variables(self)

    def _scalar(self, name, value=0.0):
        return self.add_variable(
            shape=(),
            initializer=keras.initializers.Constant(value),
            dtype="float32",
            aggregation="only_first_replica",
            name=name,
        )

    @classmethod
    def _default_name(cls):
        return cls.__name__.lower()

    # ---- the contract ----

    def gradient(self, grad_at, w):
        """The gradient to apply on a step that sharpness counts in."""
        raise NotImplementedError(
            f"{self.__class__.__name__} must define `gradient(grad_at, w)`."
        )

    def cheap_gradient(self, grad_at, w):
        """The gradient to apply on a step the schedule leaves plain."""
        return grad_at(w)

    def should_perturb(self, grad_sq=None):
        """Boolean tensor: does this step run `gradient`? Decided inside
        the step by the schedule, which may update its statistics from
        `grad_sq`, `||g||^2` of the clean gradient."""
        return self.schedule.two_pass_in_graph(
            self.steps, grad_sq, self.schedule_state
        )

    def count(self, two_pass, adv_nonfinite=None):
        """Counts a step, whether it ran `gradient`, and whether its other
        passes were non-finite."""
        if self.passes_per_step < 2:
            two_pass = False
        self.steps.assign(ops.add(self.steps, 1.0))
        self.sam_steps.assign(
            ops.add(self.sam_steps, ops.cast(two_pass, "float32"))
        )
        if adv_nonfinite is not None:
            self.adv_nonfinite.assign(
                ops.add(self.adv_nonfinite, ops.cast(adv_nonfinite, "float32"))
            )

    def log_values(self):
        """Scalars the step writes into `logs` (read after the update).

        Only what can change: `sam_fraction` under a schedule that skips
        steps, `adv_nonfinite` where there is an adversarial pass (every
        scalar in `logs` is one more device-to-host copy per
        `train_on_batch`, measured at about 0.5 ms on an H200).
        """
        values = {"rho": self.rho}
        if self.passes_per_step > 1:
            values["adv_nonfinite"] = self.adv_nonfinite
        if not self.schedule.always:
            values["sam_fraction"] = ops.divide(
                self.sam_steps, ops.maximum(self.steps, 1.0)
            )
        if self.radius is not None:
            values.update(self.radius.log_values())
        return values

    def host_schedule(self, steps_per_execution=1):
        """Whether the host picks each step's program (two or one pass)."""
        return (
            not self.schedule.always
            and self.schedule.host
            and steps_per_execution == 1
        )

    # Forward/backward passes of `gradient` (for costs and logs).
    passes_per_step = 2

    def batch_shapes(self):
        """`[(shape, dtype), ...]` of state shaped like a training batch."""
        return []

    # ---- wrapper plumbing (mirrors keras.optimizers.LossScaleOptimizer) ----

    def build(self, var_list):
        if self.built:
            return
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return own_variables(self) + self.inner_optimizer.variables

    @property
    def own_variables(self):
        """The variables of this wrapper (rho, counters, the rule's state),
        not of its inner optimizer: what the step may change."""
        return list(own_variables(self))

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
        """Marks the code of a step; `apply` refuses to run outside."""
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
        # The update rule is the inner optimizer's, applied at w.
        self.inner_optimizer.apply(grads, trainable_variables)
        self._after_update(trainable_variables or built_variables(self))

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
