"""Optimum shifting: the minimum-norm weights that keep a model's outputs.

For a linear layer `z = a W + b` and the inputs `A` (n x d) it receives on
calibration data, every `W'` with `[A 1][W'; b'] = [A 1][W; b]` gives the
same outputs on that data. Optimum shifting replaces `W` by the solution of
minimum norm, which lowers the weight norm (and with it a bound on the Hessian
trace) without changing a single prediction on the calibration data.

Modules: `report` (`ShiftReport`, `LayerShift`), `projection` (the
float64 projection), `layers` (which layers, their input rows and hooks),
`arguments` (checking what `optimum_shift` receives), `shifting` (the
layers front to back, each checked), `comparison` (the model before and
after), `transform` (`optimum_shift`), `callback` (`OptimumShifting`).
"""

from keras_sam.optimum_shift.callback import OptimumShifting
from keras_sam.optimum_shift.report import LayerShift
from keras_sam.optimum_shift.report import ShiftReport
from keras_sam.optimum_shift.report import ShiftToleranceError
from keras_sam.optimum_shift.transform import optimum_shift

__all__ = [
    "OptimumShifting",
    "LayerShift",
    "ShiftReport",
    "ShiftToleranceError",
    "optimum_shift",
]
