"""`FriendlySAM`: SAM's ascent without the full-gradient component."""

import keras
from keras import ops

from keras_sam._validation import check_float
from keras_sam.optimizers.sam import SAM


@keras.saving.register_keras_serializable(package="keras_sam")
class FriendlySAM(SAM):
    """Friendly SAM (F-SAM): ascend along the batch-specific gradient.

    The stochastic gradient is the full gradient plus a batch-specific
    part; F-SAM finds the full-gradient part harmful to generalization and
    removes its estimate, an exponential moving average of the gradients,
    from the ascent direction:

    ```
    g     = grad L(w)
    m     = lmbda * m + (1 - lmbda) * g        # m = 0 before the first step
    d     = g - sigma * m
    eps   = rho * d / (||d|| + 1e-12)          # the geometry of SAM/ASAM
    g_adv = grad L(w + eps)
    w     = inner_optimizer.update(w, g_adv)
    ```

    `sigma=0` is SAM exactly. With sub-batches (`num_batch_splits`) each
    ascends along its own gradient minus `sigma * m`.

    Args:
        optimizer: The inner optimizer: a `keras.optimizers.Optimizer`
            instance or a name/config accepted by `keras.optimizers.get`.
            Defaults to `"sgd"`.
        rho: Float >= 0, the radius of the neighbourhood.
            Defaults to `0.05`.
        sigma: Float >= 0, how much of the averaged gradient to remove.
            Defaults to `1.0`.
        lmbda: Float in `[0, 1)`, the decay of the average.
            Defaults to `0.9`.
        name: String, the name of the optimizer.
            Defaults to `"friendlysam"`.
        **kwargs: Further arguments of `keras_sam.optimizers.SAM`.

    Example:

    >>> optimizer = keras_sam.optimizers.FriendlySAM(
    ...     keras.optimizers.SGD(0.1, momentum=0.9), rho=0.05, sigma=1.0)

    References:
        - Li, Zhou, Liu, Zhang, Ma, Xu, Friendly Sharpness-Aware
          Minimization, CVPR 2024.
    """

    def __init__(
        self,
        optimizer="sgd",
        rho=0.05,
        sigma=1.0,
        lmbda=0.9,
        name=None,
        **kwargs,
    ):
        sigma = check_float("sigma", sigma, low=0.0)
        lmbda = check_float("lmbda", lmbda, low=0.0, high=1.0)
        super().__init__(optimizer, rho=rho, name=name, **kwargs)
        self.sigma, self.lmbda = sigma, lmbda
        self._m = []

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._m = [
            self.add_variable_from_reference(v, name="friendly_m")
            for v in var_list
        ]

    def gradient(self, grad_at, w):
        """SAM's gradient, ascending along g - sigma * m."""
        if not self.built:
            self.build(list(grad_at.variables))
        for m, g_i in zip(self._m, grad_at.shared(grad_at(w))):
            if g_i is not None:  # m = lmbda m + (1 - lmbda) g
                m.assign(
                    ops.add(
                        ops.multiply(self.lmbda, m),
                        ops.multiply(1.0 - self.lmbda, ops.cast(g_i, m.dtype)),
                    )
                )
        return super().gradient(grad_at, w)

    def _ascent_direction(self, g):
        if self.sigma == 0.0:
            return g  # SAM, bit for bit
        return [
            (
                None
                if g_i is None
                else ops.subtract(
                    g_i, ops.cast(ops.multiply(self.sigma, m), g_i.dtype)
                )
            )
            for g_i, m in zip(g, self._m)
        ]

    def get_config(self):
        config = super().get_config()
        config.update({"sigma": self.sigma, "lmbda": self.lmbda})
        return config
