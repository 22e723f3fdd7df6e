"""PyTorch glue: autograd over values, and torch's global generators."""

import keras
import torch

from keras_sam.backend import _one_replica
from keras_sam.backend._one_replica import all_reduce  # noqa: F401
from keras_sam.backend._one_replica import all_replicas  # noqa: F401
from keras_sam.backend._one_replica import apply_if  # noqa: F401
from keras_sam.backend._one_replica import forward  # noqa: F401
from keras_sam.backend._one_replica import in_parallel  # noqa: F401
from keras_sam.backend._one_replica import in_replica  # noqa: F401
from keras_sam.backend._one_replica import per_replica  # noqa: F401
from keras_sam.backend._one_replica import per_replica_batchnorm  # noqa: F401

unscale_loss_for_distribution = _one_replica.unscale_loss_for_distribution


def read(variables):
    """The variables' current values: detached views, no copy (the step
    writes nothing until its commit)."""
    return [v.value.detach() for v in variables]


def _leaves(values):
    """Detached views of `values` (the same storage, no copy: nothing here
    writes to it) that autograd differentiates against."""
    return [torch.as_tensor(w).detach().requires_grad_(True) for w in values]


def _detach(structure):
    return keras.tree.map_structure(
        lambda t: t.detach() if isinstance(t, torch.Tensor) else t, structure
    )


def grad_and_aux(fn, values):
    """`(fn(values), grads)` for `fn` returning `(loss, aux)`; a gradient is
    `None` where the loss does not depend on the value."""
    with torch.enable_grad():
        values = _leaves(values)
        loss, aux = fn(values)
        grads = [None] * len(values)
        if loss.requires_grad:
            grads = list(torch.autograd.grad(loss, values, allow_unused=True))
    return (loss.detach(), _detach(aux)), grads


@torch.compiler.disable
def random_state():
    """torch's global generators: Keras' torch dropout draws from them when
    the layer has no seed, so they are part of the step's random state.
    (Run outside torch.compile's graphs.)"""
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return torch.get_rng_state(), cuda


@torch.compiler.disable
def set_random_state(state):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


no_grad = torch.no_grad


# ---------------------------------------------------------------------------
# Hessian-vector products (keras_sam.sharpness). `fn(values, *args)` is a
# scalar function of a list of tensors; nothing here touches a variable.


def _zeros_for_none(tensors, like):
    return [
        torch.zeros_like(w) if t is None else t.detach()
        for t, w in zip(tensors, like)
    ]


def value_and_grad(fn, values, *args):
    """`(fn(values, *args), grad fn)` with respect to the list `values`."""
    (loss, _), grads = grad_and_aux(lambda w: (fn(w, *args), None), values)
    return loss, _zeros_for_none(grads, values)


def hvp(fn, values, vectors, *args):
    """H v, the Hessian of `fn(values, *args)` at `values` times `vectors`.

    Double backward: `g = grad fn` is built with `create_graph=True`, then
    `g . v` is differentiated once more.
    """
    with torch.enable_grad():
        values = _leaves(values)
        loss = fn(values, *args)
        grads = torch.autograd.grad(
            loss, values, create_graph=True, allow_unused=True
        )
        terms = [
            torch.vdot(
                g.reshape(-1), torch.as_tensor(v, dtype=g.dtype).reshape(-1)
            )
            for g, v in zip(grads, vectors)
            if g is not None and g.requires_grad
        ]
        if not terms:
            # The gradient does not depend on the values: H = 0.
            return [torch.zeros_like(w) for w in values]
        hv = torch.autograd.grad(sum(terms), values, allow_unused=True)
    return _zeros_for_none(hv, values)


def compile_function(fn, jit_compile=False):
    """`fn` itself: torch runs eagerly, as Keras' torch backend does
    without `jit_compile` (`jit_compile` is accepted and ignored)."""
    return fn


def on_accelerator():
    """Whether Keras' torch backend computes on a GPU (it picks CUDA, then
    MPS, when available)."""
    return torch.cuda.is_available() or torch.backends.mps.is_available()
