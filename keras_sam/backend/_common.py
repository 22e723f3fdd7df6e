"""Pieces of the train step shared by the backends, written in `keras.ops`.

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

from keras_sam import optimizers as sam_optimizers


def split_sizes(batch_size, num_splits):
    """Sizes of `num_splits` contiguous sub-batches, as even as possible.

    The first `batch_size % num_splits` sub-batches get one sample more.
    Works on Python integers only (static shapes).
    """
    base, extra = divmod(int(batch_size), int(num_splits))
    return [base + (1 if j < extra else 0) for j in range(num_splits)]


def split_batch(x, y, sample_weight, num_splits, batch_size):
    """Contiguous sub-batches `[((x, y, sw), n_j / n)]`, empty ones dropped.

    `batch_size` must be a Python integer (a static shape); one split gives
    the batch itself with fraction `None`.
    """
    if num_splits == 1:
        return [((x, y, sample_weight), None)]
    parts, start = [], 0
    for size in split_sizes(batch_size, num_splits):
        if size:
            part = keras.tree.map_structure(
                lambda t: None if t is None else t[start : start + size],
                (x, y, sample_weight),
            )
            parts.append((part, size / batch_size))
        start += size
    return parts


def combine(parts, fractions):
    """`sum_j fractions[j] * parts[j]` per variable; `None` stays `None`.

    `parts` is a list (one entry per sub-batch) of lists of gradients (or of
    scalars). A sub-batch with fraction 0 (an empty one) contributes zero
    even when its gradient is not finite.
    """
    if len(parts) == 1 and fractions[0] is None:
        return parts[0]
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


def all_finite(grads):
    """Boolean scalar: every present gradient is finite."""
    checks = [ops.all(ops.isfinite(g)) for g in grads if g is not None]
    if not checks:
        return ops.convert_to_tensor(True)
    return ops.all(ops.stack(checks))


def select(condition, if_true, if_false):
    """Per variable `where(condition, if_true, if_false)`; keeps `None`."""
    return [
        a if a is None else ops.where(condition, a, b)
        for a, b in zip(if_true, if_false)
    ]


def has_loss_scaling(optimizer):
    """True when a `LossScaleOptimizer` wraps (or is) the SAM optimizer.

    It then checks the gradients itself: it skips a non-finite step and
    lowers its scale.
    """
    loss_scale = keras.optimizers.LossScaleOptimizer
    return sam_optimizers.find_optimizer(optimizer, loss_scale) is not None
