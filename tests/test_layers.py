"""keras_sam.layers: Stiefel-parametrized Dense and Conv2D, U diag(s)."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_sam
from keras_sam import layers
from keras_sam import manifolds
from tests import reference


def _orthonormality_error(u):
    u = np.asarray(u, dtype=np.float64).reshape(-1, u.shape[-1])
    return np.abs(u.T @ u - np.eye(u.shape[1])).max()


def test_dense_forward_matches_reference():
    rng = np.random.default_rng(0)
    layer = layers.StiefelDense(3, activation="tanh", seed=2)
    x = rng.normal(size=(5, 7)).astype("float32")
    layer.build((None, 7))
    s = rng.normal(size=(3,)).astype("float32")
    b = rng.normal(size=(3,)).astype("float32")
    layer.s.assign(s)
    layer.bias.assign(b)
    u = np.asarray(layer.u)
    assert u.shape == (7, 3)
    assert _orthonormality_error(u) < 1e-5
    expected = reference.stiefel_dense_forward(
        u.astype("float64"), s, b, x.astype("float64"), np.tanh
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(layer(x)), expected, atol=1e-5
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(layer.kernel), u * s, atol=1e-7
    )


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_conv_forward_matches_reference(padding):
    rng = np.random.default_rng(1)
    layer = layers.StiefelConv2D(4, 3, padding=padding, seed=3)
    x = rng.normal(size=(2, 5, 5, 2)).astype("float32")
    layer.build(x.shape)
    s = rng.normal(size=(4,)).astype("float32")
    layer.s.assign(s)
    layer.bias.assign(np.arange(4, dtype="float32"))
    u = np.asarray(layer.u)
    assert u.shape == (3, 3, 2, 4)
    assert _orthonormality_error(u) < 1e-5
    # 'same' with a 3x3 window: one zero row/column on each side.
    xr = np.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]) if padding == "same" else x
    expected = reference.stiefel_conv_forward(
        u.astype("float64"),
        s,
        np.arange(4.0),
        xr,
        padding_left=(1, 1) if padding == "same" else None,
    )
    got = ops.convert_to_numpy(layer(x))
    assert got.shape == layer.compute_output_shape(x.shape)
    np.testing.assert_allclose(
        got.reshape(2, -1, 4), expected, atol=1e-5, rtol=1e-5
    )


def test_u_is_declared_to_rsam_and_s_bias_are_flat():
    model = keras.Sequential(
        [
            keras.Input((4, 4, 3)),
            layers.StiefelConv2D(8, 2, name="conv"),
            keras.layers.Flatten(),
            layers.StiefelDense(5, name="dense"),
        ]
    )
    optimizer = keras_sam.optimizers.RSAM("sgd", rho=0.1, flat_rho=0.01)
    optimizer.build(model.trainable_variables)
    kinds = {
        v.path.split("/", 1)[1]: optimizer.manifold_of(v)
        for v in model.trainable_variables
    }
    assert kinds["conv/u"] == manifolds.Stiefel(metric="canonical")
    assert kinds["dense/u"] == manifolds.Stiefel(metric="canonical")
    for name in ("conv/s", "conv/bias", "dense/s", "dense/bias"):
        assert isinstance(kinds[name], manifolds.Euclidean)


def test_fan_in_below_units_and_bad_arguments():
    with pytest.raises(ValueError, match="fan_in >= units"):
        layers.StiefelDense(5).build((None, 4))
    with pytest.raises(ValueError, match="fan_in >= filters"):
        layers.StiefelConv2D(10, 1).build((None, 4, 4, 3))
    with pytest.raises(ValueError, match="`units`"):
        layers.StiefelDense(0)
    with pytest.raises(ValueError, match="`metric`"):
        layers.StiefelDense(2, metric="fisher")
    with pytest.raises(ValueError, match="`kernel_size`"):
        layers.StiefelConv2D(2, (3, 3, 3))
    with pytest.raises(ValueError, match="`padding`"):
        layers.StiefelConv2D(2, 3, padding="causal")


def test_config_and_keras_round_trip(tmp_path):
    dense = layers.StiefelDense(
        3, activation="relu", use_bias=False, seed=4, retraction="polar"
    )
    clone = layers.StiefelDense.from_config(dense.get_config())
    assert clone.get_config() == dense.get_config()
    conv = layers.StiefelConv2D(
        4, (2, 3), strides=(1, 2), padding="same", dilation_rate=1, seed=5
    )
    assert (
        layers.StiefelConv2D.from_config(conv.get_config()).get_config()
        == conv.get_config()
    )

    model = keras.Sequential(
        [keras.Input((6, 6, 2)), conv, keras.layers.Flatten(), dense]
    )
    x = np.random.default_rng(2).normal(size=(3, 6, 6, 2)).astype("float32")
    path = str(tmp_path / "stiefel.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.layers[0], layers.StiefelConv2D)
    assert isinstance(loaded.layers[-1], layers.StiefelDense)
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
