"""SAM with `keras.distribution.DataParallel` on every visible device (JAX).

Trains the same small MLP from the same weights three ways and prints the
largest weight difference between the multi-device run and its
single-device reference:

- `sync`: `sync_perturbation=True` on N devices against plain SAM on one
  device (eps from the gradient of the whole global batch);
- `per-replica` (the default): N devices against one device with
  `num_batch_splits=N` (eps from each replica's part of the batch).

Run (GPUs are used when JAX sees them):

    KERAS_BACKEND=jax python benchmarks/multi_device.py
    KERAS_BACKEND=jax python benchmarks/multi_device.py --steps 200 --batch 512

On CPU, simulate devices with
`XLA_FLAGS=--xla_force_host_platform_device_count=2`.
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402


def build(seed, features, classes):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(classes),
        ]
    )


def train(weights, x, y, args, distribution=None, **sam_kwargs):
    keras.distribution.set_distribution(distribution)
    base = build(0, x.shape[1], args.classes)
    base.set_weights(weights)
    model = keras_sam.SAMModel(base)
    model.compile(
        optimizer=keras_sam.optimizers.SAM(
            keras.optimizers.SGD(args.lr, momentum=0.9),
            rho=args.rho,
            **sam_kwargs,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    start = time.perf_counter()
    history = model.fit(
        x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0
    )
    seconds = time.perf_counter() - start
    keras.distribution.set_distribution(None)
    result = [np.asarray(w, dtype="float64") for w in model.get_weights()]
    return result, history.history["loss"][-1], seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument(
        "--precision",
        default="highest",
        help="jax_default_matmul_precision; 'highest' avoids TF32 on GPUs",
    )
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", args.precision)

    devices = jax.devices()
    n = len(devices)
    print(f"backend={keras.backend.backend()} devices={n}: {devices}")
    if args.batch % n:
        raise ValueError(
            f"`--batch` must be divisible by the {n} devices. "
            f"Received: --batch={args.batch}"
        )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.steps * args.batch, args.features))
    x = x.astype("float32")
    y = rng.integers(0, args.classes, size=(len(x),))
    weights = build(0, args.features, args.classes).get_weights()
    data_parallel = keras.distribution.DataParallel(
        devices=keras.distribution.list_devices()
    )

    for mode, kwargs, reference_kwargs in [
        ("sync", {"sync_perturbation": True}, {}),
        ("per-replica", {}, {"num_batch_splits": n}),
    ]:
        single, single_loss, t1 = train(weights, x, y, args, **reference_kwargs)
        multi, multi_loss, tn = train(
            weights, x, y, args, distribution=data_parallel, **kwargs
        )
        moved = max(
            float(np.max(np.abs(a - b))) for a, b in zip(single, weights)
        )
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(single, multi))
        print(
            f"{mode:12s} max |w_{n}dev - w_1dev| = {diff:.3e} "
            f"(weights moved {moved:.3e}); last loss {multi_loss:.4f} vs "
            f"{single_loss:.4f}; fit {tn:.1f}s on {n} devices, {t1:.1f}s "
            "on one (first includes compilation)"
        )


if __name__ == "__main__":
    main()
