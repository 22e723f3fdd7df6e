"""One test per Keras-private member that `keras_sam._keras_compat` uses:
each fails when a Keras release renames the member or changes what it
means, instead of the training step silently changing."""

import keras
import numpy as np
import pytest

from keras_sam import _keras_compat


def _batchnorm(shape):
    layer = keras.layers.BatchNormalization()
    layer.build(shape)
    return layer


def test_batchnorm_moments_are_the_batch_moments():
    """`BatchNormalization._moments(inputs, mask)`: `(mean, variance)`
    of a training call, over every axis but the features."""
    x = np.random.default_rng(0).normal(size=(6, 3, 4)).astype("float32")
    layer = _batchnorm(x.shape)
    assert "_moments" in vars(keras.layers.BatchNormalization)
    mean, variance = layer._moments(keras.ops.convert_to_tensor(x), None)
    mean = keras.ops.convert_to_numpy(mean)
    variance = keras.ops.convert_to_numpy(variance)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1)), atol=1e-6)
    np.testing.assert_allclose(variance, x.var(axis=(0, 1)), atol=1e-6)


def test_batchnorm_moments_replaced_only_within_the_context():
    """A training call takes its statistics from `_moments`: the context
    replaces them (given Keras' own), and restores the method on exit,
    exceptions included."""
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    layer = _batchnorm(x.shape)
    own = vars(keras.layers.BatchNormalization)["_moments"]
    seen = []

    def moments(layer_, inputs, mask, own_moments):
        seen.append(own_moments(inputs, mask))
        return keras.ops.zeros((4,)), keras.ops.ones((4,))

    with _keras_compat.batchnorm_moments(moments):
        y = keras.ops.convert_to_numpy(layer(x, training=True))
    # Normalized with mean 0, variance 1: x / sqrt(1 + eps) (gamma 1, beta 0).
    np.testing.assert_allclose(y, x / np.sqrt(1 + layer.epsilon), atol=1e-6)
    mean = keras.ops.convert_to_numpy(seen[0][0])
    np.testing.assert_allclose(mean, x.mean(axis=0), atol=1e-6)
    assert vars(keras.layers.BatchNormalization)["_moments"] is own
    with pytest.raises(RuntimeError):
        with _keras_compat.batchnorm_moments(moments):
            raise RuntimeError("inside")
    assert vars(keras.layers.BatchNormalization)["_moments"] is own
    # Outside the context, the batch's own statistics again.
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    z = (x - x.mean(0)) / np.sqrt(x.var(0) + layer.epsilon)
    np.testing.assert_allclose(y, z, atol=1e-5)


def test_batchnorm_reduction_axes():
    """`BatchNormalization._reduction_axes`: every axis but the features,
    non-negative, the batch axis 0 first."""
    assert _keras_compat.batchnorm_reduction_axes(_batchnorm((2, 3, 5))) == (
        0,
        1,
    )
    layer = keras.layers.BatchNormalization(axis=1)
    layer.build((2, 3, 5))
    assert _keras_compat.batchnorm_reduction_axes(layer) == (0, 2)


def test_learning_rate_of_an_optimizer():
    """`Optimizer._learning_rate`: the schedule object itself, or the
    variable of a constant learning rate."""
    schedule = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=10)
    optimizer = keras.optimizers.SGD(schedule)
    assert _keras_compat.learning_rate_of(optimizer) is schedule
    optimizer = keras.optimizers.SGD(0.25)
    rate = _keras_compat.learning_rate_of(optimizer)
    assert float(keras.ops.convert_to_numpy(rate)) == 0.25
