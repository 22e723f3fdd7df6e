"""Numpy references of the variants on the gradient-rule contract (issue 23):
WSAM, FriendlySAM, several ascent steps and late-phase SAM, with Keras SGD
as the inner optimizer. Written from the papers' equations."""

import numpy as np

from tests.reference import sam_eps
from tests.reference import sgd_step


def _ascend(params, direction, radius):
    return [p + e for p, e in zip(params, sam_eps(direction, radius))]


def train(
    params,
    batches,
    loss_and_grads,
    lr,
    momentum,
    variant,
    rho=0.05,
    gamma=0.9,
    sigma=1.0,
    lmbda=0.9,
    ascent_steps=1,
    start_step=0,
):
    """Final parameters of `variant` over `batches`.

    wsam:     g_use = g + gamma / (1 - gamma) * (g_adv - g)
    friendly: m = lmbda m + (1 - lmbda) g (m = 0 at first);
              eps = rho (g - sigma m) / ||g - sigma m||; g_use = g_adv
    ascent:   p_0 = w; p_i = p_{i-1} + (rho / k) g(p_{i-1}) / ||g(p_{i-1})||;
              g_use = g(p_k)
    late:     g_use = g before `start_step`, SAM's g_adv from it on
    """
    params = [np.array(p, dtype=np.float64) for p in params]
    velocity = [np.zeros_like(p) for p in params]
    m = [np.zeros_like(p) for p in params]
    for step, (x, y) in enumerate(batches):
        _, g = loss_and_grads(params, x, y)
        if variant == "late" and step < start_step:
            g_use = g
        elif variant == "ascent":
            point, g_point = params, g
            for _ in range(ascent_steps):
                point = _ascend(point, g_point, rho / ascent_steps)
                _, g_point = loss_and_grads(point, x, y)
            g_use = g_point
        elif variant == "friendly":
            m = [lmbda * mi + (1 - lmbda) * gi for mi, gi in zip(m, g)]
            d = [gi - sigma * mi for gi, mi in zip(g, m)]
            _, g_use = loss_and_grads(_ascend(params, d, rho), x, y)
        else:  # wsam, late
            _, g_adv = loss_and_grads(_ascend(params, g, rho), x, y)
            weight = gamma / (1 - gamma) if variant == "wsam" else 1.0
            g_use = [gi + weight * (a - gi) for gi, a in zip(g, g_adv)]
        params, velocity = sgd_step(params, g_use, velocity, lr, momentum)
    return params
