"""RSAM: a CNN with an orthogonal (Stiefel) convolution, SGD vs SAM vs RSAM.

A small CNN on scikit-learn's bundled 8x8 digits has one convolution in the
middle whose kernel, reshaped to (3 * 3 * channels, filters), is meant to have
orthonormal columns (a point of the Stiefel manifold, as in the RSAM paper).
All three runs start from the same weights, with that kernel initialized on
the manifold:

- SGD (momentum) and SAM around the same SGD treat the kernel as flat, so it
  drifts off the manifold;
- RSAM (`keras_sam.optimizers.RSAM`) perturbs along the manifold, projects
  the adversarial gradient onto its tangent space and retracts after each
  step, so the kernel stays orthonormal.

The script prints test accuracy and the orthonormality error
`max |U^T U - I|` of the kernel; the error is also logged each epoch (key
`orth_error`), and `--plot NAME` draws it into `--out-dir` (default
`out/`). `--projected` gives SGD and SAM the retraction too (projected
gradient descent) for a like-for-like comparison.
The training labels get symmetric label noise (20% by default).

Runs in about a minute on 2 CPU cores with the defaults; no download. Pick
the backend with KERAS_BACKEND.

    python examples/rsam_stiefel.py
    python examples/rsam_stiefel.py --epochs 60 --rho 0.1 --metric adaptive
    python examples/rsam_stiefel.py --projected --plot orth.png
"""

import argparse
import os
import time

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import keras_sam
from keras_sam import manifolds

STIEFEL_LAYER = "stiefel_conv"


def load_data(label_noise, seed):
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    rng = np.random.default_rng(seed)
    flip = rng.random(len(y_train)) < label_noise
    y_train = np.where(flip, rng.integers(0, 10, len(y_train)), y_train)
    return (x_train, y_train.astype("int32")), (x_test, y_test)


def build_model(filters, projected):
    """Conv -> Stiefel conv -> pool -> conv -> dense.

    The middle kernel, (3, 3, filters, filters), is a (9 * filters, filters)
    matrix with orthonormal columns at initialization.
    """
    constraint = manifolds.ManifoldConstraint("stiefel") if projected else None
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(filters, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(
                filters,
                3,
                padding="same",
                activation="relu",
                name=STIEFEL_LAYER,
                kernel_initializer=manifolds.StiefelInitializer(),
                kernel_constraint=constraint,
            ),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(
                2 * filters, 3, padding="same", activation="relu"
            ),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )


def orthonormality_error(kernel):
    """max |U^T U - I| of a kernel reshaped to (fan_in, units)."""
    u = np.asarray(kernel, dtype="float64").reshape(-1, kernel.shape[-1])
    return float(np.abs(u.T @ u - np.eye(u.shape[1])).max())


class OrthonormalityLog(keras.callbacks.Callback):
    """Writes the Stiefel kernel's orthonormality error into the logs."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["orth_error"] = orthonormality_error(self.layer.kernel)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument(
        "--metric",
        choices=["identity", "adaptive", "fisher"],
        default="identity",
        help="RSAM's metric (rho ~0.5 for adaptive)",
    )
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--label-noise", type=float, default=0.2)
    parser.add_argument(
        "--projected",
        action="store_true",
        help="retract SGD and SAM onto the manifold too (a constraint)",
    )
    parser.add_argument(
        "--plot", default=None, help="file name of a plot, in --out-dir"
    )
    parser.add_argument(
        "--out-dir", default="out", help="folder of the plot (created)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args()

    (x_train, y_train), (x_test, y_test) = load_data(
        args.label_noise, args.seed
    )
    keras.utils.set_random_seed(args.seed)
    initial = build_model(args.filters, False).get_weights()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    results, histories = {}, {}
    for name in ("sgd", "sam", "rsam"):
        keras.utils.set_random_seed(args.seed)
        net = build_model(args.filters, args.projected and name != "rsam")
        net.set_weights(initial)
        sgd = keras.optimizers.SGD(args.lr, momentum=0.9)
        if name == "sgd":
            model, optimizer = net, sgd
        elif name == "sam":
            model = keras_sam.SAMModel(net)
            optimizer = keras_sam.optimizers.SAM(sgd, rho=args.rho)
        else:
            model = keras_sam.SAMModel(net)
            optimizer = keras_sam.optimizers.RSAM(
                sgd,
                rho=args.rho,
                manifold={STIEFEL_LAYER: "stiefel"},
                metric=args.metric,
            )
        model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
        print(f"\n== {name}: {type(optimizer).__name__}")
        start = time.perf_counter()
        history = model.fit(
            x_train,
            y_train,
            batch_size=args.batch_size,
            epochs=args.epochs,
            callbacks=[OrthonormalityLog(net.get_layer(STIEFEL_LAYER))],
            verbose=args.verbose,
        )
        seconds = time.perf_counter() - start
        _, accuracy = model.evaluate(x_test, y_test, verbose=0)
        error = orthonormality_error(net.get_layer(STIEFEL_LAYER).kernel)
        results[name] = (accuracy, error, seconds)
        histories[name] = history.history["orth_error"]

    print(
        f"\nbackend {keras.backend.backend()}, label noise "
        f"{args.label_noise:.0%}, {args.epochs} epochs, rho {args.rho}, "
        f"RSAM metric {args.metric}"
        + (", SGD/SAM projected" if args.projected else "")
    )
    for name, (accuracy, error, seconds) in results.items():
        print(
            f"{name:>5}: test accuracy {accuracy:.4f}   "
            f"max|U^T U - I| {error:.2e}   ({seconds:.1f} s)"
        )

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for name, errors in histories.items():
            plt.semilogy(range(1, len(errors) + 1), errors, label=name)
        plt.xlabel("epoch")
        plt.ylabel("max |U^T U - I| of the Stiefel kernel")
        plt.legend()
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, args.plot)
        plt.savefig(path, dpi=120)
        print(f"plot saved to {path}")


if __name__ == "__main__":
    main()
