"""Backend dispatch: the only package that imports tensorflow, jax or torch.

The backend is chosen once, from `keras.backend.backend()`, when keras_sam is
imported; no other module branches on it.
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

train_step = _impl.train_step
# Hessian-vector products and gradients of a pure function of values
# (keras_sam.sharpness), and the backend's compiler for such functions
# (`tf.function`, `jax.jit`; torch runs eagerly).
hvp = _impl.hvp
value_and_grad = _impl.value_and_grad
compile_function = _impl.compile_function
# Whether the backend computes on a GPU/TPU: per-call costs dominate there.
on_accelerator = _impl.on_accelerator
