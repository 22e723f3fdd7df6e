"""The `Manifold` base class and the two simple manifolds: flat and sphere."""

import numbers

import keras
from keras import ops

from keras_sam._validation import check_float

# The smallest norm divided by (no 0 / 0 at the origin).
_TINY = 1e-30


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
        self.tolerance = check_float(
            "tolerance", tolerance, low=0.0, low_open=True
        )

    def project(self, point, vector):
        """Projects `vector` onto the tangent space at `point`."""
        raise NotImplementedError

    def retract(self, point, step):
        """Moves `point` along the tangent `step`, staying on the manifold."""
        raise NotImplementedError

    def restore(self, point):
        """Maps a point near the manifold onto it (used by constraints)."""
        raise NotImplementedError

    # A manifold with a metric of its own (not the ambient Euclidean one)
    # sets this; `RSAM` then uses `riemannian_gradient` and `inner` for its
    # variables instead of its diagonal `metric`.
    has_metric = False

    def riemannian_gradient(self, point, grad):
        """The Riemannian gradient at `point` of a Euclidean gradient.

        With the ambient (Euclidean) metric it is the tangent projection.
        """
        return self.project(point, grad)

    def inner(self, point, u, v):
        """Scalar tensor: the metric's inner product of tangents `u`, `v`."""
        return ops.sum(ops.multiply(u, v))

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
            radius = check_float("radius", radius, low=0.0, low_open=True)
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
