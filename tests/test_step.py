"""The step written once (keras_sam.step): atomic, and safe with non-finite
values, on every backend."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_sam
from keras_sam import optimizers
from tests import sam_setup
from tests.conftest import BACKEND


class FailOnCall(keras.layers.Layer):
    """Identity that, once armed, raises on its second training call: the
    adversarial pass of the step (the clean pass is the first)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.armed = False
        self.calls = 0

    def call(self, inputs, training=None):
        if training and self.armed:
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom in the adversarial pass")
        return inputs


def _values(variables):
    return [np.array(ops.convert_to_numpy(v)) for v in variables]


def _optimizer(kind, x_val, y_val):
    inner = keras.optimizers.SGD(0.05, momentum=0.9)
    if kind == "sam":
        return optimizers.SAM(inner, rho=0.1)
    if kind == "lets":
        radius = keras_sam.LearnedRadius(
            initial=0.1, learning_rate=0.1, validation_data=(x_val, y_val)
        )
        return optimizers.SAM(inner, rho=radius)
    return optimizers.RSAM(inner, rho=0.1, metric="fisher")


@pytest.mark.parametrize("kind", ["sam", "lets", "fisher"])
def test_exception_in_adversarial_pass_leaves_every_variable(kind):
    x, y = sam_setup.data(32)
    x_val, y_val = sam_setup.data(16, seed=5)
    steps = 3  # good steps first, so momentum and the hooks' state move
    layer = FailOnCall()
    base = keras.Sequential(
        [
            keras.Input((sam_setup.D_IN,)),
            keras.layers.Dense(sam_setup.D_HIDDEN, activation="tanh"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.2),
            layer,
            keras.layers.Dense(sam_setup.D_OUT),
        ]
    )
    model = keras_sam.SAMModel(base)
    model.compile(
        optimizer=_optimizer(kind, x_val, y_val),
        loss="mse",
        metrics=["mae"],
        run_eagerly=True,
    )
    for i in range(steps):
        model.train_on_batch(x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])
    variables = model.variables + model.optimizer.variables
    before = _values(variables)
    assert np.any(_values(model.optimizer.inner_optimizer.variables)[1] != 0)
    layer.armed = True
    with pytest.raises(RuntimeError, match="boom in the adversarial pass"):
        model.train_on_batch(x[24:], y[24:])
    assert layer.calls == 2
    for got, want, v in zip(_values(variables), before, variables):
        np.testing.assert_array_equal(got, want, err_msg=v.path)


def _exp_head(dtype=None):
    return keras.Sequential(
        [
            keras.Input((sam_setup.D_IN,)),
            keras.layers.Dense(4, dtype=dtype),
            keras.layers.Activation("exponential", dtype=dtype),
            keras.layers.Dense(1, dtype=dtype),
        ]
    )


def _weights_finite(model):
    return all(np.all(np.isfinite(w)) for w in _values(model.weights))


@pytest.mark.parametrize(
    "case", ["exponential_head", "huge_rho", "float16_weights"]
)
def test_non_finite_adversarial_pass_skips_the_update(case):
    rng = np.random.default_rng(0)
    x = 0.3 * rng.normal(size=(32, sam_setup.D_IN)).astype("float32")
    y = 0.3 * rng.normal(size=(32, 1)).astype("float32")
    rho = {"exponential_head": 1e3, "huge_rho": 1e6, "float16_weights": 1e4}
    dtype = "float16" if case == "float16_weights" else None
    base = _exp_head(dtype)
    initial = base.get_weights()
    model = keras_sam.SAMModel(base)
    model.compile(
        optimizer=optimizers.SAM(keras.optimizers.SGD(1e-3), rho=rho[case]),
        loss="mse",
    )
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[keras.callbacks.TerminateOnNaN()],
    )
    # Before: inf/NaN in the weights while the logged (clean) loss stayed
    # finite. Now every step is skipped, and counted.
    assert _weights_finite(model)
    assert history.history["adv_nonfinite"][-1] == 8
    assert np.all(np.isfinite(history.history["loss"]))
    assert int(ops.convert_to_numpy(model.sam_optimizer.iterations)) == 0
    for got, want in zip(base.get_weights(), initial):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode_name", ["eager", "compiled"])
def test_skipped_step_leaves_weights_and_optimizer_state(mode_name):
    rng = np.random.default_rng(1)
    x = 0.3 * rng.normal(size=(16, sam_setup.D_IN)).astype("float32")
    y = 0.3 * rng.normal(size=(16, 1)).astype("float32")
    model = keras_sam.SAMModel(_exp_head())
    model.compile(
        optimizer=optimizers.SAM(
            keras.optimizers.SGD(1e-3, momentum=0.9), rho=0.01
        ),
        loss="mse",
        run_eagerly=mode_name == "eager",
    )
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    sam = model.sam_optimizer
    assert int(ops.convert_to_numpy(sam.iterations)) == 2
    variables = model.trainable_variables + sam.inner_optimizer.variables
    before = _values(variables)
    sam.rho.assign(1e6)  # a variable: no retrace, the next step overflows
    logs = model.train_on_batch(x[:8], y[:8], return_dict=True)
    assert logs["adv_nonfinite"] == 1
    for got, want, v in zip(_values(variables), before, variables):
        np.testing.assert_array_equal(got, want, err_msg=v.path)
    sam.rho.assign(0.01)
    model.train_on_batch(x[:8], y[:8])
    assert int(ops.convert_to_numpy(sam.iterations)) == 3


class NormOnce(keras.layers.Layer):
    """Kernel `w` whose output is `sqrt(w - 0.5) x`: finite at w = 1,
    NaN where the ascent takes w below 0.5."""

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(1.0)
        )

    def call(self, x):
        return ops.multiply(ops.sqrt(self.kernel - 0.5), x)


def test_learned_radius_state_never_absorbs_a_non_finite_pass():
    x = np.ones((8, 1), "float32")
    y = np.full((8, 1), 10.0, "float32")
    radius = keras_sam.LearnedRadius(
        initial=1.0, learning_rate=0.1, validation_data=(x, y)
    )
    model = keras_sam.SAMModel(
        keras.Sequential([keras.Input((1,)), NormOnce()])
    )
    model.compile(
        optimizer=optimizers.SAM(keras.optimizers.SGD(1e-4), rho=radius),
        loss="mse",
    )
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert history.history["adv_nonfinite"][-1] == 4
    for v in model.optimizer.variables:
        assert np.all(np.isfinite(ops.convert_to_numpy(v))), v.path
    assert _weights_finite(model)


@pytest.fixture
def mixed_float16():
    keras.config.set_dtype_policy("mixed_float16")
    yield
    keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize("metric", ["identity", "fisher"])
def test_fisher_rsam_trains_under_mixed_float16(metric, mixed_float16):
    x, y = sam_setup.data(256)
    model = keras_sam.SAMModel(sam_setup.mlp(sam_setup.initial_params()))
    model.compile(
        optimizer=optimizers.RSAM(
            keras.optimizers.SGD(0.05), rho=0.05, metric=metric
        ),
        loss="mse",
    )
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    applied = int(ops.convert_to_numpy(model.sam_optimizer.iterations))
    # The loss scale starts at 2**15 and halves on each overflow: a few
    # skipped steps, then training (before: 0 of 64 with "fisher").
    assert applied >= 48, applied
    for v in model.optimizer.variables:
        assert np.all(np.isfinite(ops.convert_to_numpy(v))), v.path


def test_fisher_ema_skips_a_non_finite_clean_pass():
    x, y = sam_setup.data(8)
    x_bad = x.copy()
    x_bad[0, 0] = np.inf
    model = keras_sam.SAMModel(sam_setup.mlp(sam_setup.initial_params()))
    optimizer = keras.optimizers.LossScaleOptimizer(
        optimizers.RSAM(keras.optimizers.SGD(0.05), rho=0.05, metric="fisher")
    )
    model.compile(optimizer=optimizer, loss="mse")
    model.train_on_batch(x, y)
    fisher = [v for v in model.optimizer.variables if "fisher" in v.path]
    before = _values(fisher)
    model.train_on_batch(x_bad, y)
    for got, want in zip(_values(fisher), before):
        np.testing.assert_array_equal(got, want)
    model.train_on_batch(x, y)
    assert all(np.all(np.isfinite(f)) for f in _values(fisher))
    assert not all(
        np.array_equal(a, b) for a, b in zip(_values(fisher), before)
    )


def test_backends_hold_glue_only():
    """The step exists once: the backend modules hold no train step."""
    from keras_sam import backend

    assert not hasattr(backend, "train_step")
    assert BACKEND in ("tensorflow", "jax", "torch")
