"""Test accuracy of plain SGD and sharpness-aware methods under label noise.

Trains the same network with plain SGD (momentum 0.9) and with SAM, ASAM,
Riemannian SGD (`rsgd`: RSAM with rho 0, the hidden kernels on a sphere),
RSAM (the same sphere), LETS and SAMPa wrapped around that same SGD, for
the same number of epochs,
from the same initial weights per seed, on training labels with 0%, 20% and
40% symmetric label noise (that fraction of the training and validation
labels is replaced by a uniformly drawn *other* class; test labels stay
clean). Reports test accuracy, mean and std over the seeds.

- `--dataset digits` (default): scikit-learn's bundled 8x8 digits, a
  64-256-256-10 MLP; no download.
- `--dataset cifar10`: CIFAR-10 through tensorflow-datasets (downloads once),
  a small CNN.

Every method trains on the same training split; a validation split (10%,
labels as noisy as the training ones) is used only by LETS, which learns rho
from it. Writes `accuracy.md` (table), `accuracy.json` and `accuracy.png`
(plot) to `--out`.

The default run (3 noise levels x 3 seeds x 7 methods on digits) takes about
15 minutes on 2 CPU cores; `--quick` is a smoke run of a few seconds each.

    python benchmarks/accuracy.py --out results/accuracy
    python benchmarks/accuracy.py --quick
    python benchmarks/accuracy.py --dataset cifar10 --epochs 30
"""

import argparse
import datetime
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402

# ---------------------------------------------------------------------------
# Data


def add_label_noise(y, rate, num_classes, rng):
    """Replaces a fraction `rate` of labels by a uniformly drawn other class."""
    y = np.asarray(y).astype("int32")
    flip = rng.random(len(y)) < rate
    other = (y + rng.integers(1, num_classes, len(y))) % num_classes
    return np.where(flip, other, y).astype("int32")


def split_validation(x, y, fraction, rng):
    order = rng.permutation(len(x))
    n_val = int(round(fraction * len(x)))
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def load_digits(seed):
    """scikit-learn's digits: (x_train, y_train), (x_test, y_test)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    return (x_train, y_train), (x_test, y_test)


def load_cifar10(seed=None):
    """CIFAR-10 from tensorflow-datasets, scaled to [0, 1]."""
    import tensorflow_datasets as tfds

    splits = tfds.load("cifar10", split=["train", "test"], as_supervised=True)
    arrays = []
    for split in splits:
        xs, ys = zip(*tfds.as_numpy(split.batch(10000)))
        x = np.concatenate(xs).astype("float32") / 255.0
        arrays.append((x, np.concatenate(ys).astype("int32")))
    return tuple(arrays)


def make_splits(dataset, noise, seed, validation_fraction=0.1):
    """Noisy train and validation splits and the clean test split."""
    train, test = DATASETS[dataset][0](seed)
    rng = np.random.default_rng(seed)
    x, y = train
    y = add_label_noise(y, noise, 10, rng)
    train, val = split_validation(x, y, validation_fraction, rng)
    return train, val, test


# ---------------------------------------------------------------------------
# Models


def mlp():
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(256, activation="relu", name="hidden1"),
            keras.layers.Dense(256, activation="relu", name="hidden2"),
            keras.layers.Dense(10, name="output"),
        ]
    )


def small_cnn():
    layers = [keras.Input((32, 32, 3))]
    for i, filters in enumerate((32, 64, 128)):
        layers += [
            keras.layers.Conv2D(
                filters, 3, padding="same", use_bias=False, name=f"hidden{i}"
            ),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(),
        ]
    layers += [
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10, name="output"),
    ]
    return keras.Sequential(layers)


# name -> (loader, network builder, default epochs)
DATASETS = {
    "digits": (load_digits, mlp, 30),
    "cifar10": (load_cifar10, small_cnn, 15),
}

# ---------------------------------------------------------------------------
# Methods: name -> builder(net, sgd, val) -> (model, optimizer)


def hidden_kernels_on_sphere(net):
    return {
        layer.name: "sphere"
        for layer in net.layers
        if layer.name.startswith("hidden")
    }


def method_table():
    """Methods available in this version of keras_sam, in table order."""
    opt = keras_sam.optimizers
    wrap = keras_sam.SAMModel

    def plain(net, sgd, val):
        return net, sgd

    def sam(net, sgd, val):
        return wrap(net), opt.SAM(sgd, rho=0.05)

    def asam(net, sgd, val):
        return wrap(net), opt.ASAM(sgd, rho=0.5)

    def rsam(net, sgd, val):
        manifold = hidden_kernels_on_sphere(net)
        return wrap(net), opt.RSAM(sgd, rho=0.05, manifold=manifold)

    def rsgd(net, sgd, val):  # Riemannian SGD: the same sphere, rho = 0
        manifold = hidden_kernels_on_sphere(net)
        return wrap(net), opt.RSAM(sgd, rho=0.0, manifold=manifold)

    def lets(net, sgd, val):
        radius = keras_sam.LearnedRadius(
            initial=0.05, learning_rate=0.01, validation_data=val, seed=0
        )
        return wrap(net), opt.SAM(sgd, rho=radius)

    def sampa(net, sgd, val):
        return wrap(net), opt.SAMPa(sgd, rho=0.05, lam=0.2)

    methods = {"plain": plain, "sam": sam, "asam": asam}
    if hasattr(opt, "RSAM"):
        methods["rsgd"] = rsgd
        methods["rsam"] = rsam
    if hasattr(keras_sam, "LearnedRadius"):
        methods["lets"] = lets
    if hasattr(opt, "SAMPa"):
        methods["sampa"] = sampa
    return methods


# ---------------------------------------------------------------------------
# Training and reporting


def train_and_test(method, net_fn, initial, splits, args):
    (x_train, y_train), val, (x_test, y_test) = splits
    net = net_fn()
    net.set_weights(initial)
    sgd = keras.optimizers.SGD(args.lr, momentum=0.9)
    model, optimizer = method_table()[method](net, sgd, val)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        verbose=0,
    )
    _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    return float(accuracy)


def summarize(runs, methods, noises):
    """{method: {noise: (mean, std)}} over seeds."""
    summary = {}
    for m in methods:
        summary[m] = {}
        for noise in noises:
            accs = [
                r["accuracy"]
                for r in runs
                if r["method"] == m and r["noise"] == noise
            ]
            summary[m][noise] = (float(np.mean(accs)), float(np.std(accs)))
    return summary


def markdown(summary, noises, seeds):
    header = " | ".join(f"{n:.0%} noise" for n in noises)
    lines = [
        f"| method | {header} |",
        "|---|" + "---:|" * len(noises),
    ]
    for m, row in summary.items():
        cells = " | ".join(
            f"{100 * row[n][0]:.2f} ± {100 * row[n][1]:.2f}" for n in noises
        )
        lines.append(f"| {m} | {cells} |")
    lines.append(f"\nTest accuracy (%), mean ± std over {len(seeds)} seed(s).")
    return "\n".join(lines)


def plot(summary, noises, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [100 * n for n in noises]
    for i, (m, row) in enumerate(summary.items()):
        # Small horizontal offsets keep the error bars apart.
        offset = (i - (len(summary) - 1) / 2) * 0.6
        ax.errorbar(
            [x + offset for x in xs],
            [100 * row[n][0] for n in noises],
            yerr=[100 * row[n][1] for n in noises],
            marker="o",
            capsize=3,
            label=m,
        )
    ax.set_xlabel("symmetric label noise (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(xs)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="digits")
    parser.add_argument(
        "--noise", default="0,0.2,0.4", help="comma-separated noise rates"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default: 30 (digits), 15 (cifar10)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset; default: all available",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 seed, 2 epochs",
    )
    parser.add_argument("--out", default="accuracy_results")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = DATASETS[args.dataset][2]
    if args.quick:
        args.seeds, args.epochs = 1, 2
    return args


def main(argv=None):
    args = parse_args(argv)
    available = list(method_table())
    methods = available if args.methods is None else args.methods.split(",")
    unknown = sorted(set(methods) - set(available))
    if unknown:
        raise SystemExit(
            f"Unknown or unavailable methods {unknown}; "
            f"available: {available}"
        )
    noises = [float(n) for n in args.noise.split(",")]
    seeds = list(range(args.seeds))
    net_fn = DATASETS[args.dataset][1]
    runs = []
    for noise in noises:
        for seed in seeds:
            splits = make_splits(args.dataset, noise, seed)
            keras.utils.set_random_seed(seed)
            initial = net_fn().get_weights()
            for method in methods:
                keras.utils.set_random_seed(seed)
                start = time.perf_counter()
                accuracy = train_and_test(method, net_fn, initial, splits, args)
                seconds = time.perf_counter() - start
                runs.append(
                    {
                        "noise": noise,
                        "seed": seed,
                        "method": method,
                        "accuracy": accuracy,
                        "seconds": seconds,
                    }
                )
                print(
                    f"noise {noise:.0%} seed {seed} {method:>5}: "
                    f"test accuracy {accuracy:.4f} ({seconds:.1f} s)",
                    flush=True,
                )
                keras.backend.clear_session()

    summary = summarize(runs, methods, noises)
    title = (
        f"{args.dataset}, {args.epochs} epochs, "
        f"{keras.backend.backend()} backend"
    )
    table = markdown(summary, noises, seeds)
    print(f"\n{title}\n\n{table}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "accuracy.md"), "w") as f:
        f.write(f"{title}\n\n{table}\n")
    plot(summary, noises, title, os.path.join(args.out, "accuracy.png"))
    report = {
        "date": datetime.date.today().isoformat(),
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "args": vars(args),
        "runs": runs,
        "summary": {
            m: {str(n): v for n, v in row.items()} for m, row in summary.items()
        },
    }
    with open(os.path.join(args.out, "accuracy.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}/accuracy.md, accuracy.json, accuracy.png")
    return report


if __name__ == "__main__":
    main()
