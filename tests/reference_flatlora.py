"""Numpy reference of Flat-LoRA, written from the paper's equations.

Li, He, Li, Wang, Shang, Huang, "Flat-LoRA: Low-Rank Adaptation over a Flat
Loss Landscape", ICML 2025 (arXiv 2409.14396). Flat-LoRA trains the LoRA
factors on the expected loss under a random perturbation of the *merged*
weight, one forward/backward pass per step:

```
min_{A,B}  E_{eps ~ N} L(W + s A B + eps)     # Bayesian expected loss

W' = W + s A B                    # merged LoRA weight, s = alpha / r
eps_ij ~ N(0, sigma_t^2 * ||W'_{:,j}||^2 / n)  # Keras layout (see below)
g = grad_{A,B,others} L(W + s A B + eps)       # ONE pass, at W' + eps
(A, B, others) <- inner optimizer step with g  # applied at the unperturbed
                                               # A, B (eps is never stored)
```

- The paper writes a linear layer as `y = W x` with `W` of shape
  (m, n) = (out, in): each *row* `W'_{i,:}` (one output unit, a "filter")
  gets its own noise scale `sigma * ||W'_{i,:}||_2 / sqrt(n)`, `n` the input
  dimension, so the variance the noise adds to an output,
  `sigma^2 ||W'_{i,:}||^2 ||x||^2 / n`, does not grow with the width.
  Keras kernels are (in, out): the paper's row `i` is the Keras *column*
  `j`, the norm runs over the input axis (axis 0) and `n = kernel.shape[0]`.
  For an `EinsumDense` kernel the norm runs over the axes contracted with
  the input and `n` is their size product (`in_axes` below).
- Only the layers carrying LoRA are perturbed (their frozen `kernel`, which
  is what gets merged); biases, norms and embeddings are not.
- sigma may follow the paper's cosine-increasing schedule over training,
  `sigma_t = sigma * (1 - cos(pi * t / T)) / 2` (0 at the first step,
  sigma at the last); a constant sigma is the schedule-free case.
- The noise is fresh at every step and never stored: it is regenerated
  from a seed (for the step's own pass; nothing has to be undone because
  `W' + eps` is handed to the pass as a value).

Here the noise enters as `z`, standard normal draws of the kernel's shape:
the scale is the algorithm, the random number generator is not.
"""

import math

import numpy as np


def merged_kernel(kernel, lora_a, lora_b, scale):
    """`W' = W + s A B` for a Keras LoRA kernel (in, out) = (in, r) @ (r, out).

    For an `EinsumDense` kernel `lora_a` is (in..., r)-shaped as Keras
    makes it; `A B` is then `tensordot(A, B, 1)`.
    """
    return np.asarray(kernel, "float64") + scale * np.tensordot(
        np.asarray(lora_a, "float64"), np.asarray(lora_b, "float64"), 1
    )


def noise_std(merged, sigma, in_axes=(0,)):
    """Per-output-unit std `sigma * ||W'_{:, j}|| / sqrt(n)`, broadcastable.

    `in_axes`: the kernel axes contracted with the layer's input (Dense:
    axis 0). `n` is the product of their sizes.
    """
    merged = np.asarray(merged, "float64")
    n = math.prod(merged.shape[a] for a in in_axes)
    norm = np.sqrt(np.sum(merged**2, axis=tuple(in_axes), keepdims=True))
    return sigma * norm / np.sqrt(n)


def perturbation(merged, sigma, z, in_axes=(0,)):
    """`eps = noise_std(W') * z`, `z` standard normal of the kernel's shape."""
    return noise_std(merged, sigma, in_axes) * np.asarray(z, "float64")


def sigma_at(step, sigma, total_steps):
    """The paper's cosine-increasing sigma: 0 at step 0, sigma at the end."""
    t = min(max(step, 0), total_steps) / total_steps
    return sigma * 0.5 * (1.0 - math.cos(math.pi * t))


# ---------------------------------------------------------------------------
# One LoRA Dense layer under MSE: loss and gradients in closed form.


def lora_dense_grads(x, y, kernel, bias, lora_a, lora_b, scale, eps):
    """Loss and gradients of `mean((x (W + eps + s A B) + b - y)^2)`.

    Returns `(loss, {"lora_a", "lora_b", "bias"})`: the gradients with
    respect to the trainable variables of a LoRA `Dense` (the kernel `W` is
    frozen), evaluated at the perturbed merged weight `W' + eps`.
    """
    x, y = np.asarray(x, "float64"), np.asarray(y, "float64")
    a, b = np.asarray(lora_a, "float64"), np.asarray(lora_b, "float64")
    w_eff = merged_kernel(kernel, a, b, scale) + eps  # W' + eps
    pred = x @ w_eff + np.asarray(bias, "float64")
    r = 2.0 * (pred - y) / pred.size  # dL/dpred (Keras "mse": mean)
    g_w = x.T @ r  # dL/dW'
    grads = {
        "lora_a": scale * g_w @ b.T,
        "lora_b": scale * a.T @ g_w,
        "bias": r.sum(axis=0),
    }
    return float(np.mean((pred - y) ** 2)), grads


def flat_lora_sgd(
    x, y, kernel, bias, lora_a, lora_b, scale, sigma, zs, lr, batch_size
):
    """Flat-LoRA with plain SGD(lr) on one LoRA Dense, one step per batch.

    `zs[t]`: the standard normal draw of step t (kernel-shaped); `sigma` a
    float or a function of the step. Returns the final
    `(bias, lora_a, lora_b)` and the perturbations used.
    """
    bias = np.asarray(bias, "float64")
    a, b = np.asarray(lora_a, "float64"), np.asarray(lora_b, "float64")
    batches = [
        (x[i : i + batch_size], y[i : i + batch_size])
        for i in range(0, len(x), batch_size)
    ]
    epss = []
    for t, (xb, yb) in enumerate(batches):
        s_t = sigma(t) if callable(sigma) else sigma
        eps = perturbation(merged_kernel(kernel, a, b, scale), s_t, zs[t])
        _, g = lora_dense_grads(xb, yb, kernel, bias, a, b, scale, eps)
        # descend at the unperturbed A, B (eps is never stored)
        a, b = a - lr * g["lora_a"], b - lr * g["lora_b"]
        bias = bias - lr * g["bias"]
        epss.append(eps)
    return (bias, a, b), epss


def recover_perturbation(
    x_eye, y, kernel, bias, lora_a, lora_b, scale, b_new, lr
):
    """The `eps` an SGD(lr) step must have used, from the step's B update.

    With the batch `x = I_n` and a square, invertible `A` (rank r = n),
    `grad_B = s A^T R` with `R = 2 (W' + eps + b - y) / (n m)`, so
    `eps = (n m / 2) A^{-T} (B - B_new) / (lr s) - (W' + b - y)`.
    This lets a test read the noise an implementation drew, whatever its
    random number generator, and check its scale and its reuse.
    """
    del x_eye  # the identity batch: documents the set-up only
    a = np.asarray(lora_a, "float64")
    b = np.asarray(lora_b, "float64")
    y = np.asarray(y, "float64")
    grad_b = (b - np.asarray(b_new, "float64")) / lr
    r = np.linalg.solve(a.T, grad_b / scale)
    merged = merged_kernel(kernel, a, b, scale)
    return 0.5 * r * y.size - (merged + np.asarray(bias, "float64") - y)
