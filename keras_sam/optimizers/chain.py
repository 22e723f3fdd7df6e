"""Chains of optimizer wrappers: loss scaling around or inside SAM."""

import keras
from keras import ops


def find_optimizer(optimizer, cls):
    """The first optimizer of type `cls` in a chain of wrappers.

    Follows `inner_optimizer` from `optimizer` (itself included), through
    sharpness-aware and loss-scale wrappers; `None` when there is none.
    """
    while optimizer is not None:
        if isinstance(optimizer, cls):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return None


def describe(optimizer):
    """The chain of wrappers by class, e.g. `LossScaleOptimizer(SAM(SGD))`."""
    inner = getattr(optimizer, "inner_optimizer", None)
    name = optimizer.__class__.__name__
    return name if inner is None else f"{name}({describe(inner)})"


def has_loss_scaling(optimizer):
    """True when a `LossScaleOptimizer` wraps (or is) the SAM optimizer.

    It then checks the gradients itself: it skips a non-finite step and
    lowers its scale.
    """
    loss_scale = keras.optimizers.LossScaleOptimizer
    return find_optimizer(optimizer, loss_scale) is not None


def _loss_scale(optimizer):
    """The product of the loss scales in the chain, or `None`."""
    scale = None
    while optimizer is not None:
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            factor = ops.cast(optimizer.dynamic_scale, "float32")
        elif getattr(optimizer, "loss_scale_factor", None):
            factor = float(optimizer.loss_scale_factor)
        else:
            factor = None
        if factor is not None:
            scale = factor if scale is None else ops.multiply(scale, factor)
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return scale


def scale_gradients(optimizer, grads):
    """Multiplies true gradients by the loss scale of `optimizer` (the
    inverse of `unscale_gradients`): what the chain's `apply` expects."""
    scale = _loss_scale(optimizer)
    if scale is None:
        return list(grads)
    return [
        None if g is None else ops.multiply(g, ops.cast(scale, g.dtype))
        for g in grads
    ]


def unscale_gradients(optimizer, grads):
    """Divides gradients of a scaled loss by the loss scale of `optimizer`.

    `optimizer.scale_loss` may multiply the loss by a `LossScaleOptimizer`'s
    dynamic scale and by an inner optimizer's `loss_scale_factor`; the
    perturbation norm must be taken on the true gradient.
    """
    scale = _loss_scale(optimizer)
    if scale is None:
        return list(grads)
    return [
        None if g is None else ops.divide(g, ops.cast(scale, g.dtype))
        for g in grads
    ]
