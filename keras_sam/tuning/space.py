"""The search space's names: the variant, rho per variant, the baseline.

```
variant       ~ Choice(variants)                   # "sam", "asam", "lets"
rho_<variant> ~ log-uniform(lo_variant, hi_variant) # if variant is chosen
```
"""

import keras_tuner

VARIANT = "variant"
# An unconditional "rho" (e.g. `hp.Fixed("rho", 0.1)` from the user)
# replaces the per-variant hyperparameters `rho_<variant>`.
RHO = "rho"

# Learned radius (LETS): `rho` is the initial radius of a
# `keras_sam.LearnedRadius` around a SAM optimizer.
LETS = "lets"

# Log-scale search ranges `(min_value, max_value)` and the usual rho of each
# variant, used as the default value of the hyperparameter.
DEFAULT_RHO_RANGES = {
    "sam": (0.01, 0.5),
    "asam": (0.1, 2.0),
    LETS: (0.01, 0.5),
}
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5, LETS: 0.05}

# Registered variants without a range of their own search SAM's range.
FALLBACK_VARIANT = "sam"


def rho_name(variant):
    """Name of the hyperparameter holding rho for `variant`."""
    return f"{RHO}_{variant}"


def rho_key(values):
    """The key of rho in a dict of hyperparameter values, or `None`."""
    if RHO in values:
        return RHO
    key = rho_name(values.get(VARIANT))
    return key if key in values else None


def get_rho(hyperparameters):
    """The rho of a trial: `rho_<variant>`, or `rho` where the user set it.

    Args:
        hyperparameters: a `keras_tuner.HyperParameters` (as returned by
            `tuner.get_best_hyperparameters()`) or a dict of its values.

    Returns:
        The float rho of the chosen variant, or `None` if there is none.

    Example:

    >>> best = {"variant": "sam", "rho_sam": 0.083}  # a trial's values
    >>> keras_sam.tuning.get_rho(best), best["variant"]
    (0.083, 'sam')
    """
    values = hyperparameters
    if isinstance(values, keras_tuner.HyperParameters):
        values = values.values
    if not isinstance(values, dict):
        raise TypeError(
            "`hyperparameters` must be a `keras_tuner.HyperParameters` or a "
            f"dict of values. Received: hyperparameters={hyperparameters!r}"
        )
    key = rho_key(values)
    return None if key is None else values[key]


def is_baseline(trial):
    """Whether a Keras-Tuner trial is a `rho = 0` (no sharpness) trial."""
    return get_rho(trial.hyperparameters) == 0.0


def baseline_trial(tuner):
    """The completed `rho = 0` baseline trial of a search, or `None`.

    Args:
        tuner: the tuner returned by `search_rho`.

    Returns:
        The `keras_tuner` `Trial` with `rho = 0` and the best score, or
        `None` if no baseline trial completed.
    """
    trials = [
        t
        for t in tuner.oracle.get_best_trials(len(tuner.oracle.trials))
        if t.status == "COMPLETED" and is_baseline(t)
    ]
    return trials[0] if trials else None
