"""The peak of a learning rate (schedule): GSAM's `lr_max`.

GSAM lets rho follow the learning rate,

```
rho_t = clip(rho_min + (rho - rho_min) * (lr_t - lr_min) / (lr_max - lr_min),
             rho_min, rho)
```

so that rho is `rho` at the peak learning rate and `rho_min` at `lr_min`.
Taking `lr_max` as the learning rate at step 0 is wrong under a warmup
(the peak comes later: rho would climb past `rho`), so the default
`lr_max` is the schedule's documented peak, and a schedule whose peak is
not known asks for `lr_max` instead of guessing.
"""

import math

import keras
import numpy as np

_schedules = keras.optimizers.schedules


def peak_learning_rate(learning_rate):
    """The largest value `learning_rate` takes over training.

    Args:
        learning_rate: What the inner optimizer was given as its learning
            rate: a float (or scalar tensor / variable), or one of Keras'
            built-in `keras.optimizers.schedules` (exactly that class, not
            a subclass, whose `__call__` may differ).

    Returns:
        A Python float: the value itself for a constant; for a schedule,
        its peak as documented by Keras:

        - `CosineDecay`: `max(initial_learning_rate, warmup_target)` with a
          warmup (`warmup_target` reached after `warmup_steps`), else
          `initial_learning_rate`;
        - `ExponentialDecay`, `InverseTimeDecay`: `initial_learning_rate`
          when they decay (`decay_rate <= 1`, resp. `>= 0`);
        - `CosineDecayRestarts`: `initial_learning_rate` when restarts do
          not grow (`m_mul <= 1`);
        - `PolynomialDecay`: `max(initial_learning_rate,
          end_learning_rate)`;
        - `PiecewiseConstantDecay`: the largest of its `values`.

    Raises:
        ValueError: for any other schedule or callable, or a built-in one
            that grows without bound: pass `lr_max` explicitly.
    """
    if isinstance(learning_rate, _schedules.LearningRateSchedule):
        peak = _schedule_peak(learning_rate)
    elif callable(learning_rate):
        peak = None
    else:
        peak = float(keras.ops.convert_to_numpy(learning_rate))
    if peak is None or not math.isfinite(peak):
        raise ValueError(
            "Cannot tell the peak of this learning rate schedule, which "
            "GSAM needs as `lr_max` (rho is `rho` there): pass `lr_max` "
            "explicitly, e.g. `GSAM(..., lr_max=0.1)`. Received: "
            f"learning_rate={learning_rate!r}"
        )
    return peak


def _schedule_peak(schedule):
    """The peak of a built-in Keras schedule; `None` if not known."""
    kind = type(schedule)
    if kind.__module__.split(".")[0] != "keras":
        return None  # a user's schedule: its peak is not documented
    config = schedule.get_config()
    if kind is _schedules.CosineDecay:
        peak = config["initial_learning_rate"]
        if config.get("warmup_target") is not None and config.get(
            "warmup_steps", 0
        ):
            peak = max(peak, config["warmup_target"])
        return float(peak)
    if kind is _schedules.ExponentialDecay:
        if config["decay_rate"] <= 1:
            return float(config["initial_learning_rate"])
        return None
    if kind is _schedules.InverseTimeDecay:
        if config["decay_rate"] >= 0:
            return float(config["initial_learning_rate"])
        return None
    if kind is _schedules.CosineDecayRestarts:
        if config["m_mul"] <= 1:
            return float(config["initial_learning_rate"])
        return None
    if kind is _schedules.PolynomialDecay:
        return float(
            max(config["initial_learning_rate"], config["end_learning_rate"])
        )
    if kind is _schedules.PiecewiseConstantDecay:
        return float(
            max(np.max(keras.ops.convert_to_numpy(v)) for v in config["values"])
        )
    return None
