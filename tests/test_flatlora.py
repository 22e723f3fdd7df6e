"""Flat-LoRA (Li et al., ICML 2025): the numpy reference, and the optimizer.

`keras_sam.optimizers.FlatLoRA(inner, sigma=0.05, seed=None)` is a one-pass
rule: the gradient of the loss at the merged weights `W + s A B + eps`
(eps drawn per LoRA layer, per step, from a seed; its std per output unit
`sigma ||W'_{:, j}|| / sqrt(fan_in)`, see `tests/reference_flatlora.py`),
applied by the inner optimizer at the unperturbed weights.

The reference's own tests always run. The optimizer's tests skip until
`keras_sam.optimizers.FlatLoRA` exists.

How a test reads the noise an implementation drew, whatever its random
number generator: one LoRA `Dense` of rank r = n (its input width) with an
orthogonal `A`, the batch `x = I_n`, MSE and SGD. Then the update of `B`
determines `eps` exactly (`reference_flatlora.recover_perturbation`), the
draw is `z = eps / std`, and the updates of `A` and the bias must equal the
reference's at that `eps`.
"""

import itertools
import os
import tempfile

import keras
import numpy as np
import pytest

import keras_sam
from tests import reference_flatlora as ref
from tests.conftest import DISTINCT_MODES
from tests.conftest import MODES

FlatLoRA = getattr(keras_sam.optimizers, "FlatLoRA", None)
needs_flatlora = pytest.mark.skipif(
    FlatLoRA is None, reason="keras_sam.optimizers.FlatLoRA not written yet"
)

N = 16  # input width = LoRA rank = batch size of the probe
M = 12  # units
LR = 0.5
SIGMA = 0.1
SCALE = 1.0  # Keras: lora_alpha / rank, lora_alpha defaults to the rank


def probe_weights(seed=0):
    """Frozen kernel tiny next to `s A B`, columns of very different norms.

    Using the unmerged kernel's norms, or row norms instead of column norms,
    would change the noise scale by orders of magnitude.
    """
    rng = np.random.default_rng(seed)
    kernel = 0.01 * rng.normal(size=(N, M))
    bias = 0.1 * rng.normal(size=(M,))
    q, _ = np.linalg.qr(rng.normal(size=(N, N)))  # orthogonal A
    col = np.geomspace(0.1, 10.0, M)  # column norms of A B span 100x
    lora_b = rng.normal(size=(N, M)) * col / np.sqrt(N)
    return kernel, bias, q, lora_b


def probe_data(seed=1):
    rng = np.random.default_rng(seed)
    return np.eye(N, dtype="float32"), rng.normal(size=(N, M)).astype("float32")


def lora_dense(seed=0):
    """`Dense(M)` with LoRA of rank N, weights set from `probe_weights`."""
    model = keras.Sequential([keras.Input((N,)), keras.layers.Dense(M)])
    model.get_layer(index=0).enable_lora(N)
    set_probe(model.get_layer(index=0), seed)
    return model


def frozen_kernel(layer):
    """The layer's own (frozen) kernel variable; `layer.kernel` is merged."""
    return next(v for v in layer.weights if v.path.endswith("/kernel"))


def set_probe(layer, seed=0):
    kernel, bias, a, b = probe_weights(seed)
    frozen_kernel(layer).assign(kernel.astype("float32"))
    layer.bias.assign(bias.astype("float32"))
    layer.lora_kernel_a.assign(a.astype("float32"))
    layer.lora_kernel_b.assign(b.astype("float32"))


def values(layer):
    get = keras.ops.convert_to_numpy
    return {
        "kernel": get(frozen_kernel(layer)).astype("float64"),
        "bias": get(layer.bias).astype("float64"),
        "lora_a": get(layer.lora_kernel_a).astype("float64"),
        "lora_b": get(layer.lora_kernel_b).astype("float64"),
    }


def probe_step(model, x, y):
    """One SGD step on the identity batch; returns (eps, z, before, after)."""
    layer = model.get_layer(index=0)
    before = values(layer)
    model.fit(x, y, batch_size=N, epochs=1, shuffle=False, verbose=0)
    after = values(layer)
    eps = ref.recover_perturbation(
        x, y, before["kernel"], before["bias"], before["lora_a"],
        before["lora_b"], SCALE, after["lora_b"], LR,
    )  # fmt: skip
    merged = ref.merged_kernel(
        before["kernel"], before["lora_a"], before["lora_b"], SCALE
    )
    z = eps / ref.noise_std(merged, SIGMA)
    return eps, z, before, after


def flat_model(sigma=SIGMA, seed=0, mode=None, weights_seed=0):
    """A FlatLoRA model; `mode` defaults to the backend's own compiled mode
    (on torch that is eager: `jit_compile=True` there is `torch.compile`,
    a minute per model)."""
    mode = mode or DISTINCT_MODES[keras.backend.backend()][-1]
    model = keras_sam.SAMModel(lora_dense(weights_seed))
    model.compile(
        optimizer=FlatLoRA(keras.optimizers.SGD(LR), sigma=sigma, seed=seed),
        loss="mse",
        **MODES[mode],
    )
    return model


# ---------------------------------------------------------------------------
# The reference itself


def test_reference_gradients_match_finite_differences():
    kernel, bias, a, b = probe_weights()
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, N))
    y = rng.normal(size=(5, M))
    eps = ref.perturbation(
        ref.merged_kernel(kernel, a, b, SCALE), SIGMA, rng.normal(size=(N, M))
    )
    _, grads = ref.lora_dense_grads(x, y, kernel, bias, a, b, SCALE, eps)
    params = {"lora_a": a, "lora_b": b, "bias": bias}
    h = 1e-6
    for name, value in params.items():
        idx = (0,) * value.ndim
        plus = {k: v.copy() for k, v in params.items()}
        minus = {k: v.copy() for k, v in params.items()}
        plus[name][idx] += h
        minus[name][idx] -= h

        def loss(p):
            return ref.lora_dense_grads(
                x, y, kernel, p["bias"], p["lora_a"], p["lora_b"], SCALE, eps
            )[0]

        numeric = (loss(plus) - loss(minus)) / (2 * h)
        np.testing.assert_allclose(grads[name][idx], numeric, rtol=1e-5)


def test_reference_noise_scale():
    rng = np.random.default_rng(0)
    merged = rng.normal(size=(64, 3)) * np.array([0.1, 1.0, 10.0])
    draws = np.stack(
        [
            ref.perturbation(merged, 0.05, rng.normal(size=merged.shape))
            for _ in range(400)
        ]
    )
    expected = 0.05 * np.linalg.norm(merged, axis=0) / np.sqrt(64)
    np.testing.assert_allclose(draws.std(axis=(0, 1)), expected, rtol=0.03)
    # the variance added to an output does not grow with the input width
    assert ref.noise_std(np.ones((4, 1)), 1.0) == ref.noise_std(
        np.ones((400, 1)), 1.0
    )
    # EinsumDense: kernel (in, heads, head_dim), input axis 0
    k = rng.normal(size=(8, 2, 4))
    np.testing.assert_allclose(
        ref.noise_std(k, 0.5, in_axes=(0,))[0],
        0.5 * np.linalg.norm(k, axis=0) / np.sqrt(8),
    )


def test_reference_sigma_schedule():
    assert ref.sigma_at(0, 0.05, 100) == 0.0
    assert ref.sigma_at(100, 0.05, 100) == pytest.approx(0.05)
    assert ref.sigma_at(50, 0.05, 100) == pytest.approx(0.025)
    steps = [ref.sigma_at(t, 0.05, 100) for t in range(101)]
    assert all(b >= a for a, b in itertools.pairwise(steps))


def test_reference_recovers_its_own_noise():
    kernel, bias, a, b = probe_weights()
    x, y = probe_data()
    x, y = x.astype("float64"), y.astype("float64")
    z = np.random.default_rng(5).normal(size=(N, M))
    (_, _, b_new), (eps,) = ref.flat_lora_sgd(
        x, y, kernel, bias, a, b, SCALE, SIGMA, [z], LR, N
    )
    got = ref.recover_perturbation(x, y, kernel, bias, a, b, SCALE, b_new, LR)
    np.testing.assert_allclose(got, eps, atol=1e-10)


def test_reference_sigma_zero_is_lora_sgd():
    kernel, bias, a, b = probe_weights()
    x, y = probe_data()
    z = [np.full((N, M), 1e3)]  # ignored at sigma = 0
    (bias1, a1, b1), _ = ref.flat_lora_sgd(
        x, y, kernel, bias, a, b, SCALE, 0.0, z, LR, N
    )
    _, g = ref.lora_dense_grads(x, y, kernel, bias, a, b, SCALE, 0.0)
    np.testing.assert_allclose(a1, a - LR * g["lora_a"])
    np.testing.assert_allclose(b1, b - LR * g["lora_b"])
    np.testing.assert_allclose(bias1, bias - LR * g["bias"])


# ---------------------------------------------------------------------------
# The optimizer (skips until it exists)


@needs_flatlora
@pytest.mark.parametrize("mode", DISTINCT_MODES[keras.backend.backend()])
def test_step_follows_reference(mode):
    """The drawn eps has the paper's scale; A and bias move as the reference
    says at that eps (gradient at W' + eps, applied at the unperturbed w)."""
    model = flat_model(mode=mode)
    x, y = probe_data()
    eps, z, before, after = probe_step(model, x, y)
    # the draw is standard normal: scale per column of the merged kernel,
    # 1/sqrt(fan_in). Wrong axis or unmerged norms are off by 10-1000x.
    assert abs(z.mean()) < 0.25, z.mean()
    assert 0.8 < z.std() < 1.2, z.std()
    rms = np.sqrt((z**2).mean(axis=0))
    assert rms.max() / rms.min() < 4.0, rms
    _, g = ref.lora_dense_grads(
        x, y, before["kernel"], before["bias"], before["lora_a"],
        before["lora_b"], SCALE, eps,
    )  # fmt: skip
    np.testing.assert_allclose(
        after["lora_a"], before["lora_a"] - LR * g["lora_a"], atol=2e-5
    )
    np.testing.assert_allclose(
        after["bias"], before["bias"] - LR * g["bias"], atol=2e-5
    )
    # the frozen kernel is never written (eps is a value in the pass)
    np.testing.assert_array_equal(after["kernel"], before["kernel"])


@needs_flatlora
def test_fresh_noise_every_step_and_only_lora_layers_perturbed():
    model = flat_model()
    x, y = probe_data()
    _, z1, _, _ = probe_step(model, x, y)
    set_probe(model.get_layer(index=0))
    _, z2, _, _ = probe_step(model, x, y)
    assert np.abs(z1 - z2).max() > 0.1  # a new draw at the next step
    # a model whose only LoRA-free layer is a plain Dense trains as plain SGD
    plain = keras.Sequential([keras.Input((N,)), keras.layers.Dense(M)])
    twin = keras.models.clone_model(plain)
    twin.set_weights(plain.get_weights())
    wrapped = keras_sam.SAMModel(twin)
    wrapped.compile(
        optimizer=FlatLoRA(keras.optimizers.SGD(LR), sigma=1.0, seed=0),
        loss="mse",
    )
    plain.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    for m in (plain, wrapped):
        m.fit(x, y, batch_size=N, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(plain.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


@needs_flatlora
@pytest.mark.parametrize("mode", DISTINCT_MODES[keras.backend.backend()])
def test_sigma_zero_equals_inner_optimizer(mode):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, N)).astype("float32")
    y = rng.normal(size=(64, M)).astype("float32")
    plain = lora_dense()
    plain.compile(
        optimizer=keras.optimizers.Adam(0.01), loss="mse", **MODES[mode]
    )
    base = lora_dense()
    flat = keras_sam.SAMModel(base)
    flat.compile(
        optimizer=FlatLoRA(keras.optimizers.Adam(0.01), sigma=0.0, seed=0),
        loss="mse",
        **MODES[mode],
    )
    for m in (plain, flat):
        m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    # bit for bit in eager; to float32 round-off when compiled (DESIGN 2)
    atol = 0.0 if mode == "eager" else 1e-6
    for a, b in zip(plain.get_weights(), base.get_weights()):
        np.testing.assert_allclose(a, b, atol=atol, rtol=0)


class CountCalls(keras.layers.Layer):
    """Identity layer counting its calls (eager: one per forward pass)."""

    calls = 0

    def call(self, x):
        CountCalls.calls += 1
        return x


def counting_model():
    model = keras.Sequential(
        [keras.Input((N,)), CountCalls(), keras.layers.Dense(M)]
    )
    model.layers[-1].enable_lora(4)
    return model


@needs_flatlora
def test_one_pass_per_step():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(48, N)).astype("float32")
    y = rng.normal(size=(48, M)).astype("float32")

    def passes(model, optimizer):
        model.compile(optimizer=optimizer, loss="mse", run_eagerly=True)
        model.fit(x[:16], y[:16], batch_size=16, verbose=0)  # build
        CountCalls.calls = 0
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        return CountCalls.calls

    plain = passes(counting_model(), keras.optimizers.SGD(0.1))
    flat = passes(
        keras_sam.SAMModel(counting_model()),
        FlatLoRA(keras.optimizers.SGD(0.1), sigma=0.05, seed=0),
    )
    sam = passes(
        keras_sam.SAMModel(counting_model()),
        keras_sam.optimizers.SAM(keras.optimizers.SGD(0.1), rho=0.05),
    )
    assert plain == 3, plain  # three batches
    assert flat == plain, (flat, plain)
    assert sam == 2 * plain, (sam, plain)  # the counter sees SAM's 2 passes


@needs_flatlora
def test_same_seed_same_trajectory():
    rng = np.random.default_rng(2)
    # inputs of scale 0.1: at unit scale, SGD(LR) on the probe's factors
    # (columns of B up to norm 10) diverges to NaN in the first epoch, with
    # or without noise, and NaN weights compare equal for any seed
    x = 0.1 * rng.normal(size=(64, N)).astype("float32")
    y = rng.normal(size=(64, M)).astype("float32")

    def run(seed):
        model = flat_model(sigma=0.5, seed=seed)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        return model.get_weights()

    first, again, other = run(7), run(7), run(8)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert max(np.abs(a - b).max() for a, b in zip(first, other)) > 1e-4


@needs_flatlora
def test_keras_round_trip_and_resume_draws_the_same_noise():
    """After `.keras` save/load the config, the iteration count and so the
    noise of the next step are those of an uninterrupted run.

    Keras merges `s A B` into the kernel when it saves a LoRA layer and
    restarts A (fresh) and B (zeros) on load, so the loaded model predicts
    the same but its factors differ; the probe sets A, B again before the
    step, and what must agree is the draw z.
    """
    rng = np.random.default_rng(2)
    # inputs of scale 0.1, as above: at unit scale two SGD(LR) steps blow
    # the predictions up to ~1e4, where the merged kernel's round-off on
    # save exceeds the absolute tolerance of the comparison below
    x = 0.1 * rng.normal(size=(32, N)).astype("float32")
    y = rng.normal(size=(32, M)).astype("float32")
    xp, yp = probe_data()

    straight = flat_model(seed=11)
    straight.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    stopped = flat_model(seed=11)
    stopped.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    path = os.path.join(tempfile.mkdtemp(), "flat.keras")
    stopped.save(path)
    loaded = keras.saving.load_model(path)

    opt = loaded.optimizer
    assert type(opt).__name__ == "FlatLoRA"
    config = opt.get_config()
    assert config["sigma"] == pytest.approx(SIGMA) and config["seed"] == 11
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 2
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), stopped.predict(x, verbose=0), atol=1e-5
    )
    for model in (straight, loaded):
        set_probe(model.get_layer(index=0))
    _, z_straight, _, _ = probe_step(straight, xp, yp)
    _, z_loaded, _, _ = probe_step(loaded, xp, yp)
    # z = eps / std: eps is read to ~3e-5, the smallest std is 2.5e-3
    np.testing.assert_allclose(z_loaded, z_straight, atol=0.05)


def test_noise_std_matches_reference():
    from keras_sam.optimizers import flatlora

    rng = np.random.default_rng(4)
    for shape, in_axes in [
        ((N, M), (0,)),
        ((8, 2, 4), (0,)),
        ((3, 5, 4), (0, 1)),
    ]:
        merged = rng.normal(size=shape).astype("float32")
        got = flatlora.noise_std(
            keras.ops.convert_to_tensor(merged), 0.3, in_axes
        )
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(got),
            ref.noise_std(merged, 0.3, in_axes),
            rtol=1e-5,
        )


@needs_flatlora
def test_einsum_dense_perturbed_over_its_input_axes():
    from keras_sam.optimizers.flatlora import lora_layers

    layer = keras.layers.EinsumDense("ab,bcd->acd", output_shape=(2, 3))
    base = keras.Sequential(
        [keras.Input((N,)), layer, keras.layers.Reshape((6,))]
    )
    layer.enable_lora(2)
    ((found, kernel, in_axes),) = lora_layers(base)
    assert found is layer and in_axes == (0,)
    assert tuple(kernel.shape) == (N, 2, 3)
    before = keras.ops.convert_to_numpy(kernel).copy()
    model = keras_sam.SAMModel(base)
    model.compile(
        optimizer=FlatLoRA(keras.optimizers.SGD(0.1), sigma=0.5, seed=0),
        loss="mse",
    )
    rng = np.random.default_rng(3)
    x = rng.normal(size=(32, N)).astype("float32")
    y = rng.normal(size=(32, 6)).astype("float32")
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(kernel), before)


@needs_flatlora
def test_batchnorm_statistics_kept_and_frozen_kernel_never_written():
    """The one pass runs at W + eps (handed to it as a value): its
    BatchNorm statistics are the step's, the perturbed kernel is not."""

    def model():
        net = keras.Sequential(
            [
                keras.Input((N,)),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(M),
            ]
        )
        net.layers[-1].enable_lora(4)
        return net

    plain, base = model(), model()
    base.set_weights(plain.get_weights())
    frozen = frozen_kernel(base.layers[-1])
    before = keras.ops.convert_to_numpy(frozen).copy()
    flat = keras_sam.SAMModel(base)
    flat.compile(
        optimizer=FlatLoRA(keras.optimizers.SGD(0.1), sigma=0.5, seed=0),
        loss="mse",
    )
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    rng = np.random.default_rng(3)
    x = 3.0 + rng.normal(size=(48, N)).astype("float32")
    y = rng.normal(size=(48, M)).astype("float32")
    for m in (plain, flat):
        m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    # BatchNorm comes before the LoRA layer: its statistics do not depend
    # on the noise, and must be those of plain training
    bn_plain, bn_flat = plain.layers[0], base.layers[0]
    for a, b in (
        (bn_plain.moving_mean, bn_flat.moving_mean),
        (bn_plain.moving_variance, bn_flat.moving_variance),
    ):
        a, b = keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        assert np.abs(a).max() > 0.1  # they moved
        np.testing.assert_allclose(b, a, atol=1e-5)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(frozen), before)
    lora_b = [
        keras.ops.convert_to_numpy(m.layers[-1].lora_kernel_b)
        for m in (plain, base)
    ]
    assert np.abs(lora_b[0] - lora_b[1]).max() > 1e-4  # the noise acted


@needs_flatlora
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    """Under a mixed policy: sigma = 0 is the inner optimizer (to compute
    round-off), and with noise the frozen float32 kernel is never written."""
    rng = np.random.default_rng(2)
    x = 0.1 * rng.normal(size=(64, N)).astype("float32")
    y = rng.normal(size=(64, M)).astype("float32")
    keras.config.set_dtype_policy(policy)
    try:
        plain = lora_dense()
        plain.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        runs = {}
        for sigma in (0.0, 0.1):
            base = lora_dense()
            model = keras_sam.SAMModel(base)
            model.compile(
                optimizer=FlatLoRA(
                    keras.optimizers.Adam(0.01), sigma=sigma, seed=0
                ),
                loss="mse",
            )
            runs[sigma] = (model, base)
        plain.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        for model, _ in runs.values():
            history = model.fit(
                x, y, batch_size=16, epochs=2, shuffle=False, verbose=0
            )
            assert np.isfinite(history.history["loss"]).all()
    finally:
        keras.config.set_dtype_policy("float32")
    kernel, _, _, _ = probe_weights()
    for a, b in zip(plain.get_weights(), runs[0.0][1].get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)
    noisy = values(runs[0.1][1].get_layer(index=0))
    np.testing.assert_array_equal(noisy["kernel"], kernel.astype("float32"))
