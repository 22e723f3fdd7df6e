"""JAX glue: gradients of a pure function of values, and replicas.

The step is stateless on JAX (`keras_sam.step` returns the new state). A
`keras.distribution` program sees the global batch; under
`DataParallel` the step's passes run once per replica instead
(`per_replica`, a `shard_map` over the batch axis), and inside it the
replica glue reduces over that axis. Elsewhere it is the identity.

BatchNorm in a `per_replica` region: plain Keras on `DataParallel` takes
the batch statistics over the global batch (one program over the sharded
batch), so by default the region does too: each `BatchNormalization`'s
moments are pooled over the replica axis (`_global_moments`), and the
step equals one device as plain Keras does. `per_replica_batchnorm(True)`
keeps each replica's own statistics instead ("ghost" batch norm, what
`tf.distribute.MirroredStrategy` and PyTorch DDP give).
"""

import contextlib
import functools

import jax
import keras
import numpy as np

from keras_sam import _keras_compat
from keras_sam.backend import _one_replica
from keras_sam.backend._one_replica import apply_if  # noqa: F401
from keras_sam.backend._one_replica import no_grad  # noqa: F401
from keras_sam.backend._one_replica import random_state  # noqa: F401
from keras_sam.backend._one_replica import set_random_state  # noqa: F401

unscale_loss_for_distribution = _one_replica.unscale_loss_for_distribution

# The mesh axis of the `per_replica` region being traced, if any.
_REPLICA_AXES = []
# Whether BatchNorm in such a region keeps each replica's own statistics.
_PER_REPLICA_BATCHNORM = [False]


@contextlib.contextmanager
def per_replica_batchnorm(enabled):
    """While a step is traced in this context, BatchNorm statistics in a
    `per_replica` region are each replica's own (`enabled`) or the global
    batch's (else, the default: as plain Keras on `DataParallel`)."""
    _PER_REPLICA_BATCHNORM.append(bool(enabled))
    try:
        yield
    finally:
        _PER_REPLICA_BATCHNORM.pop()


@contextlib.contextmanager
def _replica_region(axis):
    """Traces the code of one replica over the mesh axis `axis`: the glue
    reduces over it, and so do BatchNorm's moments unless the user asked
    for per-replica statistics."""
    _REPLICA_AXES.append(axis)
    try:
        if _PER_REPLICA_BATCHNORM[-1]:
            yield
        else:
            pooled = functools.partial(_global_moments, axis)
            with _keras_compat.batchnorm_moments(pooled):
                yield
    finally:
        _REPLICA_AXES.pop()


def _global_moments(axis, layer, inputs, mask, own):
    """A BatchNorm layer's `(mean, variance)` over the global batch, from
    each replica's own moments over its part:

    ```
    mean     = sum_r n_r mean_r / sum_r n_r
    variance = sum_r n_r (variance_r + (mean_r - mean)^2) / sum_r n_r
    ```

    `n_r` is the replica's count of (unmasked) values per feature; without
    a mask every replica holds an equal part of the batch.
    """
    mean, variance = own(inputs, mask)
    axes = _keras_compat.batchnorm_reduction_axes(layer)
    if 0 not in axes:  # the batch axis is a feature axis: nothing pooled
        return mean, variance
    if mask is None:
        count = jax.numpy.ones((), mean.dtype)
    else:
        weights = jax.numpy.broadcast_to(
            jax.numpy.expand_dims(mask, -1), inputs.shape
        ).astype(mean.dtype)
        count = jax.numpy.sum(weights, axis=axes).reshape(mean.shape)
    total = jax.numpy.maximum(jax.lax.psum(count, axis), keras.config.epsilon())
    global_mean = jax.lax.psum(count * mean, axis) / total
    spread = variance + jax.numpy.square(mean - global_mean)
    return global_mean, jax.lax.psum(count * spread, axis) / total


def all_reduce(grads):
    """The mean over replicas (inside `per_replica`; else the identity)."""
    if not _REPLICA_AXES:
        return grads
    axis = _REPLICA_AXES[-1]
    return [None if g is None else jax.lax.pmean(g, axis) for g in grads]


def all_replicas(flag):
    """A boolean scalar that holds on every replica."""
    if not _REPLICA_AXES or flag is True:
        return flag
    flag = jax.numpy.asarray(flag, "int32")
    return jax.lax.pmin(flag, _REPLICA_AXES[-1]) > 0


def in_replica():
    """Whether the code runs once per replica (inside `per_replica`)."""
    return bool(_REPLICA_AXES)


def per_replica(fn, state, data):
    """`fn(state, data)` once per data-parallel replica, on its own part of
    the batch, when a `keras.distribution.DataParallel` over several
    devices is set (else one call on the global batch).

    The region is a `shard_map` over the batch axis: the state goes in
    replicated, `data` split along its first dimension. `fn` returns
    `(means, sums, batched)`: floating values of `means` are averaged over
    the replicas (others are the same on every replica and kept), `sums`
    are summed, `batched` is concatenated back into the global batch.
    Each replica's two passes stay on its own device; only what `fn`
    reduces crosses devices.
    """
    found = _data_parallel(data, groups=1)
    if found is None:
        return fn(state, data)  # one program: XLA splits what it can
    mesh, axis = found
    replicated = jax.sharding.PartitionSpec()
    split = jax.sharding.PartitionSpec(axis)

    def local(state, data):
        with _replica_region(axis):
            means, sums, batched = fn(state, data)
        return (*_reduce(axis, means, sums), batched)

    mapped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(replicated, split),
        out_specs=(replicated, replicated, split),
        check_vma=False,
    )
    return mapped(state, data)


def _data_parallel(data, groups):
    """`(mesh, batch axis)` of a `keras.distribution.DataParallel` whose
    devices split into `groups` equal groups, each able to split `data`
    evenly; `None` otherwise (or inside a `per_replica` region)."""
    distribution = keras.distribution.distribution()
    if (
        _REPLICA_AXES
        or not isinstance(distribution, keras.distribution.DataParallel)
        or distribution.batch_dim_name is None
    ):
        return None
    mesh = distribution.device_mesh.backend_mesh
    axis = distribution.batch_dim_name
    count = int(mesh.shape[axis])
    if count < 2 or count % groups:
        return None
    sizes = {int(np.shape(t)[0]) for t in jax.tree.leaves(data) if np.ndim(t)}
    if any(size % (count // groups) for size in sizes):
        return None
    return mesh, axis


def _reduce(axis, means, sums):
    """Floating `means` averaged over `axis` (others kept), `sums` summed."""

    def mean(t):
        if jax.numpy.issubdtype(t.dtype, jax.numpy.inexact):
            return jax.lax.pmean(t, axis)
        return t

    means = jax.tree.map(mean, means)
    return means, jax.tree.map(lambda t: jax.lax.psum(t, axis), sums)


def in_parallel(fn, shared, first, second, between=None):
    """`(fn(shared, *first), fn(shared, *second))`, each of `first` and
    `second` a `(point, batch)` pair; the two batches have one structure
    and shape.

    Under a `keras.distribution.DataParallel` over an even number of
    devices, the two calls run at the same time: the devices split into two
    halves (a "pair" mesh axis), each half runs one call data-parallel over
    its whole batch. `fn` returns `(means, sums, batched)` as in
    `per_replica`. Elsewhere the calls run in turn (`between()` between).

    Both points and both batches enter every half (the points are cheap to
    compute anywhere); the only exchange between the halves is one
    all-gather of the two calls' reduced outputs, packed into one buffer
    per dtype, and one of `batched`.
    """
    found = _data_parallel(first[1], groups=2)  # the batches: one shape
    if found is None:
        return _one_replica.in_parallel(fn, shared, first, second, between)
    mesh, axis = found
    devices = np.asarray(mesh.devices).reshape(2, -1)
    pair_mesh = jax.sharding.Mesh(devices, ("pair", axis))
    # With one device per half there is nothing to reduce within a half
    # (a reduction over one device still costs a collective on GPUs).
    group = axis if devices.shape[1] > 1 else None
    P = jax.sharding.PartitionSpec
    packed = []  # the reduced outputs' layout, recorded while tracing

    def local(shared, first, second):
        is_first = jax.lax.axis_index("pair") == 0
        mine = jax.tree.map(
            lambda a, b: jax.numpy.where(is_first, a, b), first, second
        )
        if group is None:
            means, sums, batched = fn(shared, *mine)
        else:
            with _replica_region(group):
                means, sums, batched = fn(shared, *mine)
            means, sums = _reduce(group, means, sums)
        buffers, layout = _pack((means, sums))
        packed.append(layout)
        # Every device gets both halves' outputs: `[2, ...]`, replicated.
        gather = functools.partial(jax.lax.all_gather, axis_name="pair")
        return [gather(b) for b in buffers], jax.tree.map(gather, batched)

    buffers, batched = jax.shard_map(
        local,
        mesh=pair_mesh,
        in_specs=(P(), (P(), P(axis)), (P(), P(axis))),
        out_specs=(P(), P(None, axis)),
        check_vma=False,
    )(shared, first, second)
    return tuple(
        (
            *_unpack([b[i] for b in buffers], packed[0]),
            jax.tree.map(lambda t: t[i], batched),
        )
        for i in range(2)
    )


def _pack(tree):
    """`(one flat buffer per dtype, layout)` of a pytree's leaves; the
    layout is what `_unpack` needs to rebuild the tree."""
    leaves, treedef = jax.tree.flatten(tree)
    dtypes = sorted({str(t.dtype) for t in leaves})
    buffers = [
        jax.numpy.concatenate(
            [jax.numpy.ravel(t) for t in leaves if str(t.dtype) == dtype]
        )
        for dtype in dtypes
    ]
    shapes = [(str(t.dtype), t.shape) for t in leaves]
    return buffers, (treedef, dtypes, shapes)


def _unpack(buffers, layout):
    """The tree `_pack` flattened into `buffers`."""
    treedef, dtypes, shapes = layout
    offsets = dict.fromkeys(dtypes, 0)
    by_dtype = dict(zip(dtypes, buffers))
    leaves = []
    for dtype, shape in shapes:
        start, size = offsets[dtype], int(np.prod(shape))
        leaves.append(by_dtype[dtype][start : start + size].reshape(shape))
        offsets[dtype] = start + size
    return jax.tree.unflatten(treedef, leaves)


def forward(model, inputs, training):
    """The wrapped model's forward pass as Keras' JAX trainer runs it: its
    `call` without `__call__` (the autocast scopes of plain `fit`)."""
    return _keras_compat.call_without_scope(model, inputs, training)


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
