"""Step time of SAM and SAMPa on several devices (JAX, `keras.distribution`).

Times one training step of the same network, from the same weights, in one
process:

| config | devices | global batch |
|---|---|---|
| `plain@1`, `sam@1`, `sampa@1` | 1 | B |
| `plain@N` | N (`DataParallel`) | N x B |
| `sam@N` (per-replica perturbation, the default) | N | N x B |
| `sam_sync@N` (`sync_perturbation=True`) | N | N x B |
| `sampa@N` (its two gradients at once, N/2 devices each) | N | B |

B is `--per-device-batch`. With `--loop train_on_batch` (the default) the
batch is placed on the devices once (split over them under a
distribution), so steps pay no host transfer, but every call pays Keras'
own per-call work (it writes the whole state back into the variables,
per variable and per device). `--loop fit` times steps inside `fit`, as
users train: the per-step time is the difference between `fit` over
`--steps + 10` and over 10 batches (numpy data, fed by Keras), divided by
`--steps`. The ratios that matter (targets from issue 18):
`sam@N / sam@1` (per-replica SAM scales: at most 1.1), `sam_sync@N /
sam@1` (at most 1.2), `sampa@N / plain@1` (SAMPa on two GPUs against one
plain step at the same batch: at most 1.25). Every config is built and warmed
up first; then each is timed in its own block (`train_on_batch`: the
median of `--steps` calls; `fit`: as above), in two rounds of opposite
order; the smaller of its two times is reported.

    KERAS_BACKEND=jax python benchmarks/multi_gpu_step.py --loop fit  # GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=2 KERAS_BACKEND=jax \\
        python benchmarks/multi_gpu_step.py --model tiny --steps 3  # CPU smoke
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_time import IMAGE_SHAPE  # noqa: E402
from step_time import MODELS  # noqa: E402
from step_time import NUM_CLASSES  # noqa: E402


def configs(n):
    """`(name, devices, batch multiple, optimizer factory)` per config."""
    opt = keras_sam.optimizers

    def sgd():
        return keras.optimizers.SGD(0.01, momentum=0.9)

    one = [
        ("plain@1", 1, 1, sgd),
        ("sam@1", 1, 1, lambda: opt.SAM(sgd(), rho=0.05)),
        ("sampa@1", 1, 1, lambda: opt.SAMPa(sgd(), rho=0.05)),
    ]
    if n < 2:
        return one
    return one + [
        (f"plain@{n}", n, n, sgd),
        (f"sam@{n}", n, n, lambda: opt.SAM(sgd(), rho=0.05)),
        (
            f"sam_sync@{n}",
            n,
            n,
            lambda: opt.SAM(sgd(), rho=0.05, sync_perturbation=True),
        ),
        (f"sampa@{n}", n, 1, lambda: opt.SAMPa(sgd(), rho=0.05)),
    ]


def _distribution(devices):
    if devices == 1:
        return None
    return keras.distribution.DataParallel(
        devices=keras.distribution.list_devices()[:devices]
    )


def _on_devices(array):
    """The batch placed once where the step reads it (split over the
    devices under a distribution), so no step pays a host transfer."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return keras.ops.convert_to_tensor(array)
    layout = distribution.get_data_layout(array.shape)
    return keras.distribution.distribute_tensor(array, layout)


def build(config, initial, args):
    """The compiled model of a config, warmed up, with its batch (on the
    devices for `train_on_batch`, numpy for `fit`)."""
    name, devices, multiple, make_optimizer = config
    keras.distribution.set_distribution(_distribution(devices))
    net = MODELS[args.model]()
    net.set_weights(initial)
    model = net if name.startswith("plain") else keras_sam.SAMModel(net)
    model.compile(
        optimizer=make_optimizer(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    batch = args.per_device_batch * multiple
    rng = np.random.default_rng(0)
    x = rng.random((batch,) + IMAGE_SHAPE, dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, batch).astype("int32")
    if args.loop == "fit":
        x = np.concatenate([x] * (args.steps + 10))
        y = np.concatenate([y] * (args.steps + 10))
        _fit(model, x, y, batch, 10)  # compiles the step
    else:
        x, y = _on_devices(x), _on_devices(y)
        for _ in range(args.warmup):
            model.train_on_batch(x, y)
    keras.distribution.set_distribution(None)
    return model, x, y


def _fit(model, x, y, batch, steps):
    """Seconds of `fit` over the first `steps` batches of `(x, y)`."""
    start = time.perf_counter()
    model.fit(
        x[: steps * batch],
        y[: steps * batch],
        batch_size=batch,
        epochs=1,
        shuffle=False,
        verbose=0,
    )
    return time.perf_counter() - start


def time_config(config, built, args):
    """Median seconds per step of a built config."""
    model, x, y = built
    keras.distribution.set_distribution(_distribution(config[1]))
    if args.loop == "fit":
        batch = args.per_device_batch * config[2]
        short = min(_fit(model, x, y, batch, 10) for _ in range(2))
        long = _fit(model, x, y, batch, args.steps + 10)
        keras.distribution.set_distribution(None)
        return (long - short) / args.steps
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)  # returns the loss: synchronizes
        times.append(time.perf_counter() - start)
    keras.distribution.set_distribution(None)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    parser.add_argument("--per-device-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--loop", choices=("train_on_batch", "fit"), default="train_on_batch"
    )
    parser.add_argument("--out", default=None, help="JSON file")
    args = parser.parse_args(argv)

    n = len(keras.distribution.list_devices())
    keras.utils.set_random_seed(0)
    initial = MODELS[args.model]().get_weights()
    table = configs(n)
    built = {config[0]: build(config, initial, args) for config in table}
    best = {}
    for round_ in range(2):
        order = table if round_ == 0 else list(reversed(table))
        for config in order:
            t = time_config(config, built[config[0]], args)
            best[config[0]] = min(best.get(config[0], t), t)
            print(f"round {round_}: {config[0]:12s} {1e3 * t:8.2f} ms")

    ms = {name: 1e3 * t for name, t in best.items()}
    ratios = {"sam@1 / plain@1": ms["sam@1"] / ms["plain@1"]}
    ratios["sampa@1 / plain@1"] = ms["sampa@1"] / ms["plain@1"]
    if n >= 2:
        ratios.update(
            {
                f"plain@{n} / plain@1": ms[f"plain@{n}"] / ms["plain@1"],
                f"sam@{n} / sam@1": ms[f"sam@{n}"] / ms["sam@1"],
                f"sam_sync@{n} / sam@1": ms[f"sam_sync@{n}"] / ms["sam@1"],
                f"sampa@{n} / plain@1": ms[f"sampa@{n}"] / ms["plain@1"],
            }
        )
    print("\n| config | ms per step |\n|---|---:|")
    for name, value in ms.items():
        print(f"| {name} | {value:.2f} |")
    print("\n| ratio | value |\n|---|---:|")
    for name, value in ratios.items():
        print(f"| {name} | {value:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "devices": [
                        str(d) for d in keras.distribution.list_devices()
                    ],
                    "model": args.model,
                    "per_device_batch": args.per_device_batch,
                    "steps": args.steps,
                    "loop": args.loop,
                    "ms": ms,
                    "ratios": ratios,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
