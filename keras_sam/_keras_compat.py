"""Every use of a Keras-private member, in one place.

keras_sam uses the public Keras API everywhere else. Each private member
named here has a test in `tests/test_keras_compat.py` that fails when a
Keras release renames it or changes what it means, so that an upgrade
breaks one test instead of silently changing the training step.

Private members used:

- `keras.layers.BatchNormalization._moments(inputs, mask)`: the batch
  moments `(mean, variance)` of a training call (Keras 3.x).
- `keras.layers.BatchNormalization._reduction_axes`: the axes they reduce
  over (every axis but the feature axes).
- `keras.optimizers.Optimizer._learning_rate`: the learning rate as given
  (a schedule stays a schedule; the public `learning_rate` evaluates it).
"""

import contextlib
import functools

import keras

_BatchNormalization = keras.layers.BatchNormalization


@contextlib.contextmanager
def batchnorm_moments(moments):
    """Within the context, `BatchNormalization` layers in training take
    their batch moments from `moments(layer, inputs, mask, own)`, where
    `own(inputs, mask)` is Keras' own computation for that layer.

    Meant for the time a step is traced (the replica glue replaces the
    moments of a replica's part of the batch with the global batch's); the
    class attribute is restored on exit, exceptions included. Subclasses
    that override `_moments` keep their own.
    """
    own = _BatchNormalization.__dict__["_moments"]

    def replaced(layer, inputs, mask=None):
        return moments(layer, inputs, mask, functools.partial(own, layer))

    _BatchNormalization._moments = replaced
    try:
        yield
    finally:
        _BatchNormalization._moments = own


def batchnorm_reduction_axes(layer):
    """The axes a `BatchNormalization` layer's moments reduce over."""
    return tuple(layer._reduction_axes)


def learning_rate_of(optimizer):
    """The learning rate `optimizer` was given: a schedule as the schedule
    object (`optimizer.learning_rate` is its value at the current step),
    else the variable holding the constant."""
    return optimizer._learning_rate
