"""Cost of Hessian-vector products and of the top eigenvalue.

Measures, on the current Keras backend, for an MLP of about 1M parameters
(784 -> 1024 -> 192 -> 10, tanh) and one batch of 256:

- one gradient (`Hessian.loss_and_gradient`) and one Hessian-vector product
  (`Hessian.hvp`), median over repeats after warm-up (compilation excluded);
  target: HVP / gradient <= 2.5;
- `Hessian.top_eigenvalue` (Lanczos, tol 1e-3, start seeds 0, 1, 2) in units
  of one HVP, median over rounds; target: < 30 HVPs of time. Also the
  products Lanczos computed and the time of one of them in HVPs (1 would be
  no overhead at all; on an accelerator a few past the stop are computed,
  several iterations being one call), and the time of a first call, which
  compiles.

The three are timed in interleaved rounds, so that load on a shared machine
affects them alike.

Prints a table and writes JSON.

    KERAS_BACKEND=jax python benchmarks/hessian.py --output hessian_jax.json
"""

import argparse
import json
import os
import statistics
import time

import keras
import numpy as np
from keras import ops

from keras_sam import sharpness


def build_model(
    hidden=(1024, 192), inputs=784, classes=10, weights="shared", seed=0
):
    """The MLP. `weights="shared"`: the same weights on every backend,
    Glorot-uniform kernels and zero biases drawn by numpy; `"keras"`: each
    backend's own initializer, which draws different numbers. The Lanczos
    iteration count depends on the spectrum, so only shared weights time
    the same problem on every backend."""
    layers = [keras.Input((inputs,))]
    layers += [keras.layers.Dense(units, activation="tanh") for units in hidden]
    layers += [keras.layers.Dense(classes)]
    model = keras.Sequential(layers)
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    if weights == "keras":
        return model
    rng = np.random.default_rng(seed)
    values = []
    for fan_in, fan_out in zip((inputs,) + hidden, hidden + (classes,)):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        values.append(rng.uniform(-limit, limit, (fan_in, fan_out)))
        values.append(np.zeros(fan_out))
    model.set_weights([w.astype("float32") for w in values])
    return model


def _block(tensors):
    """Waits for the results by reading back the last (smallest) tensor:
    JAX's compiled outputs are ready together and a CUDA copy waits for the
    kernels queued before it, so no extra operation is timed."""
    return float(np.ravel(ops.convert_to_numpy(tensors[-1]))[0])


def _times(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--repeats", type=int, default=5, help="gradients and HVPs per round"
    )
    parser.add_argument(
        "--rounds", type=int, default=6, help="top eigenvalues (one a round)"
    )
    parser.add_argument(
        "--weights",
        choices=("shared", "keras"),
        default="shared",
        help="numpy-drawn weights, the same on every backend, or each "
        "backend's own initializer",
    )
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--output", default=None, help="JSON path")
    args = parser.parse_args()
    backend = keras.backend.backend()
    keras.utils.set_random_seed(0)

    model = build_model(weights=args.weights)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, 784)).astype("float32")
    y = rng.integers(0, 10, size=(args.batch_size,))
    hessian = sharpness.Hessian(model, (x, y))
    vectors = [
        ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32"))
        for v in model.trainable_variables
    ]

    # Interleaved rounds, so that a slow spell of a shared machine falls on
    # all three quantities alike: each round times gradients and HVPs, then
    # one top eigenvalue (start vector seeds 0, 1, 2, 0, ...).
    grad_fn = lambda: _block(hessian.loss_and_gradient()[1])  # noqa: E731
    hvp_fn = lambda: _block(hessian.hvp(vectors))  # noqa: E731
    for _ in range(2):  # warm-up: compilation excluded
        grad_fn(), hvp_fn()
    # One full run per seed compiles every call the timed runs make (on an
    # accelerator Lanczos compiles several iterations as one call); the
    # first also reports what a first call costs with compilation.
    start = time.perf_counter()
    hessian.top_eigenvalue(seed=0, tol=args.tol)
    first_call = time.perf_counter() - start
    for seed in (1, 2):
        hessian.top_eigenvalue(seed=seed, tol=args.tol)
    grad_times, hvp_times, eigen_times, counts = [], [], [], []
    for round_ in range(args.rounds):
        grad_times += _times(grad_fn, args.repeats)
        hvp_times += _times(hvp_fn, args.repeats)
        before = hessian.num_hvps
        start = time.perf_counter()
        value = hessian.top_eigenvalue(seed=round_ % 3, tol=args.tol)
        eigen_times.append(time.perf_counter() - start)
        counts.append(hessian.num_hvps - before)
    t_grad = statistics.median(grad_times)
    t_hvp = statistics.median(hvp_times)
    t_eigen = statistics.median(eigen_times)
    per_iteration = statistics.median(
        [t / n / t_hvp for t, n in zip(eigen_times, counts)]
    )

    result = {
        "backend": backend,
        "parameters": int(model.count_params()),
        "batch_size": args.batch_size,
        "weights": args.weights,
        "tol": args.tol,
        "gradient_s": t_grad,
        "hvp_s": t_hvp,
        "hvp_over_gradient": t_hvp / t_grad,
        "top_eigenvalue": value,
        "top_eigenvalue_s": t_eigen,
        "top_eigenvalue_in_hvps": t_eigen / t_hvp,
        "lanczos_products": counts,
        "product_in_hvps": per_iteration,
        "first_top_eigenvalue_s": first_call,
        "targets": {"hvp_over_gradient": 2.5, "top_eigenvalue_in_hvps": 30},
    }
    rows = [
        ("backend", backend, ""),
        ("parameters", f"{result['parameters']:,}", ""),
        ("gradient (ms)", f"{1e3 * t_grad:.1f}", ""),
        ("HVP (ms)", f"{1e3 * t_hvp:.1f}", ""),
        ("HVP / gradient", f"{t_hvp / t_grad:.2f}", "<= 2.5"),
        ("top eigenvalue", f"{value:.4f}", ""),
        ("top eigenvalue (ms)", f"{1e3 * t_eigen:.1f}", ""),
        ("top eigenvalue / HVP", f"{t_eigen / t_hvp:.1f}", "< 30"),
        ("Lanczos products", str(counts), ""),
        ("one product / HVP", f"{per_iteration:.2f}", ""),
        ("first call, compiling (s)", f"{first_call:.2f}", ""),
    ]
    print(f"{'quantity':<26}{'value':>16}  target")
    for name, value_text, target in rows:
        print(f"{name:<26}{value_text:>16}  {target}")
    output = args.output or f"hessian_{backend}.json"
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
