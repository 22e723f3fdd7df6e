"""Keras-Tuner search of the radius rho (and the variant that uses it).

`SAMHyperModel` turns a model-building function into a hypermodel whose
search space is

```
variant       ~ Choice(variants)                   # "sam", "asam", "lets"
rho_<variant> ~ log-uniform(lo_variant, hi_variant) # if variant is chosen
```

and `search_rho` runs a Keras-Tuner search over it. The first trial of every
search is the baseline `rho = 0` (exactly the inner optimizer), so the
results always show what sharpness-aware training buys on the task.

This module imports `keras_tuner`; `import keras_sam` does not, the module
is loaded on first use of `keras_sam.tuning`.
"""

import inspect
import math
import numbers

import keras
import keras_tuner

from keras_sam._validation import check_positive_int
from keras_sam import optimizers as sam_optimizers
from keras_sam.radius import LearnedRadius
from keras_sam.sam_model import SAMModel

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
_DEFAULT_RHO = {"sam": 0.05, "asam": 0.5, LETS: 0.05}

# Registered variants without a range of their own search SAM's range.
_FALLBACK_VARIANT = "sam"

# Compile arguments reused from a model that `build_model` compiled.
_COMPILE_ARGS = (
    "loss",
    "loss_weights",
    "metrics",
    "weighted_metrics",
    "run_eagerly",
    "steps_per_execution",
    "jit_compile",
)


def _check_variants(variants):
    if isinstance(variants, str):
        variants = (variants,)
    if not isinstance(variants, (list, tuple)) or not variants:
        raise ValueError(
            "`variants` must be a non-empty list of sharpness-aware optimizer "
            f"names such as ('sam', 'asam'). Received: variants={variants!r}"
        )
    checked = []
    for variant in variants:
        if not isinstance(variant, str):
            raise TypeError(
                "Each entry of `variants` must be a string. Received: "
                f"variants={variants!r}"
            )
        variant = variant.lower()
        if variant != LETS:
            # Raises a ValueError that lists the registered names.
            sam_optimizers.get(variant, optimizer="sgd")
        if variant in checked:
            raise ValueError(
                f"`variants` lists {variant!r} twice. Received: "
                f"variants={variants!r}"
            )
        checked.append(variant)
    return tuple(checked)


def _check_range(value, name):
    """Validates a `(min_value, max_value)` log-scale range of rho."""
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool)
            for v in value
        )
    ):
        raise TypeError(
            f"`{name}` must be a pair `(min_value, max_value)` of floats. "
            f"Received: {name}={value!r}"
        )
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0:
        raise ValueError(
            f"`{name}` is searched on a log scale: both ends must be finite "
            f"and > 0. Received: {name}={value!r}"
        )
    if lo >= hi:
        raise ValueError(
            f"`{name}` is an empty range: `min_value` must be smaller than "
            f"`max_value` (to fix rho, pass "
            f"`hyperparameters` with `hp.Fixed('rho', value)`). Received: "
            f"{name}={value!r}"
        )
    return lo, hi


def _check_rho_ranges(rho, variants):
    """`{variant: (min_value, max_value)}` from the `rho` argument."""
    if rho is None:
        return {
            v: DEFAULT_RHO_RANGES.get(v, DEFAULT_RHO_RANGES[_FALLBACK_VARIANT])
            for v in variants
        }
    if isinstance(rho, dict):
        unknown = sorted(set(rho) - set(variants))
        if unknown:
            raise ValueError(
                f"`rho` gives ranges for {unknown}, which are not in "
                f"`variants`={list(variants)}. Received: rho={rho!r}"
            )
        ranges = {}
        for v in variants:
            if v in rho:
                ranges[v] = _check_range(rho[v], f"rho[{v!r}]")
            else:
                ranges[v] = DEFAULT_RHO_RANGES.get(
                    v, DEFAULT_RHO_RANGES[_FALLBACK_VARIANT]
                )
        return ranges
    lo_hi = _check_range(rho, "rho")
    return {v: lo_hi for v in variants}


def _wants_hp(build_model):
    """Whether `build_model` takes the `HyperParameters` argument."""
    try:
        parameters = inspect.signature(build_model).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    )
    return any(p.kind in positional for p in parameters)


def _clone_optimizer(optimizer):
    """A fresh copy, so that no optimizer state leaks from one trial."""
    if isinstance(optimizer, keras.optimizers.Optimizer):
        # get_config/from_config rather than `keras.optimizers.serialize`,
        # which imports TensorFlow on the other backends.
        return optimizer.__class__.from_config(optimizer.get_config())
    return optimizer


def rho_name(variant):
    """Name of the hyperparameter holding rho for `variant`."""
    return f"{RHO}_{variant}"


def _rho_key(values):
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

    >>> best = tuner.get_best_hyperparameters()[0]
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
    key = _rho_key(values)
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


class SAMHyperModel(keras_tuner.HyperModel):
    """A Keras-Tuner hypermodel that searches rho and the SAM variant.

    Each trial builds the user's model, wraps it in `keras_sam.SAMModel` and
    compiles it with the chosen variant around the inner optimizer:

    ```
    variant = hp.Choice("variant", variants)
    rho     = hp.Float(f"rho_{variant}", lo, hi, sampling="log")
    model   = SAMModel(build_model(hp))
    model.compile(optimizer=Variant(inner_optimizer, rho=rho), ...)
    ```

    If the built model is compiled, its loss, metrics and other compile
    arguments are reused and its optimizer becomes the inner optimizer;
    arguments given here take precedence. Each `rho_<variant>` is
    conditional on its variant, so the ranges may differ (`get_rho` reads
    the one in use); an unconditional `"rho"` that the user registers first
    (for example `hp.Fixed("rho", 0.1)` in the `hyperparameters` of a
    tuner) replaces them all. A trial whose rho is 0 trains with exactly
    the inner optimizer; `search_rho` runs that baseline first, a stock
    Keras-Tuner tuner only if its search proposes it.

    Args:
        build_model: A function that returns a `keras.Model`, taking the
            `keras_tuner.HyperParameters` as its argument or no argument, or
            a `keras_tuner.HyperModel`. It must build a new model each call.
        rho: The log-scale search range of rho: `None` for the default range
            of each variant (`DEFAULT_RHO_RANGES`: SAM and LETS 0.01..0.5,
            ASAM 0.1..2.0; other registered variants use SAM's), a pair
            `(min_value, max_value)` for all variants, or a dict from variant
            name to such a pair. Defaults to `None`.
        optimizer: The inner optimizer (instance, name or config) when the
            built model is not compiled; an instance is copied for each
            trial. Defaults to `None`: the compiled model's optimizer, or
            `"sgd"`.
        variants: Names of the sharpness-aware optimizers to choose from:
            any name registered in `keras_sam.optimizers` (`"sam"`,
            `"asam"`, ...) and `"lets"` (SAM with a `keras_sam.LearnedRadius`
            starting at rho, learned on `validation_data`). The first one
            is the default. Defaults to `("sam", "asam")`.
        loss: The loss when the built model is not compiled. Defaults to
            `None`: the compiled model's loss.
        metrics: Metrics to compile with. Defaults to `None`: the compiled
            model's metrics, if any.
        validation_data: Held-out data for the `"lets"` variant, in any form
            that `keras_sam.LearnedRadius` accepts. Required when `variants`
            contains `"lets"`. Defaults to `None`.
        name: Optional name of the hypermodel. Defaults to `None`.

    Example:

    >>> def build_model(hp):
    ...     units = hp.Int("units", 16, 64, step=16)
    ...     return keras.Sequential([
    ...         keras.Input((64,)),
    ...         keras.layers.Dense(units, activation="relu"),
    ...         keras.layers.Dense(10, activation="softmax"),
    ...     ])
    >>> hypermodel = keras_sam.tuning.SAMHyperModel(
    ...     build_model, optimizer=keras.optimizers.SGD(0.1),
    ...     loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    >>> tuner = keras_tuner.RandomSearch(
    ...     hypermodel, objective="val_accuracy", max_trials=5)

    References:
        - Foret et al., Sharpness-Aware Minimization for Efficiently Improving
          Generalization, ICLR 2021.
        - Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization, ICML 2021.
        - Wang, Jiang, Fu, Zhang, Enhancing Sharpness-Aware Minimization by
          Learning Perturbation Radius (LETS), ECML-PKDD 2024.
    """

    def __init__(
        self,
        build_model,
        rho=None,
        optimizer=None,
        variants=("sam", "asam"),
        loss=None,
        metrics=None,
        validation_data=None,
        name=None,
    ):
        if isinstance(build_model, keras.Model) or not callable(
            getattr(build_model, "build", build_model)
        ):
            raise TypeError(
                "`build_model` must be a function that builds a new "
                "`keras.Model` (taking `hp` or no argument) or a "
                "`keras_tuner.HyperModel`. Received: "
                f"build_model={build_model!r} of type "
                f"{type(build_model).__name__}"
            )
        super().__init__(name=name)
        self.build_model = build_model
        self.variants = _check_variants(variants)
        self.rho_ranges = _check_rho_ranges(rho, self.variants)
        if LETS in self.variants and validation_data is None:
            raise ValueError(
                "The 'lets' variant learns rho on held-out data: pass "
                "`validation_data`. Received: validation_data=None"
            )
        if optimizer is not None:
            # Fail now rather than inside a trial.
            sam_optimizers._get_inner(_clone_optimizer(optimizer))
        self.optimizer = optimizer
        self.loss = loss
        self.metrics = metrics
        self.validation_data = validation_data

    # ---- the search space ----

    def _default_rho(self, variant):
        lo, hi = self.rho_ranges[variant]
        usual = _DEFAULT_RHO.get(variant, _DEFAULT_RHO[_FALLBACK_VARIANT])
        if lo <= usual <= hi:
            return usual
        return math.sqrt(lo * hi)

    def declare_rho(self, hp):
        """Registers `variant` and `rho_<variant>`; returns their values."""
        variant = hp.Choice(
            VARIANT, list(self.variants), default=self.variants[0]
        )
        if variant not in self.variants:
            raise keras_tuner.errors.FatalValueError(
                f"The hyperparameter `variant` must be one of "
                f"{list(self.variants)}. Received: variant={variant!r}"
            )

        def user_defined(name):
            # Registered without condition by the user (hp.Fixed, or a range
            # of their own), not by an earlier build of this hypermodel.
            return any(p.name == name and not p.conditions for p in hp.space)

        if user_defined(RHO):
            return variant, hp.get(RHO)
        rho = None
        for v in self.variants:
            name = rho_name(v)
            if user_defined(name):
                value = hp.get(name)
            else:
                lo, hi = self.rho_ranges[v]
                with hp.conditional_scope(VARIANT, [v]):
                    value = hp.Float(
                        name,
                        min_value=lo,
                        max_value=hi,
                        sampling="log",
                        default=self._default_rho(v),
                    )
            if v == variant:
                rho = value
        return variant, rho

    # ---- building a trial's model ----

    def _build_base(self, hp):
        if isinstance(self.build_model, keras_tuner.HyperModel):
            model = self.build_model.build(hp)
        elif _wants_hp(self.build_model):
            model = self.build_model(hp)
        else:
            model = self.build_model()
        if not isinstance(model, keras.Model):
            # A fatal error: Keras-Tuner stops the search instead of
            # recording a failed trial.
            raise keras_tuner.errors.FatalTypeError(
                "`build_model` must return a `keras.Model`. Received: "
                f"{model!r} of type {type(model).__name__} from "
                f"build_model={self.build_model!r}"
            )
        if isinstance(model, SAMModel):
            raise keras_tuner.errors.FatalTypeError(
                "`build_model` must return the model to wrap, not a "
                "`keras_sam.SAMModel`: the hypermodel wraps it. Received: "
                "a SAMModel"
            )
        return model

    def _compile_args(self, model):
        """Inner optimizer and compile arguments for a trial."""
        config = model.get_compile_config()
        compile_args = {}
        inner = None
        if config:
            config = keras.saving.deserialize_keras_object(config)
            compile_args = {
                k: config[k]
                for k in _COMPILE_ARGS
                if config.get(k) is not None
            }
            inner = model.optimizer
            sam = sam_optimizers.find_sam(inner)
            if sam is not None:
                inner = sam.inner_optimizer
        if self.optimizer is not None:
            inner = _clone_optimizer(self.optimizer)
        if inner is None:
            inner = "sgd"
        if self.loss is not None:
            compile_args["loss"] = self.loss
        if self.metrics is not None:
            compile_args["metrics"] = self.metrics
        if compile_args.get("loss") is None:
            raise keras_tuner.errors.FatalValueError(
                "The model returned by `build_model` is not compiled and no "
                "`loss` was given: compile it in `build_model` or pass "
                f"`loss`. Received: loss={self.loss!r}"
            )
        return inner, compile_args

    def make_optimizer(self, variant, inner, rho):
        """The sharpness-aware optimizer of a trial."""
        if variant == LETS:
            if rho == 0:
                # A learned radius cannot start at 0; rho = 0 is the
                # baseline, which is SAM with rho = 0 (the inner optimizer).
                return sam_optimizers.SAM(inner, rho=0.0)
            learned_radius = LearnedRadius(
                initial=rho, validation_data=self.validation_data
            )
            return sam_optimizers.SAM(inner, rho=learned_radius)
        return sam_optimizers.get(variant, optimizer=inner, rho=rho)

    def build(self, hp):
        variant, rho = self.declare_rho(hp)
        model = self._build_base(hp)
        inner, compile_args = self._compile_args(model)
        sam_model = SAMModel(model)
        sam_model.compile(
            optimizer=self.make_optimizer(variant, inner, rho),
            **compile_args,
        )
        return sam_model


# ---- oracles whose first trial is the rho = 0 baseline ----


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
        key = _rho_key(values)
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


_TUNERS = ("bayesian", "random", "hyperband")


def _make_tuner(
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


def search_rho(
    build_model,
    train_data,
    validation_data,
    tuner="bayesian",
    max_trials=10,
    epochs=1,
    objective="val_loss",
    rho=None,
    variants=("sam", "asam"),
    optimizer=None,
    loss=None,
    metrics=None,
    hyperparameters=None,
    directory=None,
    project_name="search_rho",
    overwrite=False,
    seed=None,
    batch_size=None,
    callbacks=None,
    verbose=1,
    **oracle_kwargs,
):
    """Searches rho (and the variant) with Keras-Tuner; returns the tuner.

    The first trial is the baseline `rho = 0`, with the default value of
    every other hyperparameter; it trains with exactly the inner optimizer.
    The other trials follow the tuner's strategy over `SAMHyperModel`'s
    space. With `overwrite=False`, a search whose `directory/project_name`
    exists resumes: finished trials are kept, an interrupted one is rerun,
    and the search continues up to `max_trials` trials in all.

    Args:
        build_model: A function that returns a new `keras.Model`, taking
            `hp` or no argument, or a `keras_tuner.HyperModel`. See
            `SAMHyperModel`.
        train_data: Training data: a tuple `(x, y)` or `(x, y,
            sample_weight)` of arrays, or anything else that `Model.fit`
            takes as `x` (a `tf.data.Dataset`, a `keras.utils.PyDataset`).
        validation_data: Validation data as `Model.fit` takes it; the
            objective is measured on it (and `"lets"` learns rho on it).
        tuner: `"bayesian"` (Gaussian process), `"random"` or
            `"hyperband"`. Defaults to `"bayesian"`.
        max_trials: Integer >= 1, the number of trials in all, baseline
            included (for `"hyperband"`, also counting its continued
            trials). Defaults to `10`.
        epochs: Integer >= 1, epochs per trial (for `"hyperband"`, the
            most epochs of a model). Defaults to `1`.
        objective: The quantity to optimize, a name from the logs of `fit`
            (`"val_accuracy"`, ...) or a `keras_tuner.Objective`.
            Defaults to `"val_loss"`.
        rho: The search range of rho; see `SAMHyperModel`. Defaults to
            `None` (a default range per variant).
        variants: The sharpness-aware optimizers to choose from; see
            `SAMHyperModel`. Defaults to `("sam", "asam")`.
        optimizer: The inner optimizer if `build_model` does not compile.
            Defaults to `None`.
        loss: The loss if `build_model` does not compile. Defaults to `None`.
        metrics: Metrics to compile with. Defaults to `None`.
        hyperparameters: Optional `keras_tuner.HyperParameters` that
            override the search space, e.g. with `hp.Fixed("rho", 0.1)`.
            Defaults to `None`.
        directory: Folder of the search; the state to resume from lives in
            `directory/project_name`. Defaults to `None` (the current
            folder).
        project_name: Name of the search inside `directory`. Defaults to
            `"search_rho"`.
        overwrite: Boolean; `True` starts over, discarding a previous search
            of the same name. Defaults to `False` (resume).
        seed: Optional integer seed of the tuner. Defaults to `None`.
        batch_size: Batch size of `fit` for array data. Defaults to `None`.
        callbacks: Callbacks of `fit`. Defaults to `None`.
        verbose: Verbosity of the search and of `fit`. Defaults to `1`.
        **oracle_kwargs: Further arguments of the Keras-Tuner oracle, such
            as `num_initial_points` (`"bayesian"`) or `factor`
            (`"hyperband"`).

    Returns:
        The `keras_tuner.Tuner`: `tuner.get_best_hyperparameters()[0]["rho"]`
        is the best rho, `tuner.get_best_models()[0]` a trained `SAMModel`
        with it, and `keras_sam.tuning.baseline_trial(tuner)` the `rho = 0`
        trial.

    Example:

    >>> tuner = keras_sam.tuning.search_rho(
    ...     build_model, (x_train, y_train), (x_val, y_val),
    ...     tuner="random", max_trials=4, objective="val_accuracy",
    ...     optimizer=keras.optimizers.SGD(0.1),
    ...     loss="sparse_categorical_crossentropy", metrics=["accuracy"],
    ...     directory="tuning")
    >>> best_rho = tuner.get_best_hyperparameters()[0]["rho"]

    References:
        - Foret et al., Sharpness-Aware Minimization for Efficiently Improving
          Generalization, ICLR 2021.
        - Li et al., Hyperband: A Novel Bandit-Based Approach to
          Hyperparameter Optimization, JMLR 2018.
    """
    if not isinstance(tuner, str) or tuner.lower() not in _TUNERS:
        raise ValueError(
            f"`tuner` must be one of {list(_TUNERS)}. Received: tuner={tuner!r}"
        )
    max_trials = check_positive_int("max_trials", max_trials)
    epochs = check_positive_int("epochs", epochs)
    if validation_data is None:
        raise ValueError(
            "`validation_data` is required: trials are compared on it. "
            "Received: validation_data=None"
        )
    hypermodel = SAMHyperModel(
        build_model,
        rho=rho,
        optimizer=optimizer,
        variants=variants,
        loss=loss,
        metrics=metrics,
        validation_data=validation_data,
    )
    search = _make_tuner(
        tuner.lower(),
        hypermodel,
        objective=objective,
        max_trials=max_trials,
        epochs=epochs,
        hyperparameters=hyperparameters,
        seed=seed,
        directory=directory,
        project_name=project_name,
        overwrite=overwrite,
        oracle_kwargs=oracle_kwargs,
    )
    fit_kwargs = dict(
        validation_data=validation_data,
        epochs=epochs,
        batch_size=batch_size,
        callbacks=list(callbacks or []),
        verbose=verbose,
    )
    if isinstance(train_data, tuple) and len(train_data) in (2, 3):
        fit_kwargs.update(zip(("x", "y", "sample_weight"), train_data))
    else:
        fit_kwargs["x"] = train_data
    search.search(**fit_kwargs)
    _check_trials(search)
    return search


def _check_trials(tuner):
    """Raises if no trial completed (Keras-Tuner records, not raises)."""
    trials = list(tuner.oracle.trials.values())
    if not trials or any(t.status == "COMPLETED" for t in trials):
        return
    messages = [getattr(t, "message", None) for t in trials]
    message = next((m for m in messages if m), "no message recorded")
    raise RuntimeError(
        f"All {len(trials)} trials of the rho search failed. The first "
        f"error was:\n{message}"
    )
