"""keras-sam: sharpness-aware training for Keras 3."""

from keras_sam import manifolds
from keras_sam import optimizers
from keras_sam import callbacks
from keras_sam import sharpness
from keras_sam.optimum_shift import ShiftReport
from keras_sam.optimum_shift import optimum_shift  # the function, not module
from keras_sam.sam_model import SAMModel

__version__ = "0.1.0"
