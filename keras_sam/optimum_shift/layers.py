"""Layers: which ones are shifted, their input rows, their weights.

A shiftable layer (`Dense`, `Conv1D/2D/3D`) is seen through a `LinearView`
as `z = rows @ kernel2d + bias`, with its inputs as rows (samples, or
patches for a convolution). `Hook` wraps a layer's `call` for one pass to
see its inputs and outputs.
"""

import keras
import numpy as np

from keras_sam.optimum_shift.projection import Moments
from keras_sam.optimum_shift.report import LayerShift

# Patch matrices are streamed in chunks of at most this many float64 entries.
_CHUNK_ENTRIES = 1 << 22


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


class LinearView:
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


class Hook:
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


def ordered_layers(model, x):
    """Layers with weights, in the order a forward pass on `x` calls them,
    then those it does not call; and the set of ids of the called ones."""
    leaves = _leaf_layers(model)
    order = {}
    hooks = []
    for layer in leaves:

        def record(original, inputs, outputs, args, kwargs, layer=layer):
            order.setdefault(id(layer), len(order))

        hooks.append(Hook(layer, record))
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
        (leaf for leaf in leaves if id(leaf) in order),
        key=lambda leaf: order[id(leaf)],
    )
    rest = [leaf for leaf in leaves if id(leaf) not in order]
    return called + rest, set(order)


def forward(model, x):
    """The model's outputs on `x`, in inference mode."""
    return model(x, training=False)  # inference mode


# The named selections of `optimum_shift(layers=...)`.
SELECTIONS = ("last", "all")


def _select(candidates, called, layers):
    """The layers of `candidates` that `layers` names, in their order."""
    if layers is None or layers == "all":  # None: "all", as before
        return candidates
    if layers == "last":
        # The paper's choice: the last linear layer the forward pass calls
        # (the one producing the logits in a classifier).
        linear = [
            layer
            for layer in candidates
            if id(layer) in called
            and isinstance(layer, (keras.layers.Dense,) + _CONV_TYPES)
        ]
        return linear[-1:]
    if isinstance(layers, str) and layers not in {c.name for c in candidates}:
        raise ValueError(
            f"`layers` must be 'last', 'all', a layer name or a list of "
            f"names or layers. Received: layers={layers!r}"
        )
    if isinstance(layers, (str, keras.layers.Layer)):
        layers = [layers]
    if not isinstance(layers, (list, tuple)):
        raise TypeError(
            "`layers` must be 'last', 'all', a layer name or a list of "
            f"names or layers. Received: layers={layers!r}"
        )
    by_name = {c.name: c for c in candidates}
    chosen = set()
    for item in layers:
        if isinstance(item, keras.layers.Layer):
            if id(item) not in {id(c) for c in candidates}:
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
    return [c for c in candidates if id(c) in chosen]


def plan_layers(candidates, called, layers, max_dim):
    """A `LinearView` per layer to shift, a skipped `LayerShift` per other.

    `layers` selects among `candidates` (in their order): `"last"` the last
    Dense/Conv layer called (`called`: ids of the called layers), `"all"`
    every one, or names / layer objects.
    """
    plan = []
    for layer in _select(candidates, called, layers):
        reason = _skip_reason(layer, max_dim)
        if reason is None:
            plan.append(LinearView(layer))
        else:
            plan.append(
                LayerShift(layer.name, type(layer).__name__, "skipped", reason)
            )
    return plan


def start_collecting(view):
    """`Moments` of the layer's input rows, filled by its hook `collect`."""
    moments = Moments(view.dim)

    def collect(original, inputs, outputs, args, kwargs):
        for r in view.rows(inputs):
            moments.update(r)

    moments.collect = collect
    return moments


def run(model, batches, hooks):
    """One forward pass over `batches` with `hooks` in place."""
    for hook in hooks:
        hook.__enter__()
    try:
        for x, _, _ in batches:
            forward(model, x)
    finally:
        for hook in hooks:
            hook.__exit__()
