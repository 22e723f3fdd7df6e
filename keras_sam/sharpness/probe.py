"""Checks of the probe data, run once before any Hessian-vector product.

A Krylov solver fed NaN, or a model fed data of the wrong shape, fails deep
inside a compiled function (`LinAlgError: Eigenvalues did not converge`, a
graph-execution error); these checks say what is wrong with `data` first:

- `check_model`: a built `keras.Model` with trainable variables;
- `check_finite`: every floating array of `data` is finite;
- `check_targets`: `y` is there when the loss compares it with `y_pred`;
- `check_input_shapes`: `x` has the shape of the model's inputs.

`check_data` runs the last three. Finite data can still give a non-finite
loss (weights that diverged): `nan_if_diverged` turns an estimate into NaN
with a warning then, rather than an error.
"""

import math
import warnings

import keras
import numpy as np
from keras import ops

_PARTS = ("x", "y", "sample_weight")


def check_model(model):
    """Raises unless `model` is a built `keras.Model` with weights."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a `keras.Model` (or a `keras_sam.SAMModel`). "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    if not model.built or not model.trainable_variables:
        raise ValueError(
            "`model` has no trainable variables yet; build it (call it on "
            "data or give it an `Input`) before measuring its sharpness. "
            f"Received: model={model.name!r} (built={model.built})"
        )


def check_finite(batches):
    """Raises a `ValueError` if an array of `batches` has a NaN or inf.

    `batches` is a list of `(n, x, y, sample_weight)` of tensors
    (`keras_sam._data.as_batches`).
    """
    for index, batch in enumerate(batches):
        for name, part in zip(_PARTS, batch[1:]):
            for leaf in keras.tree.flatten(part):
                if leaf is None:
                    continue
                dtype = keras.backend.standardize_dtype(leaf.dtype)
                if "float" not in dtype:
                    continue
                finite = ops.all(ops.isfinite(leaf))
                if bool(ops.convert_to_numpy(finite)):
                    continue
                values = ops.convert_to_numpy(ops.cast(leaf, "float32"))
                raise ValueError(
                    "`data` contains non-finite values (NaN or inf); the "
                    "Hessian of a loss on them is not defined. Clean or "
                    "impute the probe data first. Received: "
                    f"{name} of batch {index} with "
                    f"{int(np.isnan(values).sum())} NaN and "
                    f"{int(np.isinf(values).sum())} inf values "
                    f"(shape {tuple(values.shape)})"
                )


def needs_targets(model, loss_fn):
    """Whether the loss compares targets `y` with `y_pred`: always, except
    for a plain function given as `loss=` and, with no `loss=`, a model
    whose `compute_loss` is overridden (either may ignore `y`)."""
    if loss_fn is None:
        return type(model).compute_loss is keras.Model.compute_loss
    return isinstance(loss_fn, keras.losses.Loss)


def check_targets(batches):
    """Raises a `ValueError` if a batch of `batches` has no targets."""
    for index, (_, _, y, _) in enumerate(batches):
        if y is None:
            raise ValueError(
                "`data` must include targets: the loss compares `y` with "
                "the model's predictions. Pass `(x, y)` (or "
                "`(x, y, sample_weight)`), e.g. "
                "`top_eigenvalue(model, (x, y))`, or a dataset of such "
                "batches. Received: data with inputs only (y=None in "
                f"batch {index})"
            )


def _model_inputs(model):
    """The model's symbolic inputs (a list), or `None` when it has none
    (a subclassed model): the model a `SAMModel` wraps is looked into."""
    from keras_sam.sam_model import SAMModel  # a cycle at import time

    while isinstance(model, SAMModel):
        model = model.model
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    return list(inputs) if inputs else None


def _compatible(shape, expected):
    """Whether an array of `shape` fits an input of shape `expected`
    (`None` matches any size; like Keras, a trailing axis of size 1 may be
    missing or extra)."""
    shape, expected = tuple(shape[1:]), tuple(expected[1:])
    if len(shape) == len(expected) + 1 and shape[-1:] == (1,):
        shape = shape[:-1]
    elif len(expected) == len(shape) + 1 and expected[-1:] == (1,):
        expected = expected[:-1]
    if len(shape) != len(expected):
        return False
    return all(e is None or s == e for s, e in zip(shape, expected))


def check_input_shapes(model, batches):
    """Raises a `ValueError` if `x` does not fit the model's inputs.

    Checked when the model has symbolic inputs (a functional or
    `Sequential` model with an `Input`, or a `SAMModel` around one) and `x`
    is one array (one input) or a list or tuple of arrays (one per input,
    in order); other structures are left to the model.
    """
    inputs = _model_inputs(model)
    if inputs is None:
        return
    expected = [tuple(t.shape) for t in inputs]
    for index, (_, x, _, _) in enumerate(batches):
        if isinstance(x, (list, tuple)):
            arrays = list(x)
        elif isinstance(x, dict):
            return
        else:
            arrays = [x]
        received = [tuple(getattr(a, "shape", ())) for a in arrays]
        if len(received) == len(expected) and all(
            _compatible(r, e) for r, e in zip(received, expected)
        ):
            continue
        show = lambda shapes: shapes[0] if len(shapes) == 1 else shapes  # noqa
        raise ValueError(
            "The inputs `x` in `data` do not match the model's input shape: "
            f"the model {model.name!r} expects {show(expected)} (None: any "
            f"size). Received: x of shape {show(received)} in batch {index}"
        )


def check_data(model, batches, loss_fn):
    """`check_finite`, `check_targets` (when the loss needs them) and
    `check_input_shapes` on the batches of `keras_sam._data.as_batches`."""
    check_finite(batches)
    if needs_targets(model, loss_fn):
        check_targets(batches)
    check_input_shapes(model, batches)


def nan_if_diverged(value, estimator):
    """`value`, or NaN with a `RuntimeWarning` when it is not finite."""
    if math.isfinite(value):
        return value
    warnings.warn(
        f"`{estimator}` is not finite: the loss or its derivatives are not "
        "finite at the model's current weights although the data is (it "
        "was checked), e.g. because training diverged. Returning NaN.",
        RuntimeWarning,
        stacklevel=3,
    )
    return float("nan")
