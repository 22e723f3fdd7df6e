"""`OptimumShifting`: the stochastic version, during training."""

import warnings

import keras
import numpy as np

from keras_sam._data import Batches
from keras_sam._data import take_samples
from keras_sam._validation import check_choice
from keras_sam._validation import check_positive_int
from keras_sam.optimum_shift.report import ShiftToleranceError
from keras_sam.optimum_shift.transform import MINIMIZE
from keras_sam.optimum_shift.transform import optimum_shift


@keras.saving.register_keras_serializable(package="keras_sam")
class OptimumShifting(keras.callbacks.Callback):
    """Applies optimum shifting on one batch every `every_n_epochs` epochs.

    The stochastic version of `keras_sam.optimum_shift`: at the end of every
    `every_n_epochs`-th epoch one batch `B` is drawn and each Dense/Conv
    layer is moved to the minimum-norm weights with the same outputs on it,

    ```
    W' = U U^T W,   U spans the rows of A_B - 1 mean(A_B)
    b' = b + mean(A_B) (W - W')
    ```

    so the training loss on `B` is unchanged while the kernel norm drops.
    Use batches with at least as many samples as classes (and ideally fewer
    than the layer widths, where the freedom is). If a shift exceeds
    `tolerance` it is rolled back and a warning is issued; training goes on.
    Writes `shift_kernel_norm_before` and `shift_kernel_norm_after` (global
    Frobenius norm over the shifted kernels) into `logs`.

    Args:
        data_or_batches: arrays `x` or `(x, y)` (a random batch of
            `batch_size` samples is drawn each time), or a re-iterable of
            batches (list, `tf.data.Dataset`, `keras.utils.PyDataset`), used
            one batch per application, in turn.
        every_n_epochs: apply after every this many epochs. Defaults to `1`.
        batch_size: samples per draw when arrays are given. Defaults to
            `256`.
        layers: names of the layers to shift. Defaults to `None` (all).
        tolerance: as in `optimum_shift`. Defaults to `1e-4`.
        rtol: as in `optimum_shift`. Defaults to `1e-10`.
        minimize: as in `optimum_shift`. Defaults to `"kernel"`.
        seed: seed of the batch draws. Defaults to `None`.

    `get_config` leaves out the data; pass it again to `from_config`.

    Example:

    >>> model.fit(x, y, epochs=10, callbacks=[
    ...     keras_sam.callbacks.OptimumShifting(x, every_n_epochs=2)])

    References:
        - Zhou, Li, Feng, Huang, Improving Generalization of Deep Neural
          Networks by Optimum Shifting, AAAI 2025.
    """

    def __init__(
        self,
        data_or_batches,
        every_n_epochs=1,
        batch_size=256,
        layers=None,
        tolerance=1e-4,
        rtol=1e-10,
        minimize="kernel",
        seed=None,
    ):
        super().__init__()
        every_n_epochs = check_positive_int("every_n_epochs", every_n_epochs)
        batch_size = check_positive_int("batch_size", batch_size)
        check_choice("minimize", minimize, MINIMIZE)
        self.data_or_batches = data_or_batches
        self.every_n_epochs = every_n_epochs
        self.batch_size = batch_size
        self.layers = None if layers is None else list(layers)
        self.tolerance = tolerance
        self.rtol = rtol
        self.minimize = minimize
        self.seed = seed
        self._batches = Batches(data_or_batches, batch_size)
        self._rng = np.random.default_rng(seed)
        self._iterator = None
        self.last_report = None

    def _next_batch(self):
        source = self._batches
        if source.kind == "arrays":
            take = min(self.batch_size, source.size)
            idx = np.sort(self._rng.choice(source.size, take, replace=False))
            return tuple(take_samples(part, idx) for part in source.arrays)
        if self._iterator is None:
            self._iterator = iter(source)
        try:
            return next(self._iterator)
        except StopIteration:
            self._iterator = iter(source)
            return next(self._iterator)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        batch = self._next_batch()
        try:
            report = optimum_shift(
                self.model,
                [batch],
                layers=self.layers,
                tolerance=self.tolerance,
                rtol=self.rtol,
                minimize=self.minimize,
            )
        except ShiftToleranceError as e:
            warnings.warn(f"OptimumShifting skipped at epoch {epoch}: {e}")
            return
        self.last_report = report
        if logs is not None:
            logs["shift_kernel_norm_before"] = report.kernel_norm_before
            logs["shift_kernel_norm_after"] = report.kernel_norm_after

    def get_config(self):
        return {
            "every_n_epochs": self.every_n_epochs,
            "batch_size": self.batch_size,
            "layers": self.layers,
            "tolerance": self.tolerance,
            "rtol": self.rtol,
            "minimize": self.minimize,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if "data_or_batches" not in config:
            raise ValueError(
                "`OptimumShifting.from_config` needs the data, which the "
                "config does not store: add it as "
                "config['data_or_batches']. Received keys: "
                f"{sorted(config)}"
            )
        return cls(**config)
