"""`optimum_shift`: the transform, front to back over the layers.

Check what was received (`arguments.py`), pick the layers (`layers.py`),
shift them front to back, each projected (`projection.py`) on the inputs it
receives with the layers before it already shifted and checked on the data
(`shifting.py`), then compare the model before and after (`comparison.py`).
Any failure rolls every layer back.
"""

from keras_sam._data import Batches
from keras_sam._validation import check_int
from keras_sam._validation import check_positive_int
from keras_sam.optimum_shift.arguments import MINIMIZE  # noqa: F401
from keras_sam.optimum_shift.arguments import check_args
from keras_sam.optimum_shift.arguments import check_data
from keras_sam.optimum_shift.arguments import clone
from keras_sam.optimum_shift.arguments import evaluation_loss
from keras_sam.optimum_shift.comparison import Evaluation
from keras_sam.optimum_shift.comparison import compare_model
from keras_sam.optimum_shift.layers import LinearView
from keras_sam.optimum_shift.layers import ordered_layers
from keras_sam.optimum_shift.layers import plan_layers
from keras_sam.optimum_shift.shifting import shift_layers


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
    tolerance, rtol, batch_size, max_dim = check_args(
        model, tolerance, inplace, rtol, minimize, batch_size, max_dim
    )
    batches = Batches(data, batch_size)
    first, loss = check_data(model, batches, loss)
    trace_probes = check_positive_int("trace_probes", trace_probes)
    seed = check_int("seed", seed, minimum=0)
    if evaluation_data is not None:
        eval_loss = evaluation_loss(model, loss)
    if not inplace:
        model = clone(model, first[0])

    candidates, called = ordered_layers(model, first[0])
    plan = plan_layers(candidates, called, layers, max_dim)
    views = [item for item in plan if isinstance(item, LinearView)]
    evaluation = None
    if evaluation_data is not None:
        evaluation = Evaluation(
            model, evaluation_data, eval_loss, trace_probes, seed
        )
        before = evaluation.measure()
    snapshot = {id(v): v.read() for v in views}
    try:
        shift_layers(model, views, batches, rtol, tolerance, minimize)
        report = compare_model(model, views, snapshot, batches, loss, tolerance)
        if evaluation is not None:
            report.evaluation_before = before
            report.evaluation_after = evaluation.measure()
    except BaseException:
        # Roll every layer back to its weights before shifting.
        for view in views:
            view.write(*snapshot[id(view)])
        raise
    report.layers = [
        item.row if isinstance(item, LinearView) else item for item in plan
    ]
    report.rtol = rtol
    report.minimize = minimize
    return report
