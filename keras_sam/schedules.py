"""When to run the sharpness-aware (two-pass) step, and when a plain one.

A schedule answers, for step `t` (counted by the optimizer's `steps`
variable, saved with it), whether step `t` runs SAM's two passes or one
plain pass:

```
Every(k):        two passes when t % k == 0
LatePhase(t0):   two passes when t >= t0            # Zhou et al. 2025
Random(p, seed): two passes when u(seed, t) < p(t)   # RST, Zhao et al. 2022
Adaptive(T):     two passes when ||g_t||^2 >= mu_t + c_t * sigma_t
                 # AE-SAM, Jiang et al. 2023: mu_t, sigma_t^2 EMAs of ||g||^2
```

`Every`, `LatePhase` and `Random` are decided on the host:
`keras_sam.SAMModel` then compiles one program per kind of step and calls
the one the schedule picks, so a plain step costs what a plain Keras step
costs. `Adaptive`
depends on this step's clean gradient, so it is decided inside the step
(a conditional after the clean pass). With `steps_per_execution > 1` every
schedule is decided inside the step; `Random` draws the same decisions
there (`u` is an integer hash of `(seed, t)` that the host and the graph
compute alike).
"""

import random

import keras
from keras import ops

from keras_sam._validation import check_float
from keras_sam._validation import check_int
from keras_sam._validation import check_positive_int
from keras_sam._validation import check_seed

# The hash behind `Random`: six rounds of add, affine map and cube modulo
# the prime P = 2 (mod 3), each a bijection of Z_P; every product stays
# below 2^31, so int32 arithmetic gives the same numbers everywhere.
_P = 32771
_HALF = 32768


def _mix(parts, mod):
    v = 12345
    for x in parts:
        v = mod(v + x)
        v = mod(v * 24749 + 1013)
        v = mod(mod(v * v) * v)
    return v


def uniform(seed, step):
    """`u(seed, step)` in `[0, 1)` on the host (Python ints)."""
    seed, step = int(seed) % 2**30, int(step)
    parts = [seed % _HALF, seed // _HALF, step % _HALF, step // _HALF, 0, 0]
    return _mix(parts, lambda v: v % _P) / _P


def uniform_in_graph(seed, step):
    """`u(seed, step)` as a float32 tensor; `step` a scalar tensor."""
    seed = int(seed) % 2**30
    step = ops.cast(step, "int32")
    parts = [
        seed % _HALF,
        seed // _HALF,
        ops.mod(step, _HALF),
        ops.floor_divide(step, _HALF),
        0,
        0,
    ]

    def mod(v):
        return ops.mod(ops.cast(v, "int32"), _P)

    return ops.divide(ops.cast(_mix(parts, mod), "float32"), float(_P))


class Schedule:
    """Base class: decides which steps run the two-pass SAM step.

    Subclasses decide on the host (`two_pass(step)`, with `host = True`)
    or inside the step (`two_pass_in_graph`), where they may read and
    assign the optimizer variables they created in `create_variables`.
    """

    host = True

    def two_pass(self, step):
        """Python bool: does step `step` (an int) run two passes?"""
        raise NotImplementedError

    def two_pass_in_graph(self, step, grad_sq, state):
        """Boolean tensor: the same decision inside the step.

        Args:
            step: the step counter, a scalar tensor.
            grad_sq: `||g||^2` of this step's clean (unscaled) gradient.
            state: the dict of variables from `create_variables`; assign
                their new values.
        """
        return ops.convert_to_tensor(self.two_pass(0))

    @property
    def always(self):
        """True when every step runs two passes (no choice to make)."""
        return False

    def create_variables(self, optimizer):
        """Optimizer variables the schedule keeps (saved with it)."""
        return {}

    def get_config(self):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_sam")
class Every(Schedule):
    """The two-pass step on every `k`-th step (`t % k == 0`), else plain.

    Args:
        k: Integer >= 1. `k=1` is SAM on every step. Defaults to `1`.

    Example:

    >>> optimizer = keras_sam.optimizers.SAM(
    ...     "sgd", schedule=keras_sam.schedules.Every(5))
    """

    def __init__(self, k=1):
        self.k = check_positive_int("k", k)

    @property
    def always(self):
        return self.k == 1

    def two_pass(self, step):
        return int(step) % self.k == 0

    def two_pass_in_graph(self, step, grad_sq, state):
        step = ops.cast(step, "int32")
        return ops.equal(ops.mod(step, self.k), 0)

    def get_config(self):
        return {"k": self.k}


@keras.saving.register_keras_serializable(package="keras_sam")
class LatePhase(Schedule):
    """Plain steps first, the two-pass step from `start_step` on.

    SAM's gain comes mostly from the end of training: taking its two
    passes only in the late phase keeps most of it at a fraction of the
    cost (Zhou et al.). Decided on the host, like `Every`.

    Args:
        start_step: Integer >= 0, the first step (counted from 0, over the
            whole training, resumed runs included) that runs two passes.
            `0` is SAM on every step.

    Example:

    >>> optimizer = keras_sam.optimizers.SAM(
    ...     "sgd", schedule=keras_sam.schedules.LatePhase(1000))

    References:
        - Zhou, Wang, Lin, Zhang, Sharpness-Aware Minimization Efficiently
          Selects Flatter Minima Late in Training, ICLR 2025.
    """

    def __init__(self, start_step=0):
        self.start_step = check_int("start_step", start_step, minimum=0)

    @property
    def always(self):
        return self.start_step == 0

    def two_pass(self, step):
        return int(step) >= self.start_step

    def two_pass_in_graph(self, step, grad_sq, state):
        return ops.greater_equal(ops.cast(step, "int32"), self.start_step)

    def get_config(self):
        return {"start_step": self.start_step}


@keras.saving.register_keras_serializable(package="keras_sam")
class Random(Schedule):
    """Randomized SAM (RST): two passes with probability `p(t)` per step.

    ```
    two passes at step t  iff  u(seed, t) < p(t)
    ```

    `u(seed, t)` is a deterministic hash of the seed and the step, so the
    decisions are the same on every backend, inside or outside the
    compiled step, and after a `.keras` file is loaded and training
    resumes. `p(t)` is a constant or any Keras schedule of the step
    (`keras.optimizers.schedules`, e.g. `PolynomialDecay` for a linear
    ramp between two probabilities), evaluated on the host.

    Args:
        probability: Float in `[0, 1]`, or a
            `keras.optimizers.schedules.LearningRateSchedule` giving the
            probability at step `t`. Defaults to `0.5`.
        seed: Integer or `None`. `None` draws one when the schedule is
            created; it is stored in the config, so a loaded model keeps
            it. Defaults to `None`.

    Example:

    >>> ramp = keras.optimizers.schedules.PolynomialDecay(
    ...     0.2, decay_steps=1000, end_learning_rate=0.8)
    >>> schedule = keras_sam.schedules.Random(ramp, seed=0)

    References:
        - Zhao, Zhang, Hu, Randomized Sharpness-Aware Training for
          Boosting Computational Efficiency in Deep Learning, 2022.
    """

    def __init__(self, probability=0.5, seed=None):
        if isinstance(probability, dict):
            probability = keras.saving.deserialize_keras_object(probability)
        if not isinstance(
            probability, keras.optimizers.schedules.LearningRateSchedule
        ):
            probability = check_float(
                "probability", probability, 0.0, 1.0, high_open=False
            )
        self.probability = probability
        seed = check_seed(seed)
        if seed is None:
            seed = random.randrange(2**30)
        self.seed = check_int("seed", seed, minimum=0)

    def _p(self, step):
        if isinstance(self.probability, float):
            return self.probability
        return self.probability(step)

    def two_pass(self, step):
        p = self._p(int(step))
        if not isinstance(p, float):
            p = float(ops.convert_to_numpy(p))
        return uniform(self.seed, step) < p

    def two_pass_in_graph(self, step, grad_sq, state):
        p = ops.cast(self._p(ops.cast(step, "float32")), "float32")
        return ops.less(uniform_in_graph(self.seed, step), p)

    def get_config(self):
        probability = self.probability
        if not isinstance(probability, float):
            probability = keras.saving.serialize_keras_object(probability)
        return {"probability": probability, "seed": self.seed}


@keras.saving.register_keras_serializable(package="keras_sam")
class Adaptive(Schedule):
    """AE-SAM: two passes where the gradient norm says the region is sharp.

    The squared norm of the clean gradient is compared with its running
    mean and standard deviation (exponential moving averages, kept as
    optimizer variables and saved):

    ```
    x_t       = ||g_t||^2                        # clean, unscaled gradient
    mu_t      = delta * mu_{t-1} + (1 - delta) * x_t
    sigma2_t  = delta * sigma2_{t-1} + (1 - delta) * (x_t - mu_t)^2
    c_t       = lambda_1 * t / T + lambda_2 * (1 - t / T)   # t <= T
    two passes at step t  iff  x_t >= mu_t + c_t * sqrt(sigma2_t)
    ```

    The threshold moves linearly from `lambda_2` standard deviations above
    the mean at the start to `lambda_1` at step `T = total_steps`, so SAM
    steps grow more frequent as training goes on (with the defaults, from
    about 16% to 84% of the steps for a normal `x`). The decision needs
    this step's gradient, so it is taken inside the step, after the clean
    pass; a non-finite clean gradient leaves the statistics unchanged.

    Args:
        total_steps: Integer >= 1, `T`: the number of training steps over
            which `c_t` moves from `lambda_2` to `lambda_1` (it stays at
            `lambda_1` after).
        decay: Float in `[0, 1)`, `delta`, the decay of the moving
            averages. Defaults to `0.9`.
        lambda_1: Float, the threshold (in standard deviations) at the end.
            Defaults to `-1.0`.
        lambda_2: Float, the threshold at the start. Defaults to `1.0`.

    Example:

    >>> schedule = keras_sam.schedules.Adaptive(total_steps=10 * 390)

    References:
        - Jiang, Yang, Zhang, Kwok, An Adaptive Policy to Employ
          Sharpness-Aware Minimization, ICLR 2023.
    """

    host = False

    def __init__(self, total_steps, decay=0.9, lambda_1=-1.0, lambda_2=1.0):
        self.total_steps = check_positive_int("total_steps", total_steps)
        self.decay = check_float("decay", decay, 0.0, 1.0)
        self.lambda_1 = check_float("lambda_1", lambda_1)
        self.lambda_2 = check_float("lambda_2", lambda_2)

    def two_pass(self, step):
        raise ValueError(
            "`Adaptive` decides from the gradient of each step, inside the "
            "step; it cannot be decided on the host."
        )

    def create_variables(self, optimizer):
        def scalar(name):
            return optimizer.add_variable(
                shape=(),
                initializer="zeros",
                dtype="float32",
                aggregation="only_first_replica",
                name=name,
            )

        return {
            "mean": scalar("grad_sq_mean"),
            "variance": scalar("grad_sq_variance"),
        }

    def threshold_scale(self, step):
        """c_t, the threshold in standard deviations at step `step`."""
        fraction = ops.minimum(
            ops.divide(ops.cast(step, "float32"), float(self.total_steps)),
            1.0,
        )
        return ops.add(
            ops.multiply(fraction, self.lambda_1),
            ops.multiply(ops.subtract(1.0, fraction), self.lambda_2),
        )

    def two_pass_in_graph(self, step, grad_sq, state):
        delta = self.decay
        x = ops.cast(grad_sq, "float32")
        mean = ops.add(ops.multiply(state["mean"], delta), (1 - delta) * x)
        variance = ops.add(
            ops.multiply(state["variance"], delta),
            ops.multiply(1 - delta, ops.square(ops.subtract(x, mean))),
        )
        state["mean"].assign(mean)
        state["variance"].assign(variance)
        threshold = ops.add(
            mean, ops.multiply(self.threshold_scale(step), ops.sqrt(variance))
        )
        return ops.greater_equal(x, threshold)

    def get_config(self):
        return {
            "total_steps": self.total_steps,
            "decay": self.decay,
            "lambda_1": self.lambda_1,
            "lambda_2": self.lambda_2,
        }


def get(identifier):
    """A schedule from an instance, a config dict or `None` (every step)."""
    if identifier is None:
        return Every(1)
    if isinstance(identifier, Schedule):
        return identifier
    if isinstance(identifier, dict):
        schedule = keras.saving.deserialize_keras_object(identifier)
        if isinstance(schedule, Schedule):
            return schedule
    raise TypeError(
        "`schedule` must be a `keras_sam.schedules` object (`Every`, "
        f"`LatePhase`, `Random`, `Adaptive`) or its config. Received: "
        f"schedule={identifier!r}"
    )
