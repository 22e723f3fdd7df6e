"""Does the sharpness-aware step run under torch.compile (`jit_compile=True`)?

Trains a small CNN with BatchNorm and Dropout through `fit` on the torch
backend, compiled and eager, plain and SAM, on the same data and initial
weights, and prints for each: whether it ran, the step time (median of the
timed steps), the final loss, and for compiled SAM the largest weight
difference to eager SAM after the same steps (dropout masks come from
torch's generators, which the compiled graph draws from in its own order,
so only a model without dropout is expected to agree to round-off; both are
reported).

    KERAS_BACKEND=torch python benchmarks/torch_compile.py          # GPU
    KERAS_BACKEND=torch python benchmarks/torch_compile.py --steps 5  # smoke
"""

import argparse
import json
import os
import statistics
import time
import traceback

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402


def build(dropout, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(32, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
    ]
    if dropout:
        layers.append(keras.layers.Dropout(0.2))
    layers.append(keras.layers.Dense(10))
    return keras.Sequential(layers)


def run(sam, jit, dropout, x, y, steps, batch_size):
    base = build(dropout)
    model = keras_sam.SAMModel(base) if sam else base
    inner = keras.optimizers.SGD(0.05, momentum=0.9)
    optimizer = keras_sam.optimizers.SAM(inner, rho=0.05) if sam else inner
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    times = []
    loss = None
    for i in range(steps):
        start = (i * batch_size) % len(x)
        batch = (x[start : start + batch_size], y[start : start + batch_size])
        t0 = time.perf_counter()
        loss = model.train_on_batch(*batch)  # reads the loss: synchronizes
        times.append(time.perf_counter() - t0)
    timed = times[3:] or times
    return {
        "ms": 1000 * statistics.median(timed),
        "loss": float(np.asarray(loss).reshape(-1)[0]),
        "weights": [np.asarray(w) for w in base.get_weights()],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = args.batch_size * 4
    x = rng.normal(size=(n, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=(n,)).astype("int32")
    rows = []
    for dropout in (False, True):
        results = {}
        for sam in (False, True):
            for jit in (False, True):
                kind = "compiled" if jit else "eager"
                name = f"{'sam' if sam else 'plain'}-{kind}"
                try:
                    results[name] = run(
                        sam, jit, dropout, x, y, args.steps, args.batch_size
                    )
                    status = "ok"
                except Exception as e:  # report, then go on
                    traceback.print_exc()
                    results[name] = None
                    status = f"failed: {type(e).__name__}: {e}"[:300]
                row = {"dropout": dropout, "run": name, "status": status}
                if results[name] is not None:
                    row["ms"] = round(results[name]["ms"], 2)
                    row["loss"] = round(results[name]["loss"], 5)
                rows.append(row)
        a, b = results.get("sam-eager"), results.get("sam-compiled")
        if a and b:
            rows.append(
                {
                    "dropout": dropout,
                    "run": "sam compiled vs eager: max |dw|",
                    "status": "ok",
                    "value": max(
                        float(np.max(np.abs(u - v)))
                        for u, v in zip(a["weights"], b["weights"])
                    ),
                }
            )
        for kind in ("eager", "compiled"):
            p, s = results.get(f"plain-{kind}"), results.get(f"sam-{kind}")
            if p and s:
                rows.append(
                    {
                        "dropout": dropout,
                        "run": f"SAM/plain {kind}",
                        "status": "ok",
                        "value": round(s["ms"] / p["ms"], 3),
                    }
                )
    for row in rows:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"keras": keras.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
