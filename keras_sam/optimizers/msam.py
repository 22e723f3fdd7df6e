"""`MomentumSAM`: a perturbation along the momentum, at no extra pass."""

import keras
from keras import ops

from keras_sam._keras_compat import adam_first_moments
from keras_sam._keras_compat import variable_index
from keras_sam.optimizers.base import SharpnessAware
from keras_sam.optimizers.chain import describe
from keras_sam.optimizers.sam import SAM

_NORM_EPSILON = 1e-12


def _stock_optimizer(optimizer):
    """The optimizer inside any loss-scale wrappers."""
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def momentum_slots(optimizer):
    """`(sign, slots)` of a stock optimizer with a momentum, or raises.

    `slots[i]` is the momentum of the i-th variable and `sign * slot`
    points along the accumulated gradient `v` (Keras' SGD stores
    `m = mu * m - lr * g`, i.e. `-lr * v`; Adam's first moment is `v`).
    """
    stock = _stock_optimizer(optimizer)
    if isinstance(stock, keras.optimizers.SGD) and stock.momentum > 0:
        return -1.0, stock.momentums
    if isinstance(stock, keras.optimizers.Adam):  # Adam, AdamW
        return 1.0, adam_first_moments(stock)
    return None


def check_momentum(optimizer):
    stock = _stock_optimizer(optimizer)
    supported = isinstance(stock, keras.optimizers.Adam) or (
        isinstance(stock, keras.optimizers.SGD) and stock.momentum > 0
    )
    if not supported:
        momentum = (
            f"(momentum={stock.momentum})"
            if isinstance(stock, keras.optimizers.SGD)
            else ""
        )
        raise ValueError(
            "MomentumSAM perturbs along the inner optimizer's momentum, so "
            "the inner optimizer must have one: SGD with momentum > 0, "
            "Adam or AdamW. Received: optimizer="
            f"{describe(optimizer)}{momentum}"
        )


@keras.saving.register_keras_serializable(package="keras_sam")
class MomentumSAM(SAM):
    """Momentum-SAM: SAM's ascent along the momentum, one pass per step.

    The direction of the perturbation is the inner optimizer's momentum
    `v` (the accumulated gradient), known before the step, so the step
    takes a single forward/backward pass, at the perturbed point:

    ```
    eps = -rho * v / (||v|| + 1e-12)   # v: momentum before this step
    g   = grad L(w + eps)              # the only pass
    w   = inner_optimizer.update(w, g) # from w, not w + eps
    ```

    The sign and normalization follow the authors' code (MarlonBecker/MSAM
    on GitHub): `v` accumulates gradients (`v = mu * v + g` for SGD, the
    first moment for Adam), and the weights are moved against it. The
    loss and metrics of `fit` and the BatchNorm statistics come from that
    single pass at `w + eps`, as in the authors' training loop; evaluate
    and predict run at `w`. On the first step `v = 0`, so `eps = 0`.

    The inner optimizer must have a momentum: `SGD` with `momentum > 0`,
    `Adam` or `AdamW` (their first moment). Others (plain SGD, RMSprop,
    Adagrad, ...) raise a `ValueError` naming the optimizer. Keras' SGD
    mixes the learning rate into its momentum (`m = mu m - lr g`); under a
    changing learning rate its direction differs slightly from `v`.

    Args:
        optimizer: The inner optimizer, with a momentum (see above).
            Defaults to `keras.optimizers.SGD(0.01, momentum=0.9)`.
        rho: Float >= 0, the length of the perturbation; the paper uses
            larger values than SAM (e.g. 0.3 with SGD, 1 to 3 with AdamW).
            `rho=0` is exactly the inner optimizer. Defaults to `0.3`.
        name: String, the name of the optimizer.
            Defaults to `"momentumsam"`.

    Example:

    >>> optimizer = keras_sam.optimizers.MomentumSAM(
    ...     keras.optimizers.SGD(0.1, momentum=0.9), rho=0.3)

    References:
        - Becker, Altrock, Anders, Momentum-SAM: Sharpness Aware
          Minimization without Computational Overhead, 2024.
    """

    passes_per_step = 1

    def __init__(self, optimizer=None, rho=0.3, name=None):
        if optimizer is None:
            optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
        if not isinstance(rho, (int, float)) or isinstance(rho, bool):
            raise TypeError(
                "`rho` of MomentumSAM must be a float >= 0 (a learned "
                f"radius needs two passes). Received: rho={rho!r}"
            )
        super().__init__(optimizer, rho=rho, name=name)
        check_momentum(self.inner_optimizer)

    def gradient(self, grad_at, w):
        """g(w + eps), eps along the momentum: the step's only pass."""
        return grad_at(self.perturbed_values(None, grad_at.variables, w))

    def perturbation(self, grads, trainable_variables, values=None, scale=None):
        """eps = -rho * v / (||v|| + 1e-12) per variable (`grads` unused)."""
        if values is None:
            values = [v.value for v in trainable_variables]
        sign, slots = momentum_slots(self.inner_optimizer)
        stock = _stock_optimizer(self.inner_optimizer)
        v = [
            ops.multiply(
                sign,
                ops.cast(slots[variable_index(stock, var)], "float32"),
            )
            for var in trainable_variables
        ]
        norm = ops.sqrt(
            ops.sum(ops.stack([ops.sum(ops.square(v_i)) for v_i in v]))
        )
        scale = ops.divide(
            ops.negative(ops.cast(self.rho, "float32")),
            ops.add(norm, _NORM_EPSILON),
        )
        return [
            ops.cast(ops.multiply(v_i, scale), w.dtype)
            for v_i, w in zip(v, values)
        ]

    def get_config(self):
        # Only what its constructor takes: the wrapper's own config.
        return SharpnessAware.get_config(self)
