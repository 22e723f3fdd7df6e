"""Sharpness-aware optimizers around any stock Keras optimizer.

`SAM`, `ASAM` and `RSAM` compute one perturbation and differ only in its
metric, projection and retraction (see `keras_sam.optimizers.sam`); the
cheaper variants `LookSAM`, `GSAM` and `MomentumSAM` are small sets of
hooks on the same step, `keras_sam.step`. `SAMPa` perturbs with the
gradient of the previous step's auxiliary point, so its two gradients are
independent (`keras_sam._parallel_step`).
"""

import keras

from keras_sam.optimizers.asam import ASAM
from keras_sam.optimizers.chain import find_optimizer
from keras_sam.optimizers.chain import has_loss_scaling
from keras_sam.optimizers.chain import scale_gradients
from keras_sam.optimizers.chain import unscale_gradients
from keras_sam.optimizers.gsam import GSAM
from keras_sam.optimizers.looksam import LookSAM
from keras_sam.optimizers.msam import MomentumSAM
from keras_sam.optimizers.rsam import RSAM
from keras_sam.optimizers.sam import SAM
from keras_sam.optimizers.sampa import SAMPa
from keras_sam.optimizers.sam import find_sam
from keras_sam.optimizers.sam import get_inner
from keras_sam.optimizers.sam import is_weight_like

_REGISTRY = {
    "sam": SAM,
    "asam": ASAM,
    "rsam": RSAM,
    "looksam": LookSAM,
    "gsam": GSAM,
    "momentumsam": MomentumSAM,
    "msam": MomentumSAM,
    "sampa": SAMPa,
}


def register(name, cls):
    """Adds a sharpness-aware optimizer class to the string registry."""
    _REGISTRY[name] = cls


def serialize(optimizer):
    """Returns the Keras config of a sharpness-aware optimizer."""
    return keras.saving.serialize_keras_object(optimizer)


def deserialize(config, custom_objects=None):
    """Rebuilds a sharpness-aware optimizer from `serialize`'s output."""
    return keras.saving.deserialize_keras_object(
        config, custom_objects=custom_objects
    )


def get(identifier, optimizer="sgd", **kwargs):
    """Returns a sharpness-aware optimizer.

    Args:
        identifier: a SAM instance (returned as is), a registered name
            (`"sam"`, `"asam"`, ...) or a config dict.
        optimizer: the inner optimizer when `identifier` is a name.
        **kwargs: further constructor arguments when `identifier` is a name.
    """
    if isinstance(identifier, SAM):
        return identifier
    if isinstance(identifier, dict):
        return deserialize(identifier)
    if isinstance(identifier, str):
        key = identifier.lower()
        if key not in _REGISTRY:
            raise ValueError(
                "Unknown sharpness-aware optimizer. Expected one of "
                f"{sorted(_REGISTRY)}. Received: identifier={identifier!r}"
            )
        return _REGISTRY[key](optimizer, **kwargs)
    raise TypeError(
        "Could not interpret a sharpness-aware optimizer identifier. "
        f"Received: identifier={identifier!r}"
    )
