"""A new user's first hour (issue 15): data and arguments that are wrong in
the usual ways get a clear error up front, and numerical failures give NaN,
not a `LinAlgError` from deep inside a solver."""

import math
import re
import warnings

import keras
import numpy as np
import pytest

import keras_sam
from keras_sam import sharpness
from keras_sam.callbacks import SharpnessMonitor
from keras_sam.sharpness import compiled

ESTIMATORS = {
    "top_eigenvalue": lambda model, data, **kw: sharpness.top_eigenvalue(
        model, data, max_iter=10, **kw
    ),
    "top_eigenvalue_power": lambda model, data, **kw: sharpness.top_eigenvalue(
        model, data, method="power", max_iter=10, **kw
    ),
    "hessian_trace": lambda model, data, **kw: sharpness.hessian_trace(
        model, data, num_probes=2, **kw
    ),
    "sam_sharpness": lambda model, data, **kw: sharpness.sam_sharpness(
        model, data, **kw
    ),
}


def _model(features=4, activation="tanh"):
    model = keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(3, activation=activation),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def _data(n=16, features=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    return x, y


# ---------------------------------------------------------------------------
# Non-finite data: a ValueError naming `data`, before any work.


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("where", ["x", "y"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_data_is_refused(name, where, bad):
    model = _model()
    x, y = _data()
    (x if where == "x" else y)[3, 0] = bad
    with pytest.raises(ValueError) as info:
        ESTIMATORS[name](model, (x, y))
    message = str(info.value)
    assert "`data` contains non-finite values" in message
    assert f"Received: {where} of batch 0" in message


def test_non_finite_sample_weight_is_refused():
    x, y = _data()
    weight = np.ones(len(x), "float32")
    weight[0] = np.nan
    with pytest.raises(ValueError, match="sample_weight of batch 0"):
        sharpness.top_eigenvalue(_model(), (x, y, weight), max_iter=5)


# ---------------------------------------------------------------------------
# Finite data, non-finite loss: NaN with a warning, never a LinAlgError.


def _diverged_model():
    model = _model()
    weights = model.get_weights()
    weights[0][0, 0] = np.nan
    model.set_weights(weights)
    return model


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_diverged_weights_give_nan_with_a_warning(name):
    model = _diverged_model()
    with pytest.warns(RuntimeWarning, match="is not finite: the loss"):
        value = ESTIMATORS[name](model, _data())
    assert math.isnan(value)


def test_diverged_weights_give_nan_eigenvector():
    hessian = sharpness.Hessian(_diverged_model(), _data())
    with pytest.warns(RuntimeWarning):
        value, vector = hessian.top_eigenvalue(
            max_iter=5, return_eigenvector=True
        )
    assert math.isnan(value)
    shapes = [tuple(v.shape) for v in hessian.variables]
    assert [tuple(v.shape) for v in vector] == shapes


# ---------------------------------------------------------------------------
# Missing targets.


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_missing_targets_are_named(name):
    x, _ = _data()
    with pytest.raises(ValueError) as info:
        ESTIMATORS[name](_model(), x)
    message = str(info.value)
    assert "`data` must include targets" in message
    assert "(x, y)" in message
    assert "y=None" in message


def test_missing_targets_with_a_loss_object_and_in_a_dataset():
    x, _ = _data()
    with pytest.raises(ValueError, match="must include targets"):
        sharpness.top_eigenvalue(
            _model(), x, loss=keras.losses.MeanSquaredError()
        )
    batches = [(x[:8],), (x[8:],)]
    with pytest.raises(ValueError, match="must include targets"):
        sharpness.hessian_trace(_model(), batches, num_probes=1)


def test_a_loss_function_may_ignore_targets():
    # A plain function given as `loss=` decides itself whether it needs y.
    x, _ = _data()

    def loss(y_true, y_pred):
        return keras.ops.sum(keras.ops.square(y_pred))

    value = sharpness.top_eigenvalue(_model(), x, loss=loss, max_iter=20)
    assert math.isfinite(value) and value > 0


# ---------------------------------------------------------------------------
# Input shapes.


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_wrong_feature_count_names_the_shapes(name):
    x, y = _data(features=5)
    with pytest.raises(ValueError) as info:
        ESTIMATORS[name](_model(features=4), (x, y))
    message = str(info.value)
    assert "do not match the model's input shape" in message
    assert "expects (None, 4)" in message
    assert "Received: x of shape (16, 5)" in message


def test_wrong_feature_count_through_sam_model_and_batches():
    model = keras_sam.SAMModel(_model(features=4))
    model.compile(
        optimizer=keras_sam.optimizers.SAM(keras.optimizers.SGD(0.01)),
        loss="mse",
    )
    x, y = _data(features=5)
    with pytest.raises(ValueError, match=re.escape("(8, 5) in batch 0")):
        sharpness.top_eigenvalue(model, (x, y), batch_size=8)
    # The right shape passes, wrapped or not.
    x, y = _data(features=4)
    assert math.isfinite(sharpness.top_eigenvalue(model, (x, y), max_iter=5))


def test_subclassed_model_is_not_shape_checked():
    class Linear(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    model = Linear()
    x, y = _data()
    model(x)
    model.compile(loss="mse")
    assert math.isfinite(sharpness.top_eigenvalue(model, (x, y), max_iter=5))


# ---------------------------------------------------------------------------
# The compiled-function cache stays bounded.


def test_fresh_loss_objects_share_one_compiled_entry():
    model = _model()
    data = _data()
    for _ in range(12):
        sharpness.top_eigenvalue(
            model, data, loss=keras.losses.MeanSquaredError(), max_iter=3
        )
    assert len(compiled._COMPILED[model]) == 1
    # A different config is a different loss.
    sharpness.top_eigenvalue(
        model, data, loss=keras.losses.Huber(delta=0.5), max_iter=3
    )
    assert len(compiled._COMPILED[model]) == 2


def test_fresh_loss_functions_are_bounded():
    model = _model()
    data = _data()
    values = []
    for i in range(compiled.CACHE_SIZE + 4):

        def loss(y_true, y_pred, scale=float(i + 1)):
            return scale * keras.losses.mean_squared_error(y_true, y_pred)

        values.append(sharpness.hessian_trace(model, data, loss, num_probes=1))
        assert len(compiled._COMPILED[model]) <= compiled.CACHE_SIZE
    # Each loss was its own: the trace scales with it.
    np.testing.assert_allclose(
        values, [values[0] * (i + 1) for i in range(len(values))], rtol=1e-4
    )


# ---------------------------------------------------------------------------
# SharpnessMonitor on a run that diverges.


def _diverging_fit(callbacks, epochs=3):
    x, y = _data(n=32)
    x = 100.0 * x
    model = _model(activation=None)
    model.compile(optimizer=keras.optimizers.SGD(1e4), loss="mse")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        history = model.fit(
            x, y, batch_size=32, epochs=epochs, callbacks=callbacks, verbose=0
        )
    return model, history


def test_monitor_logs_nan_when_training_diverges():
    x, y = _data(n=32)
    monitor = SharpnessMonitor((x, y), trace_probes=2, rho=0.05, max_iter=5)
    model, history = _diverging_fit([monitor])
    assert len(history.history["loss"]) == 3
    assert not np.all(np.isfinite(model.get_weights()[0]))
    for key in ("sharpness", "hessian_trace", "sam_sharpness", "eos_ratio"):
        assert math.isnan(history.history[key][-1]), key


def test_monitor_leaves_stopping_to_terminate_on_nan():
    x, y = _data(n=32)
    monitor = SharpnessMonitor((x, y), trace_probes=0, max_iter=5)
    _, history = _diverging_fit(
        [keras.callbacks.TerminateOnNaN(), monitor], epochs=20
    )
    assert len(history.history["loss"]) < 20


def test_monitor_refuses_non_finite_probe_data_when_made():
    x, y = _data()
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite values"):
        SharpnessMonitor((x, y))


# ---------------------------------------------------------------------------
# optimum_shift: `tolerance` is a float, said with its quotes.


@pytest.mark.parametrize(
    "tolerance, received",
    [("1e-4", "tolerance='1e-4'"), (True, "tolerance=True")],
)
def test_optimum_shift_tolerance_type(tolerance, received):
    model = _model()
    x, y = _data()
    with pytest.raises(TypeError) as info:
        keras_sam.optimum_shift(model, (x, y), tolerance=tolerance)
    message = str(info.value)
    assert f"Received: {received}" in message
    assert "`tolerance` must be a finite float > 0.0" in message
