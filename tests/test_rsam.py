"""RSAM and keras_sam.manifolds: references, invariants, fit and save/load."""

import types

import keras
import numpy as np
import pytest
from keras import ops

import keras_sam
from keras_sam import manifolds
from tests import reference
from tests.conftest import BACKEND
from tests.conftest import DISTINCT_MODES
from tests.conftest import MODES

D_IN, D_HIDDEN, D_OUT = 6, 4, 3
WEIGHT_LIKE = [True, False, True, False]


def _params(seed=0, stiefel=True):
    """[W1, b1, W2, b2] with W1 orthonormal (a point of Stiefel) if asked."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(D_IN, D_HIDDEN))
    w1 = reference.qf(w1) if stiefel else 0.5 * w1
    return [
        w1,
        0.1 * rng.normal(size=(D_HIDDEN,)),
        0.5 * rng.normal(size=(D_HIDDEN, D_OUT)),
        0.1 * rng.normal(size=(D_OUT,)),
    ]


def _data(n, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D_IN)).astype("float32")
    y = rng.normal(size=(n, D_OUT)).astype("float32")
    return x, y


def _mlp(params=None, hidden_kwargs=None):
    """`tanh(x W1 + b1) W2 + b2`: the reference MLP, layers "hidden"/"out"."""
    model = keras.Sequential(
        [
            keras.Input((D_IN,)),
            keras.layers.Dense(
                D_HIDDEN,
                activation="tanh",
                name="hidden",
                **(hidden_kwargs or {}),
            ),
            keras.layers.Dense(D_OUT, name="out"),
        ]
    )
    if params is not None:
        model.set_weights([np.asarray(p, dtype="float32") for p in params])
    return model


def _train(optimizer, params, x, y, mode, batch_size=8, epochs=1):
    model = keras_sam.SAMModel(_mlp(params))
    model.compile(optimizer=optimizer, loss="mse", **mode)
    model.fit(
        x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0
    )
    return [np.asarray(w) for w in model.model.get_weights()], model


def _orthonormality_error(kernel):
    u = np.asarray(kernel, dtype=np.float64).reshape(-1, kernel.shape[-1])
    return np.abs(u.T @ u - np.eye(u.shape[1])).max()


def _sgd(momentum=0.0):
    return keras.optimizers.SGD(0.1, momentum=momentum)


# ---------------------------------------------------------------------------
# Flat variables: RSAM reduces to SAM and ASAM exactly.


def test_euclidean_identity_equals_sam(mode):
    params = _params(stiefel=False)
    x, y = _data(32)
    sam, _ = _train(
        keras_sam.optimizers.SAM(_sgd(0.9), rho=0.1), params, x, y, mode
    )
    rsam, _ = _train(
        keras_sam.optimizers.RSAM(_sgd(0.9), rho=0.1, metric="identity"),
        params,
        x,
        y,
        mode,
    )
    moved = max(np.abs(a - b).max() for a, b in zip(sam, params))
    assert moved > 1e-2
    for a, b in zip(sam, rsam):
        np.testing.assert_array_equal(a, b)


def test_euclidean_adaptive_equals_asam(mode):
    params = _params(stiefel=False)
    x, y = _data(32)
    asam, _ = _train(
        keras_sam.optimizers.ASAM(_sgd(0.9), rho=0.5, eta=0.02),
        params,
        x,
        y,
        mode,
    )
    rsam, _ = _train(
        keras_sam.optimizers.RSAM(
            _sgd(0.9), rho=0.5, metric="adaptive", eta=0.02
        ),
        params,
        x,
        y,
        mode,
    )
    for a, b in zip(asam, rsam):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# The Riemannian step against the numpy reference.


@pytest.mark.parametrize(
    "metric,mode_name",
    [
        ("identity", "eager"),
        ("identity", "graph"),
        ("identity", "jit"),
        ("adaptive", "graph"),
        ("fisher", "graph"),
    ],
)
def test_stiefel_sphere_steps_match_reference(metric, mode_name):
    if metric == "identity" and mode_name not in DISTINCT_MODES[BACKEND]:
        pytest.skip(f"'{mode_name}' is not a distinct mode on {BACKEND}")
    mode = dict(MODES[mode_name])
    params = _params()
    x, y = _data(24)
    optimizer = keras_sam.optimizers.RSAM(
        _sgd(),
        rho=0.3,
        manifold={"hidden": "stiefel", "out/kernel": "sphere"},
        metric=metric,
        eta=0.05,
        damping=0.01,
        fisher_decay=0.9,
    )
    got, _ = _train(optimizer, params, x, y, mode)
    batches = [
        (x[i : i + 8].astype("float64"), y[i : i + 8].astype("float64"))
        for i in range(0, 24, 8)
    ]
    expected = reference.train_rsam(
        params,
        batches,
        reference.mlp_loss_and_grads,
        ["stiefel", "euclidean", "sphere", "euclidean"],
        rho=0.3,
        lr=0.1,
        metric=metric,
        eta=0.05,
        weight_like=WEIGHT_LIKE,
        damping=0.01,
        decay=0.9,
    )
    # Same reference with flat variables: the manifolds make a difference.
    flat = reference.train_rsam(
        params,
        batches,
        reference.mlp_loss_and_grads,
        ["euclidean"] * 4,
        rho=0.3,
        lr=0.1,
        metric=metric,
        eta=0.05,
        weight_like=WEIGHT_LIKE,
        damping=0.01,
        decay=0.9,
    )
    assert np.abs(flat[0] - expected[0]).max() > 1e-3
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=2e-5, rtol=1e-4)
    assert _orthonormality_error(got[0]) < 1e-5


@pytest.mark.parametrize("metric", ["identity", "adaptive", "fisher"])
def test_eps_has_norm_rho_in_the_metric_and_is_tangent(metric):
    params = _params()
    model = _mlp(params)
    variables = model.trainable_variables
    optimizer = keras_sam.optimizers.RSAM(
        _sgd(),
        rho=0.07,
        manifold={"hidden": "stiefel", "out/kernel": "sphere"},
        metric=metric,
        eta=0.05,
        damping=0.01,
        fisher_decay=0.8,
    )
    optimizer.build(variables)
    rng = np.random.default_rng(3)
    fisher = ([np.zeros_like(p) for p in params], 0.0)
    for _ in range(2):  # two clean passes: the EMA is debiased
        grads = [rng.normal(size=p.shape) for p in params]
        # The rule's step after the clean pass (the radius is fixed here).
        optimizer._after_clean(
            types.SimpleNamespace(variables=variables, shared=lambda g: g),
            [ops.convert_to_tensor(g, "float32") for g in grads],
        )
        fisher = reference.fisher_update(fisher, grads, 0.8)
    grads = [rng.normal(size=p.shape) for p in params]
    eps = optimizer.perturbation(
        [ops.convert_to_tensor(g, "float32") for g in grads], variables
    )
    eps = [ops.convert_to_numpy(e).astype(np.float64) for e in eps]

    d = reference.rsam_metric(
        params, grads, metric, WEIGHT_LIKE, 0.05, fisher, 0.01
    )
    norm_d = np.sqrt(sum(np.sum(e * dd * e) for e, dd in zip(eps, d)))
    np.testing.assert_allclose(norm_d, 0.07, rtol=1e-5)
    expected = reference.rsam_eps(
        params, grads, ["stiefel", "euclidean", "sphere", "euclidean"], 0.07, d
    )
    for e, r in zip(eps, expected):
        np.testing.assert_allclose(e, r, rtol=1e-4, atol=1e-7)
    # Tangent at w: U^T eps is skew, w . eps = 0.
    skew = params[0].T @ eps[0]
    np.testing.assert_allclose(skew, -skew.T, atol=1e-6)
    np.testing.assert_allclose(np.sum(params[2] * eps[2]), 0.0, atol=1e-6)

    zero = optimizer.perturbation(
        [ops.zeros(p.shape) for p in params], variables
    )
    for e in zero:
        np.testing.assert_array_equal(ops.convert_to_numpy(e), 0.0)


# ---------------------------------------------------------------------------
# Invariants over a long run.


def test_stiefel_and_sphere_stay_on_manifold_for_200_steps():
    x, y = _data(800, seed=4)
    base = _mlp(hidden_kwargs=manifolds.stiefel_kernel(seed=0))
    u0 = np.asarray(base.layers[0].kernel)
    norm0 = np.linalg.norm(np.asarray(base.layers[1].kernel))
    model = keras_sam.SAMModel(base)
    model.compile(
        optimizer=keras_sam.optimizers.RSAM(
            keras.optimizers.SGD(0.2, momentum=0.9),
            rho=0.1,
            manifold={"out": manifolds.Sphere()},
            metric="fisher",
        ),
        loss="mse",
    )
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert int(np.asarray(model.optimizer.iterations)) == 200
    u = np.asarray(base.layers[0].kernel)
    w2 = np.asarray(base.layers[1].kernel)
    assert _orthonormality_error(u) < 1e-5
    assert abs(np.linalg.norm(w2) / norm0 - 1.0) < 1e-5
    # The run is not trivial: the weights travelled along the manifolds.
    assert np.abs(u - u0).max() > 0.05

    # Without the retraction the same kernel leaves the manifold.
    keras.utils.set_random_seed(1234)
    plain = _mlp(hidden_kwargs={"kernel_initializer": "orthogonal"})
    plain.compile(optimizer=keras.optimizers.SGD(0.2, momentum=0.9), loss="mse")
    plain.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert _orthonormality_error(np.asarray(plain.layers[0].kernel)) > 1e-3


# ---------------------------------------------------------------------------
# fit, save and load.


@keras.saving.register_keras_serializable(package="keras_sam_tests")
def out_kernel(variable):
    """A predicate key: the output layer's kernel."""
    return variable.path.endswith("out/kernel")


def test_fit_save_load_round_trip(tmp_path):
    x, y = _data(64, seed=5)
    base = _mlp(hidden_kwargs=manifolds.stiefel_kernel(seed=1))
    model = keras_sam.SAMModel(base)
    model.compile(
        optimizer=keras_sam.optimizers.RSAM(
            keras.optimizers.SGD(0.1, momentum=0.9),
            rho=0.05,
            manifold={out_kernel: manifolds.Sphere(axis=0)},
            metric="fisher",
        ),
        loss="mse",
    )
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    path = str(tmp_path / "rsam.keras")
    model.save(path)
    loaded = keras.models.load_model(path)

    assert isinstance(loaded.optimizer, keras_sam.optimizers.RSAM)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kinds = [
        type(loaded.optimizer.manifold_of(v)).__name__
        for v in loaded.trainable_variables
    ]
    assert kinds == ["Stiefel", "Euclidean", "Sphere", "Euclidean"]

    # Training resumes from the restored state (momentum, Fisher EMA).
    for m in (model, loaded):
        m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    columns = np.linalg.norm(np.asarray(loaded.model.layers[1].kernel), axis=0)
    before = np.linalg.norm(np.asarray(base.layers[1].kernel), axis=0)
    np.testing.assert_allclose(columns, before, rtol=1e-5)
    assert _orthonormality_error(np.asarray(loaded.model.layers[0].kernel)) < (
        1e-5
    )


def test_registry_and_config_round_trip():
    optimizer = keras_sam.optimizers.get(
        "rsam",
        _sgd(0.5),
        rho=0.2,
        manifold={"hidden": "stiefel", "out/bias": manifolds.Sphere(2.0)},
        metric="adaptive",
        eta=0.1,
    )
    assert isinstance(optimizer, keras_sam.optimizers.RSAM)
    config = keras_sam.optimizers.serialize(optimizer)
    clone = keras_sam.optimizers.deserialize(config)
    assert clone.get_config() == optimizer.get_config()
    assert clone.manifold_spec == optimizer.manifold_spec
    assert clone.metric == "adaptive" and clone.eta == 0.1


def test_mapping_by_layer_name_path_and_predicate():
    model = _mlp(_params())
    optimizer = keras_sam.optimizers.RSAM(
        manifold={
            "hidden": "stiefel",  # layer name: its kernel, not its bias
            "out/bias": "sphere",  # variable path (tail)
            out_kernel: manifolds.Sphere(axis=0),  # predicate
        }
    )
    optimizer.build(model.trainable_variables)
    got = [optimizer.manifold_of(v) for v in model.trainable_variables]
    assert got == [
        manifolds.Stiefel(),
        manifolds.Euclidean(),
        manifolds.Sphere(axis=0),
        manifolds.Sphere(),
    ]


# ---------------------------------------------------------------------------
# The manifolds themselves.


def _random(shape, seed):
    return np.random.default_rng(seed).normal(size=shape)


@pytest.mark.parametrize("retraction", ["qr", "polar"])
def test_stiefel_projection_and_retraction(retraction):
    stiefel = manifolds.Stiefel(retraction)
    u = reference.qf(_random((3, 2, 5, 4), 0).reshape(30, 4)).reshape(
        3, 2, 5, 4
    )
    v = _random(u.shape, 1)
    p = ops.convert_to_numpy(stiefel.project(u, v))
    np.testing.assert_allclose(p, reference.stiefel_project(u, v), atol=1e-6)
    np.testing.assert_allclose(
        ops.convert_to_numpy(stiefel.project(u, p)), p, atol=1e-6
    )
    moved = ops.convert_to_numpy(stiefel.retract(u.astype("float32"), 0.3 * p))
    assert moved.shape == u.shape
    assert _orthonormality_error(moved) < 1e-5
    a = (u + 0.3 * p).reshape(30, 4)
    if retraction == "qr":
        expected = reference.qf(a)
    else:  # the closest matrix with orthonormal columns
        left, _, right = np.linalg.svd(a, full_matrices=False)
        expected = left @ right
    np.testing.assert_allclose(moved.reshape(30, 4), expected, atol=1e-5)
    assert float(ops.convert_to_numpy(stiefel.error(u))) < 1e-6
    assert float(ops.convert_to_numpy(stiefel.error(2 * u))) > 1.0


def test_sphere_projection_retraction_and_axis():
    w = _random((5, 3), 0)
    v = _random((5, 3), 1)
    sphere = manifolds.Sphere()
    p = ops.convert_to_numpy(sphere.project(w, v))
    np.testing.assert_allclose(p, reference.sphere_project(w, v), atol=1e-6)
    np.testing.assert_allclose(np.sum(p * w), 0.0, atol=1e-6)
    r = ops.convert_to_numpy(sphere.retract(w, 0.5 * p))
    np.testing.assert_allclose(
        r, reference.sphere_retract(w, 0.5 * p), rtol=1e-6
    )

    columns = manifolds.Sphere(axis=0)
    p = ops.convert_to_numpy(columns.project(w, v))
    np.testing.assert_allclose(np.sum(p * w, axis=0), 0.0, atol=1e-6)
    r = ops.convert_to_numpy(columns.retract(w, p))
    np.testing.assert_allclose(
        np.linalg.norm(r, axis=0), np.linalg.norm(w, axis=0), rtol=1e-6
    )

    fixed = manifolds.Sphere(radius=2.0)
    on = 2.0 * w / np.linalg.norm(w)
    np.testing.assert_allclose(
        ops.convert_to_numpy(fixed.restore(w)), on, rtol=1e-6
    )
    fixed.check(on, "w")
    with pytest.raises(ValueError, match="'w' is not on the manifold"):
        fixed.check(w / np.linalg.norm(w), "w")


def test_euclidean_is_flat():
    flat = manifolds.get("euclidean")
    w, v = _random((4,), 0), _random((4,), 1)
    assert flat.project(w, v) is v
    np.testing.assert_allclose(ops.convert_to_numpy(flat.retract(w, v)), w + v)


@pytest.mark.parametrize(
    "manifold",
    [
        manifolds.Euclidean(),
        manifolds.Sphere(radius=3.0, axis=(0, 1), tolerance=1e-3),
        manifolds.Stiefel("polar", tolerance=1e-5),
    ],
)
def test_manifold_serialization(manifold):
    config = manifolds.serialize(manifold)
    assert manifolds.deserialize(config) == manifold
    assert manifolds.get(config) == manifold
    assert manifolds.get(manifold.name) == type(manifold)()
    constraint = manifolds.ManifoldConstraint(manifold)
    clone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(constraint)
    )
    assert clone.manifold == manifold


def test_stiefel_initializer_and_constraint():
    initializer = manifolds.StiefelInitializer(seed=3)
    kernel = ops.convert_to_numpy(initializer((3, 3, 4, 16)))
    assert kernel.shape == (3, 3, 4, 16)
    assert _orthonormality_error(kernel) < 1e-5
    clone = manifolds.StiefelInitializer.from_config(initializer.get_config())
    assert clone.seed == 3

    constraint = manifolds.ManifoldConstraint("stiefel")
    fixed = ops.convert_to_numpy(constraint(ops.convert_to_tensor(2 * kernel)))
    np.testing.assert_allclose(fixed, kernel, atol=1e-5)

    kwargs = manifolds.stiefel_kernel(seed=2)
    conv = keras.layers.Conv2D(8, 3, **kwargs)
    conv.build((None, 6, 6, 2))
    assert _orthonormality_error(np.asarray(conv.kernel)) < 1e-5


# ---------------------------------------------------------------------------
# Bad input.


def test_unknown_manifold_and_metric_names():
    with pytest.raises(ValueError, match="Unknown manifold.*'torus'.*hidden"):
        keras_sam.optimizers.RSAM(manifold={"hidden": "torus"})
    with pytest.raises(ValueError, match="`metric` must be one of.*'riemann'"):
        keras_sam.optimizers.RSAM(metric="riemann")
    with pytest.raises(ValueError, match="Unknown manifold.*'torus'"):
        manifolds.get("torus")
    with pytest.raises(TypeError, match="manifold=42"):
        keras_sam.optimizers.RSAM(manifold=42)
    with pytest.raises(ValueError, match="damping=0"):
        keras_sam.optimizers.RSAM(damping=0)
    with pytest.raises(ValueError, match="fisher_decay=1"):
        keras_sam.optimizers.RSAM(fisher_decay=1)
    with pytest.raises(ValueError, match="retraction='cayley'"):
        manifolds.Stiefel("cayley")
    with pytest.raises(ValueError, match="radius=-1"):
        manifolds.Sphere(radius=-1)


def test_stiefel_needs_fan_in_at_least_units():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(8, name="wide")]
    )
    optimizer = keras_sam.optimizers.RSAM(manifold={"wide": "stiefel"})
    with pytest.raises(ValueError, match=r"'.*wide/kernel'.*\(3, 8\)"):
        optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match="fan_in >= units"):
        manifolds.StiefelInitializer()((3, 8))


@pytest.mark.parametrize("via", ["build", "fit"])
def test_weights_off_the_manifold_at_build(via):
    model = _mlp(_params(stiefel=False))  # W1 not orthonormal
    optimizer = keras_sam.optimizers.RSAM(manifold={"hidden": "stiefel"})
    match = r"'.*hidden/kernel' is not on the manifold Stiefel"
    if via == "build":
        with pytest.raises(ValueError, match=match):
            optimizer.build(model.trainable_variables)
    else:
        # SAMModel.compile builds the optimizer eagerly (a built model), so
        # the check runs there on every backend, before any trace.
        wrapped = keras_sam.SAMModel(model)
        x, y = _data(8)
        with pytest.raises(ValueError, match=match):
            wrapped.compile(optimizer=optimizer, loss="mse")
            wrapped.fit(x, y, verbose=0)


def test_unmatched_keys_and_conflicting_manifolds():
    model = _mlp(_params())
    optimizer = keras_sam.optimizers.RSAM(manifold={"hiden": "stiefel"})
    with pytest.raises(
        ValueError, match="No trainable variable matches.*'hiden'"
    ):
        optimizer.build(model.trainable_variables)

    model = _mlp(hidden_kwargs=manifolds.stiefel_kernel())
    optimizer = keras_sam.optimizers.RSAM(manifold={"hidden": "sphere"})
    with pytest.raises(ValueError, match="'.*hidden/kernel' is mapped to"):
        optimizer.build(model.trainable_variables)


# ---------------------------------------------------------------------------
# R-Stiefel layers (issue 17): the canonical metric, per-group radii.


def _stiefel_mlp(params=None, **kwargs):
    """`tanh(x U diag(s) + b1) W2 + b2`, U in a StiefelDense "hidden"."""
    model = keras.Sequential(
        [
            keras.Input((D_IN,)),
            keras_sam.layers.StiefelDense(
                D_HIDDEN, activation="tanh", name="hidden", **kwargs
            ),
            keras.layers.Dense(D_OUT, name="out"),
        ]
    )
    if params is not None:
        model.set_weights([np.asarray(p, dtype="float32") for p in params])
    return model


def _stiefel_params(seed=0):
    rng = np.random.default_rng(seed)
    return [
        reference.qf(rng.normal(size=(D_IN, D_HIDDEN))),
        1.0 + 0.3 * rng.normal(size=(D_HIDDEN,)),
        0.1 * rng.normal(size=(D_HIDDEN,)),
        0.5 * rng.normal(size=(D_HIDDEN, D_OUT)),
        0.1 * rng.normal(size=(D_OUT,)),
    ]


def test_canonical_metric_gradient_and_inner():
    rng = np.random.default_rng(3)
    u = reference.qf(rng.normal(size=(6, 3))).astype("float32")
    g = rng.normal(size=(6, 3)).astype("float32")
    z = reference.stiefel_project(u, rng.normal(size=(6, 3)))  # tangent
    z = z.astype("float32")
    stiefel = manifolds.Stiefel(metric="canonical")
    xi = ops.convert_to_numpy(stiefel.riemannian_gradient(u, g))
    np.testing.assert_allclose(
        xi, reference.stiefel_canonical_grad(u, g), atol=1e-5
    )
    # Tangent, and the gradient of the metric: <xi, Z>_c = <G, Z>.
    sym = u.T @ xi + xi.T @ u
    assert np.abs(sym).max() < 1e-5
    inner = float(ops.convert_to_numpy(stiefel.inner(u, xi, z)))
    np.testing.assert_allclose(inner, np.sum(g * z), rtol=1e-5)
    np.testing.assert_allclose(
        inner, reference.stiefel_canonical_inner(u, xi, z), rtol=1e-5
    )
    # The Euclidean metric is the projection.
    np.testing.assert_allclose(
        ops.convert_to_numpy(manifolds.Stiefel().riemannian_gradient(u, g)),
        reference.stiefel_project(u, g),
        atol=1e-5,
    )


@pytest.mark.parametrize("flat_rho", [None, 0.02])
def test_stiefel_dense_steps_match_reference(flat_rho):
    params = _stiefel_params()
    x, y = _data(24)
    model = keras_sam.SAMModel(_stiefel_mlp(params))
    model.compile(
        optimizer=keras_sam.optimizers.RSAM(_sgd(), rho=0.3, flat_rho=flat_rho),
        loss="mse",
    )
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    got = [np.asarray(w) for w in model.model.get_weights()]
    batches = [
        (x[i : i + 8].astype("float64"), y[i : i + 8].astype("float64"))
        for i in range(0, 24, 8)
    ]
    expected = reference.train_rsam_stiefel_layer(
        params, batches, rho=0.3, flat_rho=flat_rho, lr=0.1
    )
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=2e-5, rtol=1e-4)
    assert _orthonormality_error(got[0]) < 1e-5


def test_rho_zero_is_riemannian_sgd_and_groups_differ():
    params = _stiefel_params(1)
    x, y = _data(24, seed=4)
    batches = [
        (x[i : i + 8].astype("float64"), y[i : i + 8].astype("float64"))
        for i in range(0, 24, 8)
    ]

    def fit(**kwargs):
        model = keras_sam.SAMModel(_stiefel_mlp(params))
        model.compile(
            optimizer=keras_sam.optimizers.RSAM(_sgd(), **kwargs), loss="mse"
        )
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        return [np.asarray(w) for w in model.model.get_weights()]

    # rho = 0: Riemannian SGD, G - U G^T U retracted by QR.
    rsgd = reference.train_rsam_stiefel_layer(params, batches, 0.0, 0.0, 0.1)
    for g, e in zip(fit(rho=0.0, flat_rho=0.0), rsgd):
        np.testing.assert_allclose(g, e, atol=2e-6, rtol=1e-5)
    # flat_rho = 0 perturbs U only: the flat variables' radius matters.
    only_u = fit(rho=0.3, flat_rho=0.0)
    both = fit(rho=0.3, flat_rho=0.3)
    assert np.abs(only_u[3] - both[3]).max() > 1e-4
    assert np.abs(only_u[0] - rsgd[0]).max() > 1e-4


def test_eps_per_group_has_its_radius():
    model = _stiefel_mlp(_stiefel_params(2))
    optimizer = keras_sam.optimizers.RSAM("sgd", rho=0.3, flat_rho=0.07)
    variables = model.trainable_variables
    optimizer.build(variables)
    rng = np.random.default_rng(5)
    grads = [rng.normal(size=v.shape).astype("float32") for v in variables]
    eps = [
        ops.convert_to_numpy(e).astype(np.float64)
        for e in optimizer.perturbation(grads, variables)
    ]
    u = ops.convert_to_numpy(variables[0]).astype(np.float64)
    norm_u = np.sqrt(reference.stiefel_canonical_inner(u, eps[0], eps[0]))
    np.testing.assert_allclose(norm_u, 0.3, rtol=1e-5)
    norm_flat = np.sqrt(sum(np.sum(e**2) for e in eps[1:]))
    np.testing.assert_allclose(norm_flat, 0.07, rtol=1e-5)
    assert np.abs(u.T @ eps[0] + eps[0].T @ u).max() < 1e-5  # tangent
    np.testing.assert_allclose(
        eps[0] / np.abs(eps[0]).max(),
        reference.stiefel_canonical_grad(u, grads[0])
        / np.abs(reference.stiefel_canonical_grad(u, grads[0])).max(),
        atol=1e-5,
    )
    optimizer.flat_rho.assign(0.0)
    eps = optimizer.perturbation(grads, variables)
    assert all(np.abs(ops.convert_to_numpy(e)).max() == 0 for e in eps[1:])


def test_flat_rho_validation_and_stiefel_layer_round_trip(tmp_path):
    with pytest.raises(ValueError, match="flat_rho"):
        keras_sam.optimizers.RSAM("sgd", flat_rho=-0.1)
    with pytest.raises(ValueError, match="flat_rho"):
        keras_sam.optimizers.RSAM(
            "sgd",
            rho=keras_sam.LearnedRadius(
                validation_data=(np.zeros((2, 1)),) * 2
            ),
            flat_rho=0.1,
        )
    with pytest.raises(ValueError, match="`metric`"):
        manifolds.Stiefel(metric="fisher")

    x, y = _data(64, seed=6)
    model = keras_sam.SAMModel(_stiefel_mlp(seed=1))
    model.compile(
        optimizer=keras_sam.optimizers.RSAM(
            keras.optimizers.SGD(0.1, momentum=0.9), rho=0.2, flat_rho=0.05
        ),
        loss="mse",
    )
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    assert history.history["flat_rho"][-1] == pytest.approx(0.05)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert (
        _orthonormality_error(ops.convert_to_numpy(model.model.layers[0].u))
        < 1e-5
    )
    path = str(tmp_path / "stiefel_rsam.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert loaded.optimizer.get_config()["flat_rho"] == 0.05
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for m in (model, loaded):
        m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert (
        _orthonormality_error(ops.convert_to_numpy(loaded.model.layers[0].u))
        < 1e-5
    )
