"""Backend dispatch: the only package that imports tensorflow, jax or torch.

The backend is chosen once, from `keras.backend.backend()`, when keras_sam is
imported; no other module branches on it. Each backend module holds only
glue: a gradient of a function of values, the replica context, torch's
random generators, Hessian-vector products. The step itself is
`keras_sam.step`, written once.
"""

import keras

_BACKEND = keras.backend.backend()

if _BACKEND == "tensorflow":
    from keras_sam.backend import tensorflow as _impl
elif _BACKEND == "jax":
    from keras_sam.backend import jax as _impl
elif _BACKEND == "torch":
    from keras_sam.backend import torch as _impl
else:
    raise ImportError(
        "keras_sam supports the 'tensorflow', 'jax' and 'torch' Keras "
        f"backends. Received: KERAS_BACKEND={_BACKEND!r}"
    )

# The train step's glue (keras_sam.step): variable values, a gradient of a
# function of values with auxiliary outputs, the replica context (identity
# where the step sees the global batch), the random state that unseeded
# layers draw from, the context the commit runs in, and a conditional
# stateful update.
read = _impl.read
# The wrapped model's forward pass as the backend's Keras trainer runs a
# model (autocast scopes differ: `__call__` on TensorFlow and torch, `call`
# on JAX).
forward = _impl.forward
grad_and_aux = _impl.grad_and_aux
all_reduce = _impl.all_reduce
all_replicas = _impl.all_replicas
in_replica = _impl.in_replica
per_replica = _impl.per_replica
# BatchNorm statistics in a `per_replica` region: the global batch's (as
# plain Keras on JAX `DataParallel`) unless this context says per replica.
per_replica_batchnorm = _impl.per_replica_batchnorm
in_parallel = _impl.in_parallel
unscale_loss_for_distribution = _impl.unscale_loss_for_distribution
random_state = _impl.random_state
set_random_state = _impl.set_random_state
no_grad = _impl.no_grad
apply_if = _impl.apply_if
# Hessian-vector products and gradients of a pure function of values
# (keras_sam.sharpness), and the backend's compiler for such functions
# (`tf.function`, `jax.jit`; torch runs eagerly).
hvp = _impl.hvp
value_and_grad = _impl.value_and_grad
compile_function = _impl.compile_function
# Whether the backend computes on a GPU/TPU: per-call costs dominate there.
on_accelerator = _impl.on_accelerator
