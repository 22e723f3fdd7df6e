"""keras-sam: sharpness-aware training for Keras 3."""

from keras_sam import manifolds
from keras_sam import layers
from keras_sam import optimizers
from keras_sam import schedules
from keras_sam import callbacks
from keras_sam import sharpness
from keras_sam.optimum_shift import ShiftReport
from keras_sam.optimum_shift import optimum_shift  # the function, not module
from keras_sam.radius import LearnedRadius
from keras_sam.sam_model import SAMModel

__version__ = "0.1.0"


def __getattr__(name):
    # `keras_sam.tuning` imports keras_tuner: loaded on first use only.
    if name == "tuning":
        import importlib

        return importlib.import_module("keras_sam.tuning")
    raise AttributeError(f"module 'keras_sam' has no attribute {name!r}")
