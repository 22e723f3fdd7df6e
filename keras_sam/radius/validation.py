"""The held-out data of a `LearnedRadius`: read once, windows per update.

`ValidationSet` holds `(x, y, sample_weight)` as tensors, shuffled once, and
gives the step the window of `batch_size` samples of update `k` (consecutive
windows of the shuffled data, chosen from the step counter inside the
compiled step, so no host callback is needed).
"""

import keras
import numpy as np
from keras import ops

from keras_sam._data import validation_arrays
from keras_sam._shapes import check_fits
from keras_sam._shapes import trailing
from keras_sam.radius.hypergradient import check_finite


class ValidationSet:
    """`validation_data` in memory, shuffled once with `seed`.

    Raises a `ValueError` for non-finite floating values (the validation
    loss would be NaN and rho would silently stop moving).
    """

    def __init__(self, validation_data, seed=None):
        arrays, n = validation_arrays(validation_data)
        check_finite(arrays)
        if seed is None:
            order = np.random.permutation(n)
        else:
            order = np.random.default_rng(seed).permutation(n)
        self.arrays = keras.tree.map_structure(
            lambda a: None if a is None else ops.convert_to_tensor(a[order]),
            arrays,
        )
        self.num_samples = n
        self._checked = set()

    def check_model(self, model, y=None):
        """Checks the data against `model` (and the training targets `y`)
        once per model and target shape (`keras_sam._shapes.check_fits`)."""
        key = (id(model), None if y is None else trailing(y))
        if key not in self._checked:
            x_val, y_val, _ = self.arrays
            check_fits("LearnedRadius", x_val, y_val, model, y)
            self._checked.add(key)

    def window(self, update, batch_size):
        """The `batch_size` samples of update number `update` (a tensor)."""
        n = self.num_samples
        if batch_size >= n:
            return self.arrays
        start = ops.mod(ops.multiply(ops.mod(update, n), batch_size % n), n)
        index = ops.mod(ops.add(start, ops.arange(batch_size)), n)
        return keras.tree.map_structure(
            lambda a: None if a is None else ops.take(a, index, axis=0),
            self.arrays,
        )
