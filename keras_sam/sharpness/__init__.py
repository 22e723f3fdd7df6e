"""Sharpness diagnostics: Hessian spectrum, SAM sharpness, weight norms.

Every estimator is written in `keras.ops` on one primitive, the
Hessian-vector product of the loss averaged over a whole dataset,

```
L(w)   = sum_b (n_b / N) * L_b(w)            # full-data mean over batches b
H v    = sum_b (n_b / N) * hvp(L_b, w, v)    # backend: nested tapes (TF),
                                             # jvp of grad (JAX), double
                                             # backward (torch)
```

computed at the model's current weights in inference mode (`training=False`)
unless asked otherwise. Nothing here changes a variable.

Edge of stability: full-batch gradient descent with learning rate `eta` is
unstable along the top Hessian eigenvector once the top eigenvalue exceeds
`2 / eta` (`2 (1 + beta) / eta` with heavy-ball momentum `beta`); training
then tends to hover at that edge. `keras_sam.callbacks.SharpnessMonitor`
logs these quantities during `fit`.

Modules: `operator` (the data, the loss, its gradient and Hessian-vector
products), `hessian` (`Hessian`: the estimators on those products),
`krylov` (Lanczos and power iteration, apart from models and data),
`compiled` (the compiled functions of one batch's loss), `vectors` (flat
vectors), `estimators` (the one-call functions), `stability` (full-batch
gradient descent and the critical learning rate `2 / S_GF`).
"""

from keras_sam.sharpness.estimators import hessian_trace
from keras_sam.sharpness.estimators import hessian_vector_product
from keras_sam.sharpness.estimators import parameter_norms
from keras_sam.sharpness.estimators import sam_sharpness
from keras_sam.sharpness.estimators import top_eigenvalue
from keras_sam.sharpness.hessian import Hessian
from keras_sam.sharpness.stability import critical_learning_rate
from keras_sam.sharpness.stability import full_batch_gradient_descent

__all__ = [
    "hessian_trace",
    "hessian_vector_product",
    "parameter_norms",
    "sam_sharpness",
    "top_eigenvalue",
    "Hessian",
    "critical_learning_rate",
    "full_batch_gradient_descent",
]
