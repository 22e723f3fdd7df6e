"""`optimum_shift`: the transform, front to back over the layers.

Each layer is projected (`projection.py`) on the inputs it receives with the
layers before it already shifted; each shift is checked on the data, and
any failure rolls every layer back.
"""

import keras
import numpy as np

from keras_sam._data import Batches
from keras_sam._validation import check_bool
from keras_sam._validation import check_choice
from keras_sam._validation import check_float
from keras_sam._validation import check_int
from keras_sam._validation import check_positive_int
from keras_sam.optimum_shift.layers import Hook
from keras_sam.optimum_shift.layers import LinearView
from keras_sam.optimum_shift.layers import forward
from keras_sam.optimum_shift.layers import ordered_layers
from keras_sam.optimum_shift.layers import plan_layers
from keras_sam.optimum_shift.layers import run
from keras_sam.optimum_shift.layers import start_collecting
from keras_sam.optimum_shift.projection import project
from keras_sam.optimum_shift.report import LayerShift
from keras_sam.optimum_shift.report import ShiftReport
from keras_sam.optimum_shift.report import ShiftToleranceError
from keras_sam.sam_model import SAMModel

# The norms `optimum_shift(minimize=...)` can minimize.
MINIMIZE = ("kernel", "joint")


def optimum_shift(
    model,
    data,
    layers="last",
    tolerance=1e-4,
    inplace=True,
    loss=None,
    rtol=1e-10,
    minimize="kernel",
    batch_size=128,
    max_dim=4096,
    evaluation_data=None,
    trace_probes=20,
    seed=0,
):
    """Shifts linear layers to the minimum-norm weights with the same outputs.

    For the last linear layer (the paper's choice, `layers="last"`), or
    each `Dense` layer (at any depth, front to back) and each
    `Conv1D`/`Conv2D`/`Conv3D` (through its patch matrix) with
    `layers="all"`, with `A` (n x d) the inputs it receives on `data` in
    inference mode:

    ```
    G        = sum_batches [a 1]^T [a 1]          # streamed, float64
    U        = eigenvectors of G, eigenvalue > rtol * max eigenvalue
    [W'; b'] = U U^T [W; b]                       # minimize="joint"
    ```

    `[A 1][W'; b'] = [A 1][W; b]`, so the layer's outputs, and the model's,
    are unchanged on `data`, and `[W'; b']` has the smallest Frobenius norm
    among all weights with that property. With the default
    `minimize="kernel"` the bias is free and the kernel norm is minimized
    instead (it is the kernel, not the bias, that enters the Hessian of the
    layers around it), using the centered inputs:

    ```
    W' = U U^T W,   U spans the rows of A - 1 mean(A)
    b' = b + mean(A) (W - W')
    ```

    so `||W'|| <= ||W||` always. If the inputs span the whole space there is
    no freedom and the layer is left as it is. After each layer the change
    of its outputs on `data` is measured (and at the end that of the model's
    outputs); if one exceeds `tolerance` (relative to the largest output) all
    layers are rolled back and `ShiftToleranceError` is raised.

    The outputs are kept on `data` only. Whether the minimum is flatter for
    the model, not just on `data`, is a measurement: with `evaluation_data`
    (e.g. the whole training set) the report holds the loss, the Hessian
    trace (Hutchinson, the same `trace_probes` probes before and after) and
    the top Hessian eigenvalue (Lanczos) on it, before and after. Measured
    on digits, shifting on 64-128 samples can raise the trace on the whole
    training set while it drops on the calibration samples, and shifting
    every layer keeps the outputs on `data` but moves them elsewhere more
    than shifting the last one.

    Args:
        model: a built `keras.Model` or `keras_sam.SAMModel`.
        data: calibration data, seen in inference mode: an array (or dict of
            arrays) `x`, a tuple `(x, y[, sample_weight])` of arrays (split
            into batches of `batch_size`), or a re-iterable of batches (a
            list of batches, a `tf.data.Dataset`, a `keras.utils.PyDataset`).
            Batches are streamed; the data never has to fit in memory.
        layers: `"last"` (the last Dense/Conv layer the forward pass
            calls, as in the paper), `"all"` (every Dense and Conv layer,
            front to back), or names (or layer objects) of the layers to
            shift. Defaults to `"last"`.
        tolerance: largest allowed `max |z' - z| / max |z|`, for each shifted
            layer's outputs and the model's outputs on `data`. Defaults to
            `1e-4`.
        inplace: if `False`, the model is cloned and the clone is shifted;
            `model` is left untouched. Defaults to `True`.
        loss: optional loss (name, function or `keras.losses.Loss`). If
            given, `data` must carry `y` and the report holds the mean loss
            before and after. Defaults to `None`.
        rtol: relative eigenvalue tolerance defining the rank of the inputs.
            Defaults to `1e-10`.
        minimize: `"kernel"` (minimum kernel norm, the bias absorbs the mean)
            or `"joint"` (minimum norm of `[W; b]`). Defaults to `"kernel"`.
        batch_size: batch size used when `data` is given as arrays. Defaults
            to `128`.
        max_dim: layers whose input (or patch) dimension exceeds this are
            skipped; the eigen-decomposition costs `O(d^3)`. Defaults to
            `4096`.
        evaluation_data: data `(x, y)` (arrays, a dataset or batches) on
            which to measure the loss, the Hessian trace and the top
            eigenvalue before and after shifting (`keras_sam.sharpness`);
            needs `loss` or a compiled loss. Defaults to `None` (not
            measured).
        trace_probes: Hutchinson probes for the trace on
            `evaluation_data`. Defaults to `20`.
        seed: seed of the probes and of the eigenvalue's start vector.
            Defaults to `0`.

    Returns:
        A `ShiftReport`; `report.model` is the shifted model (`model` itself
        when `inplace=True`); `report.evaluation_before` and
        `report.evaluation_after` the measurements on `evaluation_data`.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((64,)),
    ...     keras.layers.Dense(128, activation="relu"),
    ...     keras.layers.Dense(10)])
    >>> x = np.random.rand(32, 64).astype("float32")
    >>> report = keras_sam.optimum_shift(model, x, layers="all")
    >>> print(report)        # the first kernel norm drops: rank 31 < 64

    References:
        - Zhou, Li, Feng, Huang, Improving Generalization of Deep Neural
          Networks by Optimum Shifting, AAAI 2025.
    """
    tolerance, rtol, batch_size, max_dim = _check_args(
        model, tolerance, inplace, rtol, minimize, batch_size, max_dim
    )
    batches = Batches(data, batch_size)
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
    trace_probes = check_positive_int("trace_probes", trace_probes)
    seed = check_int("seed", seed, minimum=0)
    if evaluation_data is not None:
        evaluation_loss = (
            loss if loss is not None else getattr(model, "loss", None)
        )
        if evaluation_loss is None:
            raise ValueError(
                "`evaluation_data` needs a loss: pass `loss=` or compile the "
                f"model. Received: loss=None, model={model.name!r} with no "
                "compiled loss"
            )
    if not inplace:
        model = _clone(model, first[0])

    candidates, called = ordered_layers(model, first[0])
    plan = plan_layers(candidates, called, layers, max_dim)
    views = [item for item in plan if isinstance(item, LinearView)]
    evaluation = None
    if evaluation_data is not None:
        evaluation = _Evaluation(
            model, evaluation_data, evaluation_loss, trace_probes, seed
        )
        before = evaluation.measure()
    snapshot = {id(v): v.read() for v in views}
    try:
        _shift_layers(model, views, batches, rtol, tolerance, minimize)
        report = _finish(model, views, snapshot, batches, loss, tolerance)
        if evaluation is not None:
            report.evaluation_before = before
            report.evaluation_after = evaluation.measure()
    except BaseException:
        for view in views:
            view.write(*snapshot[id(view)])
        raise
    report.layers = [
        item.row if isinstance(item, LinearView) else item for item in plan
    ]
    report.rtol = rtol
    report.minimize = minimize
    return report


class _Evaluation:
    """Loss, Hessian trace and top eigenvalue on the evaluation data."""

    def __init__(self, model, data, loss, trace_probes, seed):
        from keras_sam import sharpness  # only needed when asked for

        self.hessian = sharpness.Hessian(model, data, loss=loss)
        self.trace_probes = trace_probes
        self.seed = seed

    def measure(self):
        hessian = self.hessian
        return {
            "samples": hessian.num_samples,
            "loss": hessian.loss(),
            "hessian_trace": hessian.trace(
                num_probes=self.trace_probes, seed=self.seed
            ),
            "top_eigenvalue": hessian.top_eigenvalue(seed=self.seed),
        }


def _check_args(model, tolerance, inplace, rtol, minimize, batch_size, dim):
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


def _get_loss(loss):
    if isinstance(loss, (str, dict)):
        return keras.losses.get(loss)
    if callable(loss):
        return loss
    raise TypeError(
        "`loss` must be a loss name, a function or a `keras.losses.Loss`. "
        f"Received: loss={loss!r}"
    )


def _clone(model, x):
    if isinstance(model, SAMModel):
        clone = SAMModel(_clone(model.model, x), rho=model.rho)
    else:
        try:
            clone = keras.models.clone_model(model)
        except Exception as e:
            raise TypeError(
                "`inplace=False` needs a model that `keras.models.clone_model`"
                f" can clone; {model.name!r} cannot ({e}). Use inplace=True "
                "on a copy you made yourself."
            ) from e
        if not clone.built:
            clone(x, training=False)
    clone.set_weights(model.get_weights())
    return clone


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


def _shift_layers(model, views, batches, rtol, tolerance, minimize):
    """Shifts the layers front to back; each view gets its report `row`.

    One pass over the data per layer: the pass that checks layer k (now
    shifted) also collects the inputs of layer k + 1, which therefore sees
    the shifted layer k, as front-to-back processing requires.
    """
    if not views:
        return
    moments = start_collecting(views[0])
    hooks = [Hook(views[0].layer, moments.collect)]
    pending = None
    for k, view in enumerate(views):
        run(model, batches, hooks)  # inputs of layer k, change of k - 1
        if pending is not None:
            pending.check(tolerance)
        hooks, pending = [], None
        if _shift_one(view, moments, rtol, minimize):
            pending = _Change(view)
            hooks.append(Hook(view.layer, pending.compare))
        if k + 1 < len(views):
            moments = start_collecting(views[k + 1])
            hooks.append(Hook(views[k + 1].layer, moments.collect))
    if hooks:
        run(model, batches, hooks)
    if pending is not None:
        pending.check(tolerance)


def _shift_one(view, moments, rtol, minimize):
    """Writes the minimum-norm weights; `True` if the layer changed."""
    layer = view.layer
    kernel, bias = view.old = view.read()
    norm_before = float(np.linalg.norm(kernel))
    if moments.n == 0:
        view.row = LayerShift(
            layer.name, type(layer).__name__, "skipped", "not called on `data`"
        )
        return False
    if not np.all(np.isfinite(moments.scatter)):
        raise ValueError(
            f"Layer {layer.name!r} received non-finite inputs (NaN or inf) on "
            "`data`; optimum shifting needs finite activations. Received "
            f"input mean {moments.mean}"
        )
    new_kernel, new_bias, rank, dim = project(
        kernel, bias, moments, rtol, minimize
    )
    view.row = LayerShift(
        layer.name,
        type(layer).__name__,
        "shifted",
        input_rank=rank,
        input_dim=dim,
        samples=moments.n,
        kernel_norm_before=norm_before,
    )
    if rank == dim:
        view.row.status = "unchanged"
        view.row.reason = (
            f"inputs span the whole space (rank {rank} = dim {dim})"
        )
        view.row.kernel_norm_after = norm_before
        view.row.max_abs_change = view.row.max_rel_change = 0.0
        return False
    view.write(new_kernel, new_bias)
    view.row.kernel_norm_after = float(np.linalg.norm(new_kernel))
    return True


class _Change:
    """Max change of a shifted layer's outputs against its old weights."""

    def __init__(self, view):
        self.view = view
        self.old = view.old
        self.new = view.read()
        self.max_abs = 0.0
        self.scale = 0.0

    def compare(self, original, inputs, outputs, args, kwargs):
        # The model runs with the shifted weights; swap the old ones in for
        # one call of this layer, on the same inputs.
        self.view.write(*self.old)
        old_outputs = original(*args, **kwargs)
        self.view.write(*self.new)
        z = keras.ops.convert_to_numpy(old_outputs).astype(np.float64)
        z_new = keras.ops.convert_to_numpy(outputs).astype(np.float64)
        self.max_abs = max(self.max_abs, float(np.max(np.abs(z_new - z))))
        self.scale = max(self.scale, float(np.max(np.abs(z))))

    def check(self, tolerance):
        row = self.view.row
        row.max_abs_change = self.max_abs
        row.max_rel_change = self.max_abs / max(self.scale, 1e-30)
        if row.max_rel_change > tolerance:
            raise ShiftToleranceError(
                "Optimum shifting changed the outputs of layer "
                f"{row.name!r} by {row.max_rel_change:.3g} (relative; "
                f"max |dz| = {row.max_abs_change:.3g}), above "
                f"tolerance={tolerance:g}. The model was rolled back. Raise "
                "`tolerance`, or lower `rtol` so that fewer directions "
                "count as unused."
            )


def _finish(model, views, snapshot, batches, loss, tolerance):
    """Compares the model's outputs (and loss) before and after shifting."""
    shifted = {id(v): v.read() for v in views}
    max_abs, scale = 0.0, 0.0
    totals = {"before": 0.0, "after": 0.0, "n": 0}
    samples = 0
    for x, y, sample_weight in batches:
        y_new = forward(model, x)
        for view in views:
            view.write(*snapshot[id(view)])
        y_old = forward(model, x)
        for view in views:
            view.write(*shifted[id(view)])
        for old, new in zip(
            keras.tree.flatten(y_old), keras.tree.flatten(y_new)
        ):
            old = keras.ops.convert_to_numpy(old).astype(np.float64)
            new = keras.ops.convert_to_numpy(new).astype(np.float64)
            max_abs = max(max_abs, float(np.max(np.abs(new - old))))
            scale = max(scale, float(np.max(np.abs(old))))
        n = len(keras.tree.flatten(x)[0])
        samples += n
        if loss is not None:
            totals["before"] += n * _batch_loss(loss, y, y_old, sample_weight)
            totals["after"] += n * _batch_loss(loss, y, y_new, sample_weight)
            totals["n"] += n
    rel = max_abs / max(scale, 1e-30)
    if rel > tolerance:
        raise ShiftToleranceError(
            f"Optimum shifting changed the model's outputs by {rel:.3g} "
            f"(relative; max |dy| = {max_abs:.3g}), above "
            f"tolerance={tolerance:g}. The model was rolled back."
        )
    report = ShiftReport(
        [],
        model=model,
        samples=samples,
        tolerance=tolerance,
        output_max_abs_change=max_abs,
        output_max_rel_change=rel,
    )
    if loss is not None:
        report.loss_before = totals["before"] / totals["n"]
        report.loss_after = totals["after"] / totals["n"]
    return report


def _batch_loss(loss, y, y_pred, sample_weight):
    if isinstance(y_pred, (list, tuple, dict)):
        raise ValueError(
            "`loss` is supported for models with a single output. Received "
            f"outputs of structure {keras.tree.map_structure(np.shape, y_pred)}"
        )
    y = keras.ops.convert_to_tensor(y)
    if isinstance(loss, keras.losses.Loss):
        value = loss(y, y_pred, sample_weight=sample_weight)
    else:
        value = loss(y, y_pred)
    return float(np.mean(keras.ops.convert_to_numpy(value)))
