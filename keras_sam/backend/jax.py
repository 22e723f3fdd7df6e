"""JAX glue: gradients of a pure function of values.

The step is stateless on JAX (`keras_sam.step` returns the new state), and
a `keras.distribution` program sees the global batch, so the replica glue
is the identity.
"""

import jax

from keras_sam.backend._one_replica import all_reduce  # noqa: F401
from keras_sam.backend._one_replica import all_replicas  # noqa: F401
from keras_sam.backend._one_replica import apply_if  # noqa: F401
from keras_sam.backend._one_replica import no_grad  # noqa: F401
from keras_sam.backend._one_replica import random_state  # noqa: F401
from keras_sam.backend._one_replica import set_random_state  # noqa: F401
from keras_sam.backend._one_replica import (  # noqa: F401
    unscale_loss_for_distribution,
)


def read(variables):
    """The variables' current values."""
    return [v.value for v in variables]


def grad_and_aux(fn, values):
    """`(fn(values), grads)` for `fn` returning `(loss, aux)`."""
    return jax.value_and_grad(fn, has_aux=True)(list(values))


# ---------------------------------------------------------------------------
# Hessian-vector products (keras_sam.sharpness). `fn(values, *args)` is a
# pure scalar function of a list of arrays; nothing here touches a variable.


def value_and_grad(fn, values, *args):
    """`(fn(values, *args), grad fn)` with respect to the list `values`."""
    return jax.value_and_grad(lambda w: fn(w, *args))(list(values))


def hvp(fn, values, vectors, *args):
    """H v, the Hessian of `fn(values, *args)` at `values` times `vectors`.

    Forward over reverse: the directional derivative (jvp) of `grad fn`
    along `v`, one forward-mode sweep through the gradient computation.
    """
    values = list(values)
    vectors = [
        jax.numpy.asarray(v, dtype=w.dtype) for v, w in zip(vectors, values)
    ]
    grad_fn = jax.grad(lambda w: fn(w, *args))
    _, hv = jax.jvp(grad_fn, (values,), (vectors,))
    return hv


def compile_function(fn, jit_compile=False):
    """`fn` compiled once per input shape (`jax.jit`) and reused; JAX
    always compiles, `jit_compile` is accepted for the other backends."""
    return jax.jit(fn)


def on_accelerator():
    """Whether JAX computes on a GPU or TPU (not the CPU)."""
    return jax.default_backend() != "cpu"
