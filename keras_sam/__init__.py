"""keras-sam: sharpness-aware training for Keras 3."""

from keras_sam import manifolds
from keras_sam import optimizers
from keras_sam import callbacks
from keras_sam import sharpness
from keras_sam.sam_model import SAMModel

__version__ = "0.1.0"
