"""`SAMPa`: SAM whose two gradients of a step can run at the same time."""

import keras
from keras import ops

from keras_sam._validation import check_float
from keras_sam.optimizers.sam import SAM
from keras_sam.radius import LearnedRadius


@keras.saving.register_keras_serializable(package="keras_sam")
class SAMPa(SAM):
    """Sharpness-aware minimization, parallelized (SAMPa).

    SAM's adversarial gradient needs the clean gradient of the same step,
    so its two passes run one after the other. SAMPa perturbs with the
    gradient at an auxiliary point `y_t` computed in the previous step, so
    both gradients of a step depend only on what the step starts from:

    ```
    w_adv  = w_t + rho * g_y / (||g_y|| + 1e-12)    # g_y = grad L(y_t)
    y_t+1  = w_t - lr * g_y                         # SGD: its momentum step
    g_adv  = grad L_B(w_adv)        } independent: at once on two groups
    g_next = grad L_B(y_t+1)        } of devices, else one after the other
    w_t+1  = inner_optimizer.update(w_t, (1 - lam) g_adv + lam g_next)
    g_y    = g_next                                 # kept for the next step
    ```

    The auxiliary point is `w - lr g_y` with the inner optimizer's current
    learning rate (the paper's equation); with Keras' `SGD` it is where
    SGD's own update would move with `g_y`, its momentum and weight decay
    included, as in the paper's code. Computing it changes nothing. Both gradients are taken on the
    step's batch (the paper's code takes the perturbed one on the previous
    batch, which would hold a batch in the optimizer); the loss, metrics
    and BatchNorm statistics come from the pass at `y_t+1`. On the first
    step `g_y = 0`, so `w_adv = w`.

    Under `keras.distribution.DataParallel` (JAX) with an even number of
    devices, the two gradients are computed at the same time on the two
    halves of the devices, each half data-parallel over the whole batch,
    as the paper runs them on two GPUs. Elsewhere (one device, TensorFlow,
    torch) they run one after the other, with the same result.

    Args:
        optimizer: The inner optimizer: a `keras.optimizers.Optimizer`
            instance or a name/config accepted by `keras.optimizers.get`.
            Defaults to `"sgd"`.
        rho: Float >= 0, the radius of the perturbation. Defaults to `0.1`.
        lam: Float in [0, 1], the weight of the gradient at the auxiliary
            point in the update. `rho=0` and `lam=0` give exactly the inner
            optimizer. Defaults to `0.2`.
        name: String, the name of the optimizer. Defaults to `"sampa"`.

    Example:

    >>> optimizer = keras_sam.optimizers.SAMPa(
    ...     keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1, lam=0.2)

    References:
        - Xie, Pethick, Cevher, SAMPa: Sharpness-aware Minimization
          Parallelized, NeurIPS 2024.
    """

    # The step runs `keras_sam._parallel_step`, not the two-pass step.
    parallel_passes = True

    def __init__(self, optimizer="sgd", rho=0.1, lam=0.2, name=None):
        if isinstance(rho, LearnedRadius):
            raise TypeError(
                "`SAMPa` takes a float `rho`; a learned radius needs the "
                "clean and adversarial gradients of one point. Received: "
                f"rho={rho!r}"
            )
        lam = check_float("lam", lam, low=0.0, high=1.0, high_open=False)
        super().__init__(optimizer, rho=rho, name=name)
        self.lam = lam
        self.g_y = []

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        # g_y: the gradient at the auxiliary point of the previous step.
        self.g_y = [
            self.add_variable_from_reference(v, name="g_y") for v in var_list
        ]

    def points(self, trainable_variables, values):
        """`(w_adv, y)`: where the step's two gradients are taken."""
        if not self.built:
            self.build(list(trainable_variables))
        g_y = [ops.convert_to_tensor(g) for g in self.g_y]
        w_adv = self.perturbed_values(g_y, trainable_variables, values)
        return w_adv, self._auxiliary_point(values, g_y)

    def _auxiliary_point(self, values, g_y):
        """`y = w - lr g_y` (the paper's equation); with Keras' `SGD`, its
        momentum (Nesterov or not) and weight decay as its update would
        apply them (the paper's code). Nothing is assigned."""
        inner = self.inner_optimizer
        lr = ops.cast(inner.learning_rate, "float32")
        sgd = isinstance(inner, keras.optimizers.SGD)
        momentum = inner.momentum if sgd else 0.0
        points = []
        for i, (w, g) in enumerate(zip(values, g_y)):
            step = ops.multiply(-lr, ops.cast(g, "float32"))
            if momentum:
                m = ops.cast(inner.momentums[i], "float32")
                m_next = ops.add(ops.multiply(momentum, m), step)
                if inner.nesterov:
                    step = ops.add(step, ops.multiply(momentum, m_next))
                else:
                    step = m_next
            if sgd and inner.weight_decay:
                decay = ops.multiply(lr * inner.weight_decay, w)
                step = ops.subtract(step, ops.cast(decay, "float32"))
            points.append(ops.add(w, ops.cast(step, w.dtype)))
        return points

    def combine(self, g_adv, g_next):
        """The gradient of the update: `(1 - lam) g_adv + lam g_next`."""
        return [
            None if a is None else ops.add((1.0 - self.lam) * a, self.lam * b)
            for a, b in zip(g_adv, g_next)
        ]

    def keep(self, g_next):
        """Stores the auxiliary gradient (unscaled) for the next step."""
        for variable, g in zip(self.g_y, g_next):
            if g is not None:
                variable.assign(ops.cast(g, variable.dtype))

    def get_config(self):
        config = super().get_config()
        for key in (
            "sam_every",
            "sync_perturbation",
            "num_batch_splits",
            "normalize",
            "schedule",
        ):
            config.pop(key, None)
        config["lam"] = self.lam
        return config
