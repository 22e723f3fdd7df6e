"""User data -> batches: the one place that reads what users pass as data.

Three readers, one per kind of use:

- `as_batches`: read once into a list of `(n, x, y, sample_weight)` batches
  of tensors (the sharpness estimators keep a fixed probe set).
- `Batches`: re-iterable batches of numpy arrays, streamed on every pass
  (optimum shifting makes one pass per layer).
- `validation_arrays`: one `(x, y, sample_weight)` of numpy arrays in
  `floatx` (the held-out data of `keras_sam.LearnedRadius`).

The helpers below them (`unpack`, `num_samples`, `slice_samples`,
`take_samples`, `to_numpy`, `to_tensor`) are shared by all three.
"""

import keras
import numpy as np
from keras import ops

# ---------------------------------------------------------------------------
# Leaves and structures.


def to_numpy(value):
    """A numpy array from a tensor or array-like; `None` stays `None`."""
    if value is None:
        return None
    if ops.is_tensor(value):
        return ops.convert_to_numpy(value)
    try:
        return np.asarray(value)
    except (TypeError, ValueError, RuntimeError):
        return ops.convert_to_numpy(value)


def to_tensor(value):
    """A backend tensor from an array-like; tensors and `None` as they are."""
    if value is None or ops.is_tensor(value):
        return value
    return ops.convert_to_tensor(np.asarray(value))


def unpack(batch):
    """`(x, y, sample_weight)` from `x`, `(x,)`, `(x, y)` or `(x, y, sw)`.

    A list is read as a tuple; missing parts are `None`. Nothing is
    converted.
    """
    if isinstance(batch, list):
        batch = tuple(batch)
    if not isinstance(batch, tuple):
        batch = (batch,)
    if not 1 <= len(batch) <= 3:
        raise ValueError(
            "A batch of `data` must be `x`, `(x, y)` or "
            f"`(x, y, sample_weight)`. Received a tuple of {len(batch)} "
            "elements"
        )
    return batch + (None,) * (3 - len(batch))


def num_samples(x):
    """The leading dimension of the first array of `x` (0 if it has none)."""
    leaves = [t for t in keras.tree.flatten(x) if t is not None]
    if not leaves:
        return 0
    shape = leaves[0].shape
    return int(shape[0]) if len(shape) else 1


def slice_samples(structure, start, stop):
    """Samples `start:stop` of every array of `structure` (`None` kept)."""
    if structure is None:
        return None
    return keras.tree.map_structure(
        lambda a: None if a is None else a[start:stop], structure
    )


def take_samples(structure, indices):
    """Samples `indices` of every array of `structure` (`None` kept)."""
    if structure is None:
        return None
    return keras.tree.map_structure(
        lambda a: None if a is None else a[indices], structure
    )


def _is_array(value):
    return isinstance(value, (np.ndarray, dict)) or ops.is_tensor(value)


# ---------------------------------------------------------------------------
# Read once: a fixed list of batches of tensors.


def as_batches(data, batch_size=None, steps=None):
    """`[(n_b, x, y, sample_weight), ...]` from arrays, a dataset or batches.

    Arrays (a tuple `(x, y)` or `(x, y, sample_weight)`, or `x` alone) are
    cut into batches of `batch_size` (all samples in one batch when `None`);
    anything else is iterated as batches (a `tf.data.Dataset`, a
    `keras.utils.PyDataset`, a list or generator of tuples), at most `steps`
    of them. Empty batches are dropped; every array becomes a tensor.

    Args:
        data: The user's data.
        batch_size: Batch size used to cut arrays. Defaults to `None`.
        steps: At most this many batches are read from an iterable.
            Defaults to `None`, all.

    Returns:
        A non-empty list of `(num_samples, x, y, sample_weight)`.
    """
    if data is None:
        raise ValueError(
            "`data` must be arrays `(x, y)`, a dataset or an iterable of "
            "batches. Received: data=None"
        )
    if hasattr(data, "shape") or isinstance(data, dict):
        data = (data,)
    if isinstance(data, tuple):
        x, y, sample_weight = unpack(data)
        n = num_samples(x)
        size = n if batch_size is None else batch_size
        batches = [
            (
                slice_samples(x, start, start + size),
                slice_samples(y, start, start + size),
                slice_samples(sample_weight, start, start + size),
            )
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
        x, y, sample_weight = unpack(batch)
        n = num_samples(x)
        if n == 0:
            continue
        convert = lambda s: keras.tree.map_structure(to_tensor, s)  # noqa
        result.append((n, convert(x), convert(y), convert(sample_weight)))
    if not result:
        raise ValueError(
            "`data` is empty: it yielded no samples, so there is no loss to "
            "differentiate. Pass at least one batch. Received: "
            f"data of type {type(data).__name__} with 0 samples"
        )
    return result


# ---------------------------------------------------------------------------
# Streamed: re-iterable batches of numpy arrays.


def _numpy_batch(batch):
    return tuple(
        keras.tree.map_structure(to_numpy, part) for part in unpack(batch)
    )


class Batches:
    """Re-iterable batches `(x, y, sample_weight)` of numpy arrays.

    Arrays (`x`, a dict of arrays, or a tuple `(x, y[, sample_weight])`
    whose first entry is an array) are held once and cut into batches of
    `batch_size` on every pass; a `keras.utils.PyDataset` or a re-iterable
    of batches (a list, a `tf.data.Dataset`) is iterated again on every
    pass. A generator or iterator is refused: it can be read only once.

    Args:
        data: The user's data.
        batch_size: Batch size used to cut arrays.

    Attributes:
        kind: `"arrays"`, `"pydataset"` or `"iterable"`.
        arrays: With `kind="arrays"`, the numpy `(x, y, sample_weight)`.
        size: With `kind="arrays"`, the number of samples.
    """

    def __init__(self, data, batch_size):
        self.data = data
        self.batch_size = batch_size
        if _is_array(data) or (
            isinstance(data, tuple) and data and _is_array(data[0])
        ):
            self.kind = "arrays"
            self.arrays = _numpy_batch(data)
            sizes = {
                len(leaf)
                for part in self.arrays
                if part is not None
                for leaf in keras.tree.flatten(part)
            }
            if len(sizes) != 1:
                raise ValueError(
                    "The arrays in `data` must have the same number of "
                    f"samples. Received sizes: {sorted(sizes)}"
                )
            self.size = sizes.pop()
            if self.size == 0:
                raise ValueError("`data` is empty. Received 0 samples")
        elif isinstance(data, keras.utils.PyDataset):
            self.kind = "pydataset"
        elif hasattr(data, "__iter__") and not isinstance(data, (str, bytes)):
            if iter(data) is data:
                raise TypeError(
                    "`data` must be re-iterable: optimum shifting makes "
                    "several passes. Pass arrays, a list of batches, a "
                    "`tf.data.Dataset` or a `keras.utils.PyDataset`, not a "
                    f"generator or iterator. Received: data={data!r}"
                )
            self.kind = "iterable"
        else:
            raise TypeError(
                "`data` must be an array, a dict of arrays, a tuple "
                "`(x, y[, sample_weight])`, a list of batches, a "
                "`tf.data.Dataset` or a `keras.utils.PyDataset`. Received: "
                f"data={data!r} of type {type(data).__name__}"
            )

    def __iter__(self):
        if self.kind == "arrays":
            for start in range(0, self.size, self.batch_size):
                stop = start + self.batch_size
                yield tuple(
                    slice_samples(part, start, stop) for part in self.arrays
                )
        elif self.kind == "pydataset":
            for i in range(self.data.num_batches):
                yield _numpy_batch(self.data[i])
        else:
            for batch in self.data:
                yield _numpy_batch(batch)


# ---------------------------------------------------------------------------
# Held-out data as one set of arrays.


def _validation_batch(batch, where):
    """`(x, y)` or `(x, y, sample_weight)` -> `(x, y, sample_weight)`."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError(
            "`validation_data` must be `(x, y)` or `(x, y, sample_weight)`, "
            "or a dataset of such batches. Received: "
            f"{where}={type(batch).__name__}"
            + (
                f" of length {len(batch)}"
                if isinstance(batch, (tuple, list))
                else ""
            )
        )
    x, y = batch[0], batch[1]
    sample_weight = batch[2] if len(batch) == 3 else None
    if x is None or y is None:
        raise ValueError(
            "`validation_data` needs both inputs and targets. Received: "
            f"x={'None' if x is None else 'given'}, "
            f"y={'None' if y is None else 'given'}"
        )
    return x, y, sample_weight


def _concatenate(batches):
    """Concatenates a list of `(x, y, sample_weight)` batches along axis 0."""

    def join(*parts):
        if parts[0] is None:
            return None
        return np.concatenate(parts, axis=0)

    try:
        return keras.tree.map_structure(join, *batches)
    except (ValueError, TypeError) as e:
        shapes = [
            keras.tree.map_structure(
                lambda a: None if a is None else a.shape, b
            )
            for b in batches[:3]
        ]
        raise ValueError(
            "The batches of `validation_data` have mismatched structures or "
            "shapes and cannot be joined. Received (first batches): "
            f"{shapes}"
        ) from e


_UNBATCHED = (
    " in a batch. Is the dataset unbatched (elements without a leading "
    "batch axis)? Batch it first, e.g. `dataset.batch(32)`"
)


def _check_sample_counts(batch, hint=""):
    """The common number of samples of `x`, `y` and `sample_weight`;
    `hint` ends the error messages."""
    sizes = {}
    for name, part in zip(("x", "y", "sample_weight"), batch):
        for leaf in keras.tree.flatten(part):
            if leaf is None:
                continue
            if leaf.ndim == 0:
                raise ValueError(
                    f"Every array of `validation_data` needs a leading "
                    f"sample axis. Received: {name} of shape {leaf.shape}"
                    + hint
                )
            sizes.setdefault(name, leaf.shape[0])
            if leaf.shape[0] != sizes[name]:
                raise ValueError(
                    f"The arrays of `validation_data` {name} have different "
                    f"numbers of samples. Received: {name} shapes "
                    f"{[a.shape for a in keras.tree.flatten(part)]}"
                )
    if len(set(sizes.values())) > 1:
        raise ValueError(
            "`validation_data` x, y (and sample_weight) must have the same "
            "number of samples. Received: "
            + ", ".join(f"{k} with {v} samples" for k, v in sizes.items())
            + hint
        )
    if sizes["x"] == 0:
        raise ValueError(
            "`validation_data` is empty. Received: x with 0 samples"
        )
    return sizes["x"]


def validation_arrays(validation_data):
    """Held-out data as numpy `(x, y, sample_weight)` and its sample count.

    Accepts `(x, y)`, `(x, y, sample_weight)` (tuple or list) or an iterable
    of such batches (a batched `tf.data.Dataset`, a list, a generator),
    whose batches are joined along the sample axis. Floating arrays are
    cast to `keras.config.floatx()`.

    Args:
        validation_data: The user's held-out data.

    Returns:
        `((x, y, sample_weight), num_samples)`.
    """
    if validation_data is None:
        raise ValueError(
            "`validation_data` is required: LearnedRadius learns rho from "
            "the gap between validation and training loss. Pass "
            "`validation_data=(x_val, y_val)` or a batched `tf.data.Dataset`."
            " Received: validation_data=None"
        )
    if isinstance(validation_data, (tuple, list)):
        batch = _validation_batch(validation_data, "validation_data")
        batch = keras.tree.map_structure(to_numpy, batch)
    elif isinstance(validation_data, (dict, np.ndarray)) or not hasattr(
        validation_data, "__iter__"
    ):
        raise TypeError(
            "`validation_data` must be `(x, y)`, `(x, y, sample_weight)` or "
            "an iterable of such batches (e.g. a batched `tf.data.Dataset`)."
            f" Received: validation_data of type "
            f"{type(validation_data).__name__}"
        )
    else:
        if hasattr(validation_data, "as_numpy_iterator"):
            iterator = validation_data.as_numpy_iterator()
        else:
            iterator = iter(validation_data)
        batches = [
            keras.tree.map_structure(
                to_numpy, _validation_batch(b, "validation_data batch")
            )
            for b in iterator
        ]
        if not batches:
            raise ValueError(
                "`validation_data` is empty: the dataset yielded no batches. "
                "Received: validation_data with 0 batches"
            )
        # The first element must be a batch, not one sample (unbatched).
        _check_sample_counts(batches[0], _UNBATCHED)
        batch = _concatenate(batches)
    n = _check_sample_counts(batch)

    def to_floatx(a):
        if a is not None and np.issubdtype(a.dtype, np.floating):
            return a.astype(keras.config.floatx())
        return a

    return keras.tree.map_structure(to_floatx, batch), n
