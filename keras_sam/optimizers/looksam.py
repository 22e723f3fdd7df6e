"""`LookSAM`: SAM every `k` steps, its direction reused in between."""

import keras
from keras import ops

from keras_sam import schedules as sam_schedules
from keras_sam._step_parts import dot
from keras_sam._step_parts import squared_norm
from keras_sam._validation import check_float
from keras_sam._validation import check_positive_int
from keras_sam.optimizers.sam import SAM

_NORM_EPSILON = 1e-12


@keras.saving.register_keras_serializable(package="keras_sam")
class LookSAM(SAM):
    """LookSAM: the two-pass SAM step every `k` steps, reused in between.

    On a SAM step the part of the adversarial gradient orthogonal to the
    clean one, `g_v`, is stored (an optimizer slot, saved); the next
    `k - 1` steps take one pass and add it back, rescaled to the current
    gradient:

    ```
    every k-th step:  g_s = grad L(w + eps)               # two passes
                      g_v = g_s - (<g, g_s> / ||g||^2) g  # stored
    other steps:      g_s = g + alpha * (||g|| / ||g_v||) * g_v  # one pass
    w = inner_optimizer.update(w, g_s)
    ```

    The choice is made on the host (`keras_sam.schedules.Every(k)`), so
    the steps in between run a one-pass program. `k=1` is SAM. Norms are
    global over all variables, as in the paper's Algorithm 1.

    Args:
        optimizer: The inner optimizer: a `keras.optimizers.Optimizer`
            instance or a name/config accepted by `keras.optimizers.get`.
            Defaults to `"sgd"`.
        rho: Float >= 0, the radius of SAM's neighbourhood.
            Defaults to `0.05`.
        k: Integer >= 1, the period of the SAM step. Defaults to `5`.
        alpha: Float >= 0, the weight of the reused direction.
            Defaults to `0.7`.
        name: String, the name of the optimizer. Defaults to `"looksam"`.
        **kwargs: Further arguments of `keras_sam.optimizers.SAM`
            (`sync_perturbation`, `num_batch_splits`).

    Example:

    >>> optimizer = keras_sam.optimizers.LookSAM(
    ...     keras.optimizers.SGD(0.1, momentum=0.9), rho=0.05, k=5)

    References:
        - Liu, Mai, Chen, Hsieh, You, Towards Efficient and Scalable
          Sharpness-Aware Minimization, CVPR 2022.
    """

    def __init__(
        self, optimizer="sgd", rho=0.05, k=5, alpha=0.7, name=None, **kwargs
    ):
        for key in ("sam_every", "schedule"):
            if key in kwargs:
                raise ValueError(
                    f"LookSAM runs SAM every `k` steps; it takes no `{key}`. "
                    f"Received: {key}={kwargs[key]!r}"
                )
        k = check_positive_int("k", k)
        alpha = check_float("alpha", alpha, low=0.0)
        super().__init__(
            optimizer,
            rho=rho,
            name=name,
            schedule=sam_schedules.Every(k),
            **kwargs,
        )
        self.k, self.alpha = k, alpha
        self._g_v = None

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._g_v = [
            self.add_variable_from_reference(v, name="looksam_g_v")
            for v in var_list
        ]

    def gradient(self, grad_at, w):
        """SAM's gradient g_s; stores g_v, its part orthogonal to g."""
        g_s = super().gradient(grad_at, w)
        g = grad_at.shared(grad_at(w))
        # g_v = g_s - (<g, g_s> / ||g||^2) g
        coefficient = ops.divide(
            dot(g, g_s), ops.add(squared_norm(g), _NORM_EPSILON)
        )
        for g_i, g_s_i, slot in zip(g, g_s, self._g_v):
            if g_i is None or g_s_i is None:
                continue
            g_v = ops.subtract(
                ops.cast(g_s_i, "float32"),
                ops.multiply(coefficient, ops.cast(g_i, "float32")),
            )
            slot.assign(ops.cast(g_v, slot.dtype))
        return g_s

    def cheap_gradient(self, grad_at, w):
        """g + alpha * (||g|| / ||g_v||) * g_v, from one pass."""
        g = super().cheap_gradient(grad_at, w)
        g_v = [None if g_i is None else v for g_i, v in zip(g, self._g_v)]
        # Zero before the first SAM step (g_v = 0).
        scale = ops.divide(
            ops.multiply(self.alpha, ops.sqrt(squared_norm(g))),
            ops.add(ops.sqrt(squared_norm(g_v)), _NORM_EPSILON),
        )
        return [
            (
                None
                if g_i is None
                else ops.add(
                    g_i,
                    ops.cast(
                        ops.multiply(scale, ops.cast(v, "float32")), g_i.dtype
                    ),
                )
            )
            for g_i, v in zip(g, g_v)
        ]

    def get_config(self):
        config = super().get_config()
        for key in ("sam_every", "schedule"):
            config.pop(key)
        config.update({"k": self.k, "alpha": self.alpha})
        return config
