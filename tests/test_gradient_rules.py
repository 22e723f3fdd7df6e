"""Variants on the gradient-rule contract (issue 23): WSAM, FriendlySAM,
several ascent steps, late-phase SAM; and the contract itself."""

import os

import keras
import numpy as np
import pytest

import keras_sam
from keras_sam import optimizers
from keras_sam import schedules
from tests import reference
from tests import reference_variants
from tests import sam_setup as setup

N, BATCH, LR, MOMENTUM = 32, 8, 0.1, 0.9


def _sgd():
    return keras.optimizers.SGD(LR, momentum=MOMENTUM)


def _model(params, sam_optimizer, **compile_kwargs):
    model = keras_sam.SAMModel(setup.mlp(params))
    model.compile(optimizer=sam_optimizer, loss="mse", **compile_kwargs)
    return model


def _train(sam_optimizer, epochs=2, **compile_kwargs):
    params = setup.initial_params()
    x, y = setup.data(N)
    model = _model(params, sam_optimizer, **compile_kwargs)
    history = model.fit(
        x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0
    )
    return model, history, params, setup.batches(x, y, BATCH, epochs)


MODES = [{"run_eagerly": True}, {"jit_compile": False}]
CASES = [
    (
        "wsam",
        lambda: optimizers.WSAM(_sgd(), rho=0.1, gamma=0.8),
        {"rho": 0.1, "gamma": 0.8},
    ),
    (
        "friendly",
        lambda: optimizers.FriendlySAM(_sgd(), rho=0.1, sigma=0.7, lmbda=0.6),
        {"rho": 0.1, "sigma": 0.7, "lmbda": 0.6},
    ),
    (
        "ascent",
        lambda: optimizers.SAM(_sgd(), rho=0.1, ascent_steps=3),
        {"rho": 0.1, "ascent_steps": 3},
    ),
    (
        "late",
        lambda: optimizers.SAM(
            _sgd(), rho=0.1, schedule=schedules.LatePhase(5)
        ),
        {"rho": 0.1, "start_step": 5},
    ),
]


@pytest.mark.parametrize("mode", MODES, ids=["eager", "compiled"])
@pytest.mark.parametrize(
    "variant, make, kwargs", CASES, ids=[c[0] for c in CASES]
)
def test_matches_numpy_reference(variant, make, kwargs, mode):
    model, history, params, batches = _train(make(), **mode)
    expected = reference_variants.train(
        params,
        batches,
        reference.mlp_loss_and_grads,
        LR,
        MOMENTUM,
        variant,
        **kwargs,
    )
    assert setup.max_difference(setup.weights(model), expected) < 2e-5
    if variant == "late":  # 8 steps, SAM on the last 3
        assert history.history["sam_fraction"][-1] == pytest.approx(3 / 8)


@pytest.mark.parametrize(
    "make",
    [
        lambda: optimizers.FriendlySAM(_sgd(), rho=0.1, sigma=0.0),
        lambda: optimizers.SAM(_sgd(), rho=0.1, ascent_steps=1),
        lambda: optimizers.SAM(
            _sgd(), rho=0.1, schedule=schedules.LatePhase(0)
        ),
        lambda: optimizers.WSAM(_sgd(), rho=0.1, gamma=0.5),
    ],
    ids=["friendly_sigma0", "ascent1", "late0", "wsam_half"],
)
def test_reduces_to_sam(make):
    sam, _, _, _ = _train(optimizers.SAM(_sgd(), rho=0.1))
    model, _, _, _ = _train(make())
    difference = setup.max_difference(setup.weights(model), setup.weights(sam))
    if isinstance(model.optimizer, optimizers.WSAM):
        # g + 1 * (g_adv - g) rounds differently from g_adv.
        assert difference < 1e-6
    else:
        assert difference == 0.0


def test_wsam_gamma_zero_is_the_inner_optimizer():
    params = setup.initial_params()
    x, y = setup.data(N)
    plain = setup.mlp(params)
    plain.compile(optimizer=_sgd(), loss="mse")
    plain.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    model, _, _, _ = _train(optimizers.WSAM(_sgd(), gamma=0.0))
    assert (
        setup.max_difference(
            setup.weights(model), [w.numpy() for w in plain.weights]
        )
        < 1e-6
    )
    assert model.optimizer.passes_per_step == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda: optimizers.WSAM(_sgd(), rho=0.1, gamma=0.8),
        lambda: optimizers.FriendlySAM(_sgd(), rho=0.1, sigma=0.5),
        lambda: optimizers.SAM(_sgd(), rho=0.1, ascent_steps=2),
        lambda: optimizers.SAM(_sgd(), schedule=schedules.LatePhase(3)),
    ],
    ids=["wsam", "friendly", "ascent", "late"],
)
def test_save_and_resume_repeats_the_run(make, tmp_path):
    x, y = setup.data(N)
    params = setup.initial_params()
    whole = _model(params, make())
    whole.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    first = _model(params, make())
    first.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    path = os.path.join(tmp_path, "m.keras")
    first.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.sam_optimizer) is type(first.sam_optimizer)
    loaded.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert (
        setup.max_difference(setup.weights(loaded), setup.weights(whole)) < 1e-6
    )


@pytest.mark.parametrize(
    "name, cls",
    [("wsam", optimizers.WSAM), ("friendlysam", optimizers.FriendlySAM)],
)
def test_registered_and_config_round_trip(name, cls):
    optimizer = optimizers.get(name, "sgd", rho=0.07)
    assert isinstance(optimizer, cls)
    again = optimizers.deserialize(optimizers.serialize(optimizer))
    assert type(again) is cls
    assert again.get_config() == optimizer.get_config()
    late = schedules.get(
        keras.saving.serialize_keras_object(schedules.LatePhase(4))
    )
    assert isinstance(late, schedules.LatePhase) and late.start_step == 4


def test_argument_errors():
    with pytest.raises(ValueError, match="gamma"):
        optimizers.WSAM("sgd", gamma=1.0)
    with pytest.raises(ValueError, match="sigma"):
        optimizers.FriendlySAM("sgd", sigma=-1.0)
    with pytest.raises(ValueError, match="lmbda"):
        optimizers.FriendlySAM("sgd", lmbda=1.0)
    with pytest.raises(ValueError, match="ascent_steps"):
        optimizers.SAM("sgd", ascent_steps=0)
    with pytest.raises(ValueError, match="start_step"):
        schedules.LatePhase(-1)
    with pytest.raises(ValueError, match="ascent_steps"):
        optimizers.SAM(
            "sgd",
            rho=keras_sam.LearnedRadius(
                validation_data=(np.zeros((4, 5)), np.zeros((4, 3)))
            ),
            ascent_steps=2,
        )


@pytest.mark.parametrize(
    "make, passes",
    [
        (lambda: optimizers.SAM(_sgd(), ascent_steps=3), 4),
        (lambda: optimizers.WSAM(_sgd()), 2),
        (lambda: optimizers.FriendlySAM(_sgd()), 2),
        (lambda: optimizers.SAM(_sgd(), schedule=schedules.LatePhase(6)), 1),
    ],
    ids=["ascent3", "wsam", "friendly", "late_plain"],
)
def test_passes_per_step(make, passes):
    """Each rule runs the passes its paper costs: counted forward passes."""
    params = setup.initial_params()
    x, y = setup.data(BATCH)
    calls = []

    class Counting(keras.Sequential):
        def call(self, *args, **kwargs):
            calls.append(1)
            return super().call(*args, **kwargs)

    base = setup.mlp(params)
    counting = Counting(base.layers)
    model = keras_sam.SAMModel(counting)
    model.compile(optimizer=make(), loss="mse", run_eagerly=True)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    calls.clear()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert len(calls) == passes


@pytest.mark.parametrize("policy", ["mixed_float16"])
def test_mixed_precision_fits(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        for make in (
            lambda: optimizers.WSAM(_sgd()),
            lambda: optimizers.FriendlySAM(_sgd()),
            lambda: optimizers.SAM(_sgd(), ascent_steps=2),
        ):
            x, y = setup.data(N)
            model = keras_sam.SAMModel(setup.mlp(setup.initial_params()))
            model.compile(optimizer=make(), loss="mse")
            history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
            assert np.isfinite(history.history["loss"][-1])
            assert isinstance(
                model.optimizer, keras.optimizers.LossScaleOptimizer
            )
    finally:
        keras.mixed_precision.set_global_policy("float32")
