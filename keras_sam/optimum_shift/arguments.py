"""What `optimum_shift` receives: its arguments, its data, its loss.

Everything is checked before a weight moves (`ValueError`/`TypeError` saying
what was received), and `inplace=False` makes the clone that is shifted
instead of the model.
"""

import keras
import numpy as np

from keras_sam._validation import check_bool
from keras_sam._validation import check_choice
from keras_sam._validation import check_float
from keras_sam._validation import check_positive_int
from keras_sam.sam_model import SAMModel

# The norms `optimum_shift(minimize=...)` can minimize.
MINIMIZE = ("kernel", "joint")


def check_args(model, tolerance, inplace, rtol, minimize, batch_size, dim):
    """The checked `(tolerance, rtol, batch_size, max_dim)`."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a `keras.Model` or `keras_sam.SAMModel`. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            "`model` must be built before optimum shifting: call it on data "
            "or give it an `Input`. Received an unbuilt model: "
            f"{model.name!r}"
        )
    tolerance = check_float("tolerance", tolerance, low=0.0, low_open=True)
    check_bool("inplace", inplace)
    rtol = check_float("rtol", rtol, low=0.0, high=1.0, low_open=True)
    check_choice("minimize", minimize, MINIMIZE)
    batch_size = check_positive_int("batch_size", batch_size)
    dim = check_positive_int("max_dim", dim)
    return tolerance, rtol, batch_size, dim


def check_data(model, batches, loss):
    """The first batch of `batches` (checked against the model's inputs)
    and the loss (resolved; `data` must then carry targets)."""
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("`data` is empty. Received no batches")
    _check_inputs(model, first[0])
    if loss is not None:
        loss = _get_loss(loss)
        if first[1] is None:
            raise ValueError(
                "`loss` was given but `data` has no targets: pass "
                "`(x, y)` batches. Received: loss="
                f"{loss!r} and batches of x only"
            )
    return first, loss


def evaluation_loss(model, loss):
    """The loss measured on `evaluation_data`: `loss`, else the compiled
    one."""
    chosen = loss if loss is not None else getattr(model, "loss", None)
    if chosen is None:
        raise ValueError(
            "`evaluation_data` needs a loss: pass `loss=` or compile the "
            f"model. Received: loss=None, model={model.name!r} with no "
            "compiled loss"
        )
    return chosen


def _get_loss(loss):
    if isinstance(loss, (str, dict)):
        return keras.losses.get(loss)
    if callable(loss):
        return loss
    raise TypeError(
        "`loss` must be a loss name, a function or a `keras.losses.Loss`. "
        f"Received: loss={loss!r}"
    )


def clone(model, x):
    """A copy of `model` with its weights, built on the batch `x`."""
    if isinstance(model, SAMModel):
        copy = SAMModel(clone(model.model, x), rho=model.rho)
    else:
        try:
            copy = keras.models.clone_model(model)
        except Exception as e:
            raise TypeError(
                "`inplace=False` needs a model that `keras.models.clone_model`"
                f" can clone; {model.name!r} cannot ({e}). Use inplace=True "
                "on a copy you made yourself."
            ) from e
        if not copy.built:
            copy(x, training=False)
    copy.set_weights(model.get_weights())
    return copy


def _expected_shapes(model):
    target = model.model if isinstance(model, SAMModel) else model
    try:
        inputs = target.inputs
    except (AttributeError, ValueError):
        return None
    if not inputs:
        return None
    return [tuple(t.shape) for t in inputs]


def _check_inputs(model, x):
    expected = _expected_shapes(model)
    if expected is None:
        return
    received = [tuple(np.shape(a)) for a in keras.tree.flatten(x)]
    ok = len(received) == len(expected) and all(
        len(r) == len(e)
        and all(ed is None or ed == rd for ed, rd in zip(e[1:], r[1:]))
        for r, e in zip(received, expected)
    )
    if not ok:
        raise ValueError(
            "`data` does not match the model's inputs: expected batches of "
            f"shape {expected} (None: any size). Received x of shape "
            f"{received}"
        )
