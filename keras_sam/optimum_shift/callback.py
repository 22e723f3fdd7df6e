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
    """Applies optimum shifting on one batch every k epochs or k steps.

    The stochastic version of `keras_sam.optimum_shift` (stochastic optimum
    shifting): at the end of every `every_n_epochs`-th epoch, or of every
    `every_n_steps`-th training step when that is given instead, one batch
    `B` is drawn and the last linear layer (`layers="last"`, the paper's
    choice; `"all"` for every Dense/Conv layer) is moved to the
    minimum-norm weights with the same outputs on it,

    ```
    W' = U U^T W,   U spans the rows of A_B - 1 mean(A_B)
    b' = b + mean(A_B) (W - W')
    ```

    so the training loss on `B` is unchanged while the kernel norm drops.
    Use batches with at least as many samples as classes (and ideally fewer
    than the layer widths, where the freedom is). If a shift exceeds
    `tolerance` it is rolled back and a warning is issued; training goes on.
    Writes `shift_kernel_norm_before` and `shift_kernel_norm_after` (global
    Frobenius norm over the shifted kernels) into `logs` at the end of an
    epoch in which a shift was made (the last one).

    Measured on digits (small MLP, SGD, every layer shifted each epoch):
    -0.3 to -0.4 points of test accuracy on clean labels, +0.8 to +1.1
    with 20% label noise; the last-layer default is not measured yet.

    Args:
        data_or_batches: arrays `x` or `(x, y)` (a random batch of
            `batch_size` samples is drawn each time), or a re-iterable of
            batches (list, `tf.data.Dataset`, `keras.utils.PyDataset`), used
            one batch per application, in turn.
        every_n_epochs: apply after every this many epochs. Defaults to `1`.
        every_n_steps: apply after every this many training steps instead
            (then `every_n_epochs` must be left at `1`). Defaults to `None`.
        batch_size: samples per draw when arrays are given. Defaults to
            `256`.
        layers: as in `optimum_shift`: `"last"`, `"all"` or names.
            Defaults to `"last"`.
        tolerance: as in `optimum_shift`. Defaults to `1e-4`.
        rtol: as in `optimum_shift`. Defaults to `1e-10`.
        minimize: as in `optimum_shift`. Defaults to `"kernel"`.
        seed: seed of the batch draws. Defaults to `None`.

    `get_config` leaves out the data; pass it again to `from_config`.

    Example:

    >>> model.fit(x, y, epochs=10, callbacks=[
    ...     keras_sam.callbacks.OptimumShifting(x, every_n_epochs=2)])
    >>> model.fit(x, y, epochs=10, callbacks=[
    ...     keras_sam.callbacks.OptimumShifting(
    ...         (x, y), every_n_steps=50, batch_size=64)])

    References:
        - Zhou, Li, Feng, Huang, Improving Generalization of Deep Neural
          Networks by Optimum Shifting, AAAI 2025.
    """

    def __init__(
        self,
        data_or_batches,
        every_n_epochs=1,
        batch_size=256,
        layers="last",
        tolerance=1e-4,
        rtol=1e-10,
        minimize="kernel",
        seed=None,
        every_n_steps=None,
    ):
        super().__init__()
        every_n_epochs = check_positive_int("every_n_epochs", every_n_epochs)
        if every_n_steps is not None:
            every_n_steps = check_positive_int("every_n_steps", every_n_steps)
            if every_n_epochs != 1:
                raise ValueError(
                    "Give `every_n_epochs` or `every_n_steps`, not both. "
                    f"Received: every_n_epochs={every_n_epochs}, "
                    f"every_n_steps={every_n_steps}"
                )
        batch_size = check_positive_int("batch_size", batch_size)
        check_choice("minimize", minimize, MINIMIZE)
        self.data_or_batches = data_or_batches
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.batch_size = batch_size
        self.layers = (
            layers
            if isinstance(layers, str) or layers is None
            else list(layers)
        )
        self.tolerance = tolerance
        self.rtol = rtol
        self.minimize = minimize
        self.seed = seed
        self._batches = Batches(data_or_batches, batch_size)
        self._rng = np.random.default_rng(seed)
        self._iterator = None
        self._steps = 0
        self._shifted_this_epoch = False
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

    def _shift(self, when):
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
            warnings.warn(f"OptimumShifting skipped at {when}: {e}")
            return
        self.last_report = report
        self._shifted_this_epoch = True

    def on_epoch_begin(self, epoch, logs=None):
        self._shifted_this_epoch = False

    def on_train_batch_end(self, batch, logs=None):
        if self.every_n_steps is None:
            return
        self._steps += 1
        if self._steps % self.every_n_steps == 0:
            self._shift(f"step {self._steps}")

    def on_epoch_end(self, epoch, logs=None):
        if (
            self.every_n_steps is None
            and (epoch + 1) % self.every_n_epochs == 0
        ):
            self._shift(f"epoch {epoch}")
        if self._shifted_this_epoch and logs is not None:
            logs["shift_kernel_norm_before"] = (
                self.last_report.kernel_norm_before
            )
            logs["shift_kernel_norm_after"] = self.last_report.kernel_norm_after

    def get_config(self):
        return {
            "every_n_epochs": self.every_n_epochs,
            "every_n_steps": self.every_n_steps,
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
