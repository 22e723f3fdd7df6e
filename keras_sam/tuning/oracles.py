"""Keras-Tuner oracles whose first trial is the `rho = 0` baseline."""

import keras_tuner

from keras_sam.tuning.space import is_baseline
from keras_sam.tuning.space import rho_key


class _BaselineFirst:
    """Oracle mixin: the first trial has default values and `rho = 0`."""

    def _propose(self, trial_id):
        return super().populate_space(trial_id)

    def populate_space(self, trial_id):
        response = self._propose(trial_id)
        values = response.get("values")
        if (
            response.get("status") != "RUNNING"
            or not values
            or "tuner/trial_id" in values  # Hyperband continues a trial.
            or any(is_baseline(t) for t in self.trials.values())
        ):
            return response
        baseline = keras_tuner.HyperParameters()
        for hp in self.hyperparameters.space:
            # Registers hp, with its default value when active.
            baseline.merge([hp])
        values = dict(
            baseline.values,
            **{k: v for k, v in values.items() if k.startswith("tuner/")},
        )
        key = rho_key(values)
        if key is None:
            return response
        values[key] = 0.0
        return dict(response, values=values)


class _RandomSearchOracle(
    _BaselineFirst, keras_tuner.oracles.RandomSearchOracle
):
    pass


class _HyperbandOracle(_BaselineFirst, keras_tuner.oracles.HyperbandOracle):
    pass


class _BayesianOracle(
    _BaselineFirst, keras_tuner.oracles.BayesianOptimizationOracle
):
    def _propose(self, trial_id):
        # rho = 0 has no place on the log scale of rho (log 0): the
        # Gaussian process is fitted on the other trials only.
        trials = self.trials
        self.trials = {k: t for k, t in trials.items() if not is_baseline(t)}
        try:
            return super()._propose(trial_id)
        finally:
            self.trials = trials


class _HyperbandTuner(keras_tuner.Hyperband):
    """`keras_tuner.Hyperband` (epochs per round, warm starts), our oracle."""

    def __init__(self, oracle, hypermodel, **kwargs):
        # Hyperband's own __init__ only builds a HyperbandOracle.
        keras_tuner.Tuner.__init__(
            self, oracle=oracle, hypermodel=hypermodel, **kwargs
        )


# The kinds of `make_tuner` (and `search_rho(tuner=...)`).
TUNERS = ("bayesian", "random", "hyperband")


def make_tuner(
    tuner,
    hypermodel,
    objective,
    max_trials,
    epochs,
    hyperparameters,
    seed,
    directory,
    project_name,
    overwrite,
    oracle_kwargs,
):
    """A tuner of kind `tuner` (one of `TUNERS`) over `hypermodel`, whose
    oracle runs the `rho = 0` baseline first."""
    common = dict(
        objective=objective,
        hyperparameters=hyperparameters,
        seed=seed,
        **oracle_kwargs,
    )
    tuner_kwargs = dict(
        hypermodel=hypermodel,
        directory=directory,
        project_name=project_name,
        overwrite=overwrite,
    )
    if tuner == "random":
        oracle = _RandomSearchOracle(max_trials=max_trials, **common)
        return keras_tuner.Tuner(oracle=oracle, **tuner_kwargs)
    if tuner == "bayesian":
        oracle = _BayesianOracle(max_trials=max_trials, **common)
        return keras_tuner.Tuner(oracle=oracle, **tuner_kwargs)
    oracle = _HyperbandOracle(max_epochs=epochs, **common)
    # Hyperband has no trial budget of its own; cap it with max_trials.
    oracle.max_trials = max_trials
    return _HyperbandTuner(oracle=oracle, **tuner_kwargs)
