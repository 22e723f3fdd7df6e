"""Manifolds for Riemannian sharpness-aware training (RSAM).

A manifold tells `keras_sam.optimizers.RSAM` how to move a variable without
leaving its constraint set (DESIGN section 2):

```
P_w(v)   tangent projection at w      (the Riemannian gradient is P_w(g))
R_w(u)   retraction of a tangent step  (w + u on flat variables)
```

- `Euclidean`: no constraint, `P_w(v) = v`, `R_w(u) = w + u`.
- `Sphere`: `|w| = r`, `P_w(v) = v - (w.v / |w|^2) w`,
  `R_w(u) = r (w + u) / |w + u|`.
- `Stiefel`: a kernel reshaped to `(fan_in, units)` with orthonormal columns,
  `U^T U = I`, `P_U(V) = V - U sym(U^T V)`, `R_U(u) = qf(U + u)` (QR with a
  positive diagonal) or the polar factor of `U + u`.

All math is written in `keras.ops` and works on values (tensors), so the same
code runs inside the train step of every backend. `StiefelInitializer`,
`ManifoldConstraint` and `stiefel_kernel()` declare an orthogonal Dense or
Conv kernel, initialized on the manifold.
"""

import math
import numbers

import keras
from keras import ops

_TINY = 1e-30
# QR/SVD run in float32 at least.
_HALF = ("float16", "bfloat16")


def _check_tolerance(tolerance):
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real):
        raise TypeError(
            "`tolerance` must be a float > 0. "
            f"Received: tolerance={tolerance!r}"
        )
    if not math.isfinite(tolerance) or tolerance <= 0:
        raise ValueError(
            f"`tolerance` must be a float > 0. Received: tolerance={tolerance}"
        )
    return float(tolerance)


class Manifold:
    """Base class: a constraint set with a tangent projection and retraction.

    Subclasses implement `project`, `retract`, `restore` and `error` in
    `keras.ops`; `check_shape` and `check` validate a variable at build time.

    Args:
        tolerance: Float > 0, the largest `error(w)` for which a value counts
            as lying on the manifold in `check`. Defaults to `1e-4`.
    """

    name = None

    def __init__(self, tolerance=1e-4):
        self.tolerance = _check_tolerance(tolerance)

    def project(self, point, vector):
        """Projects `vector` onto the tangent space at `point`."""
        raise NotImplementedError

    def retract(self, point, step):
        """Moves `point` along the tangent `step`, staying on the manifold."""
        raise NotImplementedError

    def restore(self, point):
        """Maps a point near the manifold onto it (used by constraints)."""
        raise NotImplementedError

    def error(self, point):
        """Scalar tensor: how far `point` is from the manifold (0 on it)."""
        raise NotImplementedError

    def check_shape(self, shape, name="variable"):
        """Raises `ValueError` if no variable of `shape` fits the manifold."""

    def check(self, point, name="variable"):
        """Raises `ValueError` if the (concrete) `point` is off the manifold.

        Args:
            point: a concrete tensor or array (not a symbolic one).
            name: what to call the value in the error message, e.g. the
                variable's path.
        """
        self.check_shape(tuple(point.shape), name)
        err = float(
            ops.convert_to_numpy(self.error(ops.cast(point, "float32")))
        )
        if not err <= self.tolerance:
            raise ValueError(
                f"Variable '{name}' is not on the manifold {self!r}: its "
                f"error is {err:.3g} > tolerance={self.tolerance:g}. "
                "Initialize it on the manifold (e.g. "
                "`kernel_initializer=keras_sam.manifolds."
                "StiefelInitializer()` for `Stiefel`, or use "
                "`**keras_sam.manifolds.stiefel_kernel()`)."
            )

    def get_config(self):
        return {"tolerance": self.tolerance}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and (
            self.get_config() == other.get_config()
        )

    def __hash__(self):
        return hash((type(self).__name__, repr(sorted(self.get_config()))))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="keras_sam")
class Euclidean(Manifold):
    """The flat space: no constraint.

    ```
    P_w(v) = v
    R_w(u) = w + u
    ```

    Variables that `RSAM` is not told about are Euclidean, and RSAM treats
    them exactly as SAM (or ASAM) does.

    Args:
        tolerance: Unused (every value lies on it); kept for a uniform
            config. Defaults to `1e-4`.

    Example:

    >>> keras_sam.manifolds.Euclidean().retract(w, u)  # w + u
    """

    name = "euclidean"

    def project(self, point, vector):
        return vector

    def retract(self, point, step):
        return ops.add(point, step)

    def restore(self, point):
        return point

    def error(self, point):
        return ops.zeros((), dtype="float32")


@keras.saving.register_keras_serializable(package="keras_sam")
class Sphere(Manifold):
    """The sphere `{w : |w| = r}`, whole variable or per slice along `axis`.

    ```
    P_w(v) = v - (w.v / |w|^2) w
    R_w(u) = r (w + u) / |w + u|      # r = radius, or |w| when radius=None
    ```

    With `radius=None` each variable keeps the norm it has at build time
    (the retraction rescales to `|w|`), so any nonzero initialization lies
    on the manifold. With `axis` set, each slice (e.g. each output unit of a
    Dense kernel with `axis=0`) is a point of its own sphere, as in weight
    normalization.

    Args:
        radius: Optional float > 0, the radius `r`. `None` keeps the current
            norm of each (slice of the) variable. Defaults to `None`.
        axis: `None` (the whole variable is one vector), an integer or a
            tuple of integers: the axes the norm is taken over.
            Defaults to `None`.
        tolerance: Float > 0. With a fixed radius, the largest relative
            deviation `max | |w| / r - 1 |` accepted at build time.
            Defaults to `1e-4`.

    Example:

    >>> optimizer = keras_sam.optimizers.RSAM(
    ...     "sgd", rho=0.05, manifold={"dense_1": keras_sam.manifolds.Sphere()})
    """

    name = "sphere"

    def __init__(self, radius=None, axis=None, tolerance=1e-4):
        super().__init__(tolerance=tolerance)
        if radius is not None:
            if isinstance(radius, bool) or not isinstance(radius, numbers.Real):
                raise TypeError(
                    "`radius` must be None or a float > 0. "
                    f"Received: radius={radius!r}"
                )
            if not math.isfinite(radius) or radius <= 0:
                raise ValueError(
                    "`radius` must be None or a float > 0. "
                    f"Received: radius={radius}"
                )
            radius = float(radius)
        if axis is not None:
            axes = (axis,) if isinstance(axis, numbers.Integral) else axis
            if (
                isinstance(axis, bool)
                or not isinstance(axes, (tuple, list))
                or not all(
                    isinstance(a, numbers.Integral) and not isinstance(a, bool)
                    for a in axes
                )
            ):
                raise TypeError(
                    "`axis` must be None, an integer or a tuple of integers. "
                    f"Received: axis={axis!r}"
                )
            axis = (
                int(axis)
                if isinstance(axis, numbers.Integral)
                else (tuple(int(a) for a in axes))
            )
        self.radius = radius
        self.axis = axis

    def _norm(self, x):
        return ops.sqrt(ops.sum(ops.square(x), axis=self.axis, keepdims=True))

    def project(self, point, vector):
        dot = ops.sum(
            ops.multiply(point, vector), axis=self.axis, keepdims=True
        )
        sq = ops.sum(ops.square(point), axis=self.axis, keepdims=True)
        return ops.subtract(
            vector, ops.multiply(ops.divide(dot, ops.maximum(sq, _TINY)), point)
        )

    def retract(self, point, step):
        r = self._norm(point) if self.radius is None else self.radius
        moved = ops.add(point, step)
        norm = ops.maximum(self._norm(moved), _TINY)
        return ops.multiply(ops.divide(moved, norm), r)

    def restore(self, point):
        if self.radius is None:
            return point
        norm = ops.maximum(self._norm(point), _TINY)
        return ops.multiply(ops.divide(point, norm), self.radius)

    def error(self, point):
        norm = self._norm(point)
        if self.radius is None:
            # Any nonzero point lies on the sphere of its own norm.
            return ops.cast(ops.any(ops.equal(norm, 0.0)), "float32")
        return ops.max(ops.abs(ops.subtract(norm / self.radius, 1.0)))

    def check_shape(self, shape, name="variable"):
        if len(shape) == 0:
            raise ValueError(
                f"Variable '{name}' cannot be put on a sphere: it is a "
                f"scalar. Received: shape={tuple(shape)}"
            )
        if self.axis is not None:
            axes = (self.axis,) if isinstance(self.axis, int) else self.axis
            for a in axes:
                if not -len(shape) <= a < len(shape):
                    raise ValueError(
                        f"Variable '{name}' of shape {tuple(shape)} has no "
                        f"axis {a}. Received: Sphere(axis={self.axis!r})"
                    )

    def get_config(self):
        config = super().get_config()
        config.update({"radius": self.radius, "axis": self.axis})
        return config


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

    Args:
        retraction: `"qr"` or `"polar"` (the closest orthonormal matrix,
            through an SVD; slower). Defaults to `"qr"`.
        tolerance: Float > 0, the largest `max |U^T U - I|` accepted at
            build time. Defaults to `1e-4`.

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

    def __init__(self, retraction="qr", tolerance=1e-4):
        super().__init__(tolerance=tolerance)
        if retraction not in _RETRACTIONS:
            raise ValueError(
                f"`retraction` must be one of {list(_RETRACTIONS)}. "
                f"Received: retraction={retraction!r}"
            )
        self.retraction = retraction

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
        return config


_MANIFOLDS = {"euclidean": Euclidean, "sphere": Sphere, "stiefel": Stiefel}


def serialize(manifold):
    """Returns the Keras config of a manifold."""
    return keras.saving.serialize_keras_object(manifold)


def deserialize(config, custom_objects=None):
    """Rebuilds a manifold from `serialize`'s output."""
    return keras.saving.deserialize_keras_object(
        config, custom_objects=custom_objects
    )


def get(identifier):
    """Returns a manifold from an instance, a name or a config.

    Args:
        identifier: a `Manifold` (returned as is), `None` (Euclidean), one of
            `"euclidean"`, `"sphere"`, `"stiefel"`, or a config dict from
            `serialize`.
    """
    if identifier is None:
        return Euclidean()
    if isinstance(identifier, Manifold):
        return identifier
    if isinstance(identifier, dict):
        manifold = deserialize(identifier)
        if isinstance(manifold, Manifold):
            return manifold
    if isinstance(identifier, str):
        key = identifier.lower()
        if key not in _MANIFOLDS:
            raise ValueError(
                f"Unknown manifold. Expected one of {sorted(_MANIFOLDS)}. "
                f"Received: manifold={identifier!r}"
            )
        return _MANIFOLDS[key]()
    raise TypeError(
        "Could not interpret a manifold identifier: expected a "
        "`keras_sam.manifolds.Manifold`, a name or a config. "
        f"Received: manifold={identifier!r}"
    )


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
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
        ):
            raise TypeError(
                f"`seed` must be None or an integer. Received: seed={seed!r}"
            )
        self.seed = seed
        self._generator = keras.random.SeedGenerator(seed)

    def __call__(self, shape, dtype=None):
        Stiefel().check_shape(shape, name="initializer output")
        n, p = _fan_in_units(shape)
        a = keras.random.normal((n, p), dtype="float32", seed=self._generator)
        q = _qf(a)
        return ops.cast(ops.reshape(q, shape), dtype or keras.config.floatx())

    def get_config(self):
        return {"seed": self.seed}


@keras.saving.register_keras_serializable(package="keras_sam")
class ManifoldConstraint(keras.constraints.Constraint):
    """Keeps a weight on a manifold after each optimizer update.

    After every update the optimizer replaces `w` by `restore(w)`: `qf(w)`
    on Stiefel, `r w / |w|` on a sphere of fixed radius. With a stock
    optimizer this is projected gradient descent. `RSAM` reads the manifold
    from this constraint, so a variable declared this way needs no entry in
    its `manifold=` mapping.

    Args:
        manifold: a `Manifold`, a name or a config. Defaults to
            `"stiefel"`.

    Example:

    >>> layer = keras.layers.Conv2D(
    ...     16, 3,
    ...     kernel_initializer=keras_sam.manifolds.StiefelInitializer(),
    ...     kernel_constraint=keras_sam.manifolds.ManifoldConstraint())
    """

    def __init__(self, manifold="stiefel"):
        self.manifold = get(manifold)

    def __call__(self, w):
        return self.manifold.restore(w)

    def get_config(self):
        return {"manifold": serialize(self.manifold)}

    @classmethod
    def from_config(cls, config):
        return cls(manifold=get(config["manifold"]))


def stiefel_kernel(seed=None, retraction="qr"):
    """Layer arguments declaring an orthogonal kernel on the Stiefel manifold.

    Returns `kernel_initializer` and `kernel_constraint` for a Dense or Conv
    layer: the kernel, reshaped to `(fan_in, units)`, starts with orthonormal
    columns and `RSAM` keeps it so (a stock optimizer projects it back after
    each step through the constraint).

    Args:
        seed: Optional integer seed of the initializer. Defaults to `None`.
        retraction: `"qr"` or `"polar"`. Defaults to `"qr"`.

    Returns:
        A dict to unpack into the layer's constructor.

    Example:

    >>> conv = keras.layers.Conv2D(
    ...     32, 3, padding="same", **keras_sam.manifolds.stiefel_kernel())
    """
    return {
        "kernel_initializer": StiefelInitializer(seed=seed),
        "kernel_constraint": ManifoldConstraint(Stiefel(retraction)),
    }
