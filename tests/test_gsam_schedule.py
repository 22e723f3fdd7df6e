"""GSAM's rho under a learning-rate schedule with warmup (issue 26).

rho follows the learning rate between `rho_min` (at `lr_min`) and `rho`
(at `lr_max`); `lr_max` must be the schedule's peak, not its value at step
0, or rho climbs past `rho` during the warmup with nothing said.
"""

import keras
import numpy as np
import pytest

import keras_sam
from keras_sam import _keras_compat
from keras_sam.optimizers._lr_peak import peak_learning_rate

schedules = keras.optimizers.schedules


def _warmup():
    return schedules.CosineDecay(
        0.01, decay_steps=200, warmup_target=0.1, warmup_steps=20
    )


def _gsam(**kwargs):
    return keras_sam.optimizers.GSAM(
        keras.optimizers.SGD(_warmup(), momentum=0.9),
        rho=0.05,
        rho_min=0.01,
        **kwargs,
    )


class _RhoLog(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rho = []

    def on_train_batch_end(self, batch, logs=None):
        self.rho.append(float(logs["rho"]))


def test_lr_max_is_the_warmup_peak():
    assert _gsam().lr_max == pytest.approx(0.1)


def _rho_through_fit(optimizer):
    """rho after each of 24 steps of `fit` (warmup: steps 0-20)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model = keras_sam.SAMModel(base)
    model.compile(optimizer=optimizer, loss="mse")
    log = _RhoLog()
    model.fit(x, y, batch_size=4, epochs=3, verbose=0, callbacks=[log])
    assert len(log.rho) == 24
    return np.asarray(log.rho)


def _assert_within_bounds(rho):
    assert rho.min() >= 0.01 - 1e-6
    assert rho.max() <= 0.05 + 1e-6
    assert rho.max() == pytest.approx(0.05, abs=1e-3)


def test_rho_stays_within_its_bounds_through_fit():
    """Through the warmup and past the peak, rho stays in `[rho_min, rho]`,
    reaching `rho` at the peak learning rate."""
    _assert_within_bounds(_rho_through_fit(_gsam()))


def test_peak_as_lr_max_keeps_rho_within_its_bounds():
    """The fix, through today's API: `lr_max` from `peak_learning_rate`."""
    lr_max = peak_learning_rate(_warmup())
    _assert_within_bounds(_rho_through_fit(_gsam(lr_max=lr_max)))


@pytest.mark.parametrize(
    "learning_rate, peak",
    [
        (0.05, 0.05),
        (_warmup(), 0.1),
        (schedules.CosineDecay(0.1, decay_steps=10), 0.1),
        (
            schedules.CosineDecay(0.2, 10, warmup_target=0.1, warmup_steps=5),
            0.2,
        ),
        (schedules.ExponentialDecay(0.1, 10, 0.5), 0.1),
        (schedules.InverseTimeDecay(0.1, 10, 0.5), 0.1),
        (schedules.CosineDecayRestarts(0.1, 10), 0.1),
        (schedules.PolynomialDecay(0.1, 10, end_learning_rate=0.3), 0.3),
        (schedules.PiecewiseConstantDecay([5, 10], [0.1, 0.3, 0.01]), 0.3),
    ],
)
def test_peak_learning_rate(learning_rate, peak):
    assert peak_learning_rate(learning_rate) == pytest.approx(peak)


def test_peak_of_the_inner_optimizers_schedule():
    optimizer = keras.optimizers.SGD(_warmup(), momentum=0.9)
    rate = _keras_compat.learning_rate_of(optimizer)
    assert peak_learning_rate(rate) == pytest.approx(0.1)


class _Custom(schedules.LearningRateSchedule):
    def __call__(self, step):
        return 0.1 * keras.ops.sin(keras.ops.cast(step, "float32"))


@pytest.mark.parametrize(
    "learning_rate",
    [
        _Custom(),
        lambda: 0.1,
        schedules.ExponentialDecay(0.1, 10, decay_rate=1.5),
        schedules.CosineDecayRestarts(0.1, 10, m_mul=2.0),
    ],
)
def test_unknown_peak_asks_for_lr_max(learning_rate):
    with pytest.raises(ValueError, match="lr_max"):
        peak_learning_rate(learning_rate)
