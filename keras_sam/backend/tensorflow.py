"""TensorFlow glue: gradients of a function of values, replica context."""

import tensorflow as tf

from keras_sam.backend._one_replica import forward  # noqa: F401
from keras_sam.backend._one_replica import in_parallel  # noqa: F401
from keras_sam.backend._one_replica import in_replica  # noqa: F401
from keras_sam.backend._one_replica import no_grad  # noqa: F401
from keras_sam.backend._one_replica import per_replica  # noqa: F401
from keras_sam.backend._one_replica import per_replica_batchnorm  # noqa: F401
from keras_sam.backend._one_replica import random_state  # noqa: F401
from keras_sam.backend._one_replica import set_random_state  # noqa: F401


def read(variables):
    """The variables' current values as tensors (in replica context under
    a strategy: the local copies)."""
    return [tf.convert_to_tensor(v) for v in variables]


def grad_and_aux(fn, values):
    """`(fn(values), grads)` for `fn` returning `(loss, aux)`; a gradient is
    `None` where the loss does not depend on the value."""
    values = list(values)
    with tf.GradientTape() as tape:
        tape.watch(values)
        loss, aux = fn(values)
    return (loss, aux), tape.gradient(loss, values)


def _context():
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def all_reduce(grads):
    """Sum over replicas of per-replica gradients (of the loss scaled by
    1/replicas, so the sum is the gradient of the global batch)."""
    context = _context()
    if context is None:
        return grads
    present = [g for g in grads if g is not None]
    reduced = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present))
    return [None if g is None else next(reduced) for g in grads]


def all_replicas(flag):
    """A boolean scalar that holds on every replica (no collective: each
    replica's flag is read in cross-replica context)."""
    context = _context()
    if context is None or flag is True:
        return flag

    def every(strategy, flag):
        return tf.reduce_all(
            tf.stack(strategy.experimental_local_results(flag))
        )

    return context.merge_call(every, args=(flag,))


def unscale_loss_for_distribution(loss):
    """The replica's loss for the loss tracker: Keras scales it by
    1/replicas for the gradient."""
    return loss * tf.distribute.get_strategy().num_replicas_in_sync


def apply_if(flag, apply, grads, variables):
    """`apply(grads, variables)` (a stateful optimizer update) where
    `flag` holds; under a strategy, decided in cross-replica context as
    Keras' LossScaleOptimizer does (`flag` agrees across replicas)."""
    if flag is True:
        apply(grads, variables)
        return
    context = _context()
    if context is None:
        tf.cond(flag, lambda: apply(grads, variables), lambda: None)
        return

    def cross_replica(strategy, flag, grads, variables):
        def run():
            strategy.extended.call_for_each_replica(
                apply, args=(grads, variables)
            )

        flag = strategy.experimental_local_results(flag)[0]
        tf.cond(flag, run, lambda: None)

    context.merge_call(cross_replica, args=(flag, grads, variables))


# ---------------------------------------------------------------------------
# Hessian-vector products (keras_sam.sharpness). `fn(values, *args)` is a
# scalar function of a list of tensors; nothing here touches a variable.


def _zeros_for_none(tensors, like):
    return [tf.zeros_like(w) if t is None else t for t, w in zip(tensors, like)]


def value_and_grad(fn, values, *args):
    """`(fn(values, *args), grad fn)` with respect to the list `values`."""
    values = [tf.convert_to_tensor(w) for w in values]
    (loss, _), grads = grad_and_aux(lambda w: (fn(w, *args), None), values)
    return loss, _zeros_for_none(grads, values)


def hvp(fn, values, vectors, *args):
    """H v, the Hessian of `fn(values, *args)` at `values` times `vectors`.

    Reverse over reverse with nested tapes: the inner tape gives
    `g = grad fn`, the outer one differentiates `g . v`.
    """
    values = [tf.convert_to_tensor(w) for w in values]
    with tf.GradientTape() as outer:
        outer.watch(values)
        _, grads = value_and_grad(fn, values, *args)
        g_dot_v = tf.add_n(
            [
                tf.reduce_sum(g * tf.cast(v, g.dtype))
                for g, v in zip(grads, vectors)
            ]
        )
    return _zeros_for_none(outer.gradient(g_dot_v, values), values)


def compile_function(fn, jit_compile=False):
    """`fn` traced once per input signature (`tf.function`) and reused.

    Python scalars in the arguments are part of the signature (a new value
    retraces); pass tensors for values that change between calls.
    `jit_compile=True` fuses with XLA: for vector algebra only (a model's
    graph is slower under XLA on CPU and may hold ops XLA lacks).
    """
    return tf.function(fn, reduce_retracing=True, jit_compile=jit_compile)


def on_accelerator():
    """Whether TensorFlow places computations on a GPU or TPU."""
    return bool(
        tf.config.list_logical_devices("GPU")
        or tf.config.list_logical_devices("TPU")
    )
