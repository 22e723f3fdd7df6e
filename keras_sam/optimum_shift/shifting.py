"""Shifting the layers front to back, each one checked on the data.

Layer k is projected (`projection.py`) on the inputs it receives with layers
1..k-1 already shifted; the change of its outputs is then measured against
its old weights on the same inputs and must stay within `tolerance`.
"""

import keras
import numpy as np

from keras_sam.optimum_shift.layers import Hook
from keras_sam.optimum_shift.layers import run
from keras_sam.optimum_shift.layers import start_collecting
from keras_sam.optimum_shift.projection import project
from keras_sam.optimum_shift.report import LayerShift
from keras_sam.optimum_shift.report import ShiftToleranceError


def shift_layers(model, views, batches, rtol, tolerance, minimize):
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
