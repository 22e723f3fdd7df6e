"""Sharpness diagnostics: Hessian spectrum, SAM sharpness, weight norms.

Every estimator is written in `keras.ops` on one primitive, the
Hessian-vector product of the loss averaged over a whole dataset,

```
L(w)   = sum_b (n_b / N) * L_b(w)            # full-data mean over batches b
H v    = sum_b (n_b / N) * hvp(L_b, w, v)    # backend: nested tapes (TF),
                                             # jvp of grad (JAX), double
                                             # backward (torch)
```

computed at the model's current weights in inference mode (`training=False`)
unless asked otherwise. Nothing here changes a variable.

Edge of stability: full-batch gradient descent with learning rate `eta` is
unstable along the top Hessian eigenvector once the top eigenvalue exceeds
`2 / eta` (`2 (1 + beta) / eta` with heavy-ball momentum `beta`); training
then tends to hover at that edge. `keras_sam.callbacks.SharpnessMonitor`
logs these quantities during `fit`.
"""

import math
import numbers
import weakref

import keras
import numpy as np
from keras import ops

from keras_sam import backend

_NORM_EPSILON = 1e-12
_METHODS = ("lanczos", "power")


# ---------------------------------------------------------------------------
# Argument checks.


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be an integer >= {minimum}. "
            f"Received: {name}={value!r}"
        )
    if value < minimum:
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}. "
            f"Received: {name}={value}"
        )
    return int(value)


def _check_float(name, value, minimum=0.0, strict=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a float. Received: {name}={value!r}")
    bad = value <= minimum if strict else value < minimum
    if not math.isfinite(value) or bad:
        relation = ">" if strict else ">="
        raise ValueError(
            f"`{name}` must be a finite float {relation} {minimum}. "
            f"Received: {name}={value}"
        )
    return float(value)


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a `keras.Model` (or a `keras_sam.SAMModel`). "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    if not model.built or not model.trainable_variables:
        raise ValueError(
            "`model` has no trainable variables yet; build it (call it on "
            "data or give it an `Input`) before measuring its sharpness. "
            f"Received: model={model.name!r} (built={model.built})"
        )


def _resolve_loss(model, loss):
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


# ---------------------------------------------------------------------------
# Data: a fixed list of batches, converted once.


def _to_tensor(array):
    if array is None or ops.is_tensor(array):
        return array
    return ops.convert_to_tensor(np.asarray(array))


def _num_samples(x):
    leaves = [t for t in keras.tree.flatten(x) if t is not None]
    if not leaves:
        return 0
    shape = leaves[0].shape
    return int(shape[0]) if len(shape) else 1


def _slice(structure, start, stop):
    return keras.tree.map_structure(
        lambda a: None if a is None else a[start:stop], structure
    )


def _as_batches(data, batch_size=None, steps=None):
    """`[(n_b, x, y, sample_weight), ...]` from arrays, a dataset or batches.

    Arrays (a tuple `(x, y)` or `(x, y, sample_weight)`, or `x` alone) are cut
    into batches of `batch_size` (all samples in one batch when `None`);
    anything else is iterated as batches (a `tf.data.Dataset`, a
    `keras.utils.PyDataset`, a list or generator of tuples), at most `steps`
    of them.
    """
    if data is None:
        raise ValueError(
            "`data` must be arrays `(x, y)`, a dataset or an iterable of "
            "batches. Received: data=None"
        )
    if hasattr(data, "shape") or isinstance(data, dict):
        data = (data,)
    if isinstance(data, tuple):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        n = _num_samples(x)
        size = n if batch_size is None else batch_size
        batches = [
            _slice((x, y, sample_weight), start, start + size)
            for start in range(0, n, max(size, 1))
        ]
    elif isinstance(data, keras.utils.PyDataset):
        batches = (data[i] for i in range(len(data)))
    else:
        try:
            batches = iter(data)
        except TypeError as e:
            raise TypeError(
                "`data` must be arrays `(x, y)`, a dataset or an iterable "
                f"of batches. Received: data of type {type(data).__name__}"
            ) from e
    result = []
    for step, batch in enumerate(batches):
        if steps is not None and step >= steps:
            break
        if isinstance(batch, list):
            batch = tuple(batch)
        if not isinstance(batch, tuple):
            batch = (batch,)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        n = _num_samples(x)
        if n == 0:
            continue
        convert = lambda s: keras.tree.map_structure(_to_tensor, s)  # noqa
        result.append((n, convert(x), convert(y), convert(sample_weight)))
    if not result:
        raise ValueError(
            "`data` is empty: it yielded no samples, so there is no loss to "
            "differentiate. Pass at least one batch. Received: "
            f"data of type {type(data).__name__} with 0 samples"
        )
    return result


# ---------------------------------------------------------------------------
# Flat vectors: the estimators see the trainable values as one vector.


def _as_float32(t):
    if keras.backend.standardize_dtype(t.dtype) == "float32":
        return t  # no op at all: eager backends pay for every call
    return ops.cast(t, "float32")


def _flatten(tensors):
    return ops.concatenate(
        [ops.reshape(_as_float32(t), (-1,)) for t in tensors]
    )


def _unflatten(flat, like):
    parts, start = [], 0
    for w in like:
        size = int(np.prod(w.shape))
        part = ops.reshape(flat[start : start + size], w.shape)
        if keras.backend.standardize_dtype(w.dtype) != "float32":
            part = ops.cast(part, w.dtype)
        parts.append(part)
        start += size
    return parts


def _dot(a, b):
    return float(ops.convert_to_numpy(ops.sum(ops.multiply(a, b))))


def _norm(a):
    return math.sqrt(max(_dot(a, a), 0.0))


# Compiled functions per (model, loss, mode), reused by every `Hessian` of
# the same model: `tf.function` / `jax.jit` trace once, not once per call.
_COMPILED = weakref.WeakKeyDictionary()


def _compiled_functions(model, loss_fn, training):
    """`(value_and_grad, hvp, flat_hvp)` of one batch's loss as functions of
    the values, compiled by the backend."""
    variables = list(model.trainable_variables)
    states = list(model.non_trainable_variables)
    try:
        key = (loss_fn, training, tuple(id(v) for v in variables + states))
        hash(key)
    except TypeError:
        key = None  # an unhashable loss: compile for this `Hessian` only
    cache = _COMPILED.setdefault(model, {})
    if key in cache:
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
        vectors = _unflatten(flat, values)
        hv = _flatten(hvp(values, vectors, state_values, x, y, sample_weight))
        return hv if weight is None else ops.multiply(hv, weight)

    functions = _BatchFunctions(value_and_grad, hvp, flat_hvp)
    if key is not None:
        cache[key] = functions
    return functions


class _BatchFunctions:
    """The compiled functions of one batch's loss (see `_compiled_functions`);
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

                return _lanczos_steps(matvec, k, q, *carry)

            self._lanczos[k] = backend.compile_function(steps)
        return self._lanczos[k]


class Hessian:
    """The Hessian of a model's loss over a dataset, as an operator.

    The loss is averaged over all of `data` (not one batch) and evaluated at
    the model's current weights each time a method is called, so one
    `Hessian` can follow a model through training; the backend functions are
    compiled once (`tf.function`, `jax.jit`) and reused.

    ```
    L(w) = sum_b (n_b / N) L_b(w)        H v = sum_b (n_b / N) H_b(w) v
    ```

    Args:
        model: A built `keras.Model` or `keras_sam.SAMModel`.
        data: Arrays `(x, y)` or `(x, y, sample_weight)`, a `tf.data.Dataset`,
            a `keras.utils.PyDataset`, or an iterable of such batches. It is
            read once and kept (use a probe set, not a whole large dataset).
        loss: A Keras loss, loss name, or callable `loss(y_true, y_pred)`;
            the model's regularization losses are added. Defaults to `None`,
            the compiled loss of `model` (regularization included).
        training: Whether to run the model in training mode (BatchNorm batch
            statistics, dropout with the mask of the layer's current seed
            state, the same for every product); nothing is updated either
            way. On torch an unseeded `Dropout` draws a new mask each time,
            so give it a `seed`. Defaults to `False`.
        batch_size: Batch size used to cut arrays. Defaults to `None`, all
            samples in one batch.
        steps: At most this many batches are read from an iterable `data`
            (required for an infinite dataset). Defaults to `None`, all.

    Example:

    >>> hessian = keras_sam.sharpness.Hessian(model, (x, y))
    >>> hessian.top_eigenvalue(), hessian.trace()
    """

    def __init__(
        self,
        model,
        data,
        loss=None,
        training=False,
        batch_size=None,
        steps=None,
    ):
        _check_model(model)
        loss_fn = _resolve_loss(model, loss)
        if batch_size is not None:
            batch_size = _check_int("batch_size", batch_size, 1)
        if steps is not None:
            steps = _check_int("steps", steps, 1)
        self.model = model
        self.training = bool(training)
        self.batches = _as_batches(data, batch_size=batch_size, steps=steps)
        total = sum(n for n, _, _, _ in self.batches)
        self.weights = [n / total for n, _, _, _ in self.batches]
        self.num_samples = total
        self.num_hvps = 0
        self.variables = list(model.trainable_variables)
        self._states = list(model.non_trainable_variables)
        self.size = sum(int(np.prod(v.shape)) for v in self.variables)

        # Batch weights as tensors: a compiled function retraces for every
        # new Python number but not for a new tensor value. One batch: none.
        self._weight_tensors = [
            None if w == 1.0 else ops.convert_to_tensor(np.float32(w))
            for w in self.weights
        ]
        self._functions = _compiled_functions(model, loss_fn, self.training)

    # ---- values and flat vectors ----

    def _values(self):
        return [ops.convert_to_tensor(v) for v in self.variables]

    def _state_values(self):
        return [ops.convert_to_tensor(v) for v in self._states]

    def _check_vectors(self, vectors):
        vectors = list(vectors)
        shapes = [tuple(v.shape) for v in self.variables]
        received = [tuple(getattr(v, "shape", ())) for v in vectors]
        if received != shapes:
            raise ValueError(
                "`vectors` must be a list of tensors shaped like the "
                f"trainable variables {shapes}. Received shapes: {received}"
            )
        return vectors

    # ---- loss, gradient, Hessian-vector product ----

    def loss_and_gradient(self, values=None):
        """Full-data loss (float) and its gradient (list of tensors).

        Args:
            values: Values of the trainable variables to evaluate at.
                Defaults to `None`, their current values.
        """
        values = self._values() if values is None else list(values)
        states = self._state_values()
        loss, grads = 0.0, None
        for weight, (_, x, y, sample_weight) in zip(self.weights, self.batches):
            value, g = self._functions.value_and_grad(
                values, states, x, y, sample_weight
            )
            loss += weight * float(ops.convert_to_numpy(value))
            if weight != 1.0:
                g = [ops.multiply(gi, weight) for gi in g]
            grads = g if grads is None else list(map(ops.add, grads, g))
        return loss, grads

    def loss(self, values=None):
        """The full-data loss (float) at `values` (default: current)."""
        return self.loss_and_gradient(values)[0]

    def hvp(self, vectors):
        """`H v` at the current weights, for `v` shaped like the variables.

        Args:
            vectors: List of tensors, one per trainable variable.

        Returns:
            List of tensors, one per trainable variable.
        """
        vectors = self._check_vectors(vectors)
        values, states = self._values(), self._state_values()
        self.num_hvps += 1
        result = None
        for weight, (_, x, y, sample_weight) in zip(self.weights, self.batches):
            hv = self._functions.hvp(
                values, vectors, states, x, y, sample_weight
            )
            if weight != 1.0:
                hv = [ops.multiply(h, weight) for h in hv]
            result = hv if result is None else list(map(ops.add, result, hv))
        return result

    def _flat_operator(self, step=None):
        """`v -> H v` on flat float32 vectors, at the current weights: one
        compiled call per batch, summed with the batch weights.

        With `step`, `(v, *extra) -> step(H v, v, *extra)`: an iteration of
        an estimator, compiled with the product into one call when the data
        is one batch (one dispatch per iteration, which is what an
        accelerator waits on for a model of this size).
        """
        values, states = self._values(), self._state_values()
        if step is not None and len(self.batches) == 1:
            fused = self._functions.fused(step)
            _, x, y, sample_weight = self.batches[0]

            def iterate(flat, *extra):
                self.num_hvps += 1
                return fused(values, flat, states, x, y, sample_weight, *extra)

            return iterate
        flat_hvp = self._functions.flat_hvp
        batches = [
            (weight, x, y, sample_weight)
            for weight, (_, x, y, sample_weight) in zip(
                self._weight_tensors, self.batches
            )
        ]

        def matvec(flat):
            self.num_hvps += 1
            result = None
            for weight, x, y, sample_weight in batches:
                hv = flat_hvp(values, flat, weight, states, x, y, sample_weight)
                result = hv if result is None else ops.add(result, hv)
            return result

        if step is None:
            return matvec
        step = _compiled_step(step)
        return lambda flat, *extra: step(matvec(flat), flat, *extra)

    def _lanczos_operator(self):
        """`(n, q, q_previous, beta) -> (q, q_previous, beta, block, stats)`:
        `min(n, k)` Lanczos iterations (`_lanczos_steps`) in one call.

        On one batch they are one compiled call. On a GPU or TPU `k` is
        `_ACCELERATOR_ITERATIONS`: there a call and the read of its scalars
        cost more host time than the device spends on an iteration of a
        model of this size, so fewer calls and reads is what saves time. On
        a CPU `k = 1`: the product dominates, and iterations past the
        stopping point would be computed for nothing. Several batches:
        `k = 1`, one call per batch (`_flat_operator`) and one for the
        recurrence.
        """
        values, states = self._values(), self._state_values()
        if len(self.batches) == 1:
            k = _ACCELERATOR_ITERATIONS if backend.on_accelerator() else 1
            _, x, y, sample_weight = self.batches[0]

            def iterate(n, q, *carry):
                n = min(n, k)
                self.num_hvps += n
                steps = self._functions.lanczos(n)
                return steps(values, q, states, x, y, sample_weight, *carry)

            return iterate
        iterate = self._flat_operator(_lanczos_block_step)
        return lambda n, q, *carry: iterate(q, *carry)

    def _rademacher_vector(self, rng):
        """A probe of +-1 from numpy's `rng` (the same on every backend)."""
        sample = rng.integers(0, 2, size=self.size) * 2 - 1
        return ops.convert_to_tensor(sample.astype("float32"))

    def _start_vector(self, seed):
        """A seeded standard normal vector, drawn on the device."""
        return keras.random.normal((self.size,), dtype="float32", seed=seed)

    # ---- estimators ----

    def top_eigenvalue(
        self,
        method="lanczos",
        max_iter=100,
        tol=1e-3,
        seed=0,
        return_eigenvector=False,
    ):
        """Top eigenvalue of the Hessian (the sharpness).

        Lanczos (default) builds an orthonormal Krylov basis `q_1..q_k` with
        `H Q_k = Q_k T_k + beta_k q_{k+1} e_k^T` and returns the largest
        eigenvalue `theta` of the tridiagonal `T_k`. The basis is
        reorthogonalized only when Simon's estimate of `max |q_i . q_j|`
        passes `sqrt(eps)` (partial reorthogonalization): the Ritz values
        stay as accurate as with an exactly orthonormal basis, at the cost
        of one product and a few vector operations per iteration; the `k`
        basis vectors are kept in memory. It stops when the error bound
        `min(r, r^2 / gap)` is at most `tol * |theta|`, with the Ritz
        residual `r = ||H y - theta y|| = beta_k |s_k|` and `gap` the
        distance from `theta` to the next Ritz value. The number of
        iterations depends on the spectrum: 15-47 at `tol=1e-3` for the
        1M-parameter MLP of `benchmarks/hessian.py`, whose top eigenvalues
        lie within 3% of each other. On a GPU or TPU eight iterations run
        as one compiled call, because there the calls and reads, not the
        device, take most of the time of a model this size; each iteration
        is still checked, so the result is the same, and the products
        computed past the stop are dropped (`num_hvps` counts every
        product). Power iteration repeats
        `v <- H v / ||H v||` and stops when `v . H v` changes by at most
        `tol` relative; it finds the eigenvalue of largest magnitude and
        converges more slowly.

        Args:
            method: `"lanczos"` or `"power"`. Defaults to `"lanczos"`.
            max_iter: Maximum number of Hessian-vector products.
                Defaults to `100`.
            tol: Relative tolerance of the stopping rule. Defaults to `1e-3`.
            seed: Seed of the random start vector. Defaults to `0`.
            return_eigenvector: Also return the eigenvector (a list of
                tensors shaped like the trainable variables, unit norm).
                Defaults to `False`.

        Returns:
            The eigenvalue (float), or `(eigenvalue, eigenvector)`.
        """
        if method not in _METHODS:
            raise ValueError(
                f"`method` must be one of {_METHODS}. Received: "
                f"method={method!r}"
            )
        max_iter = _check_int("max_iter", max_iter, 1)
        tol = _check_float("tol", tol, 0.0, strict=True)
        seed = _check_int("seed", seed, 0)
        start = self._start_vector(seed)
        if method == "lanczos":
            iterate = self._lanczos_operator()
            theta, flat = _lanczos(
                iterate, start, max_iter, tol, return_eigenvector
            )
        else:
            iterate = self._flat_operator(_power_step)
            theta, flat = _power_iteration(iterate, start, max_iter, tol)
        if return_eigenvector:
            return theta, _unflatten(flat, self._values())
        return theta

    def trace(self, num_probes=100, seed=0):
        """Hutchinson estimate of the Hessian trace with Rademacher probes.

        ```
        tr(H) ~= (1/m) sum_{i=1..m} z_i^T H z_i,   z_i in {-1, +1}^n
        ```

        Unbiased; its variance is `2 (||H||_F^2 - sum_j H_jj^2) / m`.

        Args:
            num_probes: Number of probes `m` (one Hessian-vector product
                each). Defaults to `100`.
            seed: Seed of the probes. Defaults to `0`.
        """
        num_probes = _check_int("num_probes", num_probes, 1)
        seed = _check_int("seed", seed, 0)
        matvec = self._flat_operator()
        rng = np.random.default_rng(seed)
        total = 0.0
        for _ in range(num_probes):
            z = self._rademacher_vector(rng)
            total += _dot(z, matvec(z))
        return total / num_probes

    def sam_sharpness(self, rho=None, optimizer=None):
        """SAM sharpness, the loss increase at the adversarial point.

        ```
        g   = grad L(w)
        eps = rho * g / (||g|| + 1e-12)    # or the perturbation of `optimizer`
        S   = L(w + eps) - L(w)
        ```

        Args:
            rho: Float >= 0, the radius. Defaults to `None`: the rho of
                `optimizer` if given, else `0.05`.
            optimizer: Optional `keras_sam.optimizers.SAM` (or a variant,
                e.g. `ASAM` for adaptive sharpness) whose perturbation
                defines `eps`; then `rho` must be `None`. Defaults to `None`.
        """
        if optimizer is not None:
            if rho is not None:
                raise ValueError(
                    "Give `rho` or `optimizer`, not both (the optimizer "
                    f"carries its own rho). Received: rho={rho}, "
                    f"optimizer={optimizer.__class__.__name__}"
                )
            if not hasattr(optimizer, "perturbed_values"):
                raise TypeError(
                    "`optimizer` must be a keras_sam sharpness-aware "
                    f"optimizer. Received: optimizer={optimizer!r}"
                )
        rho = 0.05 if rho is None else _check_float("rho", rho)
        values = self._values()
        loss, grads = self.loss_and_gradient(values)
        if optimizer is not None:
            adversarial = optimizer.perturbed_values(
                grads, self.variables, values
            )
        else:
            # Ascend to w + eps, eps = rho g / ||g||.
            norm = _norm(_flatten(grads))
            scale = rho / (norm + _NORM_EPSILON)
            adversarial = [
                ops.add(w, ops.cast(ops.multiply(g, scale), w.dtype))
                for w, g in zip(values, grads)
            ]
        return self.loss(adversarial) - loss


# ---------------------------------------------------------------------------
# Krylov iterations. Each iteration is one Hessian-vector product, one
# compiled vector update and one read of two scalars; the tridiagonal matrix
# and the orthogonality estimates are small and live in numpy.

# float32 unit roundoff and the semi-orthogonality level sqrt(eps): while
# |q_i . q_j| stays below it, the Ritz values of T_k are as accurate as with
# an exactly orthonormal basis (Simon 1984).
_EPS = float(np.finfo(np.float32).eps)
_SEMI_ORTHOGONAL = math.sqrt(_EPS)


def _lanczos_step(w, q, q_previous, beta_previous):
    """The three-term recurrence on `w = H q` (modified Gram-Schmidt order):

    ```
    w     = H q_k - beta_{k-1} q_{k-1}
    alpha = q_k . w ;  w = w - alpha q_k ;  beta = ||w|| ;  q_{k+1} = w / beta
    ```
    """
    w = ops.subtract(w, ops.multiply(q_previous, beta_previous))
    alpha = ops.vdot(q, w)
    w = ops.subtract(w, ops.multiply(q, alpha))
    beta = ops.norm(w)
    q_next = ops.divide(w, ops.maximum(beta, _NORM_EPSILON))
    return q_next, beta, ops.stack([alpha, beta])


def _lanczos_block_step(w, q, q_previous, beta_previous):
    """`_lanczos_step` as one iteration of `_lanczos_steps`."""
    q_next, beta, stats = _lanczos_step(w, q, q_previous, beta_previous)
    block = ops.expand_dims(q_next, 0)
    return q_next, q, beta, block, ops.expand_dims(stats, 0)


def _lanczos_steps(matvec, k, q, q_previous, beta):
    """`k` iterations of `_lanczos_step` with `w = matvec(q)`, in a loop of
    the compiled function.

    Returns `(q, q_previous, beta)` after the last, the new basis vectors
    `q_{j+1}..q_{j+k}` as the rows of `block` and their `(alpha, beta)` as
    the rows of `stats`.
    """
    if k == 1:
        return _lanczos_block_step(matvec(q), q, q_previous, beta)

    def body(i, carry):
        q, q_previous, beta, block, stats = carry
        q_next, beta, row = _lanczos_step(matvec(q), q, q_previous, beta)
        block = ops.slice_update(block, (i, 0), ops.expand_dims(q_next, 0))
        stats = ops.slice_update(stats, (i, 0), ops.expand_dims(row, 0))
        return q_next, q, beta, block, stats

    block = ops.zeros((k, q.shape[0]), dtype=q.dtype)
    stats = ops.zeros((k, 2), dtype=q.dtype)
    return ops.fori_loop(0, k, body, (q, q_previous, beta, block, stats))


def _power_step(w, v):
    """`theta = v . H v`, `v <- H v / ||H v||`."""
    theta = ops.vdot(v, w)
    norm = ops.norm(w)
    v_next = ops.divide(w, ops.maximum(norm, _NORM_EPSILON))
    return v_next, ops.stack([theta, norm])


_STEPS = {}

# Lanczos iterations per compiled call on a GPU or TPU (see
# `Hessian._lanczos_operator`); on a CPU, one.
_ACCELERATOR_ITERATIONS = 8


def _compiled_step(fn):
    """`fn` compiled by the backend once per process (shared by models)."""
    if fn not in _STEPS:
        _STEPS[fn] = backend.compile_function(fn, jit_compile=True)
    return _STEPS[fn]


def _scalars(tensor):
    return [float(value) for value in ops.convert_to_numpy(tensor)]


def _orthogonality_estimate(omega, omega_previous, alphas, betas, beta, norm):
    """Simon's recurrence for `omega_{k+1, j} = q_{k+1} . q_j`, `j <= k`.

    Taking `q_j .` of `beta_k q_{k+1} = H q_k - alpha_k q_k -
    beta_{k-1} q_{k-1}` and using `H q_j` from step `j`:

    ```
    beta_k w_{k+1,j} = beta_j w_{k,j+1} + (alpha_j - alpha_k) w_{k,j}
                       + beta_{j-1} w_{k,j-1} - beta_{k-1} w_{k-1,j}
                       +- eps ||H||           (the rounding of both steps)
    w_{k+1,k} = eps ||H|| / beta_k,   w_{k+1,k+1} = 1
    ```

    `omega` holds `w_{k,0..k}`, `omega_previous` `w_{k-1,0..k-1}`,
    `alphas` `alpha_0..alpha_k` and `betas` `beta_0..beta_{k-1}`; `beta` is
    `beta_k` and `norm` an estimate of `||H||`. Only scalars: O(k) per step.
    """
    k = len(alphas) - 1
    alpha = np.asarray(alphas[:k])
    beta_j = np.asarray(betas[:k])
    term = beta_j * omega[1 : k + 1] + (alpha - alphas[k]) * omega[:k]
    if k > 1:
        term[1:] += beta_j[: k - 1] * omega[: k - 1]
    if k > 0:
        term -= betas[k - 1] * omega_previous[:k]
    # The rounding terms, added in the direction that makes |w| larger.
    term += np.where(term >= 0, 1.0, -1.0) * _EPS * norm
    return np.concatenate([term / beta, [_EPS * norm / beta, 1.0]])


def _reorthogonalize(blocks, q):
    """`q` made orthogonal to the rows of the matrices `blocks` (classical
    Gram-Schmidt, block by block, repeated once if it cancelled much of `q`:
    "twice is enough"), returned normalized with the norm it had before."""
    norm = 1.0  # q arrives normalized
    for _ in range(2):
        for rows in blocks:
            coefficients = ops.matmul(rows, ops.expand_dims(q, 1))  # (m, 1)
            q = ops.subtract(
                q, ops.matmul(ops.transpose(coefficients), rows)[0]
            )
        previous, norm = norm, _norm(q)
        if norm > 0.7 * previous:  # little was cancelled: once is enough
            break
    return ops.divide(q, max(norm, _NORM_EPSILON)), norm


def _lanczos(iterate, start, max_iter, tol, return_vector=False):
    """Largest Ritz pair by Lanczos with partial reorthogonalization.

    `iterate(n, q, q_previous, beta)` runs `1 <= k <= n` iterations of the
    recurrence (`_lanczos_steps`) in one compiled call; their `(alpha, beta)`
    are read in one go and checked one iteration at a time, so the result
    does not depend on `k` (iterations computed past the stop are dropped).
    The basis is reorthogonalized only when Simon's estimate of the loss of
    orthogonality passes sqrt(eps); then the iterations after that one are
    dropped too and the next call starts from the reorthogonalized vector.
    On a top eigenvalue that rarely happens before convergence, so an
    iteration costs one product and a few vector operations, not O(k).
    """
    q = ops.divide(start, ops.norm(start))
    q_previous = ops.zeros_like(q)
    beta_tensor = ops.zeros((), dtype="float32")
    # The basis q_0, q_1, ... in blocks of rows, kept for reorthogonalization
    # and the eigenvector.
    blocks = [ops.expand_dims(q, 0)]
    alphas, betas = [], []
    omega_previous, omega = np.zeros(0), np.ones(1)
    norm = 0.0  # running Gershgorin bound on ||T_k||, standing in for ||H||
    theta, ritz = 0.0, np.ones(1)
    done = False
    follow_up = False  # the vector after a reorthogonalized one is due too
    while not done:
        q_last, q_previous_last, beta_last, block, stats = iterate(
            1 if follow_up else max_iter - len(alphas),
            q,
            q_previous,
            beta_tensor,
        )
        restart = None
        for i, (alpha, beta) in enumerate(ops.convert_to_numpy(stats)):
            alpha, beta = float(alpha), float(beta)
            alphas.append(alpha)
            norm = max(norm, abs(alpha) + beta + (betas[-1] if betas else 0.0))
            tridiagonal = (
                np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
            )
            eigenvalues, eigenvectors = np.linalg.eigh(tridiagonal)
            theta, ritz = float(eigenvalues[-1]), eigenvectors[:, -1]
            # r = ||H y - theta y|| for the Ritz vector y = Q_k s bounds the
            # error by r, and by r^2 / gap with the gap to the next Ritz
            # value.
            residual = beta * abs(ritz[-1])
            error = residual
            if len(eigenvalues) > 1 and theta > eigenvalues[-2]:
                error = min(residual, residual**2 / (theta - eigenvalues[-2]))
            done = (
                error <= tol * abs(theta)
                or beta <= _NORM_EPSILON * max(norm, 1.0)
                or len(alphas) >= max_iter
            )
            if done:
                break
            omega_next = _orthogonality_estimate(
                omega, omega_previous, alphas, betas, beta, norm
            )
            lost = np.max(np.abs(omega_next[:-1])) > _SEMI_ORTHOGONAL
            if lost or follow_up:
                # q_{j+1} = block[i] against q_0..q_j; the rest of the block
                # was computed from the unorthogonalized vector: dropped.
                # q_{j+2} follows (Simon's two-step rule): it is made from
                # q_j, whose loss of orthogonality the recurrence carries
                # forward, so without it the estimate passes again at once.
                # Joined once for the pair: many small products cost more
                # than one copy of the basis.
                if len(blocks) > 1:
                    blocks = [ops.concatenate(blocks, axis=0)]
                kept = [block[:i]] if i else []  # q_{j+1-i}..q_j
                q_next, scale = _reorthogonalize(blocks + kept, block[i])
                beta *= scale
                omega_next[:-1] = _EPS * norm / beta
                restart = (i, kept, q_next, beta)
                follow_up = not follow_up
            betas.append(beta)
            omega_previous, omega = omega, omega_next
            if restart is not None:
                break
        if done:
            blocks.append(block)
        elif restart is None:
            blocks.append(block)
            q, q_previous, beta_tensor = q_last, q_previous_last, beta_last
        else:
            i, kept, q_next, beta = restart
            q_previous = block[i - 1] if i > 0 else q
            blocks += kept + [ops.expand_dims(q_next, 0)]
            q, beta_tensor = q_next, ops.convert_to_tensor(np.float32(beta))
    if not return_vector:
        return theta, None
    basis = ops.concatenate(blocks, axis=0)[: len(alphas)]
    ritz = ops.convert_to_tensor(ritz.astype("float32")[None, :])
    return theta, ops.matmul(ritz, basis)[0]


def _power_iteration(iterate, start, max_iter, tol):
    """Dominant eigenpair by power iteration; `iterate(v)` is one product
    fused with `_power_step`."""
    v = ops.divide(start, _norm(start))
    theta = None
    for _ in range(max_iter):
        v_next, stats = iterate(v)
        previous, (theta, norm) = theta, _scalars(stats)
        if norm <= _NORM_EPSILON:
            return 0.0, v
        v = v_next
        if previous is not None and abs(theta - previous) <= tol * abs(theta):
            break
    return theta, v


# ---------------------------------------------------------------------------
# Public functions: one call, one estimate.


def hessian_vector_product(
    model, data, vectors, loss=None, training=False, batch_size=None, steps=None
):
    """`H v` of the full-data loss at the model's current weights.

    See `Hessian` for the arguments; `vectors` is a list of tensors shaped
    like `model.trainable_variables`. Returns a list of the same shapes.
    """
    hessian = Hessian(model, data, loss, training, batch_size, steps)
    return hessian.hvp(vectors)


def top_eigenvalue(
    model,
    data,
    loss=None,
    training=False,
    batch_size=None,
    steps=None,
    method="lanczos",
    max_iter=100,
    tol=1e-3,
    seed=0,
):
    """Top eigenvalue of the Hessian of the full-data loss (the sharpness).

    ```
    lambda_max = max_{||v|| = 1} v^T H v,    H = grad^2 (1/N) sum_i l_i(w)
    ```

    Args:
        model: A built `keras.Model` or `keras_sam.SAMModel`.
        data: Arrays `(x, y[, sample_weight])`, a dataset or batches; the
            loss is averaged over all of it.
        loss: A loss overriding the compiled one. Defaults to `None`.
        training: Run the model in training mode. Defaults to `False`.
        batch_size: Batch size for arrays. Defaults to `None` (one batch).
        steps: Maximum number of batches read. Defaults to `None` (all).
        method: `"lanczos"` or `"power"`. Defaults to `"lanczos"`.
        max_iter: Maximum number of Hessian-vector products.
            Defaults to `100`.
        tol: Relative tolerance (see `Hessian.top_eigenvalue`).
            Defaults to `1e-3`.
        seed: Seed of the start vector. Defaults to `0`.

    Example:

    >>> keras_sam.sharpness.top_eigenvalue(model, (x, y))

    References:
        - Cohen et al., Gradient Descent on Neural Networks Typically Occurs
          at the Edge of Stability, ICLR 2021.
        - Yao et al., PyHessian: Neural Networks Through the Lens of the
          Hessian, 2020.
    """
    hessian = Hessian(model, data, loss, training, batch_size, steps)
    return hessian.top_eigenvalue(
        method=method, max_iter=max_iter, tol=tol, seed=seed
    )


def hessian_trace(
    model,
    data,
    loss=None,
    training=False,
    batch_size=None,
    steps=None,
    num_probes=100,
    seed=0,
):
    """Hutchinson estimate of the trace of the Hessian of the full-data loss.

    ```
    tr(H) ~= (1/m) sum_i z_i^T H z_i,   z_i Rademacher (+-1), seeded
    ```

    Args:
        model, data, loss, training, batch_size, steps: as in
            `top_eigenvalue`.
        num_probes: Number of probes (Hessian-vector products).
            Defaults to `100`.
        seed: Seed of the probes. Defaults to `0`.

    Example:

    >>> keras_sam.sharpness.hessian_trace(model, (x, y), num_probes=50)

    References:
        - Hutchinson, A Stochastic Estimator of the Trace of the Influence
          Matrix for Laplacian Smoothing Splines, 1990.
    """
    hessian = Hessian(model, data, loss, training, batch_size, steps)
    return hessian.trace(num_probes=num_probes, seed=seed)


def sam_sharpness(
    model,
    data,
    rho=None,
    optimizer=None,
    loss=None,
    training=False,
    batch_size=None,
    steps=None,
):
    """SAM sharpness `L(w + eps) - L(w)` of the full-data loss.

    ```
    eps = rho * g / (||g|| + 1e-12),   g = grad L(w)
    ```

    Args:
        model, data, loss, training, batch_size, steps: as in
            `top_eigenvalue`.
        rho: Radius. Defaults to `None` (`0.05`, or the optimizer's).
        optimizer: A keras_sam optimizer whose perturbation defines `eps`
            (e.g. `ASAM` for adaptive sharpness). Defaults to `None`.

    Example:

    >>> keras_sam.sharpness.sam_sharpness(model, (x, y), rho=0.05)

    References:
        - Foret et al., Sharpness-Aware Minimization for Efficiently Improving
          Generalization, ICLR 2021.
    """
    hessian = Hessian(model, data, loss, training, batch_size, steps)
    return hessian.sam_sharpness(rho=rho, optimizer=optimizer)


def parameter_norms(model, trainable_only=True):
    """l1 and l2 norms of the weights, per layer and in total.

    ```
    l1 = sum_j |w_j|        l2 = sqrt(sum_j w_j^2)
    ```

    Args:
        model: A `keras.Model` (or any Keras layer).
        trainable_only: Only the trainable variables. Defaults to `True`.

    Returns:
        A dict `{"l1": float, "l2": float, "layers": {path: {"l1", "l2"}}}`
        where `path` is the variable path without its last component.

    Example:

    >>> keras_sam.sharpness.parameter_norms(model)["l2"]
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "`model` must be a `keras.Model` or layer. Received: "
            f"model={model!r} of type {type(model).__name__}"
        )
    variables = model.trainable_variables if trainable_only else model.variables
    layers = {}
    for v in variables:
        if not str(v.dtype).startswith(("float", "bfloat")):
            continue
        path = getattr(v, "path", None) or v.name
        layer = path.rsplit("/", 1)[0] if "/" in path else path
        w = ops.cast(ops.convert_to_tensor(v), "float32")
        l1 = float(ops.convert_to_numpy(ops.sum(ops.abs(w))))
        sq = float(ops.convert_to_numpy(ops.sum(ops.square(w))))
        entry = layers.setdefault(layer, {"l1": 0.0, "l2": 0.0})
        entry["l1"] += l1
        entry["l2"] += sq  # squared for now
    total_l1 = sum(e["l1"] for e in layers.values())
    total_sq = sum(e["l2"] for e in layers.values())
    for entry in layers.values():
        entry["l2"] = math.sqrt(entry["l2"])
    return {"l1": total_l1, "l2": math.sqrt(total_sq), "layers": layers}
