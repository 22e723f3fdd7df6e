"""Declaring a kernel on a manifold: a constraint and the layer arguments."""

import keras

from keras_sam.manifolds.registry import get
from keras_sam.manifolds.registry import serialize
from keras_sam.manifolds.stiefel import Stiefel
from keras_sam.manifolds.stiefel import StiefelInitializer


@keras.saving.register_keras_serializable(package="keras_sam")
class ManifoldConstraint(keras.constraints.Constraint):
    """Keeps a weight on a manifold after each optimizer update.

    After every update the optimizer replaces `w` by `restore(w)`: `qf(w)`
    on Stiefel, `r w / |w|` on a sphere of fixed radius. With a stock
    optimizer this is projected gradient descent. `RSAM` reads the manifold
    from this constraint, so a variable declared this way needs no entry in
    its `manifold=` mapping.

    Args:
        manifold: a `Manifold`, a name or a config. Defaults to
            `"stiefel"`.

    Example:

    >>> layer = keras.layers.Conv2D(
    ...     16, 3,
    ...     kernel_initializer=keras_sam.manifolds.StiefelInitializer(),
    ...     kernel_constraint=keras_sam.manifolds.ManifoldConstraint())
    """

    def __init__(self, manifold="stiefel"):
        self.manifold = get(manifold)

    def __call__(self, w):
        return self.manifold.restore(w)

    def get_config(self):
        return {"manifold": serialize(self.manifold)}

    @classmethod
    def from_config(cls, config):
        return cls(manifold=get(config["manifold"]))


def stiefel_kernel(seed=None, retraction="qr"):
    """Layer arguments declaring an orthogonal kernel on the Stiefel manifold.

    Returns `kernel_initializer` and `kernel_constraint` for a Dense or Conv
    layer: the kernel, reshaped to `(fan_in, units)`, starts with orthonormal
    columns and `RSAM` keeps it so (a stock optimizer projects it back after
    each step through the constraint).

    Args:
        seed: Optional integer seed of the initializer. Defaults to `None`.
        retraction: `"qr"` or `"polar"`. Defaults to `"qr"`.

    Returns:
        A dict to unpack into the layer's constructor.

    Example:

    >>> conv = keras.layers.Conv2D(
    ...     32, 3, padding="same", **keras_sam.manifolds.stiefel_kernel())
    """
    return {
        "kernel_initializer": StiefelInitializer(seed=seed),
        "kernel_constraint": ManifoldConstraint(Stiefel(retraction)),
    }
