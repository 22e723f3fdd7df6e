"""`WSAM`: sharpness as a weighted regularization term."""

import keras
from keras import ops

from keras_sam._validation import check_float
from keras_sam.optimizers.sam import SAM


@keras.saving.register_keras_serializable(package="keras_sam")
class WSAM(SAM):
    """Weighted SAM: the loss plus a weighted sharpness term.

    SAM minimizes `L(w + eps)`, i.e. the loss plus its sharpness
    `L(w + eps) - L(w)` with weight one. WSAM weighs the sharpness by
    `gamma / (1 - gamma)`:

    ```
    L_WSAM(w) = L(w) + gamma / (1 - gamma) * (L(w + eps) - L(w))
    g      = grad L(w)
    g_adv  = grad L(w + eps)                  # eps as in SAM
    w      = inner_optimizer.update(w, g + gamma / (1 - gamma) * (g_adv - g))
    ```

    `gamma=0` is the inner optimizer (one pass), `gamma=0.5` is SAM; the
    paper's default `0.9` weighs the sharpness nine times.

    The gradient goes through the inner optimizer, momentum and all (the
    coupled form). The reference code's default, `decouple=True`, applies
    the sharpness term as a plain SGD step beside the inner optimizer's
    update; that is no gradient for the inner optimizer, so it is left out.

    Args:
        optimizer: The inner optimizer: a `keras.optimizers.Optimizer`
            instance or a name/config accepted by `keras.optimizers.get`.
            Defaults to `"sgd"`.
        rho: Float >= 0, the radius of the neighbourhood.
            Defaults to `0.05`.
        gamma: Float in `[0, 1)`, the weight of the sharpness term.
            Defaults to `0.9`.
        name: String, the name of the optimizer. Defaults to `"wsam"`.
        **kwargs: Further arguments of `keras_sam.optimizers.SAM`
            (`sam_every`, `schedule`, `sync_perturbation`,
            `num_batch_splits`, `normalize`).

    Example:

    >>> optimizer = keras_sam.optimizers.WSAM(
    ...     keras.optimizers.SGD(0.1, momentum=0.9), rho=0.05, gamma=0.9)

    References:
        - Yue, Jiang, Ye, Gao, Liu, Zhang, Sharpness-Aware Minimization
          Revisited: Weighted Sharpness as a Regularization Term, KDD 2023.
    """

    def __init__(
        self, optimizer="sgd", rho=0.05, gamma=0.9, name=None, **kwargs
    ):
        gamma = check_float("gamma", gamma, low=0.0, high=1.0)
        super().__init__(optimizer, rho=rho, name=name, **kwargs)
        self.gamma = gamma

    @property
    def passes_per_step(self):
        return 1 if self.gamma == 0.0 else super().passes_per_step

    def gradient(self, grad_at, w):
        """g + gamma / (1 - gamma) * (g_adv - g)."""
        if self.gamma == 0.0:
            return grad_at(w)  # the inner optimizer, exactly
        g_adv = super().gradient(grad_at, w)
        g = grad_at(w)
        weight = self.gamma / (1.0 - self.gamma)
        return [
            (
                g_adv_i
                if g_i is None or g_adv_i is None
                else ops.add(
                    g_i,
                    ops.multiply(
                        ops.cast(weight, g_i.dtype), ops.subtract(g_adv_i, g_i)
                    ),
                )
            )
            for g_i, g_adv_i in zip(g, g_adv)
        ]

    def get_config(self):
        config = super().get_config()
        config["gamma"] = self.gamma
        return config
