"""Cost of Hessian-vector products and of the top eigenvalue.

Measures, on the current Keras backend, for an MLP of about 1M parameters
(784 -> 1024 -> 192 -> 10, tanh) and one batch of 256:

- one gradient (`Hessian.loss_and_gradient`) and one Hessian-vector product
  (`Hessian.hvp`), median over repeats after warm-up (compilation excluded);
  target: HVP / gradient <= 2.5;
- `Hessian.top_eigenvalue` (Lanczos, tol 1e-3) in units of one HVP;
  target: < 30 HVPs of time.

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


def build_model(hidden=(1024, 192), inputs=784, classes=10):
    layers = [keras.Input((inputs,))]
    layers += [keras.layers.Dense(units, activation="tanh") for units in hidden]
    layers += [keras.layers.Dense(classes)]
    model = keras.Sequential(layers)
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def _block(tensors):
    """Waits for (possibly asynchronous) results by reading them back."""
    return float(
        ops.convert_to_numpy(ops.sum(ops.stack([ops.sum(t) for t in tensors])))
    )


def _median_time(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--eigen-repeats", type=int, default=3)
    parser.add_argument("--output", default=None, help="JSON path")
    args = parser.parse_args()
    backend = keras.backend.backend()
    keras.utils.set_random_seed(0)

    model = build_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, 784)).astype("float32")
    y = rng.integers(0, 10, size=(args.batch_size,))
    hessian = sharpness.Hessian(model, (x, y))
    vectors = [
        ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32"))
        for v in model.trainable_variables
    ]

    t_grad = _median_time(
        lambda: _block(hessian.loss_and_gradient()[1]), args.repeats
    )
    t_hvp = _median_time(lambda: _block(hessian.hvp(vectors)), args.repeats)

    hessian.top_eigenvalue(max_iter=3)  # warm-up of the Lanczos ops
    eigen_times, counts = [], []
    for seed in range(args.eigen_repeats):
        before = hessian.num_hvps
        start = time.perf_counter()
        value = hessian.top_eigenvalue(seed=seed)
        eigen_times.append(time.perf_counter() - start)
        counts.append(hessian.num_hvps - before)
    t_eigen = statistics.median(eigen_times)

    result = {
        "backend": backend,
        "parameters": int(model.count_params()),
        "batch_size": args.batch_size,
        "gradient_s": t_grad,
        "hvp_s": t_hvp,
        "hvp_over_gradient": t_hvp / t_grad,
        "top_eigenvalue": value,
        "top_eigenvalue_s": t_eigen,
        "top_eigenvalue_in_hvps": t_eigen / t_hvp,
        "lanczos_iterations": counts,
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
        ("Lanczos iterations", str(counts), ""),
    ]
    print(f"{'quantity':<24}{'value':>16}  target")
    for name, value_text, target in rows:
        print(f"{name:<24}{value_text:>16}  {target}")
    output = args.output or f"hessian_{backend}.json"
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
