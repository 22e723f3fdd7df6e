"""Drop-in fidelity: `SAMModel` behaves like the model it wraps (issue 15).

Each test is a reproducer of a way the wrapper differed from the wrapped
model (or accepted what it cannot run), asserting the right behaviour.
"""

import os

import keras
import numpy as np
import pytest

import keras_sam
from keras_sam import optimizers
from tests.conftest import BACKEND

D_IN, D_OUT, N = 4, 1, 32
EAGER = {"run_eagerly": True, "jit_compile": False}


def _data(n=N, d_in=D_IN, d_out=D_OUT, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)).astype("float32")
    y = rng.normal(size=(n, d_out)).astype("float32")
    return x, y


def _mlp(d_in=D_IN):
    return keras.Sequential(
        [
            keras.Input((d_in,)),
            keras.layers.Dense(6, activation="tanh", name="hidden"),
            keras.layers.Dense(D_OUT, name="dense"),
        ]
    )


def _numpy(values):
    return [np.asarray(keras.ops.convert_to_numpy(v)) for v in values]


def _assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


# ---- 1. build ----


class Subclassed(keras.Model):
    """No `build` of its own: Keras builds it by running it."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.out = keras.layers.Dense(D_OUT)

    def call(self, inputs):
        return self.out(self.hidden(inputs))


@pytest.mark.parametrize("kind", ["sequential", "subclassed"])
def test_build_builds_the_wrapped_model_and_it_trains(kind):
    if kind == "sequential":
        base = keras.Sequential(
            [keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
        )
    else:
        base = Subclassed()
    model = keras_sam.SAMModel(base)
    model.build((None, 64))
    assert base.built and model.built
    assert len(model.trainable_variables) == 4
    assert model.count_params() == base.count_params() == 64 * 8 + 8 + 9
    x, y = _data(d_in=64)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    before = _numpy(base.trainable_variables)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    after = _numpy(base.trainable_variables)
    assert all(not np.array_equal(a, b) for a, b in zip(after, before))


def test_build_of_an_unbuilt_model_needs_a_shape():
    model = keras_sam.SAMModel(keras.Sequential([keras.layers.Dense(1)]))
    with pytest.raises(ValueError, match="input_shape=None"):
        model.build()


# ---- 2. the wrapped model's own compute_loss ----


class ExtraTerm(keras.Model):
    """Adds a constant (123) and, optionally, a weight penalty."""

    def __init__(self, penalty=0.0, **kwargs):
        super().__init__(**kwargs)
        self.penalty = penalty
        self.dense = keras.layers.Dense(D_OUT)

    def call(self, inputs):
        return self.dense(inputs)

    def _terms(self):
        kernel = self.dense.kernel
        return 123.0 + self.penalty * keras.ops.sum(kernel * kernel)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        loss = super().compute_loss(
            x, y, y_pred, sample_weight, training=training
        )
        return loss + self._terms()


class ExtraTermWithoutTraining(ExtraTerm):
    """An override written before Keras 3.3 added `training`."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None):
        loss = keras.Model.compute_loss(self, x, y, y_pred, sample_weight)
        return loss + self._terms()


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
def test_the_wrapped_models_compute_loss_is_minimized(eager):
    x, y = _data()
    base = ExtraTerm()
    base(x[:1])
    mse = float(np.mean((base.predict(x, verbose=0) - y) ** 2))
    model = keras_sam.SAMModel(base, rho=0.05)
    kwargs = EAGER if eager else {}
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", **kwargs)
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["loss"] == pytest.approx(123.0 + mse, rel=1e-5)
    evaluated = model.evaluate(x, y, batch_size=N, verbose=0)
    assert evaluated == pytest.approx(123.0 + mse, rel=1e-5)
    # The wrapped model is left as it was: not compiled.
    assert not base.compiled


def test_an_override_without_training_argument_is_used():
    x, y = _data()
    base = ExtraTermWithoutTraining()
    base(x[:1])
    mse = float(np.mean((base.predict(x, verbose=0) - y) ** 2))
    model = keras_sam.SAMModel(base)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", **EAGER)
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["loss"] == pytest.approx(123.0 + mse, rel=1e-5)


def test_the_custom_terms_reach_the_gradient():
    # A large weight penalty only in the wrapped model's compute_loss: SAM
    # must shrink the kernel much more than without it.
    x, y = _data()

    def kernel_norm(penalty):
        keras.utils.set_random_seed(3)
        base = ExtraTerm(penalty=penalty)
        base(x[:1])
        model = keras_sam.SAMModel(base, rho=0.01)
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        model.fit(x, y, batch_size=8, epochs=3, verbose=0)
        return float(np.linalg.norm(_numpy([base.dense.kernel])[0]))

    assert kernel_norm(10.0) < 0.5 * kernel_norm(0.0)


# ---- 3. a wrapped train_step is refused ----


def test_a_wrapped_model_with_its_own_train_step_is_refused():
    class OwnStep(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, inputs):
            return self.dense(inputs)

        def train_step(self, *args, **kwargs):
            return super().train_step(*args, **kwargs)

    with pytest.raises(TypeError, match="train_step") as info:
        keras_sam.SAMModel(OwnStep())
    message = str(info.value)
    assert "silently ignored" in message and "compute_loss" in message
    assert "OwnStep" in message


# ---- 4. weights files in the wrapped model's layout ----


def test_weights_file_of_the_sam_model_loads_into_the_bare_model(tmp_path):
    x, y = _data()
    model = keras_sam.SAMModel(_mlp())
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    path = os.path.join(tmp_path, "ckpt.weights.h5")
    checkpoint = keras.callbacks.ModelCheckpoint(path, save_weights_only=True)
    model.fit(x, y, batch_size=8, verbose=0, callbacks=[checkpoint])
    bare = _mlp()
    bare.load_weights(path)
    _assert_same(bare.get_weights(), model.get_weights())
    np.testing.assert_allclose(
        bare.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )


def test_weights_file_of_the_bare_model_loads_into_the_sam_model(tmp_path):
    bare = _mlp()
    bare.set_weights([w + 1.0 for w in bare.get_weights()])
    path = os.path.join(tmp_path, "bare.weights.h5")
    bare.save_weights(path)
    model = keras_sam.SAMModel(_mlp())
    model.load_weights(path)
    _assert_same(model.get_weights(), bare.get_weights())


def test_weights_file_restores_the_optimizer_state(tmp_path):
    x, y = _data()

    def make():
        model = keras_sam.SAMModel(_mlp())
        inner = keras.optimizers.SGD(0.1, momentum=0.9)
        model.compile(optimizer=optimizers.SAM(inner, rho=0.1), loss="mse")
        return model

    model = make()
    model.fit(x, y, batch_size=8, verbose=0)
    model.optimizer.rho.assign(0.3)
    path = os.path.join(tmp_path, "m.weights.h5")
    model.save_weights(path)
    restored = make()  # built, so compile builds the optimizer
    restored.load_weights(path)
    _assert_same(restored.get_weights(), model.get_weights())
    _assert_same(
        _numpy(restored.optimizer.variables), _numpy(model.optimizer.variables)
    )
    assert int(_numpy([restored.optimizer.iterations])[0]) == 4


# ---- 5. layers, inputs and outputs of the wrapped model ----


def test_get_layer_inputs_and_outputs_are_the_wrapped_models():
    base = _mlp()
    model = keras_sam.SAMModel(base)
    assert model.get_layer("dense") is base.get_layer("dense")
    assert model.get_layer(index=0) is base.get_layer(index=0)
    assert model.get_layer(base.name) is base
    with pytest.raises(ValueError, match="nope"):
        model.get_layer("nope")
    assert model.inputs == base.inputs
    assert model.outputs == base.outputs
    inputs = keras.Input((D_IN,))
    functional = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    wrapped = keras_sam.SAMModel(functional)
    assert wrapped.inputs == functional.inputs
    assert wrapped.outputs == functional.outputs


# ---- 6. positional compile ----


def test_compile_takes_positional_arguments():
    x, y = _data()
    model = keras_sam.SAMModel(_mlp())
    model.compile("sgd", "mse", None, ["mae"])
    assert isinstance(model.optimizer, optimizers.SAM)
    assert model.loss == "mse"
    history = model.fit(x, y, batch_size=8, verbose=0)
    assert "mae" in history.history


# ---- 7. compile is atomic ----


@pytest.mark.parametrize(
    "bad, match",
    [
        (
            {"optimizer": optimizers.RSAM("sgd", manifold={"nope": "sphere"})},
            "nope",
        ),
        ({"optimizer": "sgd", "metrics": "mae"}, "metrics"),
    ],
    ids=["rsam-manifold-key", "keras-argument"],
)
def test_a_failed_compile_keeps_the_previous_one(bad, match):
    x, y = _data()
    model = keras_sam.SAMModel(_mlp())
    inner = keras.optimizers.SGD(0.1, momentum=0.9)
    model.compile(optimizer=optimizers.SAM(inner, rho=0.1), loss="mse")
    model.fit(x, y, batch_size=8, verbose=0)
    optimizer = model.optimizer
    state = _numpy(optimizer.variables)
    with pytest.raises(ValueError, match=match):
        model.compile(loss="mae", **bad)
    assert model.optimizer is optimizer
    _assert_same(_numpy(optimizer.variables), state)
    assert model.loss == "mse"
    assert int(_numpy([optimizer.iterations])[0]) == 4
    history = model.fit(x, y, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert int(_numpy([optimizer.iterations])[0]) == 8


# ---- 8. SAM around a loss-scaled SAM ----


def test_sam_around_a_loss_scaled_sam_is_refused():
    nested = keras.optimizers.LossScaleOptimizer(optimizers.SAM("sgd"))
    with pytest.raises(TypeError, match=r"LossScaleOptimizer\(SAM\(SGD\)\)"):
        optimizers.SAM(nested)


# ---- 9. a config without its inner optimizer ----


def test_config_without_optimizer_key_names_it():
    config = optimizers.SAM("sgd", rho=0.1).get_config()
    del config["optimizer"]
    with pytest.raises(ValueError, match="'optimizer'"):
        optimizers.SAM.from_config(config)
    config = optimizers.RSAM("sgd").get_config()
    del config["optimizer"]
    with pytest.raises(ValueError, match="RSAM.*'optimizer'"):
        optimizers.RSAM.from_config(config)


# ---- 10. LearnedRadius validation data against the model ----


def _radius_model(validation_data, built=True):
    base = _mlp() if built else keras.Sequential([keras.layers.Dense(1)])
    model = keras_sam.SAMModel(base)
    radius = keras_sam.LearnedRadius(validation_data=validation_data)
    return model, optimizers.SAM(keras.optimizers.SGD(0.1), rho=radius)


def test_radius_features_that_do_not_fit_the_model():
    x, y = _data()
    xv, yv = _data(n=16, d_in=D_IN + 1, seed=1)
    model, optimizer = _radius_model((xv, yv))
    with pytest.raises(ValueError, match="LearnedRadius") as info:
        model.compile(optimizer=optimizer, loss="mse")
    assert "validation_data" in str(info.value)
    assert "(16, 5)" in str(info.value)
    assert not model.compiled
    # An unbuilt model: checked when the step builds the optimizer.
    model, optimizer = _radius_model((xv, yv), built=False)
    model.compile(optimizer=optimizer, loss="mse", **EAGER)
    with pytest.raises(ValueError, match=r"LearnedRadius.*\(16, 5\)"):
        model.fit(x, y, batch_size=8, verbose=0)


def test_radius_targets_that_do_not_fit_the_model():
    x, y = _data()
    xv, yv = _data(n=16, d_out=3, seed=1)
    model, optimizer = _radius_model((xv, yv))
    model.compile(optimizer=optimizer, loss="mse")
    with pytest.raises(ValueError, match="LearnedRadius") as info:
        model.fit(x, y, batch_size=8, verbose=0)
    message = str(info.value)
    assert "(16, 3)" in message and "(None, 1)" in message


def test_radius_sparse_labels_are_accepted():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D_IN)).astype("float32")
    y = rng.integers(0, 3, size=(N,))
    base = keras.Sequential(
        [keras.Input((D_IN,)), keras.layers.Dense(3, activation="softmax")]
    )
    radius = keras_sam.LearnedRadius(validation_data=(x[:16], y[:16, None]))
    model = keras_sam.SAMModel(base)
    model.compile(
        optimizer=optimizers.SAM("sgd", rho=radius),
        loss="sparse_categorical_crossentropy",
        **EAGER,
    )
    history = model.fit(x, y, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_radius_unbatched_elements_are_named():
    xv, yv = _data(n=8, seed=1)
    # A generator of samples, not of batches: no leading batch axis.
    with pytest.raises(ValueError, match="unbatched"):
        keras_sam.LearnedRadius(validation_data=zip(xv, yv))
    with pytest.raises(ValueError, match="unbatched"):
        keras_sam.LearnedRadius(validation_data=zip(xv, yv[:, 0]))


def test_radius_unbatched_tf_dataset_is_named():
    if BACKEND != "tensorflow":
        pytest.skip("tf.data is used under the TensorFlow backend only")
    tf = pytest.importorskip("tensorflow")
    xv, yv = _data(n=32, seed=1)
    dataset = tf.data.Dataset.from_tensor_slices((xv, yv))
    with pytest.raises(ValueError, match="unbatched"):
        keras_sam.LearnedRadius(validation_data=dataset)
    radius = keras_sam.LearnedRadius(validation_data=dataset.batch(8))
    assert "samples=32" in repr(radius)
