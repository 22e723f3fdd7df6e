"""LearnedRadius (LETS): hypergradient, controller, invariants, fit, saving."""

import math

import keras
import numpy as np
import pytest

import keras_sam
from tests import reference
from tests.conftest import BACKEND
from tests.conftest import DISTINCT_MODES
from tests.conftest import MODES

D_IN, D_HIDDEN = 4, 6
LR = 0.1
RHO = 0.05
# Tests that are not about execution modes run eagerly: no compilation,
# which dominates the time of these few-step runs.
EAGER = MODES["eager"]


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return [
        0.7 * rng.normal(size=(D_IN, D_HIDDEN)),
        0.1 * rng.normal(size=(D_HIDDEN,)),
        0.7 * rng.normal(size=(D_HIDDEN, 1)),
        0.1 * rng.normal(size=(1,)),
    ]


def _data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D_IN)).astype("float32")
    y = np.sin(x.sum(axis=1, keepdims=True)) + 0.3 * rng.normal(size=(n, 1))
    return x, y.astype("float32")


def _mlp(params):
    model = keras.Sequential(
        [
            keras.Input((D_IN,)),
            keras.layers.Dense(D_HIDDEN, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    model.set_weights([np.asarray(p, "float32") for p in params])
    return model


def _optimizer(kind, rho, lr=LR):
    inner = keras.optimizers.SGD(lr)
    if kind == "sam":
        return keras_sam.optimizers.SAM(inner, rho=rho)
    if kind == "asam":
        return keras_sam.optimizers.ASAM(inner, rho=rho, eta=0.01)
    if not hasattr(keras_sam.optimizers, "RSAM"):
        pytest.skip("keras_sam.optimizers.RSAM is not available yet")
    return keras_sam.optimizers.RSAM(
        inner, rho=rho, manifold={"dense_out": "sphere"}, metric="identity"
    )


def _eps_fn(kind):
    if kind == "sam":
        return lambda params, g, rho: reference.sam_eps(g, rho)
    return lambda params, g, rho: reference.asam_eps(
        params, g, rho, 0.01, [True, False, True, False]
    )


def _fit(model, x, y, batch_size, callbacks=None):
    return model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )


def _cases(kinds, modes=tuple(MODES)):
    """The first kind in `modes`, the others in graph mode."""
    cases = [
        (kinds[0], mode) for mode in modes if mode in DISTINCT_MODES[BACKEND]
    ]
    cases += [(kind, "graph") for kind in kinds[1:]]
    return [
        pytest.param(kind, MODES[mode], id=f"{kind}-{mode}")
        for kind, mode in cases
    ]


class _BatchLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append({k: float(v) for k, v in logs.items()})


# ---------------------------------------------------------------------------
# The hypergradient against finite differences of F(rho).


@pytest.mark.parametrize("kind, mode", _cases(["sam", "asam"]))
def test_hypergradient_matches_finite_difference(kind, mode):
    rho = RHO if kind == "sam" else 0.5
    params = _params()
    x, y = _data(16, seed=1)
    xv, yv = _data(24, seed=2)
    radius = keras_sam.LearnedRadius(
        initial=rho, learning_rate=0.0, validation_data=(xv, yv), batch_size=64
    )
    model = keras_sam.SAMModel(_mlp(params))
    model.compile(optimizer=_optimizer(kind, radius), loss="mse", **mode)
    # Step 0 moves w_0 -> w_1 and stores dw_1/drho; step 1 (same batch)
    # measures the gap and its hypergradient at w_1.
    logs = _BatchLogs()
    _fit(model, np.concatenate([x, x]), np.concatenate([y, y]), 16, [logs])

    args = (params, x, y, xv, yv, rho, LR, reference.mlp_loss_and_grads)
    exact = reference.lets_hypergradient_fd(*args, _eps_fn(kind))
    approx, gap = reference.lets_hypergradient(*args, _eps_fn(kind))
    got = float(radius.rho_grad.numpy())

    # The library computes the one-step formula ...
    np.testing.assert_allclose(logs.logs[1]["gap"], gap, rtol=1e-4)
    np.testing.assert_allclose(got, approx, rtol=2e-3)
    np.testing.assert_allclose(logs.logs[1]["rho_grad"], got, rtol=1e-6)
    # ... which is dF/drho within 10%.
    assert abs(exact) > 1e-6
    assert abs(got - exact) < 0.1 * abs(exact), (got, exact)
    # Step 0 has no stored dw/drho: no hypergradient yet.
    assert logs.logs[0]["rho_grad"] == 0.0


def _log_barrier_model(w):
    model = keras.Sequential(
        [keras.Input((len(w),)), keras.layers.Dense(1, use_bias=False)]
    )
    model.set_weights([np.asarray(w, "float32")[:, None]])
    return model


class _LogBarrier(keras.losses.Loss):
    def call(self, y_true, y_pred):
        return -keras.ops.log(keras.ops.subtract(y_true, y_pred))


def _log_barrier_loss():
    return _LogBarrier(reduction="sum")


@pytest.mark.parametrize("normalize", [True, False])
def test_diagonal_hypergradient_is_exact_when_the_hessian_is_g_squared(
    normalize,
):
    # L(w) = -sum_i log(c_i - w_i) has Hessian diag(g * g) at every w, so
    # the paper's diagonal approximation gives the true dF/drho.
    d, lr = 5, 0.05
    rho = 0.1 if normalize else 0.05
    w0 = np.linspace(-0.2, 0.3, d)
    x = np.eye(d, dtype="float32")
    y = np.full((d, 1), 2.0, "float32") + 0.1 * np.arange(d)[:, None]
    yv = np.full((d, 1), 1.5, "float32") - 0.05 * np.arange(d)[:, None]
    radius = keras_sam.LearnedRadius(
        initial=rho,
        learning_rate=0.0,
        validation_data=(x, yv.astype("float32")),
        batch_size=64,
        hypergradient="diagonal",
    )
    model = keras_sam.SAMModel(_log_barrier_model(w0))
    model.compile(
        optimizer=keras_sam.optimizers.SAM(
            keras.optimizers.SGD(lr), rho=radius, normalize=normalize
        ),
        loss=_log_barrier_loss(),
        **EAGER,
    )
    logs = _BatchLogs()
    _fit(model, np.concatenate([x, x]), np.concatenate([y, y]), d, [logs])

    eps = reference.sam_eps if normalize else reference.sam_eps_unnormalized
    args = (
        [w0[:, None]],
        x,
        y,
        x,
        yv,
        rho,
        lr,
        reference.log_barrier_loss_and_grads,
        lambda params, g, r: eps(g, r),
    )
    exact = reference.lets_hypergradient_fd(*args)
    approx, gap = reference.lets_hypergradient_diagonal(
        *args, normalize=normalize
    )
    got = float(radius.rho_grad.numpy())
    np.testing.assert_allclose(logs.logs[1]["gap"], gap, rtol=1e-4)
    np.testing.assert_allclose(approx, exact, rtol=1e-5)
    assert abs(exact) > 1e-6
    np.testing.assert_allclose(got, exact, rtol=2e-3)


def test_diagonal_hypergradient_on_an_mlp_matches_reference():
    params = _params()
    x, y = _data(16, seed=1)
    xv, yv = _data(24, seed=2)
    radius = keras_sam.LearnedRadius(
        initial=RHO,
        learning_rate=0.0,
        validation_data=(xv, yv),
        batch_size=64,
        hypergradient="diagonal",
    )
    model = keras_sam.SAMModel(_mlp(params))
    model.compile(optimizer=_optimizer("sam", radius), loss="mse", **EAGER)
    _fit(model, np.concatenate([x, x]), np.concatenate([y, y]), 16)
    args = (params, x, y, xv, yv, RHO, LR, reference.mlp_loss_and_grads)
    approx, _ = reference.lets_hypergradient_diagonal(*args, _eps_fn("sam"))
    np.testing.assert_allclose(
        float(radius.rho_grad.numpy()), approx, rtol=2e-3
    )


def test_secant_hypergradient_with_unnormalized_sam():
    rho = 0.01
    params = _params()
    x, y = _data(16, seed=1)
    xv, yv = _data(24, seed=2)
    radius = keras_sam.LearnedRadius(
        initial=rho, learning_rate=0.0, validation_data=(xv, yv), batch_size=64
    )
    model = keras_sam.SAMModel(_mlp(params))
    model.compile(
        optimizer=keras_sam.optimizers.SAM(
            keras.optimizers.SGD(LR), rho=radius, normalize=False
        ),
        loss="mse",
        **EAGER,
    )
    _fit(model, np.concatenate([x, x]), np.concatenate([y, y]), 16)
    args = (params, x, y, xv, yv, rho, LR, reference.mlp_loss_and_grads)
    eps_fn = lambda p, g, r: reference.sam_eps_unnormalized(g, r)  # noqa
    exact = reference.lets_hypergradient_fd(*args, eps_fn)
    approx, _ = reference.lets_hypergradient(*args, eps_fn)
    got = float(radius.rho_grad.numpy())
    np.testing.assert_allclose(got, approx, rtol=2e-3)
    assert abs(got - exact) < 0.1 * abs(exact), (got, exact)


def test_plain_rho_step_matches_reference():
    params = _params()
    x, y = _data(16, seed=1)
    xv, yv = _data(24, seed=2)
    radius = keras_sam.LearnedRadius(
        initial=RHO,
        learning_rate=30.0,
        validation_data=(xv, yv),
        batch_size=64,
        bounds=(1e-3, 1.0),
        rho_step="plain",
    )
    model = keras_sam.SAMModel(_mlp(params))
    model.compile(optimizer=_optimizer("sam", radius), loss="mse", **EAGER)
    logs = _BatchLogs()
    _fit(model, np.concatenate([x, x]), np.concatenate([y, y]), 16, [logs])
    rho_grad = logs.logs[1]["rho_grad"]
    rho = reference.lets_plain_step(RHO, rho_grad, 30.0, (1e-3, 1.0))
    assert abs(rho - RHO) > 1e-5
    np.testing.assert_allclose(logs.logs[1]["rho"], rho, rtol=1e-5)
    assert logs.logs[0]["rho"] == pytest.approx(RHO, rel=1e-7)


@pytest.mark.parametrize("validation_mode", ["training", "inference"])
def test_validation_mode_of_the_gap(validation_mode):
    # Validation data = the training batch: with BatchNorm in training mode
    # on both sides the gap is 0; inference mode (moving statistics) is not.
    x, y = _data(16, seed=1)
    base = keras.Sequential(
        [
            keras.Input((D_IN,)),
            keras.layers.Dense(D_HIDDEN),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(1),
        ]
    )
    radius = keras_sam.LearnedRadius(
        initial=RHO,
        learning_rate=0.0,
        validation_data=(x, y),
        batch_size=64,
        validation_mode=validation_mode,
    )
    model = keras_sam.SAMModel(base)
    model.compile(optimizer=_optimizer("sam", radius), loss="mse", **EAGER)
    logs = _BatchLogs()
    _fit(model, np.concatenate([x, x]), np.concatenate([y, y]), 16, [logs])
    gap = logs.logs[1]["gap"]
    if validation_mode == "training":
        assert abs(gap) < 1e-5
    else:
        assert abs(gap) > 1e-3


def test_first_controller_step_matches_reference():
    params = _params()
    x, y = _data(16, seed=1)
    xv, yv = _data(24, seed=2)
    radius = keras_sam.LearnedRadius(
        initial=RHO,
        learning_rate=0.2,
        validation_data=(xv, yv),
        batch_size=64,
        bounds=(1e-3, 1.0),
    )
    model = keras_sam.SAMModel(_mlp(params))
    model.compile(optimizer=_optimizer("sam", radius), loss="mse", **EAGER)
    logs = _BatchLogs()
    _fit(model, np.concatenate([x, x]), np.concatenate([y, y]), 16, [logs])

    rho_grad = logs.logs[1]["rho_grad"]
    rho, m, v = reference.lets_controller(
        RHO, rho_grad, 0.0, 0.0, 0, 0.2, (1e-3, 1.0)
    )
    # The first normalized step is lr * sign(d): rho * exp(-+0.2).
    np.testing.assert_allclose(rho, RHO * math.exp(-0.2 * np.sign(rho_grad)))
    np.testing.assert_allclose(logs.logs[1]["rho"], rho, rtol=1e-5)
    np.testing.assert_allclose(logs.logs[1]["rho_momentum"], m, rtol=1e-5)
    np.testing.assert_allclose(float(radius.velocity.numpy()), v, rtol=1e-4)
    assert logs.logs[0]["rho"] == pytest.approx(RHO, rel=1e-7)


# ---------------------------------------------------------------------------
# Invariants.


@pytest.mark.parametrize(
    "kind, mode", _cases(["sam", "asam"], ("eager", "graph"))
)
def test_learning_rate_zero_is_sam_at_initial(kind, mode):
    rho = RHO if kind == "sam" else 0.5
    x, y = _data(48, seed=3)
    xv, yv = _data(20, seed=4)
    weights = []
    for radius in (
        rho,
        keras_sam.LearnedRadius(
            initial=rho,
            learning_rate=0.0,
            validation_data=(xv, yv),
            batch_size=8,
        ),
    ):
        model = keras_sam.SAMModel(_mlp(_params()))
        model.compile(optimizer=_optimizer(kind, radius), loss="mse", **mode)
        history = model.fit(
            x, y, batch_size=8, epochs=2, shuffle=False, verbose=0
        )
        weights.append(model.get_weights())
    assert history.history["rho"] == [pytest.approx(rho, rel=1e-7)] * 2
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


def test_rho_stays_positive_finite_and_within_bounds():
    x, y = _data(64, seed=5)
    xv, yv = _data(32, seed=6)
    bounds = (0.02, 0.2)
    radius = keras_sam.LearnedRadius(
        initial=0.1,
        learning_rate=1.0,
        validation_data=(xv, yv),
        bounds=bounds,
        batch_size=8,
    )
    model = keras_sam.SAMModel(_mlp(_params()))
    model.compile(
        optimizer=_optimizer("sam", radius, lr=0.3), loss="mse", **EAGER
    )
    logs = _BatchLogs()
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[logs])
    rhos = np.array([entry["rho"] for entry in logs.logs])
    assert np.all(np.isfinite(rhos))
    assert np.all(rhos >= np.float32(bounds[0]))
    assert np.all(rhos <= np.float32(bounds[1]))
    # Steps of about e^{+-1} reach the bounds and are clipped there.
    touched = np.isclose(rhos, bounds[0]) | np.isclose(rhos, bounds[1])
    assert touched.any()
    assert len(np.unique(rhos)) > 3


def test_update_every_changes_rho_only_on_update_steps():
    x, y = _data(80, seed=7)
    xv, yv = _data(30, seed=8)
    radius = keras_sam.LearnedRadius(
        initial=RHO,
        learning_rate=0.1,
        validation_data=(xv, yv),
        update_every=3,
        batch_size=8,
    )
    model = keras_sam.SAMModel(_mlp(_params()))
    model.compile(optimizer=_optimizer("sam", radius), loss="mse", **EAGER)
    logs = _BatchLogs()
    _fit(model, x, y, 8, [logs])
    rhos = [np.float32(RHO)] + [entry["rho"] for entry in logs.logs]
    changed = [t for t in range(10) if rhos[t + 1] != rhos[t]]
    assert changed == [3, 6, 9]
    gaps = [entry["gap"] for entry in logs.logs]
    assert gaps[:3] == [0.0, 0.0, 0.0]
    # The gap is measured (and kept) on update steps only.
    assert gaps[3] != 0.0 and gaps[3] == gaps[4] == gaps[5]


def test_sam_every_updates_only_after_a_sharpness_aware_step():
    x, y = _data(64, seed=9)
    xv, yv = _data(30, seed=10)
    radius = keras_sam.LearnedRadius(
        initial=RHO, learning_rate=0.1, validation_data=(xv, yv), batch_size=8
    )
    optimizer = keras_sam.optimizers.SAM(
        keras.optimizers.SGD(LR), rho=radius, sam_every=2
    )
    model = keras_sam.SAMModel(_mlp(_params()))
    model.compile(optimizer=optimizer, loss="mse", **EAGER)
    logs = _BatchLogs()
    _fit(model, x, y, 8, [logs])
    rhos = [np.float32(RHO)] + [entry["rho"] for entry in logs.logs]
    changed = [t for t in range(8) if rhos[t + 1] != rhos[t]]
    # Steps 0, 2, 4, 6 are SAM steps; rho follows them at 1, 3, 5, 7.
    assert changed == [1, 3, 5, 7]


# ---------------------------------------------------------------------------
# End to end: SAM, ASAM and RSAM, logs, saving.


def _digits(n_train=300, n_val=100):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    y = y.astype("int32")
    return (x[:n_train], y[:n_train]), (x[-n_val:], y[-n_val:])


def _classifier():
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10, name="dense_out"),
        ]
    )


@pytest.mark.parametrize(
    "kind, mode", _cases(["sam", "asam", "rsam"], ("graph",))
)
def test_fit_with_sharpness_aware_optimizers(kind, mode):
    (x, y), (xv, yv) = _digits()
    initial = 0.05 if kind != "asam" else 0.5
    radius = keras_sam.LearnedRadius(
        initial=initial, learning_rate=0.05, validation_data=(xv, yv)
    )
    model = keras_sam.SAMModel(_classifier())
    model.compile(
        optimizer=_optimizer(kind, radius, lr=0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        **mode,
    )
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    logs = history.history
    for key in ("rho", "gap", "rho_grad", "rho_momentum"):
        assert np.all(np.isfinite(logs[key])), key
    assert logs["rho"][-1] != pytest.approx(initial, rel=1e-4)
    assert logs["loss"][-1] < 0.6 * logs["loss"][0]
    # Learned rho stays in the default bounds and follows the log entries.
    assert 1e-4 <= logs["rho"][-1] <= 10.0
    np.testing.assert_allclose(
        float(model.optimizer.rho.numpy()), logs["rho"][-1], rtol=1e-6
    )


def test_save_and_load_restore_radius_state(tmp_path):
    (x, y), (xv, yv) = _digits(200, 60)
    radius = keras_sam.LearnedRadius(
        initial=0.05,
        learning_rate=0.1,
        validation_data=(xv, yv),
        update_every=2,
        bounds=(1e-3, 1.0),
        batch_size=16,
        seed=3,
    )
    model = keras_sam.SAMModel(_classifier())
    model.compile(
        optimizer=keras_sam.optimizers.SAM(
            keras.optimizers.SGD(0.1, momentum=0.9), rho=radius
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **EAGER,
    )
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    path = str(tmp_path / "lets.keras")
    model.save(path)

    loaded = keras.models.load_model(path)
    restored = loaded.optimizer.radius
    assert isinstance(restored, keras_sam.LearnedRadius)
    assert restored.get_config() == radius.get_config()
    assert restored is not radius
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    for before, after in zip(
        model.optimizer.variables, loaded.optimizer.variables
    ):
        np.testing.assert_array_equal(before.numpy(), after.numpy())
    for name in ("gap", "rho_grad", "momentum", "velocity", "updates"):
        np.testing.assert_array_equal(
            getattr(radius, name).numpy(), getattr(restored, name).numpy()
        )
    assert float(loaded.optimizer.rho.numpy()) != 0.05
    assert float(restored.updates.numpy()) > 0

    # The data is not saved: without it rho stays fixed (with a warning);
    # given again, rho is learned on from the restored state.
    rho = float(loaded.optimizer.rho.numpy())
    with pytest.warns(UserWarning, match="set_validation_data"):
        loaded.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert float(loaded.optimizer.rho.numpy()) == rho
    restored.set_validation_data((xv, yv))
    loaded.make_train_function(force=True)
    updates = float(restored.updates.numpy())
    history = loaded.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert float(restored.updates.numpy()) > updates
    assert history.history["rho"][0] != pytest.approx(rho, rel=1e-6)


def test_config_round_trip():
    xv, yv = _data(10, seed=0)
    radius = keras_sam.LearnedRadius(
        initial=0.1,
        learning_rate=0.02,
        validation_data=(xv, yv),
        update_every=5,
        bounds=(0.01, 2.0),
        batch_size=4,
        seed=7,
    )
    optimizer = keras_sam.optimizers.ASAM("sgd", rho=radius)
    config = keras_sam.optimizers.serialize(optimizer)
    clone = keras_sam.optimizers.deserialize(config)
    assert isinstance(clone.radius, keras_sam.LearnedRadius)
    assert clone.radius.get_config() == radius.get_config()
    assert clone.initial_rho == 0.1
    assert radius.get_config() == {
        "initial": 0.1,
        "learning_rate": 0.02,
        "update_every": 5,
        "bounds": [0.01, 2.0],
        "batch_size": 4,
        "seed": 7,
        "hypergradient": "secant",
        "rho_step": "normalized",
        "validation_mode": "training",
        "objective": "gap",
    }
    options = dict(
        hypergradient="diagonal",
        rho_step="plain",
        validation_mode="inference",
        objective="validation",
    )
    radius = keras_sam.LearnedRadius(validation_data=(xv, yv), **options)
    clone = keras_sam.LearnedRadius.from_config(radius.get_config())
    assert {k: clone.get_config()[k] for k in options} == options


# ---------------------------------------------------------------------------
# Validation data given as a dataset, and bad input.


def test_tf_dataset_gives_the_same_run_as_arrays():
    tf = pytest.importorskip("tensorflow")
    x, y = _data(40, seed=11)
    xv, yv = _data(30, seed=12)
    dataset = tf.data.Dataset.from_tensor_slices((xv, yv)).batch(7)
    histories = []
    for validation_data in ((xv, yv), dataset):
        radius = keras_sam.LearnedRadius(
            initial=RHO,
            learning_rate=0.1,
            validation_data=validation_data,
            batch_size=8,
            seed=0,
        )
        model = keras_sam.SAMModel(_mlp(_params()))
        model.compile(optimizer=_optimizer("sam", radius), loss="mse", **EAGER)
        logs = _BatchLogs()
        _fit(model, x, y, 8, [logs])
        histories.append([(e["rho"], e["gap"]) for e in logs.logs])
    assert histories[0] == histories[1]
    assert len({rho for rho, _ in histories[0]}) > 2


def test_sample_weight_in_validation_data():
    x, y = _data(16, seed=1)
    xv, yv = _data(24, seed=2)
    gaps = []
    for weight in (np.ones(24), np.r_[np.ones(12), np.zeros(12)]):
        radius = keras_sam.LearnedRadius(
            initial=RHO,
            learning_rate=0.0,
            validation_data=(xv, yv, weight.astype("float32")),
            batch_size=64,
        )
        model = keras_sam.SAMModel(_mlp(_params()))
        model.compile(optimizer=_optimizer("sam", radius), loss="mse", **EAGER)
        _fit(model, np.concatenate([x, x]), np.concatenate([y, y]), 16)
        gaps.append(float(radius.gap.numpy()))
    assert gaps[0] != pytest.approx(gaps[1], rel=1e-3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"validation_data": None}, ValueError, "validation_data=None"),
        (
            {"validation_data": (np.zeros((0, 4)), np.zeros((0, 1)))},
            ValueError,
            "0 samples",
        ),
        (
            {"validation_data": (np.zeros((10, 4)), np.zeros((9, 1)))},
            ValueError,
            "x with 10 samples, y with 9 samples",
        ),
        (
            {
                "validation_data": (
                    np.zeros((10, 4)),
                    np.zeros((10, 1)),
                    np.ones(8),
                )
            },
            ValueError,
            "sample_weight with 8 samples",
        ),
        (
            {
                "validation_data": (
                    {"a": np.zeros((5, 2)), "b": np.zeros((6, 2))},
                    np.zeros((5,)),
                )
            },
            ValueError,
            "different numbers of samples",
        ),
        ({"validation_data": (np.zeros((4, 4)),)}, ValueError, "length 1"),
        ({"validation_data": np.zeros((4, 4))}, TypeError, "ndarray"),
        ({"initial": 0.0}, ValueError, "initial=0.0"),
        ({"initial": -0.1}, ValueError, "initial=-0.1"),
        ({"initial": float("nan")}, ValueError, "initial=nan"),
        ({"initial": "0.1"}, TypeError, "initial='0.1'"),
        ({"learning_rate": -1.0}, ValueError, "learning_rate=-1.0"),
        ({"update_every": 0}, ValueError, "update_every=0"),
        ({"batch_size": 2.5}, TypeError, "batch_size=2.5"),
        ({"bounds": (0.1,)}, ValueError, "bounds="),
        ({"bounds": (0.0, 1.0)}, ValueError, r"bounds\[0\]=0.0"),
        ({"bounds": (0.1, 1.0), "initial": 0.05}, ValueError, "initial=0.05"),
        ({"hypergradient": "exact"}, ValueError, "hypergradient='exact'"),
        ({"rho_step": "adam"}, ValueError, "rho_step='adam'"),
        ({"validation_mode": "eval"}, ValueError, "validation_mode='eval'"),
    ],
)
def test_bad_input_raises(kwargs, error, match):
    arguments = {"validation_data": (np.zeros((10, 4)), np.zeros((10, 1)))}
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        keras_sam.LearnedRadius(**arguments)


def test_empty_and_mismatched_datasets_raise():
    tf = pytest.importorskip("tensorflow")
    empty = tf.data.Dataset.from_tensor_slices(
        (np.zeros((4, 3), "float32"), np.zeros((4,), "float32"))
    ).filter(lambda x, y: False)
    with pytest.raises(ValueError, match="0 batches"):
        keras_sam.LearnedRadius(validation_data=empty.batch(2))
    ragged = [
        (np.zeros((2, 3)), np.zeros((2,))),
        (np.zeros((2, 4)), np.zeros((2,))),
    ]
    with pytest.raises(ValueError, match="mismatched"):
        keras_sam.LearnedRadius(validation_data=iter(ragged))


def test_one_radius_serves_one_optimizer():
    xv, yv = _data(10, seed=0)
    radius = keras_sam.LearnedRadius(validation_data=(xv, yv))
    variables = _mlp(_params()).trainable_variables
    keras_sam.optimizers.SAM("sgd", rho=radius).build(variables)
    with pytest.raises(ValueError, match="one optimizer"):
        keras_sam.optimizers.SAM("sgd", rho=radius).build(variables)
