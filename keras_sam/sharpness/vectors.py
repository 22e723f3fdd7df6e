"""Flat vectors: the estimators see the trainable values as one vector."""

import math

import keras
import numpy as np
from keras import ops

# Added to a norm before dividing by it.
NORM_EPSILON = 1e-12


def as_float32(t):
    """`t` in float32 (`t` itself when it already is)."""
    if keras.backend.standardize_dtype(t.dtype) == "float32":
        return t  # no op at all: eager backends pay for every call
    return ops.cast(t, "float32")


def flatten(tensors):
    """One float32 vector from a list of tensors."""
    return ops.concatenate([ops.reshape(as_float32(t), (-1,)) for t in tensors])


def unflatten(flat, like):
    """The inverse of `flatten`: tensors shaped (and typed) like `like`."""
    parts, start = [], 0
    for w in like:
        size = int(np.prod(w.shape))
        part = ops.reshape(flat[start : start + size], w.shape)
        if keras.backend.standardize_dtype(w.dtype) != "float32":
            part = ops.cast(part, w.dtype)
        parts.append(part)
        start += size
    return parts


def dot(a, b):
    """`a . b` as a Python float."""
    return float(ops.convert_to_numpy(ops.sum(ops.multiply(a, b))))


def l2_norm(a):
    """`||a||` as a Python float."""
    return math.sqrt(max(dot(a, a), 0.0))
