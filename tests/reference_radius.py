"""Numpy references for `LearnedRadius`'s objectives (DESIGN section 3).

One SAM/ASAM step with plain SGD from w_t (`tests.reference.lets_step`),
then an objective at w_{t+1}: the validation loss itself ("validation").
The squared gap ("gap") is `tests.reference.lets_objective`.
"""

import numpy as np

from tests.reference import lets_step


def validation_objective(params, x, y, xv, yv, rho, lr, loss_and_grads, eps_fn):
    """F(rho) = L_val(w_{t+1}(rho))."""
    w1, _, _ = lets_step(params, x, y, rho, lr, loss_and_grads, eps_fn)
    return loss_and_grads(w1, xv, yv)[0]


def validation_hypergradient_fd(
    params, x, y, xv, yv, rho, lr, loss_and_grads, eps_fn, h=1e-5
):
    """dL_val(w_{t+1})/drho by central differences."""
    f = [
        validation_objective(
            params, x, y, xv, yv, r, lr, loss_and_grads, eps_fn
        )
        for r in (rho + h, rho - h)
    ]
    return (f[0] - f[1]) / (2 * h)


def validation_hypergradient(
    params, x, y, xv, yv, rho, lr, loss_and_grads, eps_fn
):
    """The one-step formula: grad L_val(w_{t+1}) . dw/drho with the secant
    dw/drho = -lr (g_adv - g) / rho. Returns (dF/drho, gap)."""
    w1, g, g_adv = lets_step(params, x, y, rho, lr, loss_and_grads, eps_fn)
    dw = [-lr * (ga - g0) / rho for ga, g0 in zip(g_adv, g)]
    loss_v, g_v = loss_and_grads(w1, xv, yv)
    loss_t, _ = loss_and_grads(w1, x, y)
    dot = sum(np.sum(a * d) for a, d in zip(g_v, dw))
    return dot, loss_v - loss_t


def log_rho_step(rho, rho_grad, count, lr, bounds):
    """The first normalized step from zero moments: Adam's bias correction
    makes m_hat / sqrt(v_hat) = sign(d), so log rho moves by exactly `lr`
    whatever the scale of rho (the scale-free step)."""
    if count != 1:
        raise ValueError("only the first step has a closed form")
    return float(np.clip(rho * np.exp(-lr * np.sign(rho_grad)), *bounds))
