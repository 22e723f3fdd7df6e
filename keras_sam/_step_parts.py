"""Small pieces of the sharpness-aware step, written in `keras.ops`.

m-sharpness splits a batch into sub-batches of sizes `n_j`; each sub-batch
is perturbed with its own gradient and the adversarial gradients are
combined with weights `n_j / n`:

```
g_adv = sum_j (n_j / n) * grad L_{B_j}(w + eps_j),   eps_j from grad L_{B_j}(w)
```

With the mean loss of Keras (`"sum_over_batch_size"`) and `rho = 0` this is
exactly the gradient of the whole batch.
"""

import keras
from keras import ops


def batch_size(x):
    """Leading dimension of the first input: an int, or a scalar tensor
    when the traced shape is unknown (TensorFlow's relaxed signatures)."""
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    return ops.shape(first)[0]


def split_sizes(size, num_splits):
    """Sizes of `num_splits` contiguous sub-batches, as even as possible.

    The first `size % num_splits` sub-batches get one sample more.
    """
    base, extra = divmod(int(size), int(num_splits))
    return [base + (1 if j < extra else 0) for j in range(num_splits)]


def _slice(structure, start, stop):
    return keras.tree.map_structure(
        lambda t: None if t is None else t[start:stop], structure
    )


def split_batch(batch, num_splits):
    """Contiguous sub-batches `[(batch_j, n_j / n)]` of `(x, y, sw)`.

    One split gives the batch itself with fraction `None`. With a static
    batch size, empty sub-batches are dropped; with a dynamic one (a traced
    unknown shape), a sub-batch past the end is empty with fraction 0.
    """
    if num_splits == 1:
        return [(batch, None)]
    n = batch_size(batch[0])
    parts = []
    if isinstance(n, int):
        start = 0
        for size in split_sizes(n, num_splits):
            if size:
                parts.append((_slice(batch, start, start + size), size / n))
            start += size
        return parts
    size = (n + num_splits - 1) // num_splits
    for j in range(num_splits):
        start = ops.minimum(j * size, n)
        stop = ops.minimum(start + size, n)
        fraction = ops.divide(
            ops.cast(stop - start, "float32"), ops.cast(n, "float32")
        )
        parts.append((_slice(batch, start, stop), fraction))
    return parts


def combine(parts, fractions):
    """`sum_j fractions[j] * parts[j]` per entry; `None` stays `None`.

    `parts` is a list (one entry per sub-batch) of lists of tensors. A
    sub-batch with fraction 0 (an empty one) contributes zero even when its
    values are not finite.
    """
    if len(parts) == 1 and fractions[0] is None:
        return list(parts[0])
    combined = []
    for values in zip(*parts):
        if values[0] is None:
            combined.append(None)
            continue
        total = None
        for value, fraction in zip(values, fractions):
            fraction = ops.cast(fraction, value.dtype)
            term = ops.where(
                ops.greater(fraction, 0),
                ops.multiply(fraction, value),
                ops.zeros_like(value),
            )
            total = term if total is None else ops.add(total, term)
        combined.append(total)
    return combined


def concat(structures):
    """Concatenates the sub-batches' predictions along the batch axis."""
    if len(structures) == 1:
        return structures[0]
    return keras.tree.map_structure(
        lambda *t: ops.concatenate(t, axis=0), *structures
    )


def all_finite(tensors):
    """Boolean scalar: every present tensor is finite."""
    checks = [ops.all(ops.isfinite(t)) for t in tensors if t is not None]
    if not checks:
        return ops.convert_to_tensor(True)
    return ops.all(ops.stack(checks))


def squared_norm(tensors):
    """`sum ||t||^2` over the present tensors, as a float32 scalar."""
    squares = [
        ops.sum(ops.square(ops.cast(t, "float32")))
        for t in tensors
        if t is not None
    ]
    if not squares:
        return ops.zeros((), "float32")
    return ops.sum(ops.stack(squares))


def dot(a, b):
    """`sum <a_i, b_i>` over the entries present in both, float32."""
    products = [
        ops.sum(ops.multiply(ops.cast(x, "float32"), ops.cast(y, "float32")))
        for x, y in zip(a, b)
        if x is not None and y is not None
    ]
    if not products:
        return ops.zeros((), "float32")
    return ops.sum(ops.stack(products))


def select(condition, if_true, if_false):
    """Per entry `where(condition, if_true, if_false)`; keeps `None`, and
    skips the work where both sides are the same tensor."""
    return [
        a if a is None or a is b else ops.where(condition, a, b)
        for a, b in zip(if_true, if_false)
    ]


def zeros_for_none(tensors, like):
    return [
        ops.zeros_like(w) if t is None else t for t, w in zip(tensors, like)
    ]


def present(values):
    """Indices of the entries that are not `None`."""
    return [i for i, v in enumerate(values) if v is not None]


def fill(indices, values, size):
    """A list of `size` entries, `values` at `indices`, `None` elsewhere."""
    out = [None] * size
    for i, v in zip(indices, values):
        out[i] = v
    return out


def changed(new, old):
    """`new` with `None` where a value is still the `old` object."""
    return [None if n is o else n for n, o in zip(new, old)]


def unchanged_from(values, old):
    """The inverse of `changed`: `old` where `values` holds `None`."""
    return [o if v is None else v for v, o in zip(values, old)]


def data_parallel_replicas():
    """Replicas along the batch axis of the `keras.distribution` in use
    (the global batch is one program's input there); 1 without one."""
    distribution = keras.distribution.distribution()
    batch_axis = getattr(distribution, "batch_dim_name", None)
    if batch_axis is None:
        return 1
    mesh = distribution.device_mesh
    return int(mesh.shape[list(mesh.axis_names).index(batch_axis)])


class Stateless:
    """Runs code with variables read from (and assigned into) values.

    `run(fn)` calls `fn()` inside a `keras.StatelessScope` over
    `variables -> values` and returns `(fn(), new_values)`; a variable that
    was not assigned keeps its value object, so callers can tell which
    changed with `is`.
    """

    def __init__(self, variables, collect_losses=False):
        self.variables = list(variables)
        self.collect_losses = collect_losses

    def run(self, values, fn):
        mapping = list(zip(self.variables, values))
        with keras.StatelessScope(
            state_mapping=mapping, collect_losses=self.collect_losses
        ) as scope:
            initial = [scope.get_current_value(v) for v in self.variables]
            result = fn()
        new_values = []
        for v, value, first in zip(self.variables, values, initial):
            current = scope.get_current_value(v)
            new_values.append(value if current is first else current)
        return result, new_values
