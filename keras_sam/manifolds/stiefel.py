"""The Stiefel manifold of kernels with orthonormal columns.

`Stiefel` moves a kernel along the manifold; `StiefelInitializer` draws a
kernel on it. A kernel of shape `(..., units)` is seen as the matrix of
shape `(fan_in, units)`.
"""

import math

import keras
from keras import ops

from keras_sam._validation import check_choice
from keras_sam._validation import check_seed
from keras_sam.manifolds.base import Manifold

# QR/SVD run in float32 at least.
_HALF = ("float16", "bfloat16")


def _fan_in_units(shape):
    """`(fan_in, units)` of a kernel: all axes but the last, and the last."""
    shape = tuple(shape)
    if not shape:
        return 1, 1
    return int(math.prod(shape[:-1])), int(shape[-1])


def _qf(a):
    """Q factor of a thin QR, with the diagonal of R made positive."""
    q, r = ops.qr(a, mode="reduced")
    signs = ops.where(ops.diagonal(r) < 0, -1.0, 1.0)
    return ops.multiply(q, ops.cast(signs, q.dtype))


def _polar(a):
    """Orthonormal polar factor `A (A^T A)^-1/2 = U V^T` of a thin SVD."""
    u, _, vt = ops.svd(a, full_matrices=False)
    return ops.matmul(u, vt)


_RETRACTIONS = ("qr", "polar")
_METRICS = ("euclidean", "canonical")


@keras.saving.register_keras_serializable(package="keras_sam")
class Stiefel(Manifold):
    """Kernels with orthonormal columns: `U^T U = I`, U of shape `(n, p)`.

    A kernel of shape `(..., units)` (Dense `(fan_in, units)`, Conv
    `(kh, kw, c_in, units)`) is seen as the matrix `U` of shape
    `(fan_in, units)`; it needs `fan_in >= units`.

    ```
    P_U(V) = V - U sym(U^T V)        # sym(A) = (A + A^T) / 2
    R_U(u) = qf(U + u)               # QR, positive diagonal of R
           | (U + u) ((U + u)^T (U + u))^-1/2      # retraction="polar"
    ```

    The metric on the tangent space is the Euclidean one of the ambient
    space by default, under which the Riemannian gradient of a Euclidean
    gradient `G` is `P_U(G)`. `metric="canonical"` takes the canonical
    metric of the Stiefel manifold, the ambient metric
    `D_U = I - U U^T / 2` (`D_U^-1 = I + U U^T`):

    ```
    <Z1, Z2>_U = tr(Z1^T (I - U U^T / 2) Z2)
    grad f(U)  = P_U(D_U^-1 G) = G - U G^T U
    ```

    `RSAM` uses this metric for the perturbation (direction and norm) and
    for the pulled-back gradient of its descent step.

    Args:
        retraction: `"qr"` or `"polar"` (the closest orthonormal matrix,
            through an SVD; slower). Defaults to `"qr"`.
        tolerance: Float > 0, the largest `max |U^T U - I|` accepted at
            build time. Defaults to `1e-4`.
        metric: `"euclidean"` or `"canonical"`. Defaults to `"euclidean"`.

    Example:

    >>> layer = keras.layers.Dense(
    ...     16, **keras_sam.manifolds.stiefel_kernel())  # on Stiefel

    References:
        - Absil, Mahony, Sepulchre, Optimization Algorithms on Matrix
          Manifolds, Princeton University Press 2008 (sections 3.3, 4.1).
        - Truong et al., RSAM: Learning on Manifolds with Riemannian
          Sharpness-aware Minimization, arXiv 2309.17215.
    """

    name = "stiefel"

    def __init__(self, retraction="qr", tolerance=1e-4, metric="euclidean"):
        super().__init__(tolerance=tolerance)
        check_choice("retraction", retraction, _RETRACTIONS)
        check_choice("metric", metric, _METRICS)
        self.retraction = retraction
        self.metric = metric

    @property
    def has_metric(self):
        return self.metric == "canonical"

    @staticmethod
    def _as_matrix(x):
        n, p = _fan_in_units(x.shape)
        return ops.reshape(x, (n, p))

    def project(self, point, vector):
        u = self._as_matrix(point)
        v = self._as_matrix(vector)
        utv = ops.matmul(ops.transpose(u), v)
        sym = ops.multiply(ops.add(utv, ops.transpose(utv)), 0.5)
        return ops.reshape(
            ops.subtract(v, ops.matmul(u, sym)), ops.shape(vector)
        )

    def riemannian_gradient(self, point, grad):
        if self.metric != "canonical":
            return self.project(point, grad)
        # grad f(U) = G - U G^T U, tangent at U.
        u = self._as_matrix(point)
        g = self._as_matrix(grad)
        ugu = ops.matmul(u, ops.matmul(ops.transpose(g), u))
        return ops.reshape(ops.subtract(g, ugu), ops.shape(grad))

    def inner(self, point, a, b):
        euclidean = ops.sum(ops.multiply(a, b))
        if self.metric != "canonical":
            return euclidean
        # tr(A^T (I - U U^T / 2) B) = <A, B> - <U^T A, U^T B> / 2.
        u = self._as_matrix(point)
        uta = ops.matmul(ops.transpose(u), self._as_matrix(a))
        utb = ops.matmul(ops.transpose(u), self._as_matrix(b))
        return ops.subtract(
            euclidean, ops.multiply(ops.sum(ops.multiply(uta, utb)), 0.5)
        )

    def restore(self, point):
        a = self._as_matrix(point)
        if keras.backend.standardize_dtype(a.dtype) in _HALF:
            a = ops.cast(a, "float32")
        q = _qf(a) if self.retraction == "qr" else _polar(a)
        return ops.cast(ops.reshape(q, ops.shape(point)), point.dtype)

    def retract(self, point, step):
        return self.restore(ops.add(point, step))

    def error(self, point):
        u = self._as_matrix(point)
        gram = ops.matmul(ops.transpose(u), u)
        return ops.max(ops.abs(ops.subtract(gram, ops.eye(u.shape[1]))))

    def check_shape(self, shape, name="variable"):
        n, p = _fan_in_units(shape)
        if len(tuple(shape)) < 2 or n < p:
            raise ValueError(
                f"Variable '{name}' of shape {tuple(shape)} cannot be put on "
                "the Stiefel manifold: reshaped to (fan_in, units) = "
                f"({n}, {p}) it needs fan_in >= units and at least 2 axes."
            )

    def get_config(self):
        config = super().get_config()
        config["retraction"] = self.retraction
        config["metric"] = self.metric
        return config


@keras.saving.register_keras_serializable(package="keras_sam")
class StiefelInitializer(keras.initializers.Initializer):
    """Initializes a kernel with orthonormal columns (a point of Stiefel).

    Draws a Gaussian matrix of shape `(fan_in, units)` and takes the Q factor
    of its QR decomposition with a positive diagonal (a uniformly random
    point of the Stiefel manifold), reshaped to the kernel's shape.

    Args:
        seed: Optional integer seed. Defaults to `None`.

    Example:

    >>> init = keras_sam.manifolds.StiefelInitializer(seed=0)
    >>> kernel = init((3, 3, 8, 16))  # filters are orthonormal
    """

    def __init__(self, seed=None):
        self.seed = check_seed(seed)
        self._generator = keras.random.SeedGenerator(self.seed)

    def __call__(self, shape, dtype=None):
        Stiefel().check_shape(shape, name="initializer output")
        n, p = _fan_in_units(shape)
        a = keras.random.normal((n, p), dtype="float32", seed=self._generator)
        q = _qf(a)
        return ops.cast(ops.reshape(q, shape), dtype or keras.config.floatx())

    def get_config(self):
        return {"seed": self.seed}
