"""The geometry of a perturbation: metric, projection, retraction.

```
xi    = P_w(D^-1 g)                    # metric D, tangent projection P
eps   = rho * xi / (||xi||_D + 1e-12)  # ||xi||_D = sqrt(sum xi * D * xi),
                                       # per radius group; rho * xi when
                                       # not normalized
w_adv = R_w(eps)                       # retraction; w + eps when flat
```

SAM is flat with `D = I`; ASAM, Fisher-SAM and RSAM change only the
metric (`_metric`), the projection (`_project`), the retraction
(`_retract`) and, for RSAM, the direction on manifolds with a metric of
their own (`_direction`) and the radius groups (`_group`, `_radius`).
"""

from keras import ops

_NORM_EPSILON = 1e-12

# Variables that a weight-scaled (adaptive) metric leaves alone: T = 1.
_SHIFT_VARIABLE_NAMES = ("bias", "beta")


def _variable_name(variable):
    """Last component of a variable's path (`"dense/kernel"` -> `"kernel"`)."""
    path = getattr(variable, "path", None) or variable.name
    return path.split("/")[-1].split(":")[0]


def is_weight_like(variable):
    """True for kernels, embeddings, BN gamma; False for biases and beta."""
    return _variable_name(variable) not in _SHIFT_VARIABLE_NAMES


class Geometry:
    """The perturbation of a sharpness-aware rule (a mixin of `SAM`)."""

    normalize = True

    def perturbation(self, grads, trainable_variables, values=None, scale=None):
        """eps per variable: `rho * xi / (||xi||_D + 1e-12)`, xi = P(D^-1 g)
        (`rho * xi` with `normalize=False`).

        Args:
            grads: list of (unscaled) gradients, `None` where a variable has
                no gradient.
            trainable_variables: the `keras.Variable`s the gradients belong
                to (used for their names and shapes).
            values: current values of those variables; defaults to reading
                them. A stateless (JAX) step passes its state here.
            scale: optional factor of the radius (one of several ascent
                steps); `None` is 1.

        Returns:
            List of perturbations, `None` where the gradient is `None`.
        """
        if values is None:
            values = [v.value for v in trainable_variables]
        xis, squares, groups = [], [], []
        for g, v, w in zip(grads, trainable_variables, values):
            if g is None:
                xis.append(None)
                continue
            xi, square = self._direction(
                v, ops.cast(w, "float32"), ops.cast(g, "float32")
            )
            xis.append(xi)
            squares.append(square)
            groups.append(self._group(v))
        if not squares:
            return xis
        factors = {}
        for key in dict.fromkeys(groups):  # each group, in order
            factor = ops.cast(self._radius(key), "float32")
            if scale is not None:
                factor = ops.multiply(factor, scale)
            if self.normalize:
                group = [s for s, k in zip(squares, groups) if k == key]
                norm = ops.sqrt(ops.sum(ops.stack(group)))
                factor = ops.divide(factor, ops.add(norm, _NORM_EPSILON))
            factors[key] = factor
        groups = iter(groups)
        return [
            (
                None
                if xi is None
                else ops.cast(ops.multiply(xi, factors[next(groups)]), w.dtype)
            )
            for xi, w in zip(xis, values)
        ]

    def perturbed_values(
        self, grads, trainable_variables, values=None, scale=None
    ):
        """w_adv = R_w(eps) per variable; `None` where the gradient is `None`.

        Reads the variables unless `values` is given; assigns nothing.
        """
        if values is None:
            values = [v.value for v in trainable_variables]
        eps = self.perturbation(grads, trainable_variables, values, scale)
        return [
            None if e is None else self._retract(v, w, e)
            for e, v, w in zip(eps, trainable_variables, values)
        ]

    def pull_back(self, grads, trainable_variables, values=None):
        """Maps g_adv, taken at w_adv, to the tangent space at w."""
        if values is None:
            values = [v.value for v in trainable_variables]
        return [
            None if g is None else self._project(v, w, g)
            for g, v, w in zip(grads, trainable_variables, values)
        ]

    # ---- what the geometries tell apart ----

    def _direction(self, variable, value, grad):
        """xi = P_w(D^-1 g) and ||xi||_D^2."""
        d_inv, d = self._metric(variable, value, grad)
        xi = grad if d_inv is None else ops.multiply(d_inv, grad)
        xi = self._project(variable, value, xi)
        xi_d = xi if d is None else ops.multiply(d, xi)
        return xi, ops.sum(ops.multiply(xi, xi_d))

    def _group(self, variable):
        """The radius group of a variable (normalized apart)."""
        return False

    def _radius(self, group):
        """The radius of a group: `rho`."""
        return self.rho

    def _metric(self, variable, value, grad):
        """Diagonal metric as `(D^-1, D)`; `(None, None)` means identity."""
        return None, None

    def _project(self, variable, value, vector):
        """Projection onto the tangent space at `value`; identity when flat."""
        return vector

    def _retract(self, variable, value, step):
        """Moves `value` by the tangent `step`; `value + step` when flat."""
        return ops.add(value, step)
