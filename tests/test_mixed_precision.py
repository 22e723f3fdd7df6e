"""Mixed precision: unscaled gradients, skipped non-finite steps.

With `mixed_float16` Keras wraps the compiled optimizer in a
`LossScaleOptimizer` (LSO); a user may also wrap SAM or its inner optimizer
in one. The perturbation must see the unscaled gradient, and a non-finite
clean or adversarial pass must skip the whole step: weights and optimizer
state untouched (the LSO then halves its scale).
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_sam
from keras_sam import optimizers
from tests import reference
from tests import sam_setup
from tests.conftest import BACKEND


@pytest.fixture
def policy(request):
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy("float32")


class NormRecorder(optimizers.SAM):
    """SAM that keeps the norm of the clean gradient its hooks receive."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clean_norm = self.add_variable(
            shape=(), dtype="float32", name="clean_norm"
        )

    def gradient(self, grad_at, w):
        grads = grad_at(w)  # the oracle hands the rule true gradients
        squares = [ops.sum(ops.square(g)) for g in grads if g is not None]
        self.clean_norm.assign(ops.sqrt(ops.sum(ops.stack(squares))))
        return super().gradient(grad_at, w)


@pytest.mark.parametrize(
    "policy", ["mixed_float16", "mixed_bfloat16"], indirect=True
)
def test_gradient_is_unscaled_before_the_norm(policy):
    params = sam_setup.initial_params()
    x, y = sam_setup.data(8)
    optimizer = NormRecorder(keras.optimizers.SGD(0.1), rho=0.05)
    model = keras_sam.SAMModel(sam_setup.mlp(params))
    model.compile(optimizer=optimizer, loss="mse")
    if policy == "mixed_float16":
        # Keras wraps SAM in a LossScaleOptimizer at compile.
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert model.sam_optimizer is optimizer
    sam_setup.fit(model, x, y, batch_size=8)

    _, g = reference.mlp_loss_and_grads(
        params, x.astype("float64"), y.astype("float64")
    )
    norm = np.sqrt(sum(np.sum(gi**2) for gi in g))
    got = float(ops.convert_to_numpy(optimizer.clean_norm))
    # Without unscaling this is 2**15 times larger under mixed_float16.
    np.testing.assert_allclose(got, norm, rtol=2e-2)
    expected = reference.train_sam(
        params,
        sam_setup.batches(x, y, 8),
        reference.mlp_loss_and_grads,
        rho=0.05,
        lr=0.1,
    )
    assert sam_setup.max_difference(sam_setup.weights(model), expected) < 2e-2


@pytest.mark.parametrize("wrap", ["outer", "inner"])
def test_user_wrapped_loss_scaling_is_exact_in_float32(wrap):
    """Power-of-two loss scales cancel exactly, so with float32 compute
    either wrapping follows the reference to float32 round-off."""
    params = sam_setup.initial_params()
    x, y = sam_setup.data(16)
    inner = keras.optimizers.SGD(0.1, momentum=0.9)
    if wrap == "outer":
        optimizer = keras.optimizers.LossScaleOptimizer(
            optimizers.SAM(inner, rho=0.05)
        )
    else:
        optimizer = optimizers.SAM(
            keras.optimizers.LossScaleOptimizer(inner), rho=0.05
        )
    model = keras_sam.SAMModel(sam_setup.mlp(params))
    model.compile(optimizer=optimizer, loss="mse")
    if wrap == "inner" and BACKEND == "jax":
        # The LSO's stateful apply cannot run in the jitted stateless step.
        with pytest.raises(ValueError, match="LossScaleOptimizer\\(SAM"):
            sam_setup.fit(model, x, y, batch_size=8)
        return
    sam_setup.fit(model, x, y, batch_size=8, epochs=2)
    expected = reference.train_sam(
        params,
        sam_setup.batches(x, y, 8, epochs=2),
        reference.mlp_loss_and_grads,
        rho=0.05,
        lr=0.1,
        momentum=0.9,
    )
    assert sam_setup.max_difference(sam_setup.weights(model), expected) < 1e-5


class LogScale(keras.layers.Layer):
    """`y = log(w) x`: finite at w = 0.01, NaN at w - 0.05 (the ascent
    direction when the target is large)."""

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(0.01)
        )

    def call(self, x):
        return ops.multiply(ops.log(self.kernel), x)


def _log_model_state(rho, x):
    model = keras_sam.SAMModel(
        keras.Sequential([keras.Input((1,)), LogScale()])
    )
    inner = keras.optimizers.SGD(1e-4, momentum=0.9)
    # Skipping a non-finite step is the loss-scale optimizer's job (without
    # one, the step behaves as plain Keras): wrap SAM explicitly, so every
    # policy has one (mixed_float16 would get it from compile).
    optimizer = keras.optimizers.LossScaleOptimizer(
        optimizers.SAM(inner, rho=rho)
    )
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, np.full((4, 1), 10.0, "float32"), batch_size=4, verbose=0)
    sam = model.sam_optimizer
    return (
        float(ops.convert_to_numpy(model.trainable_weights[0])),
        [
            float(ops.convert_to_numpy(ops.sum(ops.abs(v))))
            for v in inner.variables
            if "momentum" in v.path
        ],
        int(ops.convert_to_numpy(sam.iterations)),
        model.optimizer,
    )


@pytest.mark.parametrize(
    "policy", ["float32", "mixed_float16", "mixed_bfloat16"], indirect=True
)
@pytest.mark.parametrize("bad_pass", ["clean", "adversarial"])
def test_non_finite_pass_skips_the_step(policy, bad_pass):
    x = np.ones((4, 1), "float32")
    if bad_pass == "clean":
        x[0, 0] = np.inf
    # rho = 0.05 ascends to log(0.01 - 0.05) = NaN: the adversarial pass is
    # non-finite while the clean pass is finite.
    w, momentum, iterations, outer = _log_model_state(0.05, x)
    assert w == pytest.approx(0.01, abs=1e-7)  # untouched, not perturbed
    assert momentum == [0.0]
    assert iterations == 0
    scale = float(ops.convert_to_numpy(outer.dynamic_scale))
    assert scale == 2.0**14  # halved once
    if bad_pass == "adversarial" and policy != "mixed_float16":
        # A radius that stays in the domain trains normally (under
        # mixed_float16 the first steps overflow while the LSO finds its
        # scale).
        w, momentum, iterations, _ = _log_model_state(0.001, x)
        assert abs(w - 0.01) > 1e-4
        assert momentum[0] > 0
        assert iterations == 1


class TiedLM(keras.Model):
    """Embedding, Dense, then the embedding's transpose as the head (a
    tied LM head, as keras-hub's GPT-2): `Embedding` opts out of
    autocasting, so the head's precision depends on the autocast scope its
    caller opened (bfloat16 in plain `fit` on JAX, float32 on TF/torch)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embedding = keras.layers.ReversibleEmbedding(11, 8)
        self.hidden = keras.layers.Dense(8, kernel_initializer="orthogonal")

    def call(self, token_ids):
        hidden = self.hidden(self.embedding(token_ids))
        return ops.cast(self.embedding(hidden, reverse=True), "float32")


@pytest.mark.parametrize("policy", ["mixed_bfloat16"], indirect=True)
def test_forward_runs_in_the_precision_of_plain_fit(policy):
    # The same precision in every pass as plain `fit` on this backend: at
    # rho = 0, SAMModel's weights equal plain training's to the bit.
    tokens = np.random.default_rng(0).integers(0, 11, (8, 5)).astype("int32")
    x, y = tokens, np.roll(tokens, -1, axis=1)
    weights = {}
    for name in ("plain", "sam"):
        keras.utils.set_random_seed(3)
        model = TiedLM()
        model(x[:1])
        optimizer = keras.optimizers.SGD(0.5)
        if name == "sam":
            model = keras_sam.SAMModel(model)
            optimizer = optimizers.SAM(optimizer, rho=0.0)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        weights[name] = [np.asarray(w) for w in model.get_weights()]
    for plain, sam in zip(weights["plain"], weights["sam"]):
        np.testing.assert_array_equal(sam, plain)
