"""Numpy references written from the equations in DESIGN.md.

Nothing here imports keras_sam: these are independent implementations that
the library is checked against.
"""

import numpy as np

EPS = 1e-12

# ---------------------------------------------------------------------------
# A two-layer MLP, `y = tanh(x W1 + b1) W2 + b2`, with mean squared error.
# Parameters are a list [W1, b1, W2, b2] of float64 arrays.


def mlp_forward(params, x):
    w1, b1, w2, b2 = params
    h = np.tanh(x @ w1 + b1)
    return h @ w2 + b2


def mlp_loss_and_grads(params, x, y):
    """Mean over samples and outputs of (y_pred - y)^2, and its gradient."""
    w1, b1, w2, b2 = params
    a = x @ w1 + b1
    h = np.tanh(a)
    out = h @ w2 + b2
    diff = out - y
    loss = np.mean(diff**2)
    d_out = 2.0 * diff / diff.size
    g_w2 = h.T @ d_out
    g_b2 = d_out.sum(axis=0)
    d_a = (d_out @ w2.T) * (1.0 - h**2)
    g_w1 = x.T @ d_a
    g_b1 = d_a.sum(axis=0)
    return loss, [g_w1, g_b1, g_w2, g_b2]


# ---------------------------------------------------------------------------
# Perturbations (DESIGN section 2).


def sam_eps(grads, rho):
    """eps = rho g / (||g|| + 1e-12), the norm global over all variables."""
    norm = np.sqrt(sum(np.sum(g**2) for g in grads))
    return [rho * g / (norm + EPS) for g in grads]


def asam_eps(params, grads, rho, eta, weight_like):
    """eps = rho T^2 g / (||T g|| + 1e-12); T = |w| + eta or 1 (biases)."""
    ts = [
        np.abs(w) + eta if wl else np.ones_like(w)
        for w, wl in zip(params, weight_like)
    ]
    norm = np.sqrt(sum(np.sum((t * g) ** 2) for t, g in zip(ts, grads)))
    return [rho * t**2 * g / (norm + EPS) for t, g in zip(ts, grads)]


# ---------------------------------------------------------------------------
# Inner optimizer: Keras SGD, `v = momentum v - lr g; w = w + v`.


def sgd_step(params, grads, velocity, lr, momentum=0.0):
    if momentum == 0.0:
        return [w - lr * g for w, g in zip(params, grads)], velocity
    velocity = [momentum * v - lr * g for v, g in zip(velocity, grads)]
    return [w + v for w, v in zip(params, velocity)], velocity


def train_sam(
    params,
    batches,
    loss_and_grads,
    rho,
    lr,
    momentum=0.0,
    variant="sam",
    eta=0.01,
    weight_like=None,
    sam_every=1,
):
    """Runs SAM/ASAM with SGD over `batches`; returns the final parameters."""
    params = [np.array(p, dtype=np.float64) for p in params]
    velocity = [np.zeros_like(p) for p in params]
    for step, (x, y) in enumerate(batches):
        _, g = loss_and_grads(params, x, y)
        if step % sam_every == 0:
            if variant == "sam":
                eps = sam_eps(g, rho)
            else:
                eps = asam_eps(params, g, rho, eta, weight_like)
            _, g = loss_and_grads(
                [p + e for p, e in zip(params, eps)], x, y
            )
        params, velocity = sgd_step(params, g, velocity, lr, momentum)
    return params
