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


def sam_eps_unnormalized(grads, rho):
    """eps = rho g (Behdin and Mazumder's SAM, no division by the norm)."""
    return [rho * g for g in grads]


def asam_eps_unnormalized(params, grads, rho, eta, weight_like):
    """eps = rho T^2 g, T = |w| + eta or 1 (biases), unnormalized."""
    ts = [
        np.abs(w) + eta if wl else np.ones_like(w)
        for w, wl in zip(params, weight_like)
    ]
    return [rho * t**2 * g for t, g in zip(ts, grads)]


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
    normalize=True,
):
    """Runs SAM/ASAM with SGD over `batches`; returns the final parameters."""
    params = [np.array(p, dtype=np.float64) for p in params]
    velocity = [np.zeros_like(p) for p in params]
    for step, (x, y) in enumerate(batches):
        _, g = loss_and_grads(params, x, y)
        if step % sam_every == 0:
            if variant == "sam":
                eps = (sam_eps if normalize else sam_eps_unnormalized)(g, rho)
            elif normalize:
                eps = asam_eps(params, g, rho, eta, weight_like)
            else:
                eps = asam_eps_unnormalized(params, g, rho, eta, weight_like)
            _, g = loss_and_grads([p + e for p, e in zip(params, eps)], x, y)
        params, velocity = sgd_step(params, g, velocity, lr, momentum)
    return params


# ---------------------------------------------------------------------------
# m-sharpness, gradient accumulation and clipping (issue 9).
#
# A batch is split into contiguous sub-batches B_j of near-equal sizes n_j
# (the first n % m get one sample more). Each is perturbed with its own
# gradient and the adversarial gradients are averaged with weights n_j / n:
#
#     g_adv = sum_j (n_j / n) grad L_{B_j}(w + eps_j)
#     eps_j from grad L_{B_j}(w)
#
# Per-replica perturbation on R devices is the same with m = R (replica r
# holds the r-th contiguous part of the global batch); synchronized
# perturbation is m = 1.


def split_batch(x, y, num_splits):
    """Contiguous sub-batches of near-equal sizes, as `(x_j, y_j)` pairs."""
    n = len(x)
    base, extra = divmod(n, num_splits)
    parts, start = [], 0
    for j in range(num_splits):
        size = base + (1 if j < extra else 0)
        if size:
            parts.append((x[start : start + size], y[start : start + size]))
        start += size
    return parts


def sam_grad(
    params,
    x,
    y,
    loss_and_grads,
    rho,
    num_splits=1,
    variant="sam",
    eta=0.01,
    weight_like=None,
):
    """The gradient SAM hands its inner optimizer for one batch."""
    n = len(x)
    total = [np.zeros_like(p) for p in params]
    for xj, yj in split_batch(x, y, num_splits):
        _, g = loss_and_grads(params, xj, yj)
        if variant == "sam":
            eps = sam_eps(g, rho)
        else:
            eps = asam_eps(params, g, rho, eta, weight_like)
        _, g_adv = loss_and_grads([p + e for p, e in zip(params, eps)], xj, yj)
        total = [t + len(xj) / n * ga for t, ga in zip(total, g_adv)]
    return total


def clip_by_global_norm(grads, clipnorm):
    """Keras' `global_clipnorm`: g * c / max(||g||, c), ||.|| over all."""
    norm = np.sqrt(sum(np.sum(g**2) for g in grads))
    return [g * clipnorm / max(norm, clipnorm) for g in grads]


def clip_by_norm(grads, clipnorm):
    """Keras' `clipnorm`: each gradient clipped to norm c on its own."""
    return [g * clipnorm / max(np.sqrt(np.sum(g**2)), clipnorm) for g in grads]


def train_sam_general(
    params,
    batches,
    loss_and_grads,
    rho,
    lr,
    momentum=0.0,
    num_splits=1,
    accumulation_steps=1,
    global_clipnorm=None,
    clipnorm=None,
    variant="sam",
    eta=0.01,
    weight_like=None,
):
    """SAM/ASAM with Keras SGD, m-sharpness, accumulation and clipping.

    Accumulation as in Keras: every step adds g_adv to an accumulator; each
    `accumulation_steps`-th step applies the mean of the accumulated
    gradients and resets. Clipping applies to that (adversarial) gradient
    only; the perturbation uses the unclipped clean gradient.
    """
    params = [np.array(p, dtype=np.float64) for p in params]
    velocity = [np.zeros_like(p) for p in params]
    accumulated = [np.zeros_like(p) for p in params]
    for step, (x, y) in enumerate(batches):
        g = sam_grad(
            params,
            x,
            y,
            loss_and_grads,
            rho,
            num_splits=num_splits,
            variant=variant,
            eta=eta,
            weight_like=weight_like,
        )
        if accumulation_steps > 1:
            if (step + 1) % accumulation_steps:
                accumulated = [a + gi for a, gi in zip(accumulated, g)]
                continue
            g = [(a + gi) / accumulation_steps for a, gi in zip(accumulated, g)]
            accumulated = [np.zeros_like(p) for p in params]
        if clipnorm is not None:
            g = clip_by_norm(g, clipnorm)
        if global_clipnorm is not None:
            g = clip_by_global_norm(g, global_clipnorm)
        params, velocity = sgd_step(params, g, velocity, lr, momentum)
    return params


# ---------------------------------------------------------------------------
# Optimum shifting (DESIGN section 4): minimum-norm weights with the same
# outputs on the inputs A (n x d), solved by least squares (SVD), not by the
# library's streamed eigen-decomposition.


def min_norm_shift(a, kernel, bias=None, minimize="kernel"):
    """`W'` (and `b'`) of minimum norm with `[A 1][W'; b'] = [A 1][W; b]`.

    minimize="kernel": min ||W'|| (b' free): A_c W' = A_c W, A_c = A - mean,
    b' = b + mean (W - W'). minimize="joint": min ||[W'; b']||. No bias:
    min ||W'|| with A W' = A W.
    """
    a = np.asarray(a, dtype=np.float64)
    kernel = np.asarray(kernel, dtype=np.float64)
    if bias is None:
        w, *_ = np.linalg.lstsq(a, a @ kernel, rcond=None)
        return w, None
    bias = np.asarray(bias, dtype=np.float64)
    if minimize == "kernel":
        mean = a.mean(axis=0)
        a_c = a - mean
        w, *_ = np.linalg.lstsq(a_c, a_c @ kernel, rcond=None)
        return w, bias + mean @ (kernel - w)
    x = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    theta = np.concatenate([kernel, bias[None, :]], axis=0)
    theta, *_ = np.linalg.lstsq(x, x @ theta, rcond=None)
    return theta[:-1], theta[-1]


def conv_patches(x, kernel_size, strides=None, dilation=None, pad_left=None):
    """Patch matrix of a channels-last 'valid' convolution (after left pads).

    Row order: (sample, output position); column order that of
    `kernel.reshape(-1, filters)`, i.e. (kernel offsets..., input channel).
    """
    x = np.asarray(x, dtype=np.float64)
    rank = len(kernel_size)
    strides = strides or (1,) * rank
    dilation = dilation or (1,) * rank
    if pad_left:
        pads = [(0, 0)] + [(p, 0) for p in pad_left] + [(0, 0)]
        x = np.pad(x, pads)
    spatial = x.shape[1:-1]
    out = [
        (s - d * (k - 1) - 1) // st + 1
        for s, k, st, d in zip(spatial, kernel_size, strides, dilation)
    ]
    rows = []
    for sample in x:
        for pos in np.ndindex(*out):
            patch = []
            for offset in np.ndindex(*kernel_size):
                idx = tuple(
                    p * st + o * d
                    for p, o, st, d in zip(pos, offset, strides, dilation)
                )
                patch.append(sample[idx])
            rows.append(np.concatenate(patch))
    return np.array(rows)


# ---------------------------------------------------------------------------
# Sharpness diagnostics (DESIGN section 5, issue 7).


def mlp_hvp_fd(params, x, y, vectors, h=1e-5):
    """H v by central differences of the MLP gradient:
    (grad L(w + h v) - grad L(w - h v)) / (2 h)."""
    plus = [p + h * v for p, v in zip(params, vectors)]
    minus = [p - h * v for p, v in zip(params, vectors)]
    _, g_plus = mlp_loss_and_grads(plus, x, y)
    _, g_minus = mlp_loss_and_grads(minus, x, y)
    return [(a - b) / (2 * h) for a, b in zip(g_plus, g_minus)]


def hutchinson_trace(matrix, num_probes, seed):
    """(1/m) sum_i z_i^T A z_i with Rademacher z_i drawn in sequence from
    numpy's default_rng(seed) as integers(0, 2) * 2 - 1."""
    rng = np.random.default_rng(seed)
    n = matrix.shape[0]
    total = 0.0
    for _ in range(num_probes):
        z = rng.integers(0, 2, size=n) * 2.0 - 1.0
        total += z @ matrix @ z
    return total / num_probes


def mlp_sam_sharpness(params, x, y, rho):
    """L(w + eps) - L(w), eps = rho g / (||g|| + 1e-12)."""
    loss, g = mlp_loss_and_grads(params, x, y)
    eps = sam_eps(g, rho)
    adv, _ = mlp_loss_and_grads([p + e for p, e in zip(params, eps)], x, y)
    return adv - loss


# A scalar two-parameter network f = (u v)^2 on x = 1, y = 1 with squared
# error, L(u, v) = (u^2 v^2 - 1)^2: the smallest model with an edge of
# stability. On the minima (u^2 v^2 = 1) the Hessian is 2 grad f grad f^T, of
# top eigenvalue 8 (u^2 + v^2); gradient descent with 2 / lr below that
# oscillates and drifts along the minima until the sharpness is just under
# 2 / lr, and with 2 / lr above it the sharpness stays where it is.


def scalar_eos_grads(u, v):
    f = u * u * v * v
    return 4 * (f - 1) * u * v * v, 4 * (f - 1) * u * u * v


def scalar_eos_sharpness(u, v):
    """Top eigenvalue of the 2x2 Hessian of L(u, v) = (f - 1)^2, f = u^2 v^2."""
    f = u * u * v * v
    f_u, f_v = 2 * u * v * v, 2 * u * u * v
    f_uu, f_vv, f_uv = 2 * v * v, 2 * u * u, 4 * u * v
    h_uu = 2 * f_u * f_u + 2 * (f - 1) * f_uu
    h_vv = 2 * f_v * f_v + 2 * (f - 1) * f_vv
    h_uv = 2 * f_u * f_v + 2 * (f - 1) * f_uv
    hessian = np.array([[h_uu, h_uv], [h_uv, h_vv]])
    return np.linalg.eigvalsh(hessian)[-1]


def scalar_eos_eigenvalues(u, v):
    """Both eigenvalues (ascending) of the 2x2 Hessian of L(u, v); at
    u = v = 0.5 they are -2.5625 and 0.9375: the negative one is larger in
    magnitude."""
    f = u * u * v * v
    f_u, f_v = 2 * u * v * v, 2 * u * u * v
    f_uu, f_vv, f_uv = 2 * v * v, 2 * u * u, 4 * u * v
    h_uu = 2 * f_u * f_u + 2 * (f - 1) * f_uu
    h_vv = 2 * f_v * f_v + 2 * (f - 1) * f_vv
    h_uv = 2 * f_u * f_v + 2 * (f - 1) * f_uv
    return np.linalg.eigvalsh(np.array([[h_uu, h_uv], [h_uv, h_vv]]))


def scalar_eos_gd(u, v, lr, steps):
    """Full-batch gradient descent on L(u, v); returns the final (u, v)."""
    for _ in range(steps):
        g_u, g_v = scalar_eos_grads(u, v)
        u, v = u - lr * g_u, v - lr * g_v
    return u, v


# ---------------------------------------------------------------------------
# Learned radius, LETS (DESIGN section 3): one SAM/ASAM step with plain SGD
# from w_t, then the squared generalization gap at w_{t+1}.


def lets_step(params, x, y, rho, lr, loss_and_grads, eps_fn):
    """w_{t+1}(rho) and (g, g_adv) at w_t; `eps_fn(params, g, rho)`."""
    _, g = loss_and_grads(params, x, y)
    eps = eps_fn(params, g, rho)
    _, g_adv = loss_and_grads([p + e for p, e in zip(params, eps)], x, y)
    return [p - lr * ga for p, ga in zip(params, g_adv)], g, g_adv


def lets_objective(params, x, y, xv, yv, rho, lr, loss_and_grads, eps_fn):
    """F(rho) = 1/2 (L_val(w_{t+1}) - L_train(w_{t+1}))^2."""
    w1, _, _ = lets_step(params, x, y, rho, lr, loss_and_grads, eps_fn)
    gap = loss_and_grads(w1, xv, yv)[0] - loss_and_grads(w1, x, y)[0]
    return 0.5 * gap**2


def lets_hypergradient_fd(
    params, x, y, xv, yv, rho, lr, loss_and_grads, eps_fn, h=1e-5
):
    """dF/drho by central differences of the true objective."""
    f = [
        lets_objective(params, x, y, xv, yv, r, lr, loss_and_grads, eps_fn)
        for r in (rho + h, rho - h)
    ]
    return (f[0] - f[1]) / (2 * h)


def lets_hypergradient(params, x, y, xv, yv, rho, lr, loss_and_grads, eps_fn):
    """The one-step approximation: gap (g_val - g_train) . dw/drho with
    dw/drho = -lr (g_adv - g) / rho. Returns (dF/drho, gap)."""
    w1, g, g_adv = lets_step(params, x, y, rho, lr, loss_and_grads, eps_fn)
    dw = [-lr * (ga - g0) / rho for ga, g0 in zip(g_adv, g)]
    loss_v, g_v = loss_and_grads(w1, xv, yv)
    loss_t, g_t = loss_and_grads(w1, x, y)
    gap = loss_v - loss_t
    dot = sum(np.sum((a - b) * d) for a, b, d in zip(g_v, g_t, dw))
    return gap * dot, gap


def lets_hypergradient_diagonal(
    params, x, y, xv, yv, rho, lr, loss_and_grads, eps_fn, normalize=True
):
    """The paper's approximation: H(w + eps) ~ diag(g_adv * g_adv), so
    dw/drho = -lr g_adv^2 deps/drho with deps/drho = g / ||g|| (g when
    unnormalized). Returns (dF/drho, gap)."""
    w1, g, g_adv = lets_step(params, x, y, rho, lr, loss_and_grads, eps_fn)
    norm = np.sqrt(sum(np.sum(g0**2) for g0 in g)) if normalize else 1.0
    norm = norm + (EPS if normalize else 0.0)
    dw = [-lr * ga**2 * g0 / norm for ga, g0 in zip(g_adv, g)]
    loss_v, g_v = loss_and_grads(w1, xv, yv)
    loss_t, g_t = loss_and_grads(w1, x, y)
    gap = loss_v - loss_t
    dot = sum(np.sum((a - b) * d) for a, b, d in zip(g_v, g_t, dw))
    return gap * dot, gap


def lets_plain_step(rho, rho_grad, lr, bounds):
    """The paper's upper-level step: rho - lr dF/drho, clipped."""
    return float(np.clip(rho - lr * rho_grad, *bounds))


def log_barrier_loss_and_grads(params, x, y):
    """L(w) = -sum_i log(y_i - x_i . w) over the samples (sum reduction).
    With x the identity, L = -sum log(y_i - w_i) and its Hessian is
    diag(g * g) exactly: the paper's diagonal approximation is exact."""
    (w,) = params
    r = y[:, 0] - x @ w[:, 0]
    loss = -np.sum(np.log(r))
    grad = x.T @ (1.0 / r)
    return loss, [grad[:, None]]


def lets_controller(rho, rho_grad, m, v, count, lr, bounds, b1=0.9, b2=0.999):
    """One Adam step on log rho with d = rho dF/drho; returns (rho, m, v)."""
    d = rho * rho_grad
    count = count + 1
    m = b1 * m + (1 - b1) * d
    v = b2 * v + (1 - b2) * d**2
    m_hat = m / (1 - b1**count)
    v_hat = v / (1 - b2**count)
    step = lr * m_hat / (np.sqrt(v_hat) + 1e-12)
    return float(np.clip(rho * np.exp(-step), *bounds)), m, v


# ---------------------------------------------------------------------------
# RSAM (DESIGN section 2): manifolds, metrics and one Riemannian SAM step.
# A kernel on Stiefel is the matrix of shape (fan_in, units) = (prod of all
# axes but the last, last axis); the sphere is over the whole variable.


def _as_matrix(w):
    return w.reshape(-1, w.shape[-1])


def qf(a):
    """Q of a thin QR with the diagonal of R made positive."""
    q, r = np.linalg.qr(a)
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def stiefel_project(u, v):
    """P_U(V) = V - U sym(U^T V)."""
    um, vm = _as_matrix(u), _as_matrix(v)
    utv = um.T @ vm
    return (vm - um @ (0.5 * (utv + utv.T))).reshape(v.shape)


def stiefel_retract(u, step):
    """R_U(u) = qf(U + u)."""
    return qf(_as_matrix(u + step)).reshape(u.shape)


def sphere_project(w, v):
    """P_w(v) = v - (w.v / |w|^2) w."""
    return v - (np.sum(w * v) / np.sum(w * w)) * w


def sphere_retract(w, u):
    """R_w(u) = |w| (w + u) / |w + u|."""
    return np.linalg.norm(w) * (w + u) / np.linalg.norm(w + u)


RSAM_PROJECT = {
    "euclidean": lambda w, v: v,
    "sphere": sphere_project,
    "stiefel": stiefel_project,
}
RSAM_RETRACT = {
    "euclidean": lambda w, u: w + u,
    "sphere": sphere_retract,
    "stiefel": stiefel_retract,
}


def rsam_metric(params, grads, metric, weight_like, eta, fisher, damping):
    """Diagonal metric D per variable: 1, T^-2 (adaptive) or EMA(g^2)+damping.

    `fisher` is `(ema, weight)` with the debiased EMA `ema / weight`.
    """
    if metric == "identity":
        return [np.ones_like(w) for w in params]
    if metric == "adaptive":
        return [
            (np.abs(w) + eta) ** -2.0 if wl else np.ones_like(w)
            for w, wl in zip(params, weight_like)
        ]
    ema, weight = fisher
    return [f / weight + damping for f in ema]


def fisher_update(fisher, grads, decay):
    """EMA of g^2 and its total weight 1 - decay^t (start: zeros, 0)."""
    ema, weight = fisher
    ema = [decay * f + (1 - decay) * g**2 for f, g in zip(ema, grads)]
    return ema, decay * weight + (1 - decay)


def rsam_eps(params, grads, manifolds, rho, d):
    """eps = rho xi / (||xi||_D + 1e-12), xi = P_w(D^-1 g)."""
    xi = [
        RSAM_PROJECT[m](w, g / dd)
        for w, g, dd, m in zip(params, grads, d, manifolds)
    ]
    norm = np.sqrt(sum(np.sum(x * dd * x) for x, dd in zip(xi, d)))
    return [rho * x / (norm + EPS) for x in xi]


def train_rsam(
    params,
    batches,
    loss_and_grads,
    manifolds,
    rho,
    lr,
    metric="identity",
    eta=0.01,
    weight_like=None,
    damping=1e-3,
    decay=0.95,
):
    """RSAM with plain SGD over `batches`; returns the final parameters.

    Per step: g at w; eps in the tangent space at w; g_adv at R_w(eps),
    projected onto the tangent space at w; w = R_w(-lr P_w(g_adv)).
    """
    params = [np.array(p, dtype=np.float64) for p in params]
    fisher = ([np.zeros_like(p) for p in params], 0.0)
    for x, y in batches:
        _, g = loss_and_grads(params, x, y)
        if metric == "fisher":
            fisher = fisher_update(fisher, g, decay)
        d = rsam_metric(params, g, metric, weight_like, eta, fisher, damping)
        eps = rsam_eps(params, g, manifolds, rho, d)
        w_adv = [
            RSAM_RETRACT[m](w, e) for w, e, m in zip(params, eps, manifolds)
        ]
        _, g_adv = loss_and_grads(w_adv, x, y)
        params = [
            RSAM_RETRACT[m](w, -lr * RSAM_PROJECT[m](w, ga))
            for w, ga, m in zip(params, g_adv, manifolds)
        ]
    return params


# ---------------------------------------------------------------------------
# SAMPa (Xie, Pethick, Cevher, NeurIPS 2024), from the paper's equations:
#   w_adv = w_t + rho g_y / ||g_y||,  y_t+1 = inner step from w_t with g_y,
#   w_t+1 = inner step from w_t with (1 - lam) grad(w_adv) + lam grad(y_t+1),
#   g_y = grad(y_t+1); g_y = 0 before the first step.


def train_sampa(
    params,
    batches,
    loss_and_grads,
    rho,
    lam,
    lr,
    momentum=0.0,
    adversarial_batch="previous",
    fits=(),
):
    """SAMPa (Xie et al.): g_adv at w + rho g_y/||g_y|| on the previous
    batch (`"previous"`; the step's own on the first step and when the
    batch's shape differs from the first batch's, which keeps nothing),
    g_y at the auxiliary point on the step's batch. A new `fit` starts at
    each step index in `fits`: its first batch's shape is kept from then
    on, and nothing is kept yet."""
    params = [np.array(p, dtype=np.float64) for p in params]
    velocity = [np.zeros_like(p) for p in params]
    g_y = [np.zeros_like(p) for p in params]
    kept, shape = None, batches[0][0].shape
    for step, (x, y) in enumerate(batches):
        if step in fits and x.shape != shape:
            kept, shape = None, x.shape
        adv_x, adv_y = (x, y)
        if adversarial_batch == "previous":
            if x.shape != shape:
                kept = None
            elif kept is not None:
                adv_x, adv_y = kept
            if x.shape == shape:
                kept = (x, y)
        w_adv = [w + e for w, e in zip(params, sam_eps(g_y, rho))]
        # The auxiliary point: the inner step with g_y, its state discarded.
        y_next, _ = sgd_step(params, g_y, velocity, lr, momentum)
        _, g_adv = loss_and_grads(w_adv, adv_x, adv_y)
        _, g_y = loss_and_grads(y_next, x, y)
        g = [(1 - lam) * a + lam * b for a, b in zip(g_adv, g_y)]
        params, velocity = sgd_step(params, g, velocity, lr, momentum)
    return params


# ---------------------------------------------------------------------------
# R-Stiefel layers and RSAM with a canonical metric and per-group radii
# (issue 17). A StiefelDense kernel is U diag(s), U^T U = I. The canonical
# metric of Stiefel is the ambient metric D_U = I - U U^T / 2, under which
# the Riemannian gradient of G is P_U(D_U^-1 G) = G - U G^T U.


def stiefel_dense_forward(u, s, b, x, activation=None):
    """activation(x (U diag(s)) + b)."""
    out = x @ (u * s) + b
    return out if activation is None else activation(out)


def stiefel_conv_forward(u, s, b, x, padding_left=None):
    """Channels-last stride-1 convolution with kernel U diag(s), via patches.

    Returns (n, positions, filters); `padding_left` pads before 'valid'.
    """
    kernel = u * s
    patches = conv_patches(x, kernel.shape[:2], pad_left=padding_left)
    out = patches @ kernel.reshape(-1, kernel.shape[-1]) + b
    return out.reshape(x.shape[0], -1, kernel.shape[-1])


def stiefel_canonical_grad(u, g):
    """Riemannian gradient under the canonical metric: G - U G^T U."""
    um, gm = _as_matrix(u), _as_matrix(g)
    return (gm - um @ gm.T @ um).reshape(g.shape)


def stiefel_canonical_inner(u, a, b):
    """tr(A^T (I - U U^T / 2) B)."""
    um, am, bm = _as_matrix(u), _as_matrix(a), _as_matrix(b)
    return float(np.sum(am * bm) - 0.5 * np.sum((um.T @ am) * (um.T @ bm)))


def stiefel_mlp_loss_and_grads(params, x, y):
    """`tanh(x U diag(s) + b1) W2 + b2` with MSE; params [U, s, b1, W2, b2]."""
    u, s, b1, w2, b2 = params
    loss, (g_k, g_b1, g_w2, g_b2) = mlp_loss_and_grads(
        [u * s, b1, w2, b2], x, y
    )
    return loss, [g_k * s, np.sum(g_k * u, axis=0), g_b1, g_w2, g_b2]


def train_rsam_stiefel_layer(params, batches, rho, flat_rho, lr):
    """RSAM with plain SGD on [U, s, b1, W2, b2], U on Stiefel (canonical).

    Per step: g at w; xi_U = G_U - U G_U^T U, xi = g on flat variables;
    eps = rho xi / ||xi|| over all variables (flat_rho None), or
    eps_U = rho xi_U / ||xi_U||_c and eps_flat = flat_rho g / ||g_flat||;
    g_adv at (qf(U + eps_U), w + eps); U = qf(U - lr (G'_U - U G'^T_U U)),
    w = w - lr g_adv on the flat variables.
    """
    params = [np.array(p, dtype=np.float64) for p in params]
    for x, y in batches:
        _, g = stiefel_mlp_loss_and_grads(params, x, y)
        u = params[0]
        xi = [stiefel_canonical_grad(u, g[0])] + list(g[1:])
        sq_u = stiefel_canonical_inner(u, xi[0], xi[0])
        sq_flat = sum(float(np.sum(v * v)) for v in xi[1:])
        if flat_rho is None:
            scale_u = scale_flat = rho / (np.sqrt(sq_u + sq_flat) + EPS)
        else:
            scale_u = rho / (np.sqrt(sq_u) + EPS)
            scale_flat = flat_rho / (np.sqrt(sq_flat) + EPS)
        w_adv = [stiefel_retract(u, scale_u * xi[0])] + [
            w + scale_flat * v for w, v in zip(params[1:], xi[1:])
        ]
        _, g_adv = stiefel_mlp_loss_and_grads(w_adv, x, y)
        step_u = -lr * stiefel_canonical_grad(u, g_adv[0])
        params = [stiefel_retract(u, step_u)] + [
            w - lr * ga for w, ga in zip(params[1:], g_adv[1:])
        ]
    return params


# ---------------------------------------------------------------------------
# The cheap variants (issue 16), with Keras SGD as the inner optimizer.


def _dot(a, b):
    return sum(np.sum(x * y) for x, y in zip(a, b))


def adaptive_decisions(
    grad_sq, total_steps, decay=0.9, lambda_1=-1.0, lambda_2=1.0
):
    """AE-SAM: (decisions, mean, variance) over a sequence of ||g_t||^2.

    mu_t = d mu + (1 - d) x_t; s2_t = d s2 + (1 - d)(x_t - mu_t)^2;
    c_t = l1 t/T + l2 (1 - t/T); SAM iff x_t >= mu_t + c_t sqrt(s2_t).
    """
    mean = variance = 0.0
    decisions = []
    for t, x in enumerate(grad_sq):
        mean = decay * mean + (1 - decay) * x
        variance = decay * variance + (1 - decay) * (x - mean) ** 2
        f = min(t / total_steps, 1.0)
        c = lambda_1 * f + lambda_2 * (1 - f)
        decisions.append(x >= mean + c * np.sqrt(variance))
    return decisions, mean, variance


def train_variant(
    params,
    batches,
    loss_and_grads,
    lr,
    momentum,
    variant,
    rho=0.05,
    alpha=0.1,
    k=1,
):
    """GSAM, LookSAM or MomentumSAM with Keras SGD; final parameters.

    gsam:    g_use = g_adv - alpha (g - <g, g_adv>/||g_adv||^2 g_adv)
    looksam: every k: g_v = g_adv - <g, g_adv>/||g||^2 g, g_use = g_adv;
             else g_use = g + alpha ||g||/||g_v|| g_v
    msam:    g_use = grad L(w - rho v/||v||), v the accumulated gradient
             (Keras' SGD velocity is -lr v, so v/||v|| = -vel/||vel||)
    """
    params = [np.array(p, dtype=np.float64) for p in params]
    velocity = [np.zeros_like(p) for p in params]
    g_v = [np.zeros_like(p) for p in params]
    for step, (x, y) in enumerate(batches):
        if variant == "msam":
            norm = np.sqrt(_dot(velocity, velocity))
            w_adv = [
                p + rho * v / (norm + EPS) for p, v in zip(params, velocity)
            ]
            _, g_use = loss_and_grads(w_adv, x, y)
        else:
            _, g = loss_and_grads(params, x, y)
            if variant == "looksam" and step % k != 0:
                scale = (
                    alpha
                    * np.sqrt(_dot(g, g))
                    / (np.sqrt(_dot(g_v, g_v)) + EPS)
                )
                g_use = [gi + scale * vi for gi, vi in zip(g, g_v)]
            else:
                eps = sam_eps(g, rho)
                _, g_adv = loss_and_grads(
                    [p + e for p, e in zip(params, eps)], x, y
                )
                if variant == "gsam":
                    c = _dot(g, g_adv) / (_dot(g_adv, g_adv) + EPS)
                    g_use = [
                        a - alpha * (gi - c * a) for a, gi in zip(g_adv, g)
                    ]
                else:
                    c = _dot(g, g_adv) / (_dot(g, g) + EPS)
                    g_v = [a - c * gi for a, gi in zip(g_adv, g)]
                    g_use = g_adv
        params, velocity = sgd_step(params, g_use, velocity, lr, momentum)
    return params
