"""Keras-Tuner search of rho: space, baseline, tuners, resume, bad input."""

import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

keras_tuner = pytest.importorskip("keras_tuner")

from keras_sam import optimizers  # noqa: E402
from keras_sam import tuning  # noqa: E402
from keras_sam.radius import LearnedRadius  # noqa: E402
from keras_sam.sam_model import SAMModel  # noqa: E402

LOSS = "sparse_categorical_crossentropy"


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 8)).astype("float32")
    y = ((x[:, 0] > 0).astype("int32") + (x[:, 1] > 0)).astype("int32")
    return (x[:64], y[:64]), (x[64:], y[64:])


TRAIN, VAL = _data()


def build_model(hp):
    units = hp.Int("units", 4, 8, step=4)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(units, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


class FitCounter(keras.callbacks.Callback):
    """Counts `fit` calls across the copies Keras-Tuner makes."""

    fits = 0

    def on_train_begin(self, logs=None):
        FitCounter.fits += 1


class Interrupt(BaseException):
    """Stands for Ctrl-C or a killed job: Keras-Tuner does not catch it."""


class InterruptAt(keras.callbacks.Callback):
    """Raises `Interrupt` in the `stop_at`-th fit (counting from 1)."""

    stop_at = None
    fits = 0

    def on_train_begin(self, logs=None):
        InterruptAt.fits += 1
        if InterruptAt.fits == InterruptAt.stop_at:
            raise Interrupt()


def _search(tmp_path, tuner="random", max_trials=2, **kwargs):
    kwargs.setdefault("optimizer", keras.optimizers.SGD(0.1))
    kwargs.setdefault("loss", LOSS)
    return tuning.search_rho(
        build_model,
        TRAIN,
        VAL,
        tuner=tuner,
        max_trials=max_trials,
        epochs=kwargs.pop("epochs", 1),
        directory=str(tmp_path),
        batch_size=16,
        verbose=0,
        seed=7,
        **kwargs,
    )


def _trials(tuner):
    oracle = tuner.oracle
    return [oracle.trials[i] for i in sorted(oracle.trials)]


def _rho_of(model):
    return float(keras.ops.convert_to_numpy(model.sam_optimizer.rho))


def _check_best_model(tuner):
    """The best model is a trained SAMModel with the best variant and rho."""
    completed = [t for t in _trials(tuner) if t.status == "COMPLETED"]
    best_trial = tuner.oracle.get_best_trials(1)[0]
    assert best_trial.score == min(t.score for t in completed)
    best_hp = tuner.get_best_hyperparameters(1)[0]
    assert best_hp.values == best_trial.hyperparameters.values
    model = tuner.get_best_models(1)[0]
    assert isinstance(model, SAMModel)
    expected = {"sam": optimizers.SAM, "asam": optimizers.ASAM}
    assert type(model.sam_optimizer) is expected[best_hp["variant"]]
    np.testing.assert_allclose(
        _rho_of(model), tuning.get_rho(best_hp), rtol=1e-6
    )
    # The trained weights of the best epoch are restored.
    loss = model.evaluate(*VAL, verbose=0, return_dict=True)["loss"]
    np.testing.assert_allclose(loss, best_trial.score, rtol=1e-4)


def _check_baseline_first(tuner):
    first = _trials(tuner)[0]
    values = {
        k: v for k, v in first.hyperparameters.values.items() if "/" not in k
    }
    # Default of every hyperparameter, rho = 0.
    assert values == {"variant": "sam", "rho_sam": 0.0, "units": 4}
    assert tuning.is_baseline(first)
    # The best rho = 0 trial (Hyperband may continue the baseline).
    baselines = [t for t in _trials(tuner) if tuning.is_baseline(t)]
    best_baseline = tuning.baseline_trial(tuner)
    assert best_baseline in baselines
    assert best_baseline.score == min(t.score for t in baselines)
    baseline = tuner.load_model(first)
    assert _rho_of(baseline) == 0.0


def _check_in_range(tuner):
    for trial in _trials(tuner)[1:]:
        hp = trial.hyperparameters
        lo, hi = tuning.DEFAULT_RHO_RANGES[hp["variant"]]
        if "tuner/trial_id" not in hp.values:
            assert lo <= tuning.get_rho(hp) <= hi


# ---- the search space ----


def test_space_defaults():
    hypermodel = tuning.SAMHyperModel(
        build_model, optimizer=keras.optimizers.SGD(0.1), loss=LOSS
    )
    hp = keras_tuner.HyperParameters()
    model = hypermodel.build(hp)
    assert hp.values == {"variant": "sam", "rho_sam": 0.05, "units": 4}
    space = {p.name: p for p in hp.space}
    assert space["variant"].values == ["sam", "asam"]
    assert space["variant"].default == "sam"
    for variant, lo, hi, default in (
        ("sam", 0.01, 0.5, 0.05),
        ("asam", 0.1, 2.0, 0.5),
    ):
        rho = space[f"rho_{variant}"]
        assert (rho.min_value, rho.max_value) == (lo, hi)
        assert rho.sampling == "log"
        assert rho.default == default
        [condition] = rho.conditions
        assert condition.name == "variant"
        assert list(condition.values) == [variant]

    assert isinstance(model, SAMModel)
    assert type(model.sam_optimizer) is optimizers.SAM
    assert _rho_of(model) == pytest.approx(0.05)
    inner = model.sam_optimizer.inner_optimizer
    assert isinstance(inner, keras.optimizers.SGD)
    assert float(inner.learning_rate) == pytest.approx(0.1)
    assert inner is not hypermodel.optimizer  # a fresh copy per trial


def test_space_asam_and_fixed_overrides():
    hypermodel = tuning.SAMHyperModel(build_model, optimizer="sgd", loss=LOSS)
    hp = keras_tuner.HyperParameters()
    hp.Fixed("variant", "asam")
    model = hypermodel.build(hp)
    assert hp.values["rho_asam"] == 0.5
    assert type(model.sam_optimizer) is optimizers.ASAM
    assert _rho_of(model) == pytest.approx(0.5)

    hp = keras_tuner.HyperParameters()
    hp.Fixed("variant", "asam")
    hp.Fixed("rho_asam", 1.5)
    model = hypermodel.build(hp)
    assert [p.name for p in hp.space].count("rho_asam") == 1
    assert _rho_of(model) == pytest.approx(1.5)

    # An unconditional "rho" replaces the per-variant ranges.
    hp = keras_tuner.HyperParameters()
    hp.Fixed("rho", 0.2)
    model = hypermodel.build(hp)
    assert not any(p.name.startswith("rho_") for p in hp.space)
    assert tuning.get_rho(hp) == 0.2
    assert _rho_of(model) == pytest.approx(0.2)


def test_custom_ranges():
    hypermodel = tuning.SAMHyperModel(
        build_model,
        rho={"asam": (0.02, 0.2)},
        loss=LOSS,
    )
    hp = keras_tuner.HyperParameters()
    hypermodel.build(hp)
    space = {p.name: p for p in hp.space}
    assert (space["rho_sam"].min_value, space["rho_sam"].max_value) == (
        0.01,
        0.5,
    )
    asam = space["rho_asam"]
    assert (asam.min_value, asam.max_value) == (0.02, 0.2)
    # ASAM's usual 0.5 lies outside: the geometric mean is the default.
    assert asam.default == pytest.approx(math.sqrt(0.02 * 0.2))

    single = tuning.SAMHyperModel(
        build_model, rho=(0.001, 0.01), variants="asam", loss=LOSS
    )
    hp = keras_tuner.HyperParameters()
    model = single.build(hp)
    assert hp.values["variant"] == "asam"
    assert hp.values["rho_asam"] == pytest.approx(math.sqrt(1e-5))
    assert _rho_of(model) == pytest.approx(math.sqrt(1e-5))


def test_compiled_model_is_reused():
    built = []

    def build_compiled():  # takes no `hp`
        model = build_model(keras_tuner.HyperParameters())
        model.compile(
            optimizer=keras.optimizers.Adam(0.003),
            loss=LOSS,
            metrics=["accuracy"],
        )
        built.append(model)
        return model

    hypermodel = tuning.SAMHyperModel(build_compiled)
    model = hypermodel.build(keras_tuner.HyperParameters())
    inner = model.sam_optimizer.inner_optimizer
    assert inner is built[-1].optimizer
    assert float(inner.learning_rate) == pytest.approx(0.003)
    assert model.loss == LOSS
    history = model.fit(*TRAIN, batch_size=16, epochs=1, verbose=0)
    assert 0.0 <= history.history["accuracy"][0] <= 1.0
    assert int(keras.ops.convert_to_numpy(inner.iterations)) == 4

    # Arguments take precedence over the compiled model's.
    hypermodel = tuning.SAMHyperModel(
        build_compiled, optimizer=keras.optimizers.SGD(0.2)
    )
    model = hypermodel.build(keras_tuner.HyperParameters())
    inner = model.sam_optimizer.inner_optimizer
    assert isinstance(inner, keras.optimizers.SGD)
    assert float(inner.learning_rate) == pytest.approx(0.2)
    assert model.loss == LOSS


# ---- real searches ----


def test_random_search(tmp_path):
    tuner = _search(tmp_path, "random", max_trials=2)
    trials = _trials(tuner)
    assert [t.status for t in trials] == ["COMPLETED"] * 2
    _check_baseline_first(tuner)
    _check_in_range(tuner)
    _check_best_model(tuner)


def test_bayesian_search(tmp_path):
    # One random point, then the Gaussian process proposes the third
    # trial; the baseline (rho = 0, outside the log scale) is left out of
    # its fit.
    tuner = _search(tmp_path, "bayesian", max_trials=3, num_initial_points=1)
    trials = _trials(tuner)
    assert [t.status for t in trials] == ["COMPLETED"] * 3
    assert sum(tuning.is_baseline(t) for t in trials) == 1
    _check_baseline_first(tuner)
    _check_in_range(tuner)
    _check_best_model(tuner)


def test_hyperband_search(tmp_path):
    # max_epochs=2, factor=2: two 1-epoch trials, then the better one
    # continues for a second epoch from its checkpoint.
    tuner = _search(tmp_path, "hyperband", max_trials=3, epochs=2, factor=2)
    trials = _trials(tuner)
    assert [t.status for t in trials] == ["COMPLETED"] * 3
    _check_baseline_first(tuner)
    _check_in_range(tuner)
    third = trials[2].hyperparameters.values
    assert third["tuner/initial_epoch"] == 1 and third["tuner/epochs"] == 2
    parent = tuner.oracle.trials[third["tuner/trial_id"]]
    assert tuning.get_rho(third) == tuning.get_rho(parent.hyperparameters)
    assert third["variant"] == parent.hyperparameters["variant"]
    _check_best_model(tuner)


def test_fixed_rho_override(tmp_path):
    hp = keras_tuner.HyperParameters()
    hp.Fixed("rho", 0.1)
    tuner = _search(tmp_path, "random", max_trials=2, hyperparameters=hp)
    trials = _trials(tuner)
    assert [t.status for t in trials] == ["COMPLETED"] * 2
    assert [tuning.get_rho(t.hyperparameters) for t in trials] == [0.0, 0.1]
    names = [p.name for p in tuner.oracle.hyperparameters.space]
    assert "rho_sam" not in names and "rho_asam" not in names
    model = tuner.load_model(trials[1])
    assert _rho_of(model) == pytest.approx(0.1)


def test_resume_does_not_redo_finished_trials(tmp_path):
    InterruptAt.fits, InterruptAt.stop_at = 0, 2
    with pytest.raises(Interrupt):
        _search(tmp_path, "random", max_trials=2, callbacks=[InterruptAt()])

    FitCounter.fits = 0
    tuner = _search(tmp_path, "random", max_trials=2, callbacks=[FitCounter()])
    # Only the interrupted trial runs again; the baseline is not redone.
    assert FitCounter.fits == 1
    trials = _trials(tuner)
    assert [t.status for t in trials] == ["COMPLETED"] * 2
    assert sum(tuning.is_baseline(t) for t in trials) == 1

    # A larger budget continues the same search.
    tuner = _search(tmp_path, "random", max_trials=3, callbacks=[FitCounter()])
    assert FitCounter.fits == 2
    assert len(_trials(tuner)) == 3

    # overwrite=True starts over.
    FitCounter.fits = 0
    tuner = _search(
        tmp_path,
        "random",
        max_trials=1,
        overwrite=True,
        callbacks=[FitCounter()],
    )
    assert FitCounter.fits == 1
    assert len(_trials(tuner)) == 1


# ---- bad input ----


def test_build_function_must_return_a_model(tmp_path):
    hypermodel = tuning.SAMHyperModel(lambda hp: "not a model", loss=LOSS)
    with pytest.raises(TypeError, match="build_model.*not a model"):
        hypermodel.build(keras_tuner.HyperParameters())
    with pytest.raises(TypeError, match="build_model"):
        tuning.search_rho(
            lambda: None, TRAIN, VAL, loss=LOSS, directory=str(tmp_path)
        )
    with pytest.raises(TypeError, match="build_model"):
        tuning.SAMHyperModel(build_model(keras_tuner.HyperParameters()))
    with pytest.raises(TypeError, match="build_model"):
        tuning.SAMHyperModel("sam")


@pytest.mark.parametrize(
    "rho, error",
    [
        ((0.5, 0.1), ValueError),
        ((0.1, 0.1), ValueError),
        ({"asam": (2.0, 1.0)}, ValueError),
        ((0.0, 1.0), ValueError),
        ({"fisher": (0.1, 1.0)}, ValueError),
        ((0.1,), TypeError),
        ("wide", TypeError),
    ],
)
def test_bad_range(tmp_path, rho, error):
    with pytest.raises(error, match="rho"):
        tuning.SAMHyperModel(build_model, rho=rho, loss=LOSS)
    with pytest.raises(error, match="rho"):
        _search(tmp_path, rho=rho)
    assert not os.listdir(tmp_path)  # failed before creating a search


def test_empty_range_message():
    with pytest.raises(ValueError, match=r"empty range.*rho=\(0.5, 0.1\)"):
        tuning.SAMHyperModel(build_model, rho=(0.5, 0.1))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="variants"):
        tuning.SAMHyperModel(build_model, variants=())
    with pytest.raises(ValueError, match="nope"):
        tuning.SAMHyperModel(build_model, variants=("sam", "nope"))
    with pytest.raises(ValueError, match="validation_data"):
        tuning.SAMHyperModel(build_model, variants=("lets",))
    with pytest.raises(ValueError, match="tuner='grid'"):
        _search(tmp_path, tuner="grid")
    with pytest.raises(ValueError, match="max_trials=0"):
        _search(tmp_path, max_trials=0)
    with pytest.raises(ValueError, match="validation_data"):
        tuning.search_rho(build_model, TRAIN, None, loss=LOSS)
    hypermodel = tuning.SAMHyperModel(build_model)  # not compiled, no loss
    with pytest.raises(ValueError, match="loss"):
        hypermodel.build(keras_tuner.HyperParameters())
    with pytest.raises(TypeError, match="hyperparameters"):
        tuning.get_rho([0.1])


def test_import_keras_sam_does_not_import_keras_tuner():
    code = (
        "import sys, keras_sam\n"
        "assert 'keras_tuner' not in sys.modules\n"
        "assert callable(keras_sam.tuning.search_rho)\n"
        "assert 'keras_tuner' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_learned_radius_variant(tmp_path):
    hp = keras_tuner.HyperParameters()
    hp.Fixed("variant", "lets")
    tuner = _search(
        tmp_path,
        "random",
        max_trials=2,
        variants=("sam", "lets"),
        hyperparameters=hp,
    )
    baseline, trial = _trials(tuner)
    assert [baseline.status, trial.status] == ["COMPLETED"] * 2
    assert baseline.hyperparameters.values == {
        "variant": "lets",
        "rho_lets": 0.0,
        "units": 4,
    }
    assert baseline.metrics.get_last_value("rho") == 0.0
    initial = tuning.get_rho(trial.hyperparameters)
    lo, hi = tuning.DEFAULT_RHO_RANGES["lets"]
    assert lo <= initial <= hi
    model = tuner.load_model(trial)
    assert isinstance(model.sam_optimizer.radius, LearnedRadius)
    assert model.sam_optimizer.radius.initial == pytest.approx(initial)
    # rho was learned during the trial, on search_rho's validation data.
    learned = trial.metrics.get_last_value("rho")
    assert abs(learned - initial) > 1e-6
