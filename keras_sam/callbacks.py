"""Keras callbacks of keras_sam; they report through `logs`."""

import math
import warnings

import keras
import numpy as np
from keras import ops

from keras_sam import sharpness
from keras_sam._data import as_batches
from keras_sam._validation import check_choice
from keras_sam._validation import check_float
from keras_sam._validation import check_int
from keras_sam._validation import check_positive_int
from keras_sam._validation import check_rho
from keras_sam.optimizers import chain
from keras_sam.optimum_shift import OptimumShifting  # noqa: F401
from keras_sam.sharpness.hessian import METHODS
from keras_sam.sharpness.krylov import WHICH
from keras_sam.sharpness.probe import check_finite


def _nan_on_failure(estimator, **kwargs):
    """`estimator(**kwargs)`, or NaN with a warning if it fails numerically:
    a diverged run is for `TerminateOnNaN` to stop, not for a monitor."""
    try:
        return estimator(**kwargs)
    except (np.linalg.LinAlgError, ArithmeticError) as e:
        warnings.warn(
            f"SharpnessMonitor: {estimator.__name__} failed numerically "
            f"({type(e).__name__}: {e}); logging NaN.",
            RuntimeWarning,
            stacklevel=2,
        )
        return math.nan


@keras.saving.register_keras_serializable(package="keras_sam")
class SharpnessMonitor(keras.callbacks.Callback):
    """Writes sharpness, Hessian trace and weight norms into `logs`.

    At the end of the first epoch and of every `every_n_epochs`-th epoch it
    measures on the fixed probe `data` (the full-data loss, in inference mode
    unless `training=True`) and adds to `logs`:

    ```
    sharpness     = lambda_max(H)                    # Lanczos; or max |lambda|
    hessian_trace = (1/m) sum_i z_i^T H z_i          # Hutchinson, m probes
    param_l1      = sum |w|,   param_l2 = sqrt(sum w^2)
    eos_ratio     = sharpness / (2 (1 + beta) / lr)  # >= 1: edge of stability
    sam_sharpness = L(w + eps) - L(w)                # only when rho is given
    ```

    `2 (1 + beta) / lr` is the largest curvature that (full-batch) SGD with
    heavy-ball momentum `beta` can descend stably; with Nesterov momentum it
    is `2 (1 + beta) / ((1 + 2 beta) lr)`, and `beta = 0` gives `2 / lr`.
    `eos_ratio` is written for SGD (found inside SAM or loss-scale wrappers)
    or when `momentum` is given; adaptive optimizers have a preconditioned
    threshold, so it is left out for them.

    The probe data is checked when the callback is made (a `ValueError` if
    it has NaN or inf). A numerical failure during `fit` never raises: when
    training diverges, the scalars are logged as NaN (with a warning) and
    `keras.callbacks.TerminateOnNaN`, if used, decides whether to stop.

    Like validation metrics with `validation_freq`, the keys appear only on
    the epochs that are measured; measuring the first epoch lets `CSVLogger`
    pick up the columns (it writes `NA` on the other epochs). Put this
    callback before `CSVLogger` or `TensorBoard` in the `callbacks` list so
    that they see the keys.

    Args:
        data: Probe data: arrays `(x, y[, sample_weight])`, a dataset or an
            iterable of batches; read once, when the callback is created.
        every_n_epochs: Integer >= 1; measure after the first and every
            n-th epoch. Defaults to `1`.
        loss: A loss overriding the model's compiled loss. Defaults to
            `None`.
        training: Evaluate the loss in training mode. Defaults to `False`.
        batch_size: Batch size used to cut arrays. Defaults to `None`, one
            batch.
        steps: Maximum number of batches read from `data`. Defaults to
            `None`, all.
        method: `"lanczos"` or `"power"`. Defaults to `"lanczos"`.
        max_iter: Maximum Hessian-vector products for the top eigenvalue.
            Defaults to `100`.
        tol: Relative tolerance of the eigenvalue. Defaults to `1e-3`.
        which: `"algebraic"` (the largest eigenvalue) or `"magnitude"`
            (the largest `|eigenvalue|`, the sharpness of Fojtik et al.).
            Defaults to `"algebraic"`.
        trace_probes: Number of Hutchinson probes; `0` skips the trace.
            Defaults to `10`.
        rho: If given, also log `sam_sharpness` with this radius.
            Defaults to `None`.
        momentum: Momentum `beta` for `eos_ratio`, overriding the SGD
            optimizer's. Defaults to `None`.
        seed: Seed of the start vector and the probes. Defaults to `0`.

    `get_config` returns every argument but `data` (arrays do not belong in
    a config); rebuild with `SharpnessMonitor(data, **config)`.

    Example:

    >>> monitor = keras_sam.callbacks.SharpnessMonitor((x_probe, y_probe))
    >>> history = model.fit(x, y, epochs=5, callbacks=[monitor])
    >>> history.history["sharpness"], history.history["eos_ratio"]

    References:
        - Cohen et al., Gradient Descent on Neural Networks Typically Occurs
          at the Edge of Stability, ICLR 2021.
        - Fojtik et al., Conflicting Biases at the Edge of Stability: Norm
          versus Sharpness Regularization, arXiv 2505.21423.
    """

    def __init__(
        self,
        data,
        every_n_epochs=1,
        loss=None,
        training=False,
        batch_size=None,
        steps=None,
        method="lanczos",
        max_iter=100,
        tol=1e-3,
        which="algebraic",
        trace_probes=10,
        rho=None,
        momentum=None,
        seed=0,
    ):
        super().__init__()
        self.every_n_epochs = check_positive_int(
            "every_n_epochs", every_n_epochs
        )
        check_choice("method", method, METHODS)
        self.max_iter = check_positive_int("max_iter", max_iter)
        self.tol = check_float("tol", tol, low=0.0, low_open=True)
        check_choice("which", which, WHICH)
        self.which = which
        self.trace_probes = check_int("trace_probes", trace_probes, minimum=0)
        if rho is not None:
            rho = check_rho(rho)
        if momentum is not None:
            momentum = check_float("momentum", momentum, low=0.0)
        if batch_size is not None:
            batch_size = check_positive_int("batch_size", batch_size)
        if steps is not None:
            steps = check_positive_int("steps", steps)
        self.loss = loss
        self.training = bool(training)
        self.batch_size = batch_size
        self.steps = steps
        self.method = method
        self.rho = rho
        self.momentum = momentum
        self.seed = seed
        # Read the probe data now, so that empty or non-finite data fails
        # here rather than at the end of the first epoch.
        batches = as_batches(data, batch_size=batch_size, steps=steps)
        check_finite(batches)
        self._batches = [(x, y, sw) for _, x, y, sw in batches]
        self._hessian = None

    def _eos_threshold(self):
        """`2 (1 + beta) / lr` (Nesterov: over `1 + 2 beta`), or `None`."""
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return None
        sgd = chain.find_optimizer(optimizer, keras.optimizers.SGD)
        beta, nesterov = self.momentum, False
        if beta is None:
            if sgd is None:
                return None
            beta, nesterov = float(sgd.momentum), bool(sgd.nesterov)
        lr = float(ops.convert_to_numpy(optimizer.learning_rate))
        if lr <= 0:
            return None
        threshold = 2.0 * (1.0 + beta) / lr
        if nesterov:
            threshold /= 1.0 + 2.0 * beta
        return threshold

    def measure(self):
        """Measures now and returns the dict of values written into `logs`."""
        if self._hessian is None or self._hessian.model is not self.model:
            self._hessian = sharpness.Hessian(
                self.model, self._batches, self.loss, self.training
            )
        hessian = self._hessian
        values = {
            "sharpness": _nan_on_failure(
                hessian.top_eigenvalue,
                method=self.method,
                max_iter=self.max_iter,
                tol=self.tol,
                seed=self.seed,
                which=self.which,
            )
        }
        if self.trace_probes:
            values["hessian_trace"] = _nan_on_failure(
                hessian.trace, num_probes=self.trace_probes, seed=self.seed
            )
        norms = sharpness.parameter_norms(self.model)
        values["param_l1"] = norms["l1"]
        values["param_l2"] = norms["l2"]
        threshold = self._eos_threshold()
        if threshold is not None:
            values["eos_ratio"] = values["sharpness"] / threshold
        if self.rho is not None:
            values["sam_sharpness"] = _nan_on_failure(
                hessian.sam_sharpness, rho=self.rho
            )
        return values

    def on_epoch_end(self, epoch, logs=None):
        if epoch > 0 and (epoch + 1) % self.every_n_epochs:
            return
        if logs is not None:
            logs.update(self.measure())

    def get_config(self):
        return {
            "every_n_epochs": self.every_n_epochs,
            "loss": keras.saving.serialize_keras_object(self.loss),
            "training": self.training,
            "batch_size": self.batch_size,
            "steps": self.steps,
            "method": self.method,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "which": self.which,
            "trace_probes": self.trace_probes,
            "rho": self.rho,
            "momentum": self.momentum,
            "seed": self.seed,
        }
