"""`ASAM`: SAM with a perturbation scaled by the size of each weight."""

import keras
from keras import ops

from keras_sam._validation import check_float
from keras_sam.optimizers.sam import SAM
from keras_sam.optimizers.sam import is_weight_like


@keras.saving.register_keras_serializable(package="keras_sam")
class ASAM(SAM):
    """Adaptive SAM: a perturbation scaled by the size of each weight.

    The neighbourhood is measured relative to the weights, so it is invariant
    to rescaling a layer whose scale does not change the function:

    ```
    T     = |w| + eta   (kernels, embeddings, BN gamma);  1  (bias, beta)
    eps   = rho * T^2 g / (||T g|| + 1e-12)
    g_adv = grad L(w + eps)
    w     = inner_optimizer.update(w, g_adv)
    ```

    Args:
        optimizer: The inner optimizer: a `keras.optimizers.Optimizer`
            instance or a name/config accepted by `keras.optimizers.get`.
            Defaults to `"sgd"`.
        rho: Float >= 0, the radius of the adaptive neighbourhood; typical
            values are 0.5 to 2. Defaults to `0.5`.
        eta: Float > 0, keeps the scale of zero weights positive.
            Defaults to `0.01`.
        sam_every: Integer >= 1. Run the two-pass step on every
            `sam_every`-th step and a plain step otherwise. Defaults to `1`.
        sync_perturbation: Boolean, see `SAM`. Defaults to `False`.
        num_batch_splits: Integer >= 1, see `SAM`. Defaults to `1`.
        normalize: Boolean, see `SAM` (`False`: `eps = rho * T^2 g`).
            Defaults to `True`.
        name: String, the name of the optimizer. Defaults to `"asam"`.
        schedule: Optional `keras_sam.schedules` object, see `SAM`.
            Defaults to `None`.
        ascent_steps: Integer >= 1, see `SAM`. Defaults to `1`.

    Example:

    >>> optimizer = keras_sam.optimizers.ASAM(
    ...     keras.optimizers.SGD(0.1, momentum=0.9), rho=1.0)

    References:
        - Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for
          Scale-Invariant Learning of Deep Neural Networks, ICML 2021.
    """

    def __init__(
        self,
        optimizer="sgd",
        rho=0.5,
        eta=0.01,
        sam_every=1,
        name=None,
        sync_perturbation=False,
        num_batch_splits=1,
        normalize=True,
        schedule=None,
        ascent_steps=1,
    ):
        eta = check_float("eta", eta, low=0.0, low_open=True)
        super().__init__(
            optimizer,
            rho=rho,
            sam_every=sam_every,
            name=name,
            sync_perturbation=sync_perturbation,
            num_batch_splits=num_batch_splits,
            normalize=normalize,
            schedule=schedule,
            ascent_steps=ascent_steps,
        )
        self.eta = float(eta)

    def scale(self, variable, value):
        """T for one variable: `|w| + eta`, or `None` (T = 1) for biases."""
        if not is_weight_like(variable):
            return None
        return ops.add(ops.abs(value), self.eta)

    def _metric(self, variable, value, grad):
        t = self.scale(variable, value)
        if t is None:
            return None, None
        t2 = ops.square(t)
        return t2, ops.reciprocal(t2)

    def get_config(self):
        config = super().get_config()
        config["eta"] = self.eta
        return config
