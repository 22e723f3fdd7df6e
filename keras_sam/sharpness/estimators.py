"""Public functions: one call, one estimate.

Each builds a `Hessian` over `data` and runs one estimator on it; build a
`Hessian` yourself to run several on the same data.
"""

import math

import keras
from keras import ops

from keras_sam.sharpness.hessian import Hessian


def hessian_vector_product(
    model, data, vectors, loss=None, training=False, batch_size=None, steps=None
):
    """`H v` of the full-data loss at the model's current weights.

    See `Hessian` for the arguments; `vectors` is a list of tensors shaped
    like `model.trainable_variables`. Returns a list of the same shapes.
    """
    hessian = Hessian(model, data, loss, training, batch_size, steps)
    return hessian.hvp(vectors)


def top_eigenvalue(
    model,
    data,
    loss=None,
    training=False,
    batch_size=None,
    steps=None,
    method="lanczos",
    max_iter=100,
    tol=1e-3,
    seed=0,
    which="algebraic",
):
    """Top eigenvalue of the Hessian of the full-data loss (the sharpness).

    ```
    which="algebraic":  lambda_max = max_{||v|| = 1} v^T H v
    which="magnitude":  ||H||_2    = max_{||v|| = 1} |v^T H v|
                        H = grad^2 (1/N) sum_i l_i(w)
    ```

    The two differ only where a negative eigenvalue dominates (away from a
    minimum); Fojtik et al. call the second the sharpness.

    Args:
        model: A built `keras.Model` or `keras_sam.SAMModel`.
        data: Arrays `(x, y[, sample_weight])`, a dataset or batches; the
            loss is averaged over all of it.
        loss: A loss overriding the compiled one. Defaults to `None`.
        training: Run the model in training mode. Defaults to `False`.
        batch_size: Batch size for arrays. Defaults to `None` (one batch).
        steps: Maximum number of batches read. Defaults to `None` (all).
        method: `"lanczos"` or `"power"`. Defaults to `"lanczos"`.
        max_iter: Maximum number of Hessian-vector products.
            Defaults to `100`.
        tol: Relative tolerance (see `Hessian.top_eigenvalue`).
            Defaults to `1e-3`.
        seed: Seed of the start vector. Defaults to `0`.
        which: `"algebraic"` (largest eigenvalue) or `"magnitude"`
            (largest `|eigenvalue|`). Defaults to `"algebraic"`.

    Returns:
        The eigenvalue (float). NaN, with a `RuntimeWarning`, when the loss
        or its derivatives are not finite at the current weights (training
        diverged): a diagnostic reports the failure rather than raise.

    Raises:
        ValueError: Before any work, if `data` contains NaN or inf, lacks
            the targets `y` the loss needs, or does not fit the model's
            input shape.

    Example:

    >>> keras_sam.sharpness.top_eigenvalue(model, (x, y))

    References:
        - Cohen et al., Gradient Descent on Neural Networks Typically Occurs
          at the Edge of Stability, ICLR 2021.
        - Yao et al., PyHessian: Neural Networks Through the Lens of the
          Hessian, 2020.
    """
    hessian = Hessian(model, data, loss, training, batch_size, steps)
    return hessian.top_eigenvalue(
        method=method, max_iter=max_iter, tol=tol, seed=seed, which=which
    )


def hessian_trace(
    model,
    data,
    loss=None,
    training=False,
    batch_size=None,
    steps=None,
    num_probes=100,
    seed=0,
):
    """Hutchinson estimate of the trace of the Hessian of the full-data loss.

    ```
    tr(H) ~= (1/m) sum_i z_i^T H z_i,   z_i Rademacher (+-1), seeded
    ```

    Args:
        model, data, loss, training, batch_size, steps: as in
            `top_eigenvalue`.
        num_probes: Number of probes (Hessian-vector products).
            Defaults to `100`.
        seed: Seed of the probes. Defaults to `0`.

    Returns and raises as `top_eigenvalue`: NaN with a warning for a
    non-finite loss, a `ValueError` for non-finite or ill-shaped `data`.

    Example:

    >>> keras_sam.sharpness.hessian_trace(model, (x, y), num_probes=50)

    References:
        - Hutchinson, A Stochastic Estimator of the Trace of the Influence
          Matrix for Laplacian Smoothing Splines, 1990.
    """
    hessian = Hessian(model, data, loss, training, batch_size, steps)
    return hessian.trace(num_probes=num_probes, seed=seed)


def sam_sharpness(
    model,
    data,
    rho=None,
    optimizer=None,
    loss=None,
    training=False,
    batch_size=None,
    steps=None,
):
    """SAM sharpness `L(w + eps) - L(w)` of the full-data loss.

    ```
    eps = rho * g / (||g|| + 1e-12),   g = grad L(w)
    ```

    Args:
        model, data, loss, training, batch_size, steps: as in
            `top_eigenvalue`.
        rho: Radius. Defaults to `None` (`0.05`, or the optimizer's).
        optimizer: A keras_sam optimizer whose perturbation defines `eps`
            (e.g. `ASAM` for adaptive sharpness). Defaults to `None`.

    Example:

    >>> keras_sam.sharpness.sam_sharpness(model, (x, y), rho=0.05)

    References:
        - Foret et al., Sharpness-Aware Minimization for Efficiently Improving
          Generalization, ICLR 2021.
    """
    hessian = Hessian(model, data, loss, training, batch_size, steps)
    return hessian.sam_sharpness(rho=rho, optimizer=optimizer)


def parameter_norms(model, trainable_only=True):
    """l1 and l2 norms of the weights, per layer and in total.

    ```
    l1 = sum_j |w_j|        l2 = sqrt(sum_j w_j^2)
    ```

    Args:
        model: A `keras.Model` (or any Keras layer).
        trainable_only: Only the trainable variables. Defaults to `True`.

    Returns:
        A dict `{"l1": float, "l2": float, "layers": {path: {"l1", "l2"}}}`
        where `path` is the variable path without its last component.

    Example:

    >>> keras_sam.sharpness.parameter_norms(model)["l2"]
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "`model` must be a `keras.Model` or layer. Received: "
            f"model={model!r} of type {type(model).__name__}"
        )
    variables = model.trainable_variables if trainable_only else model.variables
    layers = {}
    for v in variables:
        if not str(v.dtype).startswith(("float", "bfloat")):
            continue
        path = getattr(v, "path", None) or v.name
        layer = path.rsplit("/", 1)[0] if "/" in path else path
        w = ops.cast(ops.convert_to_tensor(v), "float32")
        l1 = float(ops.convert_to_numpy(ops.sum(ops.abs(w))))
        sq = float(ops.convert_to_numpy(ops.sum(ops.square(w))))
        entry = layers.setdefault(layer, {"l1": 0.0, "l2": 0.0})
        entry["l1"] += l1
        entry["l2"] += sq  # squared for now
    total_l1 = sum(e["l1"] for e in layers.values())
    total_sq = sum(e["l2"] for e in layers.values())
    for entry in layers.values():
        entry["l2"] = math.sqrt(entry["l2"])
    return {"l1": total_l1, "l2": math.sqrt(total_sq), "layers": layers}
