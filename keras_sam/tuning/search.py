"""`search_rho`: a Keras-Tuner search of rho, baseline first."""

from keras_sam._validation import check_choice
from keras_sam._validation import check_positive_int
from keras_sam.tuning.hypermodel import SAMHyperModel
from keras_sam.tuning.oracles import TUNERS
from keras_sam.tuning.oracles import make_tuner


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
    >>> best = tuner.get_best_hyperparameters()[0]
    >>> best_rho = keras_sam.tuning.get_rho(best)  # rho of its variant

    References:
        - Foret et al., Sharpness-Aware Minimization for Efficiently Improving
          Generalization, ICLR 2021.
        - Li et al., Hyperband: A Novel Bandit-Based Approach to
          Hyperparameter Optimization, JMLR 2018.
    """
    tuner, max_trials, epochs = _check_args(
        tuner, max_trials, epochs, validation_data
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
    search = make_tuner(
        tuner,
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
    search.search(
        **_fit_kwargs(
            train_data, validation_data, epochs, batch_size, callbacks, verbose
        )
    )
    _check_trials(search)
    return search


def _check_args(tuner, max_trials, epochs, validation_data):
    """The checked `(tuner, max_trials, epochs)`."""
    if isinstance(tuner, str):
        tuner = tuner.lower()
    check_choice("tuner", tuner, TUNERS)
    max_trials = check_positive_int("max_trials", max_trials)
    epochs = check_positive_int("epochs", epochs)
    if validation_data is None:
        raise ValueError(
            "`validation_data` is required: trials are compared on it. "
            "Received: validation_data=None"
        )
    return tuner, max_trials, epochs


def _fit_kwargs(
    train_data, validation_data, epochs, batch_size, callbacks, verbose
):
    """The arguments of `fit` for each trial; a tuple `train_data` is
    `(x, y[, sample_weight])`."""
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
    return fit_kwargs


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
