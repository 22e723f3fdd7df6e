"""The compiled functions of one batch's loss, shared by every `Hessian`.

`L_b(w)` is the loss of batch `b` as a function of the trainable values
`w`, read through a `keras.StatelessScope`, so nothing is assigned; the
backend compiles its value-and-gradient, its Hessian-vector product and the
Krylov iterations fused with that product (`tf.function`, `jax.jit`), once
per `(model, loss, training)` (at most `CACHE_SIZE` per model).
"""

import collections
import weakref

import keras
from keras import ops

from keras_sam import backend
from keras_sam.sharpness.krylov import lanczos_steps
from keras_sam.sharpness.vectors import flatten
from keras_sam.sharpness.vectors import unflatten


def resolve_loss(model, loss):
    """The loss function to use, or `None` for the model's compiled loss."""
    if loss is None:
        overridden = type(model).compute_loss is not keras.Model.compute_loss
        if getattr(model, "loss", None) is None and not overridden:
            raise ValueError(
                "`model` has no compiled loss and no `loss=` was given. "
                "Compile the model with a loss (`model.compile(loss=...)`) "
                "or pass one, e.g. `loss='mse'`. Received: "
                f"model={model.name!r} (compiled loss: None), loss=None"
            )
        return None
    if isinstance(loss, (str, dict)):
        try:
            return keras.losses.get(loss)
        except (ValueError, TypeError) as e:
            raise ValueError(f"Unknown loss. Received: loss={loss!r}") from e
    if not callable(loss):
        raise TypeError(
            "`loss` must be a Keras loss, a loss name or a callable "
            f"`loss(y_true, y_pred)`. Received: loss={loss!r}"
        )
    return loss


def _reduced_loss(loss, y, y_pred, sample_weight):
    """A scalar from `loss`: a `keras.losses.Loss` reduces itself; a plain
    function's per-sample values get Keras' default reduction (weighted sum
    over the number of elements)."""
    if isinstance(loss, keras.losses.Loss):
        return loss(y, y_pred, sample_weight=sample_weight)
    values = ops.convert_to_tensor(loss(y, y_pred))
    if sample_weight is not None:
        weight = ops.cast(sample_weight, values.dtype)
        while len(weight.shape) < len(values.shape):
            weight = ops.expand_dims(weight, -1)
        values = ops.multiply(values, weight)
    return ops.mean(values)


# Compiled functions per (model, loss, mode), reused by every `Hessian` of
# the same model: `tf.function` / `jax.jit` trace once, not once per call.
# At most `CACHE_SIZE` per model, the least recently used dropped first: a
# new loss object or lambda on every call must not grow memory without end.
_COMPILED = weakref.WeakKeyDictionary()
CACHE_SIZE = 8


def _loss_key(loss_fn):
    """A built-in Keras loss object by its class and config, so that equal
    losses share their compiled functions; anything else by identity (a
    subclass's config may leave out what its `call` reads)."""
    if isinstance(loss_fn, keras.losses.Loss) and type(
        loss_fn
    ).__module__.startswith("keras."):
        try:
            config = keras.saving.serialize_keras_object(loss_fn)
            return (type(loss_fn), repr(config))
        except (TypeError, ValueError):  # not serializable: by identity
            return loss_fn
    return loss_fn


def compiled_functions(model, loss_fn, training):
    """`(value_and_grad, hvp, flat_hvp)` of one batch's loss as functions of
    the values, compiled by the backend."""
    variables = list(model.trainable_variables)
    states = list(model.non_trainable_variables)
    try:
        key = (
            _loss_key(loss_fn),
            training,
            tuple(id(v) for v in variables + states),
        )
        hash(key)
    except TypeError:
        key = None  # an unhashable loss: compile for this `Hessian` only
    cache = _COMPILED.setdefault(model, collections.OrderedDict())
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    # A weak reference, so that the cache does not keep the model alive.
    model_ref = weakref.ref(model)

    def batch_loss(values, state_values, x, y, sample_weight):
        model = model_ref()
        mapping = list(zip(variables, values))
        mapping += list(zip(states, state_values))
        # Read the weights from `values`; updates (BatchNorm statistics,
        # metrics, seeds) stay inside the scope and are dropped.
        with keras.StatelessScope(state_mapping=mapping):
            y_pred = model(x, training=training)
            if loss_fn is None:
                value = model.compute_loss(
                    x=x,
                    y=y,
                    y_pred=y_pred,
                    sample_weight=sample_weight,
                    training=training,
                )
            else:
                value = _reduced_loss(loss_fn, y, y_pred, sample_weight)
                for penalty in model.losses:
                    value = ops.add(value, ops.cast(penalty, value.dtype))
        return ops.cast(value, "float32")

    def value_and_grad(values, state_values, x, y, sample_weight):
        return backend.value_and_grad(
            batch_loss, values, state_values, x, y, sample_weight
        )

    def hvp(values, vectors, state_values, x, y, sample_weight):
        return backend.hvp(
            batch_loss, values, vectors, state_values, x, y, sample_weight
        )

    def flat_hvp(values, flat, weight, state_values, x, y, sample_weight):
        """`weight * H v` on flat float32 vectors (`weight=None`: 1): the
        estimators' product, one compiled call per batch."""
        vectors = unflatten(flat, values)
        hv = flatten(hvp(values, vectors, state_values, x, y, sample_weight))
        return hv if weight is None else ops.multiply(hv, weight)

    functions = BatchFunctions(value_and_grad, hvp, flat_hvp)
    if key is not None:
        cache[key] = functions
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)  # the least recently used
    return functions


class BatchFunctions:
    """The compiled functions of one batch's loss (see `compiled_functions`);
    `fused(step)` also compiles `step(H v, v, *extra)` as one call, and
    `lanczos(k)` compiles `k` Lanczos iterations as one call."""

    def __init__(self, value_and_grad, hvp, flat_hvp):
        self._flat_hvp_python = flat_hvp
        self.value_and_grad = backend.compile_function(value_and_grad)
        self.hvp = backend.compile_function(hvp)
        self.flat_hvp = backend.compile_function(flat_hvp)
        self._fused = {}
        self._lanczos = {}

    def fused(self, step):
        if step not in self._fused:
            flat_hvp = self._flat_hvp_python

            def fused(values, flat, state_values, x, y, sample_weight, *extra):
                hv = flat_hvp(
                    values, flat, None, state_values, x, y, sample_weight
                )
                return step(hv, flat, *extra)

            self._fused[step] = backend.compile_function(fused)
        return self._fused[step]

    def lanczos(self, k):
        if k not in self._lanczos:
            flat_hvp = self._flat_hvp_python

            def steps(values, q, state_values, x, y, sample_weight, *carry):
                def matvec(v):
                    return flat_hvp(
                        values, v, None, state_values, x, y, sample_weight
                    )

                return lanczos_steps(matvec, k, q, *carry)

            self._lanczos[k] = backend.compile_function(steps)
        return self._lanczos[k]


# Krylov steps compiled on their own (several batches: the product is summed
# over one compiled call per batch, then the step runs), once per process.
_STEPS = {}


def compiled_step(fn):
    """`fn` compiled by the backend once per process (shared by models)."""
    if fn not in _STEPS:
        _STEPS[fn] = backend.compile_function(fn, jit_compile=True)
    return _STEPS[fn]
