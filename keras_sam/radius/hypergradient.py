"""The LETS hypergradient and the rho step, as functions of tensors.

With `w_{t+1}(rho)` the weights after one sharpness-aware step from `w_t`
(DESIGN section 3):

```
dw/drho = -lr * (g_adv - g) / rho              # "secant"
        = -lr * g_adv * g_adv * deps/drho      # "diagonal" (the paper's)
gap     = L_val(w_{t+1}) - L_train(w_{t+1})
"gap":        F = 1/2 gap^2
              dF/drho = gap * (grad L_val - grad L_train) . dw/drho
"validation": F = L_val(w_{t+1})
              dF/drho = grad L_val . dw/drho
```

`LearnedRadius` calls these inside the step and assigns what they return.
"""

import keras
import numpy as np
from keras import ops

# Adam-style normalization of the log-rho step.
BETA_1 = 0.9
BETA_2 = 0.999
EPSILON = 1e-12


def _f32(value):
    return ops.cast(value, "float32")


def _global_dot(pairs):
    """sum over variables of a . b (zero when there is no pair)."""
    dots = [ops.sum(ops.multiply(a, b)) for a, b in pairs]
    return ops.sum(ops.stack(dots)) if dots else ops.zeros(())


def dw_drho(hypergradient, grads, grads_adv, rho, lr, normalize=True):
    """`dw_{t+1}/drho` per variable (`None` where a gradient is missing)."""
    pairs = [
        None if g is None or ga is None else (_f32(g), _f32(ga))
        for g, ga in zip(grads, grads_adv)
    ]
    lr = _f32(lr)
    if hypergradient == "secant":
        scale = ops.divide(ops.negative(lr), _f32(rho))
        return [
            None if p is None else ops.multiply(ops.subtract(p[1], p[0]), scale)
            for p in pairs
        ]
    # "diagonal": deps/drho = g / ||g|| (normalized) or g (unnormalized).
    scale = ops.negative(lr)
    squares = [ops.sum(ops.square(p[0])) for p in pairs if p is not None]
    if normalize and squares:
        norm = ops.sqrt(ops.sum(ops.stack(squares)))
        scale = ops.divide(scale, ops.add(norm, EPSILON))
    return [
        (
            None
            if p is None
            else ops.multiply(ops.multiply(ops.square(p[1]), p[0]), scale)
        )
        for p in pairs
    ]


def rho_gradient(objective, loss, grads, val_loss, val_grads, dw):
    """`(dF/drho, gap)` at `w_{t+1}` for `objective` ("gap"/"validation")."""
    gap = ops.subtract(_f32(val_loss), _f32(loss))
    present = [
        (g, gv, d)
        for g, gv, d in zip(grads, val_grads, dw)
        if g is not None and gv is not None
    ]
    if objective == "validation":
        # dL_val(w_{t+1})/drho = grad L_val . dw/drho
        dot = _global_dot([(_f32(gv), _f32(d)) for _, gv, d in present])
        return dot, gap
    # d(gap^2 / 2)/drho = gap (grad L_val - grad L_train) . dw/drho
    dot = _global_dot(
        [(ops.subtract(_f32(gv), _f32(g)), _f32(d)) for g, gv, d in present]
    )
    return ops.multiply(gap, dot), gap


def rho_step(kind, rho, rho_grad, m, v, count, learning_rate, bounds):
    """One update of rho: `(new_rho, m, v)`; `count` includes this update.

    `"normalized"`: Adam on log rho with `d = rho dF/drho` (scale-free:
    `learning_rate` bounds how much log rho moves per update).
    `"plain"`: the paper's `rho - learning_rate dF/drho`.
    """
    d = ops.multiply(rho_grad, rho)  # dF/d(log rho)
    m = ops.add(ops.multiply(BETA_1, m), (1 - BETA_1) * d)
    v = ops.add(ops.multiply(BETA_2, v), (1 - BETA_2) * ops.square(d))
    if kind == "normalized":
        m_hat = ops.divide(m, ops.subtract(1.0, ops.power(BETA_1, count)))
        v_hat = ops.divide(v, ops.subtract(1.0, ops.power(BETA_2, count)))
        step = ops.multiply(
            learning_rate, ops.divide(m_hat, ops.add(ops.sqrt(v_hat), EPSILON))
        )
        # Multiplicative in rho: learning_rate = 0 leaves rho bit-exact.
        new_rho = ops.multiply(rho, ops.exp(ops.negative(step)))
    else:
        new_rho = ops.subtract(rho, ops.multiply(learning_rate, rho_grad))
    return ops.clip(new_rho, bounds[0], bounds[1]), m, v


def check_finite(arrays, name="validation_data"):
    """Raises a `ValueError` naming `name` if a floating array of `arrays`
    (`(x, y, sample_weight)` of numpy arrays) holds a NaN or inf."""
    for part, value in zip(("x", "y", "sample_weight"), arrays):
        for leaf in keras.tree.flatten(value):
            if leaf is None or not np.issubdtype(leaf.dtype, np.floating):
                continue
            nan, inf = int(np.isnan(leaf).sum()), int(np.isinf(leaf).sum())
            if nan or inf:
                raise ValueError(
                    f"`{name}` contains non-finite values (NaN or inf): "
                    "the validation loss on them, and so rho's "
                    "hypergradient, is not defined. Clean or impute the "
                    f"held-out data first. Received: {part} with {nan} NaN "
                    f"and {inf} inf values (shape {tuple(leaf.shape)})"
                )
