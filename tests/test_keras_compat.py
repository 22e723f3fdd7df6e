"""Each Keras-private member keras-sam uses (`keras_sam._keras_compat`) still
exists and means what the library takes it to mean on the installed Keras."""

import keras
import numpy as np
import pytest

from keras_sam import _keras_compat as compat


def _built_sgd(variables, **kwargs):
    optimizer = keras.optimizers.SGD(0.1, **kwargs)
    optimizer.build(variables)
    return optimizer


def _variables():
    return [keras.Variable(np.ones((2, 3))), keras.Variable(np.zeros((3,)))]


def test_own_variables_are_the_optimizers_own():
    optimizer = _built_sgd(_variables(), momentum=0.9)
    own = compat.own_variables(optimizer)
    assert list(own) == list(optimizer.variables)
    assert any(v is optimizer.iterations for v in own)


def test_variable_index_finds_the_slot():
    variables = _variables()
    optimizer = _built_sgd(variables, momentum=0.9)
    for i, v in enumerate(variables):
        assert compat.variable_index(optimizer, v) == i
        assert optimizer.momentums[i].shape == v.shape


def test_built_variables_are_the_trainable_ones():
    variables = _variables()
    optimizer = _built_sgd(variables)
    assert [id(v) for v in compat.built_variables(optimizer)] == [
        id(v) for v in variables
    ]


def test_adam_first_moments_are_the_first_moment():
    variables = _variables()
    for cls in (keras.optimizers.Adam, keras.optimizers.AdamW):
        optimizer = cls(0.1, beta_1=0.5)
        optimizer.build(variables)
        moments = compat.adam_first_moments(optimizer)
        assert len(moments) == len(variables)
        optimizer.apply([keras.ops.ones(v.shape) for v in variables])
        # m = beta_1 * 0 + (1 - beta_1) * g
        np.testing.assert_allclose(moments[0].numpy(), 0.5)


def _compiled_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def test_all_layers_finds_layers_held_as_attributes():
    class Holder(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.inner = keras.layers.Dense(2)

        def call(self, x):
            return self.inner(x)

    holder = Holder()
    inner_model = keras.Sequential([keras.Input((3,)), holder])
    model = keras.Sequential([keras.Input((3,)), inner_model])
    layers = compat.all_layers(model)
    assert any(layer is holder.inner for layer in layers)
    assert any(layer is holder for layer in layers)
    assert not any(layer is model for layer in layers)


def test_symbolic_build_builds_the_optimizer():
    model = _compiled_model()
    assert not model.optimizer.built
    data = (np.ones((4, 3), "float32"), np.ones((4, 2), "float32"))
    compat.symbolic_build(model, data)
    assert model.optimizer.built
    assert hasattr(keras.Model, "_symbolic_build")


def test_note_batch_before_build_sees_the_batch():
    noted = []

    class Noting(keras.Sequential):
        pass

    compat.note_batch_before_build(
        Noting, lambda model, it, batch: noted.append(batch) or batch
    )
    model = Noting([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((4, 3)), np.ones((4, 2)), batch_size=4, verbose=0)
    assert noted  # called before Keras' build, with or without the batch


def test_distribute_strategy_and_compiled_loss():
    model = _compiled_model()
    strategy = compat.distribute_strategy(model)
    assert strategy is None or hasattr(strategy, "scope")
    loss = compat.compiled_loss(model)
    assert getattr(model, compat.COMPILED_LOSS) is loss
    value = loss(np.ones((2, 2), "float32"), np.zeros((2, 2), "float32"))
    assert float(value) == 1.0


def test_make_train_function_as_uses_the_given_step():
    model = _compiled_model()
    called = []

    def train_step(*args):
        called.append(1)
        return type(model).train_step(model, *args)

    x, y = np.ones((4, 3), "float32"), np.ones((4, 2), "float32")
    compat.symbolic_build(model, (x, y))
    function = compat.make_train_function_as(model, train_step)
    assert "train_step" not in model.__dict__
    model.train_function = function
    model.train_on_batch(x, y)
    if keras.backend.backend() == "jax":
        # JAX jits the step it is built with: a program per step function
        # (the other trainers look `train_step` up when they trace).
        assert called


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

    with compat.batchnorm_moments(moments):
        y = keras.ops.convert_to_numpy(layer(x, training=True))
    # Normalized with mean 0, variance 1: x / sqrt(1 + eps) (gamma 1, beta 0).
    np.testing.assert_allclose(y, x / np.sqrt(1 + layer.epsilon), atol=1e-6)
    mean = keras.ops.convert_to_numpy(seen[0][0])
    np.testing.assert_allclose(mean, x.mean(axis=0), atol=1e-6)
    assert vars(keras.layers.BatchNormalization)["_moments"] is own
    with pytest.raises(RuntimeError):
        with compat.batchnorm_moments(moments):
            raise RuntimeError("inside")
    assert vars(keras.layers.BatchNormalization)["_moments"] is own
    # Outside the context, the batch's own statistics again.
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    z = (x - x.mean(0)) / np.sqrt(x.var(0) + layer.epsilon)
    np.testing.assert_allclose(y, z, atol=1e-5)


def test_batchnorm_reduction_axes():
    """`BatchNormalization._reduction_axes`: every axis but the features,
    non-negative, the batch axis 0 first."""
    assert compat.batchnorm_reduction_axes(_batchnorm((2, 3, 5))) == (
        0,
        1,
    )
    layer = keras.layers.BatchNormalization(axis=1)
    layer.build((2, 3, 5))
    assert compat.batchnorm_reduction_axes(layer) == (0, 2)


def test_learning_rate_of_an_optimizer():
    """`Optimizer._learning_rate`: the schedule object itself, or the
    variable of a constant learning rate."""
    schedule = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=10)
    optimizer = keras.optimizers.SGD(schedule)
    assert compat.learning_rate_of(optimizer) is schedule
    optimizer = keras.optimizers.SGD(0.25)
    rate = compat.learning_rate_of(optimizer)
    assert float(keras.ops.convert_to_numpy(rate)) == 0.25
