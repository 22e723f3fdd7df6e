"""Optimum shifting: the minimum-norm weights that keep a model's outputs.

For a linear layer `z = a W + b` and the inputs `A` (n x d) it receives on
calibration data, every `W'` with `[A 1][W'; b'] = [A 1][W; b]` gives the
same outputs on that data. Optimum shifting replaces `W` by the solution of
minimum norm, which lowers the weight norm (and with it a bound on the Hessian
trace) without changing a single prediction on the calibration data.
"""

import dataclasses
import math
import numbers
import warnings

import keras
import numpy as np

from keras_sam.sam_model import SAMModel

_MINIMIZE = ("kernel", "joint")

# Patch matrices are streamed in chunks of at most this many float64 entries.
_CHUNK_ENTRIES = 1 << 22


class ShiftToleranceError(ValueError):
    """Raised when shifting changed the outputs by more than `tolerance`.

    The model has been rolled back to its weights before the call when this
    is raised.
    """


# ---------------------------------------------------------------------------
# Report


@dataclasses.dataclass
class LayerShift:
    """What optimum shifting did to one layer (one row of a `ShiftReport`).

    Attributes:
        name: the layer's name.
        layer_type: the layer's class name.
        status: `"shifted"`, `"unchanged"` (the inputs span the whole space,
            there is no freedom) or `"skipped"`.
        reason: why the layer was skipped or left unchanged; `None` when it
            was shifted.
        input_rank: rank of the matrix the projection is computed from (the
            centered inputs for `minimize="kernel"`, `[A 1]` for `"joint"`).
        input_dim: the dimension that rank is compared with (`d` or `d + 1`).
        samples: number of input rows (samples, or patches for a conv).
        kernel_norm_before: Frobenius norm of the kernel before shifting.
        kernel_norm_after: Frobenius norm of the kernel after shifting.
        max_abs_change: `max |z' - z|` of the layer's outputs on the data.
        max_rel_change: `max |z' - z| / max |z|` on the data.
    """

    name: str
    layer_type: str
    status: str
    reason: str = None
    input_rank: int = None
    input_dim: int = None
    samples: int = None
    kernel_norm_before: float = None
    kernel_norm_after: float = None
    max_abs_change: float = None
    max_rel_change: float = None

    def to_dict(self):
        return dataclasses.asdict(self)


class ShiftReport:
    """The result of `keras_sam.optimum_shift`: one `LayerShift` per layer.

    `print(report)` gives a table; `report.to_dict()` plain Python values
    (for JSON or logging); `report["dense_1"]` one layer's row.

    Attributes:
        layers: list of `LayerShift`, in the order the layers were processed.
        model: the shifted model (the input model when `inplace=True`, else
            the shifted clone).
        samples: number of calibration samples.
        minimize: `"kernel"` or `"joint"`, the norm that was minimized.
        rtol: relative eigenvalue tolerance used for the rank.
        tolerance: largest relative output change that was allowed.
        output_max_abs_change: `max |y' - y|` of the model's outputs.
        output_max_rel_change: `max |y' - y| / max |y|` of the model's outputs.
        loss_before: mean loss on the data before shifting (when `loss` was
            given), else `None`.
        loss_after: mean loss on the data after shifting, or `None`.
    """

    def __init__(
        self,
        layers,
        model=None,
        samples=None,
        minimize="kernel",
        rtol=None,
        tolerance=None,
        output_max_abs_change=None,
        output_max_rel_change=None,
        loss_before=None,
        loss_after=None,
    ):
        self.layers = list(layers)
        self.model = model
        self.samples = samples
        self.minimize = minimize
        self.rtol = rtol
        self.tolerance = tolerance
        self.output_max_abs_change = output_max_abs_change
        self.output_max_rel_change = output_max_rel_change
        self.loss_before = loss_before
        self.loss_after = loss_after

    @property
    def shifted(self):
        """Names of the layers whose weights changed."""
        return [r.name for r in self.layers if r.status == "shifted"]

    @property
    def kernel_norm_before(self):
        """Frobenius norm over all processed kernels, before shifting."""
        return _total_norm(r.kernel_norm_before for r in self.layers)

    @property
    def kernel_norm_after(self):
        """Frobenius norm over all processed kernels, after shifting."""
        return _total_norm(r.kernel_norm_after for r in self.layers)

    def __getitem__(self, name):
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(
            f"No layer named {name!r} in this report. Layers: "
            f"{[r.name for r in self.layers]}"
        )

    def to_dict(self):
        return {
            "samples": self.samples,
            "minimize": self.minimize,
            "rtol": self.rtol,
            "tolerance": self.tolerance,
            "kernel_norm_before": self.kernel_norm_before,
            "kernel_norm_after": self.kernel_norm_after,
            "output_max_abs_change": self.output_max_abs_change,
            "output_max_rel_change": self.output_max_rel_change,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "layers": [row.to_dict() for row in self.layers],
        }

    def __repr__(self):
        return (
            f"<ShiftReport shifted={self.shifted} "
            f"kernel_norm={_fmt(self.kernel_norm_before)}"
            f"->{_fmt(self.kernel_norm_after)}>"
        )

    def __str__(self):
        head = (
            f"Optimum shifting on {self.samples} samples "
            f"(minimize={self.minimize!r}, rtol={self.rtol:g}, "
            f"tolerance={self.tolerance:g})"
        )
        header = (
            f"{'layer':<20} {'type':<12} {'rank/dim':>11} "
            f"{'kernel norm':>21} {'max|dz|':>9} {'rel':>9}  status"
        )
        lines = [head, header, "-" * len(header)]
        for r in self.layers:
            if r.input_rank is None:
                rank = "-"
            else:
                rank = f"{r.input_rank}/{r.input_dim}"
            if r.kernel_norm_before is None:
                norms = "-"
            else:
                norms = (
                    f"{_fmt(r.kernel_norm_before)} -> "
                    f"{_fmt(r.kernel_norm_after)}"
                )
            status = r.status if r.reason is None else f"{r.status}: {r.reason}"
            lines.append(
                f"{r.name[:20]:<20} {r.layer_type[:12]:<12} {rank:>11} "
                f"{norms:>21} {_fmt(r.max_abs_change, 'e'):>9} "
                f"{_fmt(r.max_rel_change, 'e'):>9}  {status}"
            )
        lines.append(
            f"all kernels: norm {_fmt(self.kernel_norm_before)} -> "
            f"{_fmt(self.kernel_norm_after)}; model outputs: max|dy| = "
            f"{_fmt(self.output_max_abs_change, 'e')} (relative "
            f"{_fmt(self.output_max_rel_change, 'e')})"
        )
        if self.loss_before is not None:
            lines.append(
                f"loss: {self.loss_before:.6g} -> {self.loss_after:.6g}"
            )
        return "\n".join(lines)


def _fmt(value, kind="f"):
    if value is None:
        return "-"
    if kind == "e":
        return f"{value:.2e}"
    return f"{value:.4f}"


def _total_norm(norms):
    norms = [n for n in norms if n is not None]
    if not norms:
        return None
    return math.sqrt(sum(n * n for n in norms))


# ---------------------------------------------------------------------------
# The projection (float64, on host)


class _Moments:
    """Streamed count, mean and centered scatter of input rows (float64).

    Batches are merged with the pairwise update of Chan et al., so that the
    centered scatter `sum (a - mean)^T (a - mean)` never goes through the
    cancellation-prone `sum a^T a - n mean^T mean`.
    """

    def __init__(self, dim):
        self.n = 0
        self.mean = np.zeros(dim)
        self.scatter = np.zeros((dim, dim))

    def update(self, rows):
        rows = np.asarray(rows, dtype=np.float64)
        m = rows.shape[0]
        if m == 0:
            return
        mean_b = rows.mean(axis=0)
        centered = rows - mean_b
        delta = mean_b - self.mean
        total = self.n + m
        self.scatter += centered.T @ centered
        self.scatter += np.outer(delta, delta) * (self.n * m / total)
        self.mean += delta * (m / total)
        self.n = total

    def gram(self):
        """`G = sum [a 1]^T [a 1]`, the uncentered Gram with a ones column."""
        d = self.mean.shape[0]
        g = np.empty((d + 1, d + 1))
        g[:d, :d] = self.scatter + self.n * np.outer(self.mean, self.mean)
        g[:d, d] = g[d, :d] = self.n * self.mean
        g[d, d] = self.n
        return g


def _range_basis(gram, rtol):
    """Orthonormal basis of the range of a PSD matrix: eigenvalue > rtol max."""
    lam, vec = np.linalg.eigh(gram)
    top = lam[-1] if lam.size else 0.0
    if top <= 0.0:
        return vec[:, :0]
    return vec[:, lam > rtol * top]


def _project(kernel, bias, moments, rtol, minimize):
    """Minimum-norm weights with the same outputs on the streamed inputs.

    ```
    minimize="kernel":  W' = U U^T W,  U spans the rows of A - 1 mean
                        b' = b + mean (W - W')
    minimize="joint":   [W'; b'] = U U^T [W; b],  U spans the rows of [A 1]
    no bias:            W' = U U^T W,  U spans the rows of A
    ```

    Returns `(kernel, bias, rank, dim)`, float64.
    """
    if bias is None:
        gram = moments.gram()[:-1, :-1]
        u = _range_basis(gram, rtol)
        return u @ (u.T @ kernel), None, u.shape[1], kernel.shape[0]
    if minimize == "kernel":
        u = _range_basis(moments.scatter, rtol)
        new_kernel = u @ (u.T @ kernel)
        new_bias = bias + moments.mean @ (kernel - new_kernel)
        return new_kernel, new_bias, u.shape[1], kernel.shape[0]
    theta = np.concatenate([kernel, bias[None, :]], axis=0)
    u = _range_basis(moments.gram(), rtol)
    theta = u @ (u.T @ theta)
    return theta[:-1], theta[-1], u.shape[1], theta.shape[0]


# ---------------------------------------------------------------------------
# Layers: which ones, their input rows, their weights


def _leaf_layers(model, seen=None):
    """All layers at any depth, descending into nested `keras.Model`s."""
    seen = set() if seen is None else seen
    leaves = []
    for layer in model.layers:
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, keras.Model):
            leaves.extend(_leaf_layers(layer, seen))
        elif layer.weights:
            leaves.append(layer)
    return leaves


_CONV_TYPES = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


def _skip_reason(layer, max_dim):
    """`None` if the layer can be shifted, else why not."""
    if not isinstance(layer, (keras.layers.Dense,) + _CONV_TYPES):
        return "not a Dense or Conv layer"
    if getattr(layer, "quantization_mode", None) is not None:
        return f"quantized ({layer.quantization_mode})"
    if getattr(layer, "lora_enabled", False):
        return "LoRA is enabled"
    if isinstance(layer, _CONV_TYPES) and layer.groups != 1:
        return f"grouped convolution (groups={layer.groups})"
    dim = int(np.prod(layer.kernel.shape[:-1]))
    if dim > max_dim:
        return f"input dimension {dim} > max_dim={max_dim}"
    return None


class _LinearView:
    """A shiftable layer seen as `z = rows @ kernel2d + bias`."""

    def __init__(self, layer):
        self.layer = layer
        self.kernel_shape = tuple(layer.kernel.shape)
        self.dim = int(np.prod(self.kernel_shape[:-1]))
        self.is_conv = isinstance(layer, _CONV_TYPES)
        self._eye = None

    def read(self):
        kernel = keras.ops.convert_to_numpy(self.layer.kernel)
        kernel = kernel.astype(np.float64).reshape(self.dim, -1)
        bias = None
        if self.layer.bias is not None:
            bias = keras.ops.convert_to_numpy(self.layer.bias)
            bias = bias.astype(np.float64)
        return kernel, bias

    def write(self, kernel, bias):
        self.layer.kernel.assign(np.reshape(kernel, self.kernel_shape))
        if bias is not None:
            self.layer.bias.assign(bias)

    def rows(self, inputs):
        """The layer's input rows: samples for Dense, patches for a conv."""
        if not self.is_conv:
            x = keras.ops.convert_to_numpy(inputs)
            yield x.reshape(-1, self.dim)
            return
        # A convolution with the identity kernel returns the patches in the
        # order of `kernel.reshape(dim, filters)`, with the layer's own
        # padding, strides and dilation.
        layer = self.layer
        if self._eye is None:
            eye = np.eye(self.dim).reshape(self.kernel_shape[:-1] + (-1,))
            dtype = keras.backend.standardize_dtype(inputs.dtype)
            self._eye = keras.ops.convert_to_tensor(eye, dtype=dtype)
        padding = layer.padding
        if padding == "causal":
            pad = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
            if layer.data_format == "channels_last":
                inputs = keras.ops.pad(inputs, [[0, 0], [pad, 0], [0, 0]])
            else:
                inputs = keras.ops.pad(inputs, [[0, 0], [0, 0], [pad, 0]])
            padding = "valid"
        batch = inputs.shape[0]
        step = max(1, _CHUNK_ENTRIES // max(1, self._rows_per_sample(inputs)))
        for start in range(0, batch, step):
            patches = keras.ops.conv(
                inputs[start : start + step],
                self._eye,
                strides=list(layer.strides),
                padding=padding,
                dilation_rate=layer.dilation_rate,
                data_format=layer.data_format,
            )
            patches = keras.ops.convert_to_numpy(patches)
            if layer.data_format == "channels_first":
                patches = np.moveaxis(patches, 1, -1)
            yield patches.reshape(-1, self.dim)

    def _rows_per_sample(self, inputs):
        spatial = (
            inputs.shape[1:-1]
            if self.layer.data_format == "channels_last"
            else inputs.shape[2:]
        )
        return int(np.prod(spatial)) * self.dim


class _Hook:
    """Temporarily wraps `layer.call` to see its inputs and outputs."""

    def __init__(self, layer, fn):
        self.layer = layer
        self.fn = fn

    def __enter__(self):
        original = self.layer.call
        # An instance attribute `call` (rare) is put back on exit.
        self.own = self.layer.__dict__.get("call")
        fn = self.fn

        def call(*args, **kwargs):
            outputs = original(*args, **kwargs)
            inputs = args[0] if args else kwargs["inputs"]
            fn(original, inputs, outputs, args, kwargs)
            return outputs

        self.layer.call = call
        return self

    def __exit__(self, *exc):
        del self.layer.call
        if self.own is not None:
            self.layer.call = self.own
        return False


# ---------------------------------------------------------------------------
# Data


def _to_numpy(value):
    if value is None:
        return None
    if keras.ops.is_tensor(value):
        return keras.ops.convert_to_numpy(value)
    return np.asarray(value)


def _unpack(batch):
    """`x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`, as Keras does."""
    if isinstance(batch, list):
        batch = tuple(batch)
    if not isinstance(batch, tuple):
        batch = (batch,)
    if len(batch) > 3:
        raise ValueError(
            "A batch of `data` must be `x`, `(x, y)` or "
            f"`(x, y, sample_weight)`. Received a tuple of {len(batch)} "
            "elements"
        )
    batch = tuple(keras.tree.map_structure(_to_numpy, b) for b in batch)
    return batch + (None,) * (3 - len(batch))


def _is_array(value):
    return isinstance(value, (np.ndarray, dict)) or keras.ops.is_tensor(value)


class _Batches:
    """Re-iterable batches `(x, y, sample_weight)` of numpy arrays."""

    def __init__(self, data, batch_size):
        self.data = data
        self.batch_size = batch_size
        if _is_array(data) or (
            isinstance(data, tuple) and data and _is_array(data[0])
        ):
            self.kind = "arrays"
            self.arrays = _unpack(data)
            sizes = {
                len(leaf)
                for part in self.arrays
                if part is not None
                for leaf in keras.tree.flatten(part)
            }
            if len(sizes) != 1:
                raise ValueError(
                    "The arrays in `data` must have the same number of "
                    f"samples. Received sizes: {sorted(sizes)}"
                )
            self.size = sizes.pop()
            if self.size == 0:
                raise ValueError("`data` is empty. Received 0 samples")
        elif isinstance(data, keras.utils.PyDataset):
            self.kind = "pydataset"
        elif hasattr(data, "__iter__") and not isinstance(data, (str, bytes)):
            if iter(data) is data:
                raise TypeError(
                    "`data` must be re-iterable: optimum shifting makes "
                    "several passes. Pass arrays, a list of batches, a "
                    "`tf.data.Dataset` or a `keras.utils.PyDataset`, not a "
                    f"generator or iterator. Received: data={data!r}"
                )
            self.kind = "iterable"
        else:
            raise TypeError(
                "`data` must be an array, a dict of arrays, a tuple "
                "`(x, y[, sample_weight])`, a list of batches, a "
                "`tf.data.Dataset` or a `keras.utils.PyDataset`. Received: "
                f"data={data!r} of type {type(data).__name__}"
            )

    def __iter__(self):
        if self.kind == "arrays":
            for start in range(0, self.size, self.batch_size):
                yield tuple(
                    (
                        None
                        if part is None
                        else keras.tree.map_structure(
                            lambda a: a[start : start + self.batch_size], part
                        )
                    )
                    for part in self.arrays
                )
        elif self.kind == "pydataset":
            for i in range(self.data.num_batches):
                yield _unpack(self.data[i])
        else:
            for batch in self.data:
                yield _unpack(batch)


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


# ---------------------------------------------------------------------------
# The transform


def optimum_shift(
    model,
    data,
    layers=None,
    tolerance=1e-4,
    inplace=True,
    loss=None,
    rtol=1e-10,
    minimize="kernel",
    batch_size=128,
    max_dim=4096,
):
    """Shifts linear layers to the minimum-norm weights with the same outputs.

    For each `Dense` layer (at any depth, front to back) and each
    `Conv1D`/`Conv2D`/`Conv3D` (through its patch matrix), with `A` (n x d)
    the inputs it receives on `data` in inference mode:

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

    Args:
        model: a built `keras.Model` or `keras_sam.SAMModel`.
        data: calibration data, seen in inference mode: an array (or dict of
            arrays) `x`, a tuple `(x, y[, sample_weight])` of arrays (split
            into batches of `batch_size`), or a re-iterable of batches (a
            list of batches, a `tf.data.Dataset`, a `keras.utils.PyDataset`).
            Batches are streamed; the data never has to fit in memory.
        layers: names (or layer objects) of the layers to shift. Defaults to
            `None`, every Dense and Conv layer.
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

    Returns:
        A `ShiftReport`; `report.model` is the shifted model (`model` itself
        when `inplace=True`).

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((64,)),
    ...     keras.layers.Dense(128, activation="relu"),
    ...     keras.layers.Dense(10)])
    >>> x = np.random.rand(32, 64).astype("float32")
    >>> report = keras_sam.optimum_shift(model, x)
    >>> print(report)        # the first kernel norm drops: rank 31 < 64

    References:
        - Zhou, Li, Feng, Huang, Improving Generalization of Deep Neural
          Networks by Optimum Shifting, AAAI 2025.
    """
    _check_args(model, tolerance, inplace, rtol, minimize, batch_size, max_dim)
    batches = _Batches(data, batch_size)
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
    if not inplace:
        model = _clone(model, first[0])

    plan = _select(_ordered_layers(model, first[0]), layers, max_dim)
    views = [item for item in plan if isinstance(item, _LinearView)]
    snapshot = {id(v): v.read() for v in views}
    try:
        _shift_layers(model, views, batches, rtol, tolerance, minimize)
        report = _finish(model, views, snapshot, batches, loss, tolerance)
    except BaseException:
        for view in views:
            view.write(*snapshot[id(view)])
        raise
    report.layers = [
        item.row if isinstance(item, _LinearView) else item for item in plan
    ]
    report.rtol = rtol
    report.minimize = minimize
    return report


def _check_args(model, tolerance, inplace, rtol, minimize, batch_size, dim):
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
    if not (isinstance(tolerance, numbers.Real) and tolerance > 0):
        raise ValueError(
            f"`tolerance` must be a number > 0. Received: tolerance={tolerance}"
        )
    if not isinstance(inplace, bool):
        raise TypeError(
            f"`inplace` must be True or False. Received: inplace={inplace!r}"
        )
    if not (isinstance(rtol, numbers.Real) and 0 < rtol < 1):
        raise ValueError(f"`rtol` must be in (0, 1). Received: rtol={rtol}")
    if minimize not in _MINIMIZE:
        raise ValueError(
            f"`minimize` must be one of {_MINIMIZE}. Received: "
            f"minimize={minimize!r}"
        )
    for name, value in (("batch_size", batch_size), ("max_dim", dim)):
        if not (isinstance(value, numbers.Integral) and value > 0):
            raise ValueError(
                f"`{name}` must be a positive integer. Received: "
                f"{name}={value!r}"
            )


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


def _ordered_layers(model, x):
    """Layers with weights, in the order a forward pass on `x` calls them."""
    leaves = _leaf_layers(model)
    order = {}
    hooks = []
    for layer in leaves:

        def record(original, inputs, outputs, args, kwargs, layer=layer):
            order.setdefault(id(layer), len(order))

        hooks.append(_Hook(layer, record))
    for hook in hooks:
        hook.__enter__()
    try:
        model(x, training=False)
    except Exception as e:
        raise ValueError(
            f"The model could not be run on `data`: {e}. Received x of "
            f"shape {[np.shape(a) for a in keras.tree.flatten(x)]}"
        ) from e
    finally:
        for hook in hooks:
            hook.__exit__()
    called = sorted(
        (l for l in leaves if id(l) in order), key=lambda l: order[id(l)]
    )
    return called + [l for l in leaves if id(l) not in order]


def _forward(model, x):
    return model(x, training=False)  # inference mode


def _select(candidates, layers, max_dim):
    if layers is not None:
        if isinstance(layers, (str, keras.layers.Layer)):
            layers = [layers]
        by_name = {l.name: l for l in candidates}
        chosen = set()
        for item in layers:
            if isinstance(item, keras.layers.Layer):
                if id(item) not in {id(l) for l in candidates}:
                    raise ValueError(
                        f"Layer {item.name!r} in `layers` is not part of the "
                        f"model. Received: layers={layers!r}"
                    )
                chosen.add(id(item))
            elif item in by_name:
                chosen.add(id(by_name[item]))
            else:
                raise ValueError(
                    f"No layer named {item!r} in the model. Layers with "
                    f"weights: {sorted(by_name)}. Received: layers={layers!r}"
                )
        candidates = [l for l in candidates if id(l) in chosen]
    plan = []
    for layer in candidates:
        reason = _skip_reason(layer, max_dim)
        if reason is None:
            plan.append(_LinearView(layer))
        else:
            plan.append(
                LayerShift(layer.name, type(layer).__name__, "skipped", reason)
            )
    return plan


def _shift_layers(model, views, batches, rtol, tolerance, minimize):
    """Shifts the layers front to back; each view gets its report `row`.

    One pass over the data per layer: the pass that checks layer k (now
    shifted) also collects the inputs of layer k + 1, which therefore sees
    the shifted layer k, as front-to-back processing requires.
    """
    if not views:
        return
    moments = _start_collecting(views[0])
    hooks = [_Hook(views[0].layer, moments.collect)]
    pending = None
    for k, view in enumerate(views):
        _run(model, batches, hooks)  # inputs of layer k, change of k - 1
        if pending is not None:
            pending.check(tolerance)
        hooks, pending = [], None
        if _shift_one(view, moments, rtol, minimize):
            pending = _Change(view)
            hooks.append(_Hook(view.layer, pending.compare))
        if k + 1 < len(views):
            moments = _start_collecting(views[k + 1])
            hooks.append(_Hook(views[k + 1].layer, moments.collect))
    if hooks:
        _run(model, batches, hooks)
    if pending is not None:
        pending.check(tolerance)


def _start_collecting(view):
    moments = _Moments(view.dim)

    def collect(original, inputs, outputs, args, kwargs):
        for r in view.rows(inputs):
            moments.update(r)

    moments.collect = collect
    return moments


def _run(model, batches, hooks):
    for hook in hooks:
        hook.__enter__()
    try:
        for x, _, _ in batches:
            _forward(model, x)
    finally:
        for hook in hooks:
            hook.__exit__()


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
    new_kernel, new_bias, rank, dim = _project(
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
        y_new = _forward(model, x)
        for view in views:
            view.write(*snapshot[id(view)])
        y_old = _forward(model, x)
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


# ---------------------------------------------------------------------------
# The stochastic version, during training


@keras.saving.register_keras_serializable(package="keras_sam")
class OptimumShifting(keras.callbacks.Callback):
    """Applies optimum shifting on one batch every `every_n_epochs` epochs.

    The stochastic version of `keras_sam.optimum_shift`: at the end of every
    `every_n_epochs`-th epoch one batch `B` is drawn and each Dense/Conv
    layer is moved to the minimum-norm weights with the same outputs on it,

    ```
    W' = U U^T W,   U spans the rows of A_B - 1 mean(A_B)
    b' = b + mean(A_B) (W - W')
    ```

    so the training loss on `B` is unchanged while the kernel norm drops.
    Use batches with at least as many samples as classes (and ideally fewer
    than the layer widths, where the freedom is). If a shift exceeds
    `tolerance` it is rolled back and a warning is issued; training goes on.
    Writes `shift_kernel_norm_before` and `shift_kernel_norm_after` (global
    Frobenius norm over the shifted kernels) into `logs`.

    Args:
        data_or_batches: arrays `x` or `(x, y)` (a random batch of
            `batch_size` samples is drawn each time), or a re-iterable of
            batches (list, `tf.data.Dataset`, `keras.utils.PyDataset`), used
            one batch per application, in turn.
        every_n_epochs: apply after every this many epochs. Defaults to `1`.
        batch_size: samples per draw when arrays are given. Defaults to
            `256`.
        layers: names of the layers to shift. Defaults to `None` (all).
        tolerance: as in `optimum_shift`. Defaults to `1e-4`.
        rtol: as in `optimum_shift`. Defaults to `1e-10`.
        minimize: as in `optimum_shift`. Defaults to `"kernel"`.
        seed: seed of the batch draws. Defaults to `None`.

    `get_config` leaves out the data; pass it again to `from_config`.

    Example:

    >>> model.fit(x, y, epochs=10, callbacks=[
    ...     keras_sam.callbacks.OptimumShifting(x, every_n_epochs=2)])

    References:
        - Zhou, Li, Feng, Huang, Improving Generalization of Deep Neural
          Networks by Optimum Shifting, AAAI 2025.
    """

    def __init__(
        self,
        data_or_batches,
        every_n_epochs=1,
        batch_size=256,
        layers=None,
        tolerance=1e-4,
        rtol=1e-10,
        minimize="kernel",
        seed=None,
    ):
        super().__init__()
        for name, value in (
            ("every_n_epochs", every_n_epochs),
            ("batch_size", batch_size),
        ):
            if not (isinstance(value, numbers.Integral) and value > 0):
                raise ValueError(
                    f"`{name}` must be a positive integer. Received: "
                    f"{name}={value!r}"
                )
        if minimize not in _MINIMIZE:
            raise ValueError(
                f"`minimize` must be one of {_MINIMIZE}. Received: "
                f"minimize={minimize!r}"
            )
        self.data_or_batches = data_or_batches
        self.every_n_epochs = every_n_epochs
        self.batch_size = batch_size
        self.layers = None if layers is None else list(layers)
        self.tolerance = tolerance
        self.rtol = rtol
        self.minimize = minimize
        self.seed = seed
        self._batches = _Batches(data_or_batches, batch_size)
        self._rng = np.random.default_rng(seed)
        self._iterator = None
        self.last_report = None

    def _next_batch(self):
        source = self._batches
        if source.kind == "arrays":
            take = min(self.batch_size, source.size)
            idx = np.sort(self._rng.choice(source.size, take, replace=False))
            return tuple(
                (
                    None
                    if part is None
                    else keras.tree.map_structure(lambda a: a[idx], part)
                )
                for part in source.arrays
            )
        if self._iterator is None:
            self._iterator = iter(source)
        try:
            return next(self._iterator)
        except StopIteration:
            self._iterator = iter(source)
            return next(self._iterator)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        batch = self._next_batch()
        try:
            report = optimum_shift(
                self.model,
                [batch],
                layers=self.layers,
                tolerance=self.tolerance,
                rtol=self.rtol,
                minimize=self.minimize,
            )
        except ShiftToleranceError as e:
            warnings.warn(f"OptimumShifting skipped at epoch {epoch}: {e}")
            return
        self.last_report = report
        if logs is not None:
            logs["shift_kernel_norm_before"] = report.kernel_norm_before
            logs["shift_kernel_norm_after"] = report.kernel_norm_after

    def get_config(self):
        return {
            "every_n_epochs": self.every_n_epochs,
            "batch_size": self.batch_size,
            "layers": self.layers,
            "tolerance": self.tolerance,
            "rtol": self.rtol,
            "minimize": self.minimize,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if "data_or_batches" not in config:
            raise ValueError(
                "`OptimumShifting.from_config` needs the data, which the "
                "config does not store: add it as "
                "config['data_or_batches']. Received keys: "
                f"{sorted(config)}"
            )
        return cls(**config)
