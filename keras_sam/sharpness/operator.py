"""`HessianOperator`: a model's loss over a dataset, and its products.

```
L(w) = sum_b (n_b / N) L_b(w)        H v = sum_b (n_b / N) H_b(w) v
```

It holds the probe data (read once, `keras_sam._data.as_batches`) and the
compiled functions of one batch's loss (`compiled.py`), and gives the
full-data loss, its gradient and Hessian-vector products, on lists of
tensors or on flat vectors. The estimators built on these products live in
`hessian.py` (`Hessian`).
"""

import keras
import numpy as np
from keras import ops

from keras_sam._data import as_batches
from keras_sam._validation import check_positive_int
from keras_sam.sharpness.compiled import compiled_functions
from keras_sam.sharpness.compiled import compiled_step
from keras_sam.sharpness.compiled import resolve_loss
from keras_sam.sharpness.probe import check_data
from keras_sam.sharpness.probe import check_model


class HessianOperator:
    """The full-data loss, gradient and Hessian-vector products of a model.

    Takes the arguments of `keras_sam.sharpness.Hessian` (its subclass, which
    adds the estimators and documents them).
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
        check_model(model)
        loss_fn = resolve_loss(model, loss)
        if batch_size is not None:
            batch_size = check_positive_int("batch_size", batch_size)
        if steps is not None:
            steps = check_positive_int("steps", steps)
        self.model = model
        self.training = bool(training)
        self.batches = as_batches(data, batch_size=batch_size, steps=steps)
        check_data(model, self.batches, loss_fn)
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
        self._functions = compiled_functions(model, loss_fn, self.training)

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
        step = compiled_step(step)
        return lambda flat, *extra: step(matvec(flat), flat, *extra)

    def _rademacher_vector(self, rng):
        """A probe of +-1 from numpy's `rng` (the same on every backend)."""
        sample = rng.integers(0, 2, size=self.size) * 2 - 1
        return ops.convert_to_tensor(sample.astype("float32"))

    def _start_vector(self, seed):
        """A seeded standard normal vector, drawn on the device."""
        return keras.random.normal((self.size,), dtype="float32", seed=seed)
