"""The projection, in float64 on the host.

The inputs `A` (n x d) a layer receives are streamed into their moments;
the minimum-norm weights with the same outputs on them are the projection
of the weights onto the range of the inputs.
"""

import numpy as np


class Moments:
    """Streamed count, mean and centered scatter of input rows (float64).

    Batches are merged with the pairwise update of Chan et al., so that the
    centered scatter `sum (a - mean)^T (a - mean)` never goes through the
    cancellation-prone `sum a^T a - n mean^T mean`.
    """

    def __init__(self, dim):
        self.n = 0
        self.mean = np.zeros(dim)
        self.scatter = np.zeros((dim, dim))

    def update(self, rows):
        rows = np.asarray(rows, dtype=np.float64)
        m = rows.shape[0]
        if m == 0:
            return
        mean_b = rows.mean(axis=0)
        centered = rows - mean_b
        delta = mean_b - self.mean
        total = self.n + m
        self.scatter += centered.T @ centered
        self.scatter += np.outer(delta, delta) * (self.n * m / total)
        self.mean += delta * (m / total)
        self.n = total

    def gram(self):
        """`G = sum [a 1]^T [a 1]`, the uncentered Gram with a ones column."""
        d = self.mean.shape[0]
        g = np.empty((d + 1, d + 1))
        g[:d, :d] = self.scatter + self.n * np.outer(self.mean, self.mean)
        g[:d, d] = g[d, :d] = self.n * self.mean
        g[d, d] = self.n
        return g


def _range_basis(gram, rtol):
    """Orthonormal basis of the range of a PSD matrix: eigenvalue > rtol max."""
    lam, vec = np.linalg.eigh(gram)
    top = lam[-1] if lam.size else 0.0
    if top <= 0.0:
        return vec[:, :0]
    return vec[:, lam > rtol * top]


def project(kernel, bias, moments, rtol, minimize):
    """Minimum-norm weights with the same outputs on the streamed inputs.

    ```
    minimize="kernel":  W' = U U^T W,  U spans the rows of A - 1 mean
                        b' = b + mean (W - W')
    minimize="joint":   [W'; b'] = U U^T [W; b],  U spans the rows of [A 1]
    no bias:            W' = U U^T W,  U spans the rows of A
    ```

    Returns `(kernel, bias, rank, dim)`, float64.
    """
    if bias is None:
        gram = moments.gram()[:-1, :-1]
        u = _range_basis(gram, rtol)
        return u @ (u.T @ kernel), None, u.shape[1], kernel.shape[0]
    if minimize == "kernel":
        u = _range_basis(moments.scatter, rtol)
        new_kernel = u @ (u.T @ kernel)
        new_bias = bias + moments.mean @ (kernel - new_kernel)
        return new_kernel, new_bias, u.shape[1], kernel.shape[0]
    theta = np.concatenate([kernel, bias[None, :]], axis=0)
    u = _range_basis(moments.gram(), rtol)
    theta = u @ (u.T @ theta)
    return theta[:-1], theta[-1], u.shape[1], theta.shape[0]
