"""Manifolds by name: `get`, `serialize`, `deserialize`."""

import keras

from keras_sam.manifolds.base import Euclidean
from keras_sam.manifolds.base import Manifold
from keras_sam.manifolds.base import Sphere
from keras_sam.manifolds.stiefel import Stiefel

_MANIFOLDS = {"euclidean": Euclidean, "sphere": Sphere, "stiefel": Stiefel}


def serialize(manifold):
    """Returns the Keras config of a manifold."""
    return keras.saving.serialize_keras_object(manifold)


def deserialize(config, custom_objects=None):
    """Rebuilds a manifold from `serialize`'s output."""
    return keras.saving.deserialize_keras_object(
        config, custom_objects=custom_objects
    )


def get(identifier):
    """Returns a manifold from an instance, a name or a config.

    Args:
        identifier: a `Manifold` (returned as is), `None` (Euclidean), one of
            `"euclidean"`, `"sphere"`, `"stiefel"`, or a config dict from
            `serialize`.
    """
    if identifier is None:
        return Euclidean()
    if isinstance(identifier, Manifold):
        return identifier
    if isinstance(identifier, dict):
        manifold = deserialize(identifier)
        if isinstance(manifold, Manifold):
            return manifold
    if isinstance(identifier, str):
        key = identifier.lower()
        if key not in _MANIFOLDS:
            raise ValueError(
                f"Unknown manifold. Expected one of {sorted(_MANIFOLDS)}. "
                f"Received: manifold={identifier!r}"
            )
        return _MANIFOLDS[key]()
    raise TypeError(
        "Could not interpret a manifold identifier: expected a "
        "`keras_sam.manifolds.Manifold`, a name or a config. "
        f"Received: manifold={identifier!r}"
    )
