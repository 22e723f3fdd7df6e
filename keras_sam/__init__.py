"""keras-sam: sharpness-aware training for Keras 3."""

from keras_sam import callbacks as callbacks
from keras_sam import layers as layers
from keras_sam import manifolds as manifolds
from keras_sam import optimizers as optimizers
from keras_sam import schedules as schedules
from keras_sam import sharpness as sharpness
from keras_sam.optimum_shift import ShiftReport
from keras_sam.optimum_shift import optimum_shift  # the function, not module
from keras_sam.radius import LearnedRadius
from keras_sam.sam_model import SAMModel

# The public names besides the subpackages (`callbacks`, `layers`,
# `manifolds`, `optimizers`, `schedules`, `sharpness`, and `tuning`, loaded
# on first use).
__all__ = [
    "LearnedRadius",
    "SAMModel",
    "ShiftReport",
    "optimum_shift",
]

__version__ = "0.1.0"


def __getattr__(name):
    # `keras_sam.tuning` imports keras_tuner: loaded on first use only.
    if name == "tuning":
        import importlib

        return importlib.import_module("keras_sam.tuning")
    raise AttributeError(f"module 'keras_sam' has no attribute {name!r}")
