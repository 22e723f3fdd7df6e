"""Full-batch gradient descent and its critical learning rate.

Gradient descent with learning rate `eta` cannot settle where the sharpness
exceeds `2 / eta`. Gradient flow (the limit of small steps) from the same
start reaches a minimum of sharpness `S_GF`; learning rates below the
critical rate `eta_c = 2 / S_GF` reach about that minimum, larger ones are
pushed to flatter minima at the edge of stability (Fojtik et al., arXiv
2505.21423). `critical_learning_rate` estimates `S_GF` by a run with a small
step, `full_batch_gradient_descent` runs the training both need.
"""

import math
import warnings

import keras
import numpy as np

from keras_sam._validation import check_choice
from keras_sam._validation import check_float
from keras_sam._validation import check_int
from keras_sam._validation import check_positive_int
from keras_sam.sharpness.estimators import top_eigenvalue
from keras_sam.sharpness.krylov import WHICH


def _arrays(data):
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError(
            "`data` must be a tuple `(x, y)` of arrays, the whole training "
            f"set (every step uses all of it). Received: {type(data).__name__}"
            f" of length {len(data) if hasattr(data, '__len__') else '?'}"
        )
    x, y = data
    return np.asarray(x), np.asarray(y)


def full_batch_gradient_descent(
    model,
    data,
    learning_rate,
    max_steps=1000,
    loss_threshold=None,
    loss=None,
    momentum=0.0,
    check_every=20,
):
    """Trains `model` in place by full-batch gradient descent.

    ```
    w <- w - learning_rate * grad L(w),   L = mean loss over all of `data`
    ```

    (heavy-ball momentum `beta` if given). The model is compiled with
    `keras.optimizers.SGD(learning_rate, momentum)`. Every `check_every`
    steps the full-data loss is evaluated; training stops once it is at
    most `loss_threshold`, or is not finite (diverged), or after
    `max_steps` steps.

    Args:
        model: A built `keras.Model` (trained in place).
        data: A tuple `(x, y)` of arrays: the whole training set.
        learning_rate: Float > 0, the step size `eta`.
        max_steps: Maximum number of steps. Defaults to `1000`.
        loss_threshold: Stop once the training loss is at most this.
            Defaults to `None` (run `max_steps` steps).
        loss: The loss. Defaults to `None`, the model's compiled loss.
        momentum: Heavy-ball momentum. Defaults to `0.0`.
        check_every: Steps between two evaluations of the loss (a step
            count is a multiple of it). Defaults to `20`.

    Returns:
        A dict `{"steps": int, "loss": float, "diverged": bool,
        "reached_threshold": bool}`.

    Example:

    >>> keras_sam.sharpness.full_batch_gradient_descent(
    ...     model, (x, y), learning_rate=0.1, loss_threshold=1e-3)
    """
    x, y = _arrays(data)
    learning_rate = check_float(
        "learning_rate", learning_rate, low=0.0, low_open=True
    )
    max_steps = check_positive_int("max_steps", max_steps)
    check_every = check_positive_int("check_every", check_every)
    momentum = check_float("momentum", momentum, low=0.0, high=1.0)
    if loss_threshold is not None:
        loss_threshold = check_float("loss_threshold", loss_threshold, low=0.0)
    loss = loss if loss is not None else getattr(model, "loss", None)
    if loss is None:
        raise ValueError(
            "`model` has no compiled loss and no `loss=` was given. "
            f"Received: model={model.name!r}, loss=None"
        )
    _compile_sgd(model, learning_rate, momentum, loss, check_every)
    return _descend(model, x, y, max_steps, loss_threshold, check_every)


def _compile_sgd(model, learning_rate, momentum, loss, check_every):
    """Compiles `model` with SGD, `check_every` steps per compiled call."""
    optimizer = keras.optimizers.SGD(learning_rate, momentum=momentum)
    # One compiled call per check: the steps of a small model cost less
    # than the host's dispatch of each.
    model.compile(
        optimizer=optimizer, loss=loss, steps_per_execution=check_every
    )
    try:
        model.make_train_function()
        model.make_test_function()
    except ValueError:  # a backend that runs one step per call (torch)
        model.compile(optimizer=optimizer, loss=loss)


def _descend(model, x, y, max_steps, loss_threshold, check_every):
    """Full-batch steps, `check_every` at a time, until the loss reaches
    `loss_threshold`, is not finite, or `max_steps` steps were taken."""
    n = len(x)
    # `check_every` copies of the whole set, cut into full batches: one
    # epoch is `check_every` steps of full-batch gradient descent.
    x_chunk = np.concatenate([x] * check_every)
    y_chunk = np.concatenate([y] * check_every)
    steps, value = 0, _loss(model, x, y)
    reached = loss_threshold is not None and value <= loss_threshold
    while steps < max_steps and not reached and math.isfinite(value):
        k = min(check_every, max_steps - steps)
        model.fit(
            x_chunk[: k * n],
            y_chunk[: k * n],
            batch_size=n,
            epochs=1,
            shuffle=False,
            verbose=0,
        )
        steps += k
        value = _loss(model, x, y)
        reached = loss_threshold is not None and value <= loss_threshold
    return {
        "steps": steps,
        "loss": value,
        "diverged": not math.isfinite(value),
        "reached_threshold": bool(reached),
    }


def _loss(model, x, y):
    result = model.evaluate(
        x, y, batch_size=len(x), verbose=0, return_dict=True
    )
    return float(result["loss"])


def _clone(model):
    from keras_sam.sam_model import SAMModel  # a cycle at import time

    if isinstance(model, SAMModel):
        model = model.model
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def critical_learning_rate(
    model,
    data,
    learning_rate=0.01,
    max_steps=2000,
    loss_threshold=None,
    loss=None,
    which="magnitude",
    max_halvings=4,
    check_every=20,
    seed=0,
):
    """The critical learning rate `2 / S_GF` from a small-step run.

    ```
    w_GF  = full-batch GD from w with a small step (gradient-flow proxy)
    S_GF  = sharpness at w_GF             # largest |eigenvalue| by default
    eta_c = 2 / S_GF
    ```

    A copy of `model` (its current weights: the initialization) is trained;
    `model` is left as it is. If the small step was not small enough,
    `learning_rate > S_GF^-1` (half of `eta_c`; the run then may feel the
    edge of stability itself), the step is halved and the run repeated, at
    most `max_halvings` times.

    Args:
        model: A built `keras.Model` or `keras_sam.SAMModel` at its
            initialization (a `SAMModel`'s wrapped model is used).
        data: A tuple `(x, y)` of arrays, the whole training set.
        learning_rate: The small step. Defaults to `0.01`.
        max_steps: Steps of the run. Defaults to `2000`.
        loss_threshold: Stop the run once the training loss is at most
            this. Defaults to `None`.
        loss: The loss. Defaults to `None`, the model's compiled loss.
        which: `"magnitude"` (the largest `|eigenvalue|`, the sharpness of
            Fojtik et al.) or `"algebraic"`. Defaults to `"magnitude"`.
        max_halvings: How many times the step may be halved. Defaults to
            `4`.
        check_every: As in `full_batch_gradient_descent`. Defaults to `20`.
        seed: Seed of the eigenvalue's start vector. Defaults to `0`.

    Returns:
        A dict `{"critical_learning_rate", "sharpness", "learning_rate",
        "steps", "loss", "reached_threshold"}`: `eta_c`, `S_GF`, the step
        used, the steps run, the final training loss and whether it got
        to `loss_threshold` (if not, a `RuntimeWarning` says that `S_GF`
        was measured before the minimum).

    Example:

    >>> keras_sam.sharpness.critical_learning_rate(
    ...     build_model(), (x, y), learning_rate=0.01,
    ...     loss="sparse_categorical_crossentropy")

    References:
        - Fojtik, Matveev, Chou, Kutyniok, Maly, Conflicting Biases at the
          Edge of Stability: Norm versus Sharpness Regularization, arXiv
          2505.21423.
    """
    if not isinstance(model, keras.Model) or not model.built:
        raise TypeError(
            "`model` must be a built `keras.Model` or `keras_sam.SAMModel`."
            f" Received: model={model!r}"
        )
    check_choice("which", which, WHICH)
    max_halvings = check_int("max_halvings", max_halvings, minimum=0)
    x, y = _arrays(data)
    loss = loss if loss is not None else getattr(model, "loss", None)
    learning_rate, run, s_gf = _small_step_run(
        model,
        (x, y),
        learning_rate,
        max_halvings,
        which,
        seed,
        max_steps=max_steps,
        loss_threshold=loss_threshold,
        loss=loss,
        check_every=check_every,
    )
    if loss_threshold is not None and not run["reached_threshold"]:
        _warn_before_minimum(run, loss_threshold)
    return {
        "critical_learning_rate": 2.0 / s_gf,
        "sharpness": s_gf,
        "learning_rate": learning_rate,
        "steps": run["steps"],
        "loss": run["loss"],
        "reached_threshold": run["reached_threshold"],
    }


def _small_step_run(
    model, data, learning_rate, max_halvings, which, seed, **descent_kwargs
):
    """`(learning_rate, run, S_GF)` of a copy of `model` trained with a step
    halved until the run neither diverges nor exceeds half the critical
    rate (`learning_rate * S_GF <= 1`)."""
    for _ in range(max_halvings + 1):
        clone = _clone(model)
        run = full_batch_gradient_descent(
            clone, data, learning_rate, **descent_kwargs
        )
        if run["diverged"]:
            learning_rate /= 2
            continue
        s_gf = top_eigenvalue(clone, data, which=which, seed=seed)
        if learning_rate * s_gf <= 1.0:
            break
        learning_rate /= 2
    else:
        raise ValueError(
            "No stable small-step run: after halving the step "
            f"{max_halvings} times (to {learning_rate * 2:g}) gradient "
            "descent still diverged or ran at more than half the critical "
            "rate. Start from a smaller `learning_rate`. Received: "
            f"max_halvings={max_halvings}"
        )
    return learning_rate, run, s_gf


def _warn_before_minimum(run, loss_threshold):
    warnings.warn(
        f"The small-step run stopped after {run['steps']} steps at loss "
        f"{run['loss']:.4g}, above loss_threshold={loss_threshold:g}: "
        "S_GF is measured before the minimum (the sharpness may still "
        "be rising), so 2 / S_GF can overestimate the critical rate. "
        "Raise `max_steps`.",
        RuntimeWarning,
        stacklevel=3,
    )
