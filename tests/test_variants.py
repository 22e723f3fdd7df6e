"""Cheap SAM variants (issue 16): schedules, LookSAM, GSAM, MomentumSAM."""

import os
import re

import keras
import numpy as np
import pytest

import keras_sam
from keras_sam import optimizers
from keras_sam import schedules
from tests import reference
from tests import sam_setup as setup
from tests.conftest import BACKEND

N, BATCH, LR = 32, 8, 0.1


def _model(params, sam_optimizer, **compile_kwargs):
    model = keras_sam.SAMModel(setup.mlp(params))
    model.compile(optimizer=sam_optimizer, loss="mse", **compile_kwargs)
    return model


def _sgd(momentum=0.9):
    return keras.optimizers.SGD(LR, momentum=momentum)


def _train(sam_optimizer, epochs=2, **compile_kwargs):
    params = setup.initial_params()
    x, y = setup.data(N)
    model = _model(params, sam_optimizer, **compile_kwargs)
    history = model.fit(
        x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0
    )
    return model, history, params, setup.batches(x, y, BATCH, epochs)


@pytest.mark.parametrize(
    "variant, make, kwargs",
    [
        ("gsam", lambda: optimizers.GSAM(_sgd(), rho=0.1, alpha=0.3), {}),
        (
            "looksam",
            lambda: optimizers.LookSAM(_sgd(), rho=0.1, k=3, alpha=0.7),
            {"k": 3, "alpha": 0.7},
        ),
        ("msam", lambda: optimizers.MomentumSAM(_sgd(), rho=0.3), {}),
    ],
)
def test_matches_numpy_reference(variant, make, kwargs):
    model, _, params, batches = _train(make())
    defaults = {
        "gsam": {"alpha": 0.3, "rho": 0.1},
        "looksam": {"rho": 0.1},
        "msam": {"rho": 0.3},
    }[variant]
    expected = reference.train_variant(
        params,
        batches,
        reference.mlp_loss_and_grads,
        LR,
        0.9,
        variant,
        **{**defaults, **kwargs},
    )
    assert setup.max_difference(setup.weights(model), expected) < 2e-5


@pytest.mark.parametrize(
    "make",
    [
        lambda: optimizers.LookSAM(_sgd(), rho=0.1, k=1),
        lambda: optimizers.GSAM(_sgd(), rho=0.1, alpha=0.0),
    ],
    ids=["looksam_k1", "gsam_alpha0"],
)
def test_reduces_to_sam_exactly(make):
    model, _, _, _ = _train(make())
    sam, _, _, _ = _train(optimizers.SAM(_sgd(), rho=0.1))
    for a, b in zip(setup.weights(model), setup.weights(sam)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "make",
    [
        lambda: optimizers.MomentumSAM(_sgd(), rho=0.0),
        lambda: optimizers.SAM(_sgd(), rho=0.0, sam_every=3),
        lambda: optimizers.SAM(
            _sgd(), rho=0.0, schedule=schedules.Random(0.5, seed=3)
        ),
    ],
    ids=["msam", "every3", "random"],
)
def test_rho_zero_is_the_inner_optimizer(make):
    model, _, params, _ = _train(make())
    plain = setup.mlp(params)
    plain.compile(optimizer=_sgd(), loss="mse")
    x, y = setup.data(N)
    setup.fit(plain, x, y, BATCH, epochs=2)
    assert (
        setup.max_difference(setup.weights(model), setup.weights(plain)) < 1e-6
    )


def test_host_schedule_runs_one_pass_on_plain_steps():
    calls = []

    class CountingDense(keras.layers.Dense):
        def call(self, inputs, training=None):
            if training:
                calls.append(1)
            return super().call(inputs)

    x, y = setup.data(N)
    base = keras.Sequential([keras.Input((setup.D_IN,)), CountingDense(3)])
    model = keras_sam.SAMModel(base)
    model.compile(
        optimizer=optimizers.SAM("sgd", rho=0.1, sam_every=4),
        loss="mse",
        run_eagerly=True,
    )
    history = model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    # 4 steps: one with two passes, three with one; a program per kind.
    assert len(calls) == 4 + 1
    assert set(model.train_function.programs) == {"two", "one"}
    assert history.history["sam_fraction"][-1] == pytest.approx(0.25)


def _random_fraction(seed, p, steps):
    return np.mean([schedules.uniform(seed, t) < p for t in range(steps)])


def test_random_host_and_in_graph_decisions_agree():
    schedule = schedules.Random(0.4, seed=11)
    want = _random_fraction(11, 0.4, 8)
    _, history, _, _ = _train(optimizers.SAM(_sgd(), schedule=schedule))
    assert history.history["sam_fraction"][-1] == pytest.approx(want)
    if BACKEND != "torch":  # torch has no steps_per_execution > 1
        _, history, _, _ = _train(
            optimizers.SAM(_sgd(), schedule=schedules.Random(0.4, seed=11)),
            steps_per_execution=2,
        )
        assert history.history["sam_fraction"][-1] == pytest.approx(want)
    # The hash in the graph gives the host's numbers.
    steps = keras.ops.arange(50)
    u = keras.ops.convert_to_numpy(schedules.uniform_in_graph(11, steps))
    np.testing.assert_allclose(
        u, [schedules.uniform(11, t) for t in range(50)], rtol=1e-6
    )


@pytest.mark.parametrize("variant", ["random", "looksam", "adaptive"])
def test_resume_after_load_repeats_the_run(variant, tmp_path):
    def make():
        if variant == "random":
            return optimizers.SAM(
                _sgd(), schedule=schedules.Random(0.5, seed=2)
            )
        if variant == "looksam":
            return optimizers.LookSAM(_sgd(), k=3)
        return optimizers.SAM(_sgd(), schedule=schedules.Adaptive(6))

    x, y = setup.data(N)
    params = setup.initial_params()
    whole = _model(params, make())
    whole.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    first = _model(params, make())
    first.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    path = os.path.join(tmp_path, "m.keras")
    first.save(path)
    loaded = keras.models.load_model(path)
    history = loaded.fit(
        x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0
    )
    assert (
        setup.max_difference(setup.weights(loaded), setup.weights(whole)) < 1e-6
    )
    assert history.history["sam_fraction"][-1] == pytest.approx(
        float(keras.ops.convert_to_numpy(whole.optimizer.sam_steps)) / 8
    )


def test_adaptive_statistics_match_numpy():
    # lr = 0: the weights stay, so each step's gradient is the batch's
    # gradient at the initial weights.
    params = setup.initial_params()
    x, y = setup.data(N)
    optimizer = optimizers.SAM(
        keras.optimizers.SGD(0.0), schedule=schedules.Adaptive(5)
    )
    model = _model(params, optimizer)
    history = model.fit(
        x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0
    )
    grad_sq = []
    for xb, yb in setup.batches(x, y, BATCH, epochs=2):
        _, g = reference.mlp_loss_and_grads(params, xb, yb)
        grad_sq.append(sum(np.sum(gi**2) for gi in g))
    decisions, mean, variance = reference.adaptive_decisions(grad_sq, 5)
    state = optimizer.schedule_state
    assert float(state["mean"].numpy()) == pytest.approx(mean, rel=1e-4)
    assert float(state["variance"].numpy()) == pytest.approx(variance, rel=1e-3)
    assert history.history["sam_fraction"][-1] == pytest.approx(
        np.mean(decisions)
    )


def test_gsam_rho_follows_the_learning_rate():
    lr = keras.optimizers.schedules.PolynomialDecay(0.1, 8, 0.02)
    optimizer = optimizers.GSAM(
        keras.optimizers.SGD(lr), rho=0.1, rho_min=0.02, lr_min=0.02
    )
    _, history, _, _ = _train(optimizer, epochs=1)
    # rho at the last step (t = 3 of 4): lr_3 = 0.1 - 0.08 * 3/8.
    lr_3 = 0.1 - 0.08 * 3 / 8
    want = 0.02 + (0.1 - 0.02) * (lr_3 - 0.02) / (0.1 - 0.02)
    assert history.history["rho"][-1] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize(
    "inner, shown",
    [
        (lambda: keras.optimizers.SGD(0.1), "SGD(momentum=0.0)"),
        (lambda: keras.optimizers.RMSprop(), "RMSprop"),
    ],
)
def test_momentum_sam_needs_a_momentum(inner, shown):
    with pytest.raises(ValueError, match=re.escape(shown)):
        optimizers.MomentumSAM(inner())


def test_momentum_sam_with_adam_fits():
    optimizer = optimizers.MomentumSAM(keras.optimizers.Adam(0.01), rho=0.5)
    _, history, _, _ = _train(optimizer, epochs=2)
    assert np.isfinite(history.history["loss"]).all()
    # One pass per step, no adversarial pass: only rho is logged.
    assert "sam_fraction" not in history.history
    assert "adv_nonfinite" not in history.history


@pytest.mark.parametrize(
    "make",
    [
        lambda: optimizers.LookSAM(_sgd(), rho=0.1, k=4, alpha=0.5),
        lambda: optimizers.GSAM(_sgd(), rho=0.1, alpha=0.2, rho_min=0.01),
        lambda: optimizers.MomentumSAM(_sgd(), rho=0.2),
        lambda: optimizers.SAM(
            _sgd(), schedule=schedules.Adaptive(100, decay=0.8)
        ),
        lambda: optimizers.SAM(
            _sgd(),
            schedule=schedules.Random(
                keras.optimizers.schedules.PolynomialDecay(0.2, 10, 0.8),
                seed=4,
            ),
        ),
    ],
)
def test_config_round_trip(make):
    optimizer = make()
    config = optimizer.get_config()
    clone = type(optimizer).from_config(config)
    assert clone.get_config() == config


def test_argument_errors():
    with pytest.raises(ValueError, match="probability=1.5"):
        schedules.Random(1.5)
    with pytest.raises(ValueError, match="sam_every"):
        optimizers.SAM("sgd", sam_every=2, schedule=schedules.Every(2))
    with pytest.raises(ValueError, match="schedule"):
        optimizers.LookSAM("sgd", schedule=schedules.Every(2))
    with pytest.raises(ValueError, match="rho_min"):
        optimizers.GSAM("sgd", rho=0.01, rho_min=0.1)


def test_mixed_precision_fits():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        for optimizer in (
            optimizers.GSAM(_sgd(), rho=0.1),
            optimizers.LookSAM(_sgd(), rho=0.1, k=2),
        ):
            model = keras_sam.SAMModel(setup.mlp(setup.initial_params()))
            model.compile(optimizer=optimizer, loss="mse")
            x, y = setup.data(N)
            history = model.fit(x, y, batch_size=BATCH, verbose=0)
            assert np.isfinite(history.history["loss"]).all()
    finally:
        keras.mixed_precision.set_global_policy("float32")
