"""`Hessian`: the Hessian of a model's loss over a dataset, and its estimators.

```
L(w) = sum_b (n_b / N) L_b(w)        H v = sum_b (n_b / N) H_b(w) v
```

The products over the data come from `HessianOperator` (`operator.py`);
`Hessian` runs the estimators on them: the Krylov solvers of `krylov.py` for
the top eigenvalue, Hutchinson's estimator for the trace, and the SAM
sharpness.
"""

import numpy as np
from keras import ops

from keras_sam import backend
from keras_sam._validation import check_choice
from keras_sam._validation import check_float
from keras_sam._validation import check_int
from keras_sam._validation import check_positive_int
from keras_sam._validation import check_rho
from keras_sam.sharpness.krylov import WHICH
from keras_sam.sharpness.krylov import lanczos
from keras_sam.sharpness.krylov import lanczos_block_step
from keras_sam.sharpness.krylov import power_iteration
from keras_sam.sharpness.krylov import power_step
from keras_sam.sharpness.krylov import shifted_power_step
from keras_sam.sharpness.operator import HessianOperator
from keras_sam.sharpness.probe import nan_if_diverged
from keras_sam.sharpness.vectors import NORM_EPSILON
from keras_sam.sharpness.vectors import dot
from keras_sam.sharpness.vectors import flatten
from keras_sam.sharpness.vectors import l2_norm
from keras_sam.sharpness.vectors import unflatten

# The solvers of `Hessian.top_eigenvalue`.
METHODS = ("lanczos", "power")

# Lanczos iterations per compiled call on a GPU or TPU (see
# `Hessian._lanczos_operator`); on a CPU, one.
_ACCELERATOR_ITERATIONS = 8


class Hessian(HessianOperator):
    """The Hessian of a model's loss over a dataset, as an operator.

    The loss is averaged over all of `data` (not one batch) and evaluated at
    the model's current weights each time a method is called, so one
    `Hessian` can follow a model through training; the backend functions are
    compiled once (`tf.function`, `jax.jit`) and reused.

    ```
    L(w) = sum_b (n_b / N) L_b(w)        H v = sum_b (n_b / N) H_b(w) v
    ```

    Args:
        model: A built `keras.Model` or `keras_sam.SAMModel`.
        data: Arrays `(x, y)` or `(x, y, sample_weight)`, a `tf.data.Dataset`,
            a `keras.utils.PyDataset`, or an iterable of such batches. It is
            read once and kept (use a probe set, not a whole large dataset).
        loss: A Keras loss, loss name, or callable `loss(y_true, y_pred)`;
            the model's regularization losses are added. Defaults to `None`,
            the compiled loss of `model` (regularization included).
        training: Whether to run the model in training mode (BatchNorm batch
            statistics, dropout with the mask of the layer's current seed
            state, the same for every product); nothing is updated either
            way. On torch an unseeded `Dropout` draws a new mask each time,
            so give it a `seed`. Defaults to `False`.
        batch_size: Batch size used to cut arrays. Defaults to `None`, all
            samples in one batch.
        steps: At most this many batches are read from an iterable `data`
            (required for an infinite dataset). Defaults to `None`, all.

    `data` is checked when the `Hessian` is made: a `ValueError` says so if
    it contains NaN or inf, lacks the targets `y` the loss needs, or does
    not fit the model's input shape. Finite data can still give a
    non-finite loss or gradient (weights that diverged in training): then
    the estimators return NaN with a `RuntimeWarning` rather than raise, so
    a monitor logs NaN and `keras.callbacks.TerminateOnNaN` can stop `fit`.

    Example:

    >>> hessian = keras_sam.sharpness.Hessian(model, (x, y))
    >>> hessian.top_eigenvalue(), hessian.trace()
    """

    def _lanczos_operator(self):
        """`(n, q, q_previous, beta) -> (q, q_previous, beta, block, stats)`:
        `min(n, k)` Lanczos iterations (`krylov.lanczos_steps`) in one call.

        On one batch they are one compiled call. On a GPU or TPU `k` is
        `_ACCELERATOR_ITERATIONS`: there a call and the read of its scalars
        cost more host time than the device spends on an iteration of a
        model of this size, so fewer calls and reads is what saves time. On
        a CPU `k = 1`: the product dominates, and iterations past the
        stopping point would be computed for nothing. Several batches:
        `k = 1`, one call per batch (`_flat_operator`) and one for the
        recurrence.
        """
        values, states = self._values(), self._state_values()
        if len(self.batches) == 1:
            k = _ACCELERATOR_ITERATIONS if backend.on_accelerator() else 1
            _, x, y, sample_weight = self.batches[0]

            def iterate(n, q, *carry):
                n = min(n, k)
                self.num_hvps += n
                steps = self._functions.lanczos(n)
                return steps(values, q, states, x, y, sample_weight, *carry)

            return iterate
        iterate = self._flat_operator(lanczos_block_step)
        return lambda n, q, *carry: iterate(q, *carry)

    # ---- estimators ----

    def top_eigenvalue(
        self,
        method="lanczos",
        max_iter=100,
        tol=1e-3,
        seed=0,
        return_eigenvector=False,
        which="algebraic",
    ):
        """Top eigenvalue of the Hessian (the sharpness).

        ```
        which="algebraic":  lambda_max = max_i lambda_i
        which="magnitude":  ||H||_2    = max_i |lambda_i|
        ```

        The two differ where the Hessian has a negative eigenvalue larger
        in magnitude than its largest positive one (away from a minimum).
        Cohen et al. track the first; Fojtik et al. define the sharpness as
        the second (the spectral norm of the training-loss Hessian).

        Lanczos (default) builds an orthonormal Krylov basis `q_1..q_k` with
        `H Q_k = Q_k T_k + beta_k q_{k+1} e_k^T` and returns the largest
        eigenvalue `theta` of the tridiagonal `T_k`. The basis is
        reorthogonalized only when Simon's estimate of `max |q_i . q_j|`
        passes `sqrt(eps)` (partial reorthogonalization): the Ritz values
        stay as accurate as with an exactly orthonormal basis, at the cost
        of one product and a few vector operations per iteration; the `k`
        basis vectors are kept in memory. It stops when the error bound
        `min(r, r^2 / gap)` is at most `tol * |theta|`, with the Ritz
        residual `r = ||H y - theta y|| = beta_k |s_k|` and `gap` the
        distance from `theta` to the next Ritz value. The number of
        iterations depends on the spectrum: 15-47 at `tol=1e-3` for the
        1M-parameter MLP of `benchmarks/hessian.py`, whose top eigenvalues
        lie within 3% of each other. On a GPU or TPU eight iterations run
        as one compiled call, because there the calls and reads, not the
        device, take most of the time of a model this size; each iteration
        is still checked, so the result is the same, and the products
        computed past the stop are dropped (`num_hvps` counts every
        product). Power iteration repeats
        `v <- H v / ||H v||` and stops when `v . H v` changes by at most
        `tol` relative; it finds the eigenvalue of largest magnitude and
        converges more slowly. For `which="algebraic"`, when that dominant
        eigenvalue `mu` is negative, a second power iteration on
        `H - mu I` (whose spectrum is `>= 0`, its top `lambda_max - mu`)
        gives `lambda_max`. For `which="magnitude"` Lanczos returns the
        extreme Ritz value of largest magnitude, stopping once both ends of
        the spectrum meet the tolerance.

        Args:
            method: `"lanczos"` or `"power"`. Defaults to `"lanczos"`.
            max_iter: Maximum number of Hessian-vector products.
                Defaults to `100`.
            tol: Relative tolerance of the stopping rule. Defaults to `1e-3`.
            seed: Seed of the random start vector. Defaults to `0`.
            return_eigenvector: Also return the eigenvector (a list of
                tensors shaped like the trainable variables, unit norm).
                Defaults to `False`.
            which: `"algebraic"` (the largest eigenvalue) or
                `"magnitude"` (the largest absolute value, returned as
                `|lambda|`, non-negative). Defaults to `"algebraic"`.

        Returns:
            The eigenvalue (float), or `(eigenvalue, eigenvector)`.
        """
        check_choice("method", method, METHODS)
        check_choice("which", which, WHICH)
        max_iter = check_positive_int("max_iter", max_iter)
        tol = check_float("tol", tol, low=0.0, low_open=True)
        seed = check_int("seed", seed, minimum=0)
        start = self._start_vector(seed)
        if method == "lanczos":
            iterate = self._lanczos_operator()
            theta, flat = lanczos(
                iterate, start, max_iter, tol, return_eigenvector, which
            )
        else:
            theta, flat = self._power_iteration(start, max_iter, tol, which)
        if which == "magnitude":
            theta = abs(theta)
        theta = nan_if_diverged(theta, "top_eigenvalue")
        if return_eigenvector:
            return theta, unflatten(flat, self._values())
        return theta

    def _power_iteration(self, start, max_iter, tol, which):
        """Power iteration from `start`: the dominant eigenvalue, or with
        `which="algebraic"` the largest one."""
        iterate = self._flat_operator(power_step)
        theta, flat = power_iteration(iterate, start, max_iter, tol)
        if which == "algebraic" and theta < 0:
            # The dominant eigenvalue mu is negative: the top of H is
            # mu plus the top of H - mu I, whose spectrum is >= 0.
            mu = ops.convert_to_tensor(np.float32(theta))
            shifted = self._flat_operator(shifted_power_step)
            top, flat = power_iteration(shifted, flat, max_iter, tol, mu)
            theta = top + theta
        return theta, flat

    def trace(self, num_probes=100, seed=0):
        """Hutchinson estimate of the Hessian trace with Rademacher probes.

        ```
        tr(H) ~= (1/m) sum_{i=1..m} z_i^T H z_i,   z_i in {-1, +1}^n
        ```

        Unbiased; its variance is `2 (||H||_F^2 - sum_j H_jj^2) / m`.

        Args:
            num_probes: Number of probes `m` (one Hessian-vector product
                each). Defaults to `100`.
            seed: Seed of the probes. Defaults to `0`.
        """
        num_probes = check_positive_int("num_probes", num_probes)
        seed = check_int("seed", seed, minimum=0)
        matvec = self._flat_operator()
        rng = np.random.default_rng(seed)
        total = 0.0
        for _ in range(num_probes):
            z = self._rademacher_vector(rng)
            total += dot(z, matvec(z))
        return nan_if_diverged(total / num_probes, "hessian_trace")

    def sam_sharpness(self, rho=None, optimizer=None):
        """SAM sharpness, the loss increase at the adversarial point.

        ```
        g   = grad L(w)
        eps = rho * g / (||g|| + 1e-12)    # or the perturbation of `optimizer`
        S   = L(w + eps) - L(w)
        ```

        Args:
            rho: Float >= 0, the radius. Defaults to `None`: the rho of
                `optimizer` if given, else `0.05`.
            optimizer: Optional `keras_sam.optimizers.SAM` (or a variant,
                e.g. `ASAM` for adaptive sharpness) whose perturbation
                defines `eps`; then `rho` must be `None`. Defaults to `None`.
        """
        if optimizer is not None:
            if rho is not None:
                raise ValueError(
                    "Give `rho` or `optimizer`, not both (the optimizer "
                    f"carries its own rho). Received: rho={rho}, "
                    f"optimizer={optimizer.__class__.__name__}"
                )
            if not hasattr(optimizer, "perturbed_values"):
                raise TypeError(
                    "`optimizer` must be a keras_sam sharpness-aware "
                    f"optimizer. Received: optimizer={optimizer!r}"
                )
        rho = 0.05 if rho is None else check_rho(rho)
        values = self._values()
        loss, grads = self.loss_and_gradient(values)
        if optimizer is not None:
            adversarial = optimizer.perturbed_values(
                grads, self.variables, values
            )
        else:
            # Ascend to w + eps, eps = rho g / ||g||.
            norm = l2_norm(flatten(grads))
            scale = rho / (norm + NORM_EPSILON)
            adversarial = [
                ops.add(w, ops.cast(ops.multiply(g, scale), w.dtype))
                for w, g in zip(values, grads)
            ]
        return nan_if_diverged(self.loss(adversarial) - loss, "sam_sharpness")
