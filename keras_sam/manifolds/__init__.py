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

from keras_sam.manifolds.base import Euclidean
from keras_sam.manifolds.base import Manifold
from keras_sam.manifolds.base import Sphere
from keras_sam.manifolds.constraints import ManifoldConstraint
from keras_sam.manifolds.constraints import stiefel_kernel
from keras_sam.manifolds.registry import deserialize
from keras_sam.manifolds.registry import get
from keras_sam.manifolds.registry import serialize
from keras_sam.manifolds.stiefel import Stiefel
from keras_sam.manifolds.stiefel import StiefelInitializer

__all__ = [
    "Euclidean",
    "Manifold",
    "Sphere",
    "ManifoldConstraint",
    "stiefel_kernel",
    "deserialize",
    "get",
    "serialize",
    "Stiefel",
    "StiefelInitializer",
]
