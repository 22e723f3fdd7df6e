"""Each Keras-private member keras-sam uses (`keras_sam._keras_compat`) still
exists and means what the library takes it to mean on the installed Keras."""

import keras
import numpy as np

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
