"""Sharpness diagnostics: HVP, top eigenvalue, trace, SAM sharpness, norms,
the edge of stability and `SharpnessMonitor` (issue 7)."""

import csv
import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_sam
from keras_sam import sharpness
from keras_sam.callbacks import SharpnessMonitor
from tests import reference

# ---------------------------------------------------------------------------
# Fixtures: a quadratic 0.5 w^T A w and a small tanh MLP.

DIM = 12


def _spd_matrix(seed=0, dim=DIM):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return (q * np.linspace(0.5, 10.0, dim)) @ q.T


def _quadratic(matrix):
    """A model whose output on x = I is its weight vector w, and the loss
    0.5 w^T A w (independent of the targets)."""
    a = ops.convert_to_tensor(matrix.astype("float32"))

    def loss(y_true, y_pred):
        w = ops.reshape(y_pred, (-1,))
        return 0.5 * ops.sum(w * ops.matmul(a, w))

    dim = matrix.shape[0]
    model = keras.Sequential(
        [keras.Input((dim,)), keras.layers.Dense(1, use_bias=False)]
    )
    data = (np.eye(dim, dtype="float32"), np.zeros((dim, 1), "float32"))
    return model, data, loss


def _mlp(seed=0, n=20, d=3, h=5, k=2):
    rng = np.random.default_rng(seed)
    params = [
        rng.normal(size=(d, h)) * 0.8,
        rng.normal(size=(h,)) * 0.1,
        rng.normal(size=(h, k)) * 0.8,
        rng.normal(size=(k,)) * 0.1,
    ]
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(n, k))
    model = keras.Sequential(
        [
            keras.Input((d,)),
            keras.layers.Dense(h, activation="tanh"),
            keras.layers.Dense(k),
        ]
    )
    model.set_weights([p.astype("float32") for p in params])
    model.compile(optimizer="sgd", loss="mse")
    return model, params, x.astype("float32"), y.astype("float32")


def _numpy(tensors):
    return [
        np.asarray(ops.convert_to_numpy(t), dtype=np.float64) for t in tensors
    ]


def _rel(a, b):
    a, b = np.concatenate([np.ravel(t) for t in a]), np.concatenate(
        [np.ravel(t) for t in b]
    )
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# ---------------------------------------------------------------------------
# Quadratics: eigenvalue and trace against numpy.


@pytest.mark.parametrize("compiled", [False, True])
def test_top_eigenvalue_of_quadratic_matches_eigvalsh(compiled):
    matrix = _spd_matrix()
    model, data, loss = _quadratic(matrix)
    if compiled:
        model.compile(loss=loss)
        value = sharpness.top_eigenvalue(model, data)
    else:
        value = sharpness.top_eigenvalue(model, data, loss=loss)
    expected = np.linalg.eigvalsh(matrix)[-1]
    assert abs(value - expected) <= 1e-3 * expected


def test_power_iteration_and_eigenvector():
    matrix = _spd_matrix(seed=1)
    model, data, loss = _quadratic(matrix)
    hessian = sharpness.Hessian(model, data, loss=loss)
    evals, evecs = np.linalg.eigh(matrix)
    value = hessian.top_eigenvalue(method="power", max_iter=500, tol=1e-7)
    assert abs(value - evals[-1]) <= 1e-3 * evals[-1]
    value, vector = hessian.top_eigenvalue(return_eigenvector=True)
    vector = np.ravel(_numpy(vector)[0])
    assert abs(abs(vector @ evecs[:, -1]) - 1.0) < 1e-3
    # Lanczos converges in at most DIM products on a DIM-dim quadratic.
    assert hessian.num_hvps <= 500 + DIM


def test_lanczos_stopped_early_gives_a_lower_bound():
    matrix = _spd_matrix()
    model, data, loss = _quadratic(matrix)
    hessian = sharpness.Hessian(model, data, loss=loss)
    value, vector = hessian.top_eigenvalue(max_iter=3, return_eigenvector=True)
    assert hessian.num_hvps == 3
    # A Ritz value of a 3-dim Krylov space: between the Rayleigh quotient of
    # its unit Ritz vector (equal) and the top eigenvalue (below).
    v = np.ravel(_numpy(vector)[0])
    np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-4)
    np.testing.assert_allclose(v @ matrix @ v, value, rtol=1e-4)
    assert value <= np.linalg.eigvalsh(matrix)[-1] + 1e-4


def _iterations_per_call(monkeypatch, k):
    """Lanczos as on an accelerator, `k` iterations per compiled call."""
    monkeypatch.setattr(keras_sam.backend, "on_accelerator", lambda: True)
    monkeypatch.setattr(sharpness.hessian, "_ACCELERATOR_ITERATIONS", k)


def _record_reorthogonalizations(monkeypatch):
    """A list that receives the basis size of every reorthogonalization."""
    sizes = []
    original = sharpness.krylov._reorthogonalize

    def recording(blocks, vector):
        sizes.append(sum(int(b.shape[0]) for b in blocks))
        return original(blocks, vector)

    monkeypatch.setattr(sharpness.krylov, "_reorthogonalize", recording)
    return sizes


@pytest.mark.parametrize("per_call", [1, 3])
def test_lanczos_keeps_its_basis_orthogonal_past_convergence(
    per_call, monkeypatch
):
    # A tolerance far below float32's reach keeps Lanczos going after the
    # top pair has converged. Without reorthogonalization the basis loses
    # orthogonality along that pair and copies of it appear ("ghosts"):
    # here Q s then has norm 0.14, not 1 (measured with the threshold set
    # to infinity). Partial reorthogonalization keeps the pair exact; with
    # several iterations per call, the ones computed after a vector that
    # needed it are dropped and recomputed.
    _iterations_per_call(monkeypatch, per_call)
    dim = 120
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    spectrum = np.concatenate([[40.0, 30.0], rng.uniform(0.0, 10.0, dim - 2)])
    model, data, loss = _quadratic((q * spectrum) @ q.T)
    hessian = sharpness.Hessian(model, data, loss=loss)
    reorthogonalized = _record_reorthogonalizations(monkeypatch)
    value, vector = hessian.top_eigenvalue(
        max_iter=80, tol=1e-300, return_eigenvector=True
    )
    assert hessian.num_hvps > 20  # well past convergence (about 10)
    v = np.ravel(_numpy(vector)[0])
    np.testing.assert_allclose(value, 40.0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(v), 1.0, atol=1e-5)
    assert abs(v @ q[:, 0]) > 1.0 - 1e-5
    # Vectors are reorthogonalized in pairs of consecutive ones (Simon's
    # rule; the stop may cut the last pair), each against the whole basis
    # before it; with single ones the estimate would pass again at once, at
    # every other iteration.
    assert len(reorthogonalized) >= 4
    whole = len(reorthogonalized) // 2 * 2
    pairs = np.reshape(reorthogonalized[:whole], (-1, 2))
    np.testing.assert_array_equal(pairs[:, 1], pairs[:, 0] + 1)
    assert np.all(np.diff(pairs[:, 0]) >= 3)


def test_lanczos_gives_the_same_result_with_several_iterations_per_call(
    monkeypatch,
):
    # On an accelerator several iterations run as one compiled call; each is
    # still checked, so the estimate and the stopping point do not change,
    # only products past the stop, or past a vector that needed
    # reorthogonalization, are computed and dropped.
    matrix = _spd_matrix(seed=2, dim=60)
    model, data, loss = _quadratic(matrix)
    calls = _record_reorthogonalizations(monkeypatch)
    results, products, restarts = {}, {}, {}
    for per_call in (1, 4, 8):
        _iterations_per_call(monkeypatch, per_call)
        for tol in (1e-3, 1e-6):  # 1e-6 reorthogonalizes on the way
            hessian = sharpness.Hessian(model, data, loss=loss)
            calls.clear()
            value, vector = hessian.top_eigenvalue(
                tol=tol, return_eigenvector=True
            )
            results[per_call, tol] = value, np.ravel(_numpy(vector)[0])
            products[per_call, tol] = hessian.num_hvps
            restarts[per_call, tol] = len(calls)
        # max_iter bounds the products, whatever the call size.
        hessian = sharpness.Hessian(model, data, loss=loss)
        hessian.top_eigenvalue(max_iter=6, tol=1e-300)
        assert hessian.num_hvps == 6
    expected = np.linalg.eigvalsh(matrix)[-1]
    np.testing.assert_allclose(results[1, 1e-6][0], expected, rtol=1e-5)
    assert restarts[1, 1e-6] >= 2
    for per_call in (4, 8):
        for tol in (1e-3, 1e-6):
            value, vector = results[per_call, tol]
            np.testing.assert_allclose(value, results[1, tol][0], rtol=1e-6)
            np.testing.assert_allclose(vector, results[1, tol][1], atol=1e-5)
            assert restarts[per_call, tol] == restarts[1, tol]
            # Less than one call's worth is dropped at the stop and at
            # each reorthogonalization.
            extra = products[per_call, tol] - products[1, tol]
            assert 0 <= extra < per_call * (1 + restarts[1, tol])


def test_lanczos_finds_largest_not_largest_magnitude():
    matrix = np.diag([-20.0, 1.0, 2.0, 5.0])
    model, data, loss = _quadratic(matrix)
    value = sharpness.top_eigenvalue(model, data, loss=loss)
    assert abs(value - 5.0) < 5e-3


def test_hessian_trace_of_quadratic():
    matrix = _spd_matrix()
    model, data, loss = _quadratic(matrix)
    hessian = sharpness.Hessian(model, data, loss=loss)
    # The default probe count is within 5% of the true trace.
    assert abs(hessian.trace() - np.trace(matrix)) <= 0.05 * np.trace(matrix)
    # And it is exactly Hutchinson's estimator with the seeded probes.
    estimate = hessian.trace(num_probes=30, seed=7)
    expected = reference.hutchinson_trace(matrix, 30, 7)
    np.testing.assert_allclose(estimate, expected, rtol=1e-4)
    assert hessian.trace(num_probes=30, seed=7) == estimate


# ---------------------------------------------------------------------------
# A small network: HVP, full-data averages, SAM sharpness, norms.


def test_hvp_matches_finite_differences():
    model, params, x, y = _mlp()
    rng = np.random.default_rng(1)
    vectors = [rng.normal(size=p.shape) for p in params]
    hv = sharpness.hessian_vector_product(
        model, (x, y), [v.astype("float32") for v in vectors]
    )
    expected = reference.mlp_hvp_fd(
        params, x.astype(np.float64), y.astype(np.float64), vectors
    )
    assert _rel(_numpy(hv), expected) < 1e-3
    # Linear in v: H (2 v) = 2 H v.
    hv2 = sharpness.hessian_vector_product(
        model, (x, y), [2.0 * v.astype("float32") for v in vectors]
    )
    assert _rel(_numpy(hv2), [2.0 * h for h in _numpy(hv)]) < 1e-5


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, y, size):
        super().__init__()
        self.x, self.y, self.size = x, y, size

    def __len__(self):
        return -(-len(self.x) // self.size)

    def __getitem__(self, i):
        s = slice(i * self.size, (i + 1) * self.size)
        return self.x[s], self.y[s]


def test_full_data_average_over_uneven_batches():
    model, params, x, y = _mlp()
    rng = np.random.default_rng(2)
    vectors = [rng.normal(size=p.shape) for p in params]
    expected = reference.mlp_hvp_fd(
        params, x.astype(np.float64), y.astype(np.float64), vectors
    )
    vectors = [v.astype("float32") for v in vectors]
    sources = {
        "arrays": dict(data=(x, y), batch_size=7),  # 7, 7, 6 samples
        "list": dict(data=[(x[i : i + 7], y[i : i + 7]) for i in (0, 7, 14)]),
        "generator": dict(
            data=((x[i : i + 7], y[i : i + 7]) for i in (0, 7, 14))
        ),
        "py_dataset": dict(data=_Batches(x, y, 7)),
    }
    for name, kwargs in sources.items():
        hessian = sharpness.Hessian(model, **kwargs)
        assert hessian.num_samples == 20, name
        assert _rel(_numpy(hessian.hvp(vectors)), expected) < 1e-3, name
    # Lanczos over several batches (one call per batch, then the step)
    # gives the one-batch value.
    one_batch = sharpness.top_eigenvalue(model, (x, y), tol=1e-8)
    batched = sharpness.top_eigenvalue(model, (x, y), batch_size=7, tol=1e-8)
    np.testing.assert_allclose(batched, one_batch, rtol=1e-6)
    # `steps` reads only the first batches.
    hessian = sharpness.Hessian(model, (x, y), batch_size=7, steps=2)
    assert hessian.num_samples == 14


def test_sam_sharpness_matches_reference():
    model, params, x, y = _mlp()
    for rho in (0.01, 0.2):
        value = sharpness.sam_sharpness(model, (x, y), rho=rho, batch_size=6)
        expected = reference.mlp_sam_sharpness(
            params, x.astype(np.float64), y.astype(np.float64), rho
        )
        np.testing.assert_allclose(value, expected, rtol=2e-3, atol=1e-6)
    # rho = 0: no perturbation, no sharpness.
    assert sharpness.sam_sharpness(model, (x, y), rho=0.0) == 0.0
    # The perturbation of a keras_sam optimizer (its own rho).
    sam = keras_sam.optimizers.SAM("sgd", rho=0.2)
    via_optimizer = sharpness.sam_sharpness(model, (x, y), optimizer=sam)
    np.testing.assert_allclose(via_optimizer, expected, rtol=2e-3)


def test_parameter_norms():
    model, params, _, _ = _mlp()
    norms = sharpness.parameter_norms(model)
    flat = np.concatenate([np.ravel(p.astype("float32")) for p in params])
    np.testing.assert_allclose(norms["l1"], np.abs(flat).sum(), rtol=1e-5)
    np.testing.assert_allclose(norms["l2"], np.linalg.norm(flat), rtol=1e-5)
    assert len(norms["layers"]) == 2
    first = next(iter(norms["layers"].values()))
    w1 = np.concatenate([np.ravel(params[0]), params[1]]).astype("float32")
    np.testing.assert_allclose(first["l2"], np.linalg.norm(w1), rtol=1e-5)


def test_training_mode_changes_nothing_and_is_repeatable():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            # Seeded: torch draws unseeded dropout masks from its global
            # generator, so only a seeded layer gives a fixed mask there.
            keras.layers.Dropout(0.3, seed=1),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    before = [np.array(v) for v in _numpy(model.variables)]
    hessian = sharpness.Hessian(model, (x, y), training=True)
    first = hessian.top_eigenvalue()
    assert first == hessian.top_eigenvalue()
    after = _numpy(model.variables)
    for b, a in zip(before, after):
        np.testing.assert_array_equal(b, a)
    # Inference mode measures a different function (moving statistics).
    assert sharpness.top_eigenvalue(model, (x, y)) != first


# ---------------------------------------------------------------------------
# Edge of stability on f = (u v)^2, L = (u^2 v^2 - 1)^2 (tests/reference.py).

U0, V0 = 2.0, 0.502


def _scalar_network():
    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(1, use_bias=False),
            keras.layers.Dense(1, use_bias=False),
        ]
    )
    model.set_weights(
        [np.array([[U0]], "float32"), np.array([[V0]], "float32")]
    )

    def loss(y_true, y_pred):
        return ops.mean(ops.square(ops.square(y_pred) - y_true), axis=-1)

    return model, loss


def _gradient_descent(lr, epochs=3, steps=100):
    """Full-batch GD: every sample is x = 1, y = 1, so each batch of one is
    the full batch; `steps` GD steps per epoch."""
    model, loss = _scalar_network()
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=loss)
    probe = (np.ones((1, 1), "float32"), np.ones((1, 1), "float32"))
    initial = sharpness.top_eigenvalue(model, probe)
    monitor = SharpnessMonitor(probe, trace_probes=2)
    x = np.ones((steps, 1), "float32")
    history = model.fit(
        x,
        x,
        batch_size=1,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[monitor],
    )
    return initial, history.history


def test_edge_of_stability_above_critical_learning_rate():
    initial_ref = reference.scalar_eos_sharpness(U0, V0)
    lr = 0.1  # 2 / lr = 20 < initial sharpness ~34: unstable
    assert 2 / lr < 0.8 * initial_ref
    initial, history = _gradient_descent(lr)
    np.testing.assert_allclose(initial, initial_ref, rtol=1e-3)
    final = history["sharpness"][-1]
    assert abs(final - 2 / lr) <= 0.1 * (2 / lr)
    assert abs(history["eos_ratio"][-1] - final * lr / 2) < 1e-6
    assert 0.9 <= history["eos_ratio"][-1] <= 1.1
    # The float64 reference run lands there too.
    u, v = reference.scalar_eos_gd(U0, V0, lr, 300)
    assert abs(reference.scalar_eos_sharpness(u, v) - 2 / lr) <= 0.1 * 2 / lr
    assert history["loss"][-1] < 1e-3


def test_edge_of_stability_below_critical_learning_rate():
    lr = 0.03  # 2 / lr = 67 > initial sharpness ~34: stable
    initial, history = _gradient_descent(lr)
    for value in history["sharpness"]:
        assert abs(value - initial) <= 0.03 * initial
    u, v = reference.scalar_eos_gd(U0, V0, lr, 300)
    np.testing.assert_allclose(
        history["sharpness"][-1],
        reference.scalar_eos_sharpness(u, v),
        rtol=2e-3,
    )
    assert history["eos_ratio"][-1] < 0.6


# ---------------------------------------------------------------------------
# SharpnessMonitor through fit.


def test_monitor_writes_logs_through_fit(mode, tmp_path):
    base, params, x, y = _mlp()
    model = keras_sam.SAMModel(base)
    lr, beta = 0.05, 0.9
    model.compile(
        optimizer=keras_sam.optimizers.SAM(
            keras.optimizers.SGD(lr, momentum=beta), rho=0.05
        ),
        loss="mse",
        **mode,
    )
    monitor = SharpnessMonitor(
        (x, y), every_n_epochs=3, trace_probes=3, rho=0.05
    )
    path = os.path.join(tmp_path, "log.csv")
    history = model.fit(
        x,
        y,
        batch_size=20,
        epochs=3,
        verbose=0,
        callbacks=[monitor, keras.callbacks.CSVLogger(path)],
    )
    logs = history.history
    keys = (
        "sharpness",
        "hessian_trace",
        "param_l1",
        "param_l2",
        "eos_ratio",
        "sam_sharpness",
    )
    for key in keys:
        assert len(logs[key]) == 2, key  # epochs 1 and 3
        assert np.all(np.isfinite(logs[key])), key
    # The last values are those of the trained weights.
    final = sharpness.top_eigenvalue(model, (x, y))
    np.testing.assert_allclose(logs["sharpness"][-1], final, rtol=1e-4)
    np.testing.assert_allclose(
        logs["param_l2"][-1], sharpness.parameter_norms(base)["l2"], rtol=1e-6
    )
    np.testing.assert_allclose(
        logs["eos_ratio"][-1], final * lr / (2 * (1 + beta)), rtol=1e-4
    )
    np.testing.assert_allclose(
        logs["hessian_trace"][-1],
        sharpness.hessian_trace(model, (x, y), num_probes=3),
        rtol=1e-4,
    )
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [row["sharpness"] == "NA" for row in rows] == [0, 1, 0]
    assert float(rows[-1]["sharpness"]) == pytest.approx(final, rel=1e-4)


def test_monitor_eos_ratio_rules():
    model, _, x, y = _mlp()
    monitor = SharpnessMonitor((x, y), trace_probes=0)
    monitor.set_model(model)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, nesterov=True, momentum=0.5),
        loss="mse",
    )
    values = monitor.measure()
    assert "hessian_trace" not in values
    # Nesterov: threshold 2 (1 + beta) / ((1 + 2 beta) lr).
    np.testing.assert_allclose(
        values["eos_ratio"],
        values["sharpness"] * 0.1 * 2.0 / (2 * 1.5),
        rtol=1e-6,
    )
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    assert "eos_ratio" not in monitor.measure()
    monitor = SharpnessMonitor((x, y), trace_probes=0, momentum=0.0)
    monitor.set_model(model)
    values = monitor.measure()
    np.testing.assert_allclose(
        values["eos_ratio"], values["sharpness"] * 0.05, rtol=1e-6
    )


def test_monitor_config_round_trip():
    monitor = SharpnessMonitor(
        (np.ones((2, 1)), np.ones((2, 1))),
        every_n_epochs=3,
        method="power",
        max_iter=7,
        trace_probes=4,
        rho=0.1,
        momentum=0.9,
        seed=5,
    )
    config = monitor.get_config()
    again = SharpnessMonitor((np.ones((2, 1)), np.ones((2, 1))), **config)
    assert again.get_config() == config
    assert config["every_n_epochs"] == 3 and config["method"] == "power"


# ---------------------------------------------------------------------------
# Bad input.


def test_empty_data_raises():
    model, _, x, y = _mlp()
    for data in ((x[:0], y[:0]), [], iter([])):
        with pytest.raises(ValueError, match="`data` is empty"):
            sharpness.top_eigenvalue(model, data)
    with pytest.raises(ValueError, match="`data` is empty"):
        SharpnessMonitor((x[:0], y[:0]))
    with pytest.raises(ValueError, match="data=None"):
        sharpness.hessian_trace(model, None)


def test_model_without_loss_raises():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    x, y = np.ones((4, 3), "float32"), np.ones((4, 1), "float32")
    with pytest.raises(ValueError, match="no compiled loss"):
        sharpness.top_eigenvalue(model, (x, y))
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="no compiled loss"):
        sharpness.hessian_trace(model, (x, y))
    # Passing `loss=` is enough.
    assert sharpness.top_eigenvalue(model, (x, y), loss="mse") > 0


def test_bad_arguments_raise():
    model, params, x, y = _mlp()
    with pytest.raises(TypeError, match="model="):
        sharpness.top_eigenvalue("model", (x, y))
    with pytest.raises(ValueError, match="method='qr'"):
        sharpness.top_eigenvalue(model, (x, y), method="qr")
    with pytest.raises(ValueError, match="max_iter=0"):
        sharpness.top_eigenvalue(model, (x, y), max_iter=0)
    with pytest.raises(ValueError, match="num_probes=0"):
        sharpness.hessian_trace(model, (x, y), num_probes=0)
    with pytest.raises(ValueError, match="seed=-1"):
        sharpness.top_eigenvalue(model, (x, y), seed=-1)
    with pytest.raises(TypeError, match="seed=0.5"):
        sharpness.hessian_trace(model, (x, y), seed=0.5)
    with pytest.raises(ValueError, match="Received shapes"):
        sharpness.hessian_vector_product(model, (x, y), [np.ones(3)])
    with pytest.raises(ValueError, match="rho=-1"):
        sharpness.sam_sharpness(model, (x, y), rho=-1.0)
    with pytest.raises(ValueError, match="every_n_epochs=0"):
        SharpnessMonitor((x, y), every_n_epochs=0)
    unbuilt = keras.Sequential([keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="built=False"):
        sharpness.top_eigenvalue(unbuilt, (x, y), loss="mse")


# ---------------------------------------------------------------------------
# The largest |eigenvalue| (Fojtik et al.'s sharpness) and the critical
# learning rate 2 / S_GF (issue 17).


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_which_magnitude_on_a_negative_dominant_eigenvalue(method):
    # L = (u^2 v^2 - 1)^2 at u = v = 0.5: eigenvalues -2.5625 and 0.9375.
    model, loss = _scalar_network()
    model.set_weights([np.array([[0.5]], "float32")] * 2)
    probe = (np.ones((1, 1), "float32"), np.ones((1, 1), "float32"))
    low, high = reference.scalar_eos_eigenvalues(0.5, 0.5)
    assert -low > high > 0
    hessian = sharpness.Hessian(model, probe, loss=loss)
    kwargs = dict(method=method, max_iter=200, tol=1e-6)
    algebraic = hessian.top_eigenvalue(**kwargs)
    magnitude = hessian.top_eigenvalue(which="magnitude", **kwargs)
    np.testing.assert_allclose(algebraic, high, rtol=1e-4)
    np.testing.assert_allclose(magnitude, -low, rtol=1e-4)
    value = sharpness.top_eigenvalue(
        model, probe, loss=loss, method=method, which="magnitude", tol=1e-6
    )
    np.testing.assert_allclose(value, -low, rtol=1e-4)


def test_which_magnitude_on_a_larger_indefinite_quadratic():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    matrix = (q * np.linspace(-10.0, 3.0, DIM)) @ q.T
    model, data, loss = _quadratic(matrix)
    hessian = sharpness.Hessian(model, data, loss=loss)
    value, vector = hessian.top_eigenvalue(
        which="magnitude", tol=1e-6, return_eigenvector=True
    )
    evals, evecs = np.linalg.eigh(matrix)
    np.testing.assert_allclose(value, 10.0, rtol=1e-4)
    v = np.ravel(_numpy(vector)[0])
    assert abs(abs(v @ evecs[:, 0]) - 1.0) < 1e-3
    np.testing.assert_allclose(
        hessian.top_eigenvalue(tol=1e-6), evals[-1], rtol=1e-4
    )
    with pytest.raises(ValueError, match="which"):
        hessian.top_eigenvalue(which="largest")


def test_critical_learning_rate_matches_a_float64_small_step_run():
    model, loss = _scalar_network()
    probe = (np.ones((1, 1), "float32"), np.ones((1, 1), "float32"))
    weights = [w.copy() for w in model.get_weights()]
    # lr 0.05 is above S_GF^-1 (S_GF ~ 34): halved once to 0.025.
    result = sharpness.critical_learning_rate(
        model,
        probe,
        learning_rate=0.05,
        max_steps=200,
        loss=loss,
        check_every=100,
    )
    assert result["learning_rate"] == 0.025
    assert result["steps"] == 200
    u, v = reference.scalar_eos_gd(U0, V0, 0.025, 200)
    s_gf = np.max(np.abs(reference.scalar_eos_eigenvalues(u, v)))
    np.testing.assert_allclose(result["sharpness"], s_gf, rtol=1e-3)
    np.testing.assert_allclose(
        result["critical_learning_rate"], 2 / s_gf, rtol=1e-3
    )
    far, _ = _scalar_network()
    far.set_weights([np.array([[0.8]], "float32")] * 2)  # loss 0.35
    with pytest.warns(RuntimeWarning, match="max_steps"):
        result = sharpness.critical_learning_rate(
            far,
            probe,
            learning_rate=0.02,
            max_steps=20,
            loss_threshold=1e-6,
            loss=loss,
            check_every=20,
        )
    assert result["reached_threshold"] is False
    # The model itself is not trained.
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)
    with pytest.raises(ValueError, match="max_halvings"):
        sharpness.critical_learning_rate(
            model,
            probe,
            learning_rate=1.0,
            max_steps=100,
            loss=loss,
            max_halvings=0,
            check_every=100,
        )


def test_full_batch_gradient_descent_stops_at_the_loss_threshold():
    model, loss = _scalar_network()
    model.set_weights([np.array([[0.8]], "float32")] * 2)
    probe = (np.ones((1, 1), "float32"), np.ones((1, 1), "float32"))
    run = sharpness.full_batch_gradient_descent(
        model,
        probe,
        0.05,
        max_steps=400,
        loss_threshold=1e-4,
        loss=loss,
        check_every=10,
    )
    assert run["reached_threshold"] and not run["diverged"]
    assert run["loss"] <= 1e-4 and run["steps"] % 10 == 0
    # The same number of float64 steps lands at the same point.
    u, v = reference.scalar_eos_gd(0.8, 0.8, 0.05, run["steps"])
    np.testing.assert_allclose(np.ravel(model.get_weights()), [u, v], rtol=1e-4)
    # Before the last check the loss was still above the threshold.
    u, v = reference.scalar_eos_gd(0.8, 0.8, 0.05, run["steps"] - 10)
    assert (u * u * v * v - 1) ** 2 > 1e-4
    with pytest.raises(ValueError, match="learning_rate"):
        sharpness.full_batch_gradient_descent(model, probe, -0.1, loss=loss)


def test_monitor_which_magnitude_and_config():
    model, loss = _scalar_network()
    model.set_weights([np.array([[0.5]], "float32")] * 2)
    model.compile(optimizer=keras.optimizers.SGD(1e-6), loss=loss)
    probe = (np.ones((1, 1), "float32"), np.ones((1, 1), "float32"))
    monitor = SharpnessMonitor(probe, which="magnitude", trace_probes=0)
    history = model.fit(
        probe[0], probe[1], epochs=1, verbose=0, callbacks=[monitor]
    )
    low, _ = reference.scalar_eos_eigenvalues(0.5, 0.5)
    np.testing.assert_allclose(history.history["sharpness"][0], -low, rtol=1e-3)
    assert monitor.get_config()["which"] == "magnitude"
    with pytest.raises(ValueError, match="which"):
        SharpnessMonitor(probe, which="abs")
