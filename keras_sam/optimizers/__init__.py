"""Sharpness-aware optimizers around any stock Keras optimizer.

Each is a gradient rule on the one step (`keras_sam.optimizers.base` holds
the contract): given a gradient oracle, it answers with the gradient to
apply. `SAM`, `ASAM` and `RSAM` share the rule and differ only in its
geometry (`keras_sam.optimizers.geometry`: metric, projection,
retraction); `LookSAM`, `GSAM`, `MomentumSAM`, `SAMPa`, `WSAM`,
`FriendlySAM` and `FlatLoRA` are small rules of their own.
"""

import keras

from keras_sam.optimizers.asam import ASAM
from keras_sam.optimizers.base import SharpnessAware
from keras_sam.optimizers.flatlora import FlatLoRA
from keras_sam.optimizers.friendly import FriendlySAM
from keras_sam.optimizers.gsam import GSAM
from keras_sam.optimizers.looksam import LookSAM
from keras_sam.optimizers.msam import MomentumSAM
from keras_sam.optimizers.rsam import RSAM
from keras_sam.optimizers.sam import SAM
from keras_sam.optimizers.sam import find_sam
from keras_sam.optimizers.sam import is_weight_like
from keras_sam.optimizers.sampa import SAMPa
from keras_sam.optimizers.wsam import WSAM

__all__ = [
    "ASAM",
    "SharpnessAware",
    "FlatLoRA",
    "FriendlySAM",
    "GSAM",
    "LookSAM",
    "MomentumSAM",
    "RSAM",
    "SAM",
    "SAMPa",
    "find_sam",
    "is_weight_like",
    "WSAM",
    "get",
    "serialize",
    "deserialize",
    "register",
]


_REGISTRY = {
    "sam": SAM,
    "asam": ASAM,
    "rsam": RSAM,
    "looksam": LookSAM,
    "gsam": GSAM,
    "momentumsam": MomentumSAM,
    "msam": MomentumSAM,
    "sampa": SAMPa,
    "wsam": WSAM,
    "friendlysam": FriendlySAM,
    "fsam": FriendlySAM,
    "flatlora": FlatLoRA,
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
    if isinstance(identifier, SharpnessAware):
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
