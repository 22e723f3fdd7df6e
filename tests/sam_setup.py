"""Shared set-up of the issue-9 tests: one small MLP with fixed weights.

The initial weights come from numpy, not from Keras' initializers, so every
backend starts from the same point as the float64 reference.
"""

import keras
import numpy as np

D_IN, D_HIDDEN, D_OUT = 5, 7, 3
# Kernels are scaled by ASAM, biases are not.
WEIGHT_LIKE = [True, False, True, False]


def initial_params(seed=0):
    rng = np.random.default_rng(seed)
    return [
        0.5 * rng.normal(size=(D_IN, D_HIDDEN)),
        0.1 * rng.normal(size=(D_HIDDEN,)),
        0.5 * rng.normal(size=(D_HIDDEN, D_OUT)),
        0.1 * rng.normal(size=(D_OUT,)),
    ]


def data(n, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D_IN)).astype("float32")
    y = rng.normal(size=(n, D_OUT)).astype("float32")
    return x, y


def mlp(params, dtype=None):
    """`y = tanh(x W1 + b1) W2 + b2` (the reference MLP) with `params`."""
    model = keras.Sequential(
        [
            keras.Input((D_IN,)),
            keras.layers.Dense(D_HIDDEN, activation="tanh", dtype=dtype),
            keras.layers.Dense(D_OUT, dtype=dtype),
        ]
    )
    model.set_weights([np.asarray(p, dtype="float32") for p in params])
    return model


def batches(x, y, batch_size, epochs=1):
    """The batches `fit(shuffle=False)` sees, in float64."""
    x, y = x.astype("float64"), y.astype("float64")
    return [
        (x[i : i + batch_size], y[i : i + batch_size])
        for _ in range(epochs)
        for i in range(0, len(x), batch_size)
    ]


def fit(model, x, y, batch_size, epochs=1):
    model.fit(
        x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0
    )


def weights(model):
    return [
        np.asarray(keras.ops.convert_to_numpy(w), dtype="float64")
        for w in model.trainable_weights
    ]


def max_difference(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))
