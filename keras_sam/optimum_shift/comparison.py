"""The model before and after shifting: on the data, and beyond it.

On `data` the model's outputs (and loss) must be kept: `compare_model`
measures their change and raises `ShiftToleranceError` past `tolerance`.
Whether the minimum is flatter beyond `data` is a measurement:
`Evaluation` gives the loss, the Hessian trace and the top eigenvalue on
`evaluation_data`.
"""

import keras
import numpy as np

from keras_sam.optimum_shift.layers import forward
from keras_sam.optimum_shift.report import ShiftReport
from keras_sam.optimum_shift.report import ShiftToleranceError


class Evaluation:
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


def compare_model(model, views, snapshot, batches, loss, tolerance):
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
