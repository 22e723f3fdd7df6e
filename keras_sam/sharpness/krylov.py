"""Krylov solvers on a Hessian-vector product: Lanczos and power iteration.

Each iteration is one Hessian-vector product, one compiled vector update and
one read of two scalars; the tridiagonal matrix and the orthogonality
estimates are small and live in numpy. The solvers see the Hessian only
through an `iterate` function (`keras_sam.sharpness.Hessian` builds it), so
they know nothing of models or data.
"""

import math

import numpy as np
from keras import ops

from keras_sam.sharpness.vectors import NORM_EPSILON
from keras_sam.sharpness.vectors import l2_norm

# float32 unit roundoff and the semi-orthogonality level sqrt(eps): while
# |q_i . q_j| stays below it, the Ritz values of T_k are as accurate as with
# an exactly orthonormal basis (Simon 1984).
_EPS = float(np.finfo(np.float32).eps)
_SEMI_ORTHOGONAL = math.sqrt(_EPS)


def _lanczos_step(w, q, q_previous, beta_previous):
    """The three-term recurrence on `w = H q` (modified Gram-Schmidt order):

    ```
    w     = H q_k - beta_{k-1} q_{k-1}
    alpha = q_k . w ;  w = w - alpha q_k ;  beta = ||w|| ;  q_{k+1} = w / beta
    ```
    """
    w = ops.subtract(w, ops.multiply(q_previous, beta_previous))
    alpha = ops.vdot(q, w)
    w = ops.subtract(w, ops.multiply(q, alpha))
    beta = ops.norm(w)
    q_next = ops.divide(w, ops.maximum(beta, NORM_EPSILON))
    return q_next, beta, ops.stack([alpha, beta])


def lanczos_block_step(w, q, q_previous, beta_previous):
    """`_lanczos_step` as one iteration of `lanczos_steps`."""
    q_next, beta, stats = _lanczos_step(w, q, q_previous, beta_previous)
    block = ops.expand_dims(q_next, 0)
    return q_next, q, beta, block, ops.expand_dims(stats, 0)


def lanczos_steps(matvec, k, q, q_previous, beta):
    """`k` iterations of `_lanczos_step` with `w = matvec(q)`, in a loop of
    the compiled function.

    Returns `(q, q_previous, beta)` after the last, the new basis vectors
    `q_{j+1}..q_{j+k}` as the rows of `block` and their `(alpha, beta)` as
    the rows of `stats`.
    """
    if k == 1:
        return lanczos_block_step(matvec(q), q, q_previous, beta)

    def body(i, carry):
        q, q_previous, beta, block, stats = carry
        q_next, beta, row = _lanczos_step(matvec(q), q, q_previous, beta)
        block = ops.slice_update(block, (i, 0), ops.expand_dims(q_next, 0))
        stats = ops.slice_update(stats, (i, 0), ops.expand_dims(row, 0))
        return q_next, q, beta, block, stats

    block = ops.zeros((k, q.shape[0]), dtype=q.dtype)
    stats = ops.zeros((k, 2), dtype=q.dtype)
    return ops.fori_loop(0, k, body, (q, q_previous, beta, block, stats))


def power_step(w, v):
    """`theta = v . H v`, `v <- H v / ||H v||`."""
    theta = ops.vdot(v, w)
    norm = ops.norm(w)
    v_next = ops.divide(w, ops.maximum(norm, NORM_EPSILON))
    return v_next, ops.stack([theta, norm])


def shifted_power_step(w, v, mu):
    """`power_step` on `H - mu I`: `w = H v - mu v`; `theta` is of the
    shifted operator."""
    w = ops.subtract(w, ops.multiply(v, mu))
    theta = ops.vdot(v, w)
    norm = ops.norm(w)
    v_next = ops.divide(w, ops.maximum(norm, NORM_EPSILON))
    return v_next, ops.stack([theta, norm])


def _scalars(tensor):
    return [float(value) for value in ops.convert_to_numpy(tensor)]


def _orthogonality_estimate(omega, omega_previous, alphas, betas, beta, norm):
    """Simon's recurrence for `omega_{k+1, j} = q_{k+1} . q_j`, `j <= k`.

    Taking `q_j .` of `beta_k q_{k+1} = H q_k - alpha_k q_k -
    beta_{k-1} q_{k-1}` and using `H q_j` from step `j`:

    ```
    beta_k w_{k+1,j} = beta_j w_{k,j+1} + (alpha_j - alpha_k) w_{k,j}
                       + beta_{j-1} w_{k,j-1} - beta_{k-1} w_{k-1,j}
                       +- eps ||H||           (the rounding of both steps)
    w_{k+1,k} = eps ||H|| / beta_k,   w_{k+1,k+1} = 1
    ```

    `omega` holds `w_{k,0..k}`, `omega_previous` `w_{k-1,0..k-1}`,
    `alphas` `alpha_0..alpha_k` and `betas` `beta_0..beta_{k-1}`; `beta` is
    `beta_k` and `norm` an estimate of `||H||`. Only scalars: O(k) per step.
    """
    k = len(alphas) - 1
    alpha = np.asarray(alphas[:k])
    beta_j = np.asarray(betas[:k])
    term = beta_j * omega[1 : k + 1] + (alpha - alphas[k]) * omega[:k]
    if k > 1:
        term[1:] += beta_j[: k - 1] * omega[: k - 1]
    if k > 0:
        term -= betas[k - 1] * omega_previous[:k]
    # The rounding terms, added in the direction that makes |w| larger.
    term += np.where(term >= 0, 1.0, -1.0) * _EPS * norm
    return np.concatenate([term / beta, [_EPS * norm / beta, 1.0]])


def _reorthogonalize(blocks, q):
    """`q` made orthogonal to the rows of the matrices `blocks` (classical
    Gram-Schmidt, block by block, repeated once if it cancelled much of `q`:
    "twice is enough"), returned normalized with the norm it had before."""
    norm = 1.0  # q arrives normalized
    for _ in range(2):
        for rows in blocks:
            coefficients = ops.matmul(rows, ops.expand_dims(q, 1))  # (m, 1)
            q = ops.subtract(
                q, ops.matmul(ops.transpose(coefficients), rows)[0]
            )
        previous, norm = norm, l2_norm(q)
        if norm > 0.7 * previous:  # little was cancelled: once is enough
            break
    return ops.divide(q, max(norm, NORM_EPSILON)), norm


# The eigenvalue the solvers look for: the largest (algebraic) or the one of
# largest magnitude.
WHICH = ("algebraic", "magnitude")


def _ritz_error(eigenvalues, eigenvectors, index, beta):
    """Error bound `min(r, r^2 / gap)` of the Ritz value `index` (0: the
    smallest, -1: the largest), `r = beta_k |s_k|` its residual and `gap`
    the distance to the next Ritz value."""
    residual = beta * abs(eigenvectors[-1, index])
    if len(eigenvalues) == 1:
        return residual
    neighbour = eigenvalues[-2] if index == -1 else eigenvalues[1]
    gap = abs(eigenvalues[index] - neighbour)
    if gap > 0:
        return min(residual, residual**2 / gap)
    return residual


def lanczos(
    iterate, start, max_iter, tol, return_vector=False, which="algebraic"
):
    """Largest Ritz pair by Lanczos with partial reorthogonalization.

    `which="algebraic"` gives the largest Ritz value; `"magnitude"` the
    extreme one of largest absolute value, stopping only once both ends
    of the spectrum meet the tolerance (the other end could otherwise
    still overtake it).

    `iterate(n, q, q_previous, beta)` runs `1 <= k <= n` iterations of the
    recurrence (`lanczos_steps`) in one compiled call; their `(alpha, beta)`
    are read in one go and checked one iteration at a time, so the result
    does not depend on `k` (iterations computed past the stop are dropped).
    The basis is reorthogonalized only when Simon's estimate of the loss of
    orthogonality passes sqrt(eps); then the iterations after that one are
    dropped too and the next call starts from the reorthogonalized vector.
    On a top eigenvalue that rarely happens before convergence, so an
    iteration costs one product and a few vector operations, not O(k).
    """
    q = ops.divide(start, ops.norm(start))
    q_previous = ops.zeros_like(q)
    beta_tensor = ops.zeros((), dtype="float32")
    # The basis q_0, q_1, ... in blocks of rows, kept for reorthogonalization
    # and the eigenvector.
    blocks = [ops.expand_dims(q, 0)]
    alphas, betas = [], []
    omega_previous, omega = np.zeros(0), np.ones(1)
    norm = 0.0  # running Gershgorin bound on ||T_k||, standing in for ||H||
    theta, ritz = 0.0, np.ones(1)
    done = False
    follow_up = False  # the vector after a reorthogonalized one is due too
    while not done:
        n = 1 if follow_up else max_iter - len(alphas)
        carry = iterate(n, q, q_previous, beta_tensor)
        q_last, q_previous_last, beta_last, block, stats = carry
        restart = None
        for i, (alpha, beta) in enumerate(ops.convert_to_numpy(stats)):
            alpha, beta = float(alpha), float(beta)
            if not (math.isfinite(alpha) and math.isfinite(beta)):
                # A non-finite product (diverged weights): no eigenvalue.
                return math.nan, ops.full_like(q, math.nan)
            alphas.append(alpha)
            norm = max(norm, abs(alpha) + beta + (betas[-1] if betas else 0.0))
            theta, ritz, error = _ritz_pair(alphas, betas, beta, which)
            done = (
                error <= tol * abs(theta)
                or beta <= NORM_EPSILON * max(norm, 1.0)
                or len(alphas) >= max_iter
            )
            if done:
                break
            omega_next = _orthogonality_estimate(
                omega, omega_previous, alphas, betas, beta, norm
            )
            lost = np.max(np.abs(omega_next[:-1])) > _SEMI_ORTHOGONAL
            if lost or follow_up:
                # q_{j+1} = block[i] against q_0..q_j; the rest of the block
                # was computed from the unorthogonalized vector: dropped.
                # q_{j+2} follows (Simon's two-step rule): it is made from
                # q_j, whose loss of orthogonality the recurrence carries
                # forward, so without it the estimate passes again at once.
                # Joined once for the pair: many small products cost more
                # than one copy of the basis.
                blocks, kept, q_next, scale = _against_basis(blocks, block, i)
                beta *= scale
                omega_next[:-1] = _EPS * norm / beta
                restart = (i, kept, q_next, beta)
                follow_up = not follow_up
            betas.append(beta)
            omega_previous, omega = omega, omega_next
            if restart is not None:
                break
        if done:
            blocks.append(block)
        elif restart is None:
            blocks.append(block)
            q, q_previous, beta_tensor = q_last, q_previous_last, beta_last
        else:
            i, kept, q_next, beta = restart
            q_previous = block[i - 1] if i > 0 else q
            blocks += kept + [ops.expand_dims(q_next, 0)]
            q, beta_tensor = q_next, ops.convert_to_tensor(np.float32(beta))
    if not return_vector:
        return theta, None
    return theta, _ritz_vector(blocks, ritz, len(alphas))


def _ritz_pair(alphas, betas, beta, which):
    """`(theta, s, error)`: the Ritz value `theta` of the tridiagonal
    `T_k` (the largest, or with `which="magnitude"` the one of largest
    magnitude), its eigenvector `s` and the error bound of `theta` (for
    `"magnitude"`, the larger bound of both ends of the spectrum)."""
    tridiagonal = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    eigenvalues, eigenvectors = np.linalg.eigh(tridiagonal)
    index = -1
    if which == "magnitude" and -eigenvalues[0] > eigenvalues[-1]:
        index = 0
    theta, ritz = float(eigenvalues[index]), eigenvectors[:, index]
    # r = ||H y - theta y|| for the Ritz vector y = Q_k s bounds the
    # error by r, and by r^2 / gap with the gap to the next Ritz
    # value.
    error = _ritz_error(eigenvalues, eigenvectors, index, beta)
    if which == "magnitude":
        error = max(
            error,
            _ritz_error(eigenvalues, eigenvectors, -1 - index, beta),
        )
    return theta, ritz, error


def _against_basis(blocks, block, i):
    """`block[i]` (the vector `q_{j+1}`) reorthogonalized against the basis:
    the stored `blocks` joined into one, and the rows of `block` before it.

    Returns `(blocks, kept, q_next, scale)`: `kept` the rows `block[:i]`
    (`q_{j+1-i}..q_j`, to be stored), `scale` as from `_reorthogonalize`.
    """
    if len(blocks) > 1:
        blocks = [ops.concatenate(blocks, axis=0)]
    kept = [block[:i]] if i else []  # q_{j+1-i}..q_j
    q_next, scale = _reorthogonalize(blocks + kept, block[i])
    return blocks, kept, q_next, scale


def _ritz_vector(blocks, ritz, k):
    """The Ritz vector `y = Q_k s` from the basis rows in `blocks`."""
    basis = ops.concatenate(blocks, axis=0)[:k]
    ritz = ops.convert_to_tensor(ritz.astype("float32")[None, :])
    return ops.matmul(ritz, basis)[0]


def power_iteration(iterate, start, max_iter, tol, *extra):
    """Dominant eigenpair by power iteration; `iterate(v, *extra)` is one
    product fused with `power_step` (or `shifted_power_step`, `extra`
    holding the shift)."""
    v = ops.divide(start, l2_norm(start))
    theta = None
    for _ in range(max_iter):
        v_next, stats = iterate(v, *extra)
        previous, (theta, norm) = theta, _scalars(stats)
        if not (math.isfinite(theta) and math.isfinite(norm)):
            return math.nan, ops.full_like(v, math.nan)
        if norm <= NORM_EPSILON:
            return 0.0, v
        v = v_next
        if previous is not None and abs(theta - previous) <= tol * abs(theta):
            break
    return theta, v
