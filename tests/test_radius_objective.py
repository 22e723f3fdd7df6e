"""LearnedRadius: the validation-loss objective, the scale-free log-rho
step, non-finite validation data, saving with the new options."""

import keras
import numpy as np
import pytest

import keras_sam
from tests import reference
from tests import reference_radius
from tests.test_radius import EAGER
from tests.test_radius import LR
from tests.test_radius import _BatchLogs
from tests.test_radius import _cases
from tests.test_radius import _classifier
from tests.test_radius import _data
from tests.test_radius import _digits
from tests.test_radius import _eps_fn
from tests.test_radius import _fit
from tests.test_radius import _mlp
from tests.test_radius import _optimizer
from tests.test_radius import _params


def _two_steps(kind, mode, rho, **options):
    """Step 0 stores dw_1/drho, step 1 (same batch) measures at w_1."""
    params = _params()
    x, y = _data(16, seed=1)
    xv, yv = _data(24, seed=2)
    radius = keras_sam.LearnedRadius(
        initial=rho,
        validation_data=(xv, yv),
        batch_size=64,
        **options,
    )
    model = keras_sam.SAMModel(_mlp(params))
    model.compile(optimizer=_optimizer(kind, radius), loss="mse", **mode)
    logs = _BatchLogs()
    _fit(model, np.concatenate([x, x]), np.concatenate([y, y]), 16, [logs])
    args = (params, x, y, xv, yv, rho, LR, reference.mlp_loss_and_grads)
    return radius, logs.logs, args


@pytest.mark.parametrize("kind, mode", _cases(["sam", "asam"]))
def test_validation_objective_matches_reference_and_finite_difference(
    kind, mode
):
    rho = 0.05 if kind == "sam" else 0.5
    radius, logs, args = _two_steps(
        kind, mode, rho, learning_rate=0.0, objective="validation"
    )
    approx, gap = reference_radius.validation_hypergradient(
        *args, _eps_fn(kind)
    )
    exact = reference_radius.validation_hypergradient_fd(*args, _eps_fn(kind))
    got = float(keras.ops.convert_to_numpy(radius.rho_grad))
    np.testing.assert_allclose(logs[1]["gap"], gap, rtol=1e-4)
    np.testing.assert_allclose(got, approx, rtol=2e-3, atol=1e-9)
    # The one-step formula is dL_val/drho: same sign, within 10%.
    assert abs(exact) > 1e-6
    assert np.sign(got) == np.sign(exact)
    assert abs(got - exact) < 0.1 * abs(exact), (got, exact)


@pytest.mark.parametrize("objective", ["gap", "validation"])
def test_first_log_rho_step_is_scale_free(objective):
    # From 0.001 and from 1.0 the first normalized step moves log rho by
    # exactly learning_rate, in the direction of -sign(dF/drho).
    for rho in (0.001, 0.05):
        radius, logs, _ = _two_steps(
            "sam",
            EAGER,
            rho,
            learning_rate=0.3,
            objective=objective,
            bounds=(1e-5, 10.0),
        )
        grad = logs[1]["rho_grad"]
        assert grad != 0.0
        want = reference_radius.log_rho_step(rho, grad, 1, 0.3, (1e-5, 10.0))
        np.testing.assert_allclose(logs[1]["rho"], want, rtol=1e-5)


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("part", ["x", "y"])
def test_non_finite_validation_data_raises(part, value):
    xv, yv = _data(10, seed=0)
    if part == "x":
        xv[3, 1] = value
    else:
        yv[:] = value  # all targets NaN: rho used to freeze silently
    count = 1 if part == "x" else len(yv)
    kind = "NaN" if np.isnan(value) else "inf"
    match = f"validation_data.*{part} with .*{count} {kind}"
    with pytest.raises(ValueError, match=match):
        keras_sam.LearnedRadius(validation_data=(xv, yv))
    radius = keras_sam.LearnedRadius(validation_data=_data(10, seed=0))
    with pytest.raises(ValueError, match="validation_data"):
        radius.set_validation_data((xv, yv))


def test_non_finite_validation_dataset_raises():
    tf = pytest.importorskip("tensorflow")
    xv, yv = _data(8, seed=0)
    yv[5] = np.nan
    data = tf.data.Dataset.from_tensor_slices((xv, yv)).batch(4)
    with pytest.raises(ValueError, match="1 NaN"):
        keras_sam.LearnedRadius(validation_data=data)


def test_bad_objective_raises():
    with pytest.raises(ValueError, match="objective='loss'"):
        keras_sam.LearnedRadius(
            validation_data=_data(10, seed=0), objective="loss"
        )


def test_old_config_without_objective_loads():
    config = keras_sam.LearnedRadius(
        validation_data=_data(10, seed=0)
    ).get_config()
    del config["objective"]
    assert keras_sam.LearnedRadius.from_config(config).objective == "gap"


def test_save_and_resume_with_validation_objective(tmp_path):
    (x, y), (xv, yv) = _digits(200, 60)
    radius = keras_sam.LearnedRadius(
        initial=0.5,
        learning_rate=0.1,
        validation_data=(xv, yv),
        batch_size=16,
        seed=3,
        objective="validation",
    )
    model = keras_sam.SAMModel(_classifier())
    model.compile(
        optimizer=keras_sam.optimizers.SAM(
            keras.optimizers.SGD(0.1, momentum=0.9), rho=radius
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **EAGER,
    )
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    path = str(tmp_path / "lets_validation.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    restored = loaded.optimizer.radius
    assert restored.get_config() == radius.get_config()
    assert restored.objective == "validation"
    for name in ("rho_grad", "momentum", "velocity", "updates"):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(getattr(radius, name)),
            keras.ops.convert_to_numpy(getattr(restored, name)),
        )
    rho = float(keras.ops.convert_to_numpy(loaded.optimizer.rho))
    assert rho != 0.5
    # Resumed with data, rho is learned on from the restored state.
    restored.set_validation_data((xv, yv))
    loaded.make_train_function(force=True)
    updates = float(keras.ops.convert_to_numpy(restored.updates))
    history = loaded.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert float(keras.ops.convert_to_numpy(restored.updates)) > updates
    assert np.isfinite(history.history["rho"][0])
