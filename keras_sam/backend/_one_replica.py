"""Glue shared by backends where the step sees one replica's whole batch
(JAX, whose `keras.distribution` programs see the global batch, and torch)
or draws no random state outside the model (TensorFlow, JAX)."""

import contextlib


def all_reduce(grads):
    """The step sees the global batch already: nothing to reduce."""
    return grads


def all_replicas(flag):
    """One program: its flag holds for every replica."""
    return flag


def in_replica():
    """Whether the code runs once per replica: never here."""
    return False


def per_replica(fn, state, data):
    """One call on the whole batch: `fn(state, data)`."""
    return fn(state, data)


def in_parallel(fn, shared, first, second, between=None):
    """`(fn(shared, *first), fn(shared, *second))`, in turn; `between()`
    runs between the two calls."""
    out_first = fn(shared, *first)
    if between is not None:
        between()
    return out_first, fn(shared, *second)


def unscale_loss_for_distribution(loss):
    """The loss is the batch's already."""
    return loss


def apply_if(flag, apply, grads, variables):
    """`apply(grads, variables)` (a stateful update) where `flag` holds."""
    if flag is True or bool(flag):
        apply(grads, variables)


def random_state():
    """Keras layers draw from seed variables, part of the model's state."""
    return None


def set_random_state(state):
    """Nothing to restore: see `random_state`."""


no_grad = contextlib.nullcontext


def per_replica_batchnorm(enabled):
    """BatchNorm statistics are the batch's each step sees: a plain
    context (under `tf.distribute`, each replica's own unless the layer
    is `synchronized`, as in plain Keras)."""
    return contextlib.nullcontext()


def forward(model, inputs, training):
    """The wrapped model's forward pass as Keras' TensorFlow and torch
    trainers run it: `model(inputs, training=training)`."""
    return model(inputs, training=training)
