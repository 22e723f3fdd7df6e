"""Optimum shifting after SAM training, then export for serving.

Trains a small MLP on scikit-learn's bundled digits with `keras_sam.SAMModel`
and SAM, then applies `keras_sam.optimum_shift` on calibration data (128
training samples by default): the last Dense kernel (`--layers all`: every
one) moves to the minimum-norm weights that give the same outputs on that
data, so the loss on it does not change while the weight norm goes down.
With fewer calibration samples than hidden units there is much freedom;
with the whole training set only dead inputs and units are freed, and
nothing else moves (try `--calibration 0` for all of it).
Prints the shift report with the loss, Hessian trace (Hutchinson) and top
eigenvalue on the whole training set before and after (`evaluation_data=`:
on the calibration samples alone the flatness gain holds by construction,
on the whole set it need not; `examples/optimum_shift_experiment.py`
measures it over seeds), the test accuracy before and after, then
exports the shifted model as a SavedModel (`optimum_shift_serving/` in
`--out-dir`, by default `out/`), reloads it with TensorFlow and checks that
it serves the same predictions.

Runs in about a minute on 2 CPU cores with TensorFlow or JAX (training on
torch is several times slower); no download (the data ships with
scikit-learn). Pick the backend with KERAS_BACKEND; the export step runs on
TensorFlow and JAX (on torch 2.13 `model.export` fails inside Keras, so it
is skipped there).

    python examples/optimum_shift_export.py
    python examples/optimum_shift_export.py --calibration 0 --epochs 40
    python examples/optimum_shift_export.py --epochs 1 --probes 2  # quick
"""

import argparse
import os
import time

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import keras_sam


def load_data(seed):
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def build_model(width):
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def accuracy(model, x, y):
    logits = model.predict(x, verbose=0, batch_size=512)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def export_and_check(model, x, out_dir):
    """Exports a SavedModel, reloads it with TensorFlow, compares outputs."""
    if keras.backend.backend() == "torch":
        print("export: skipped (model.export fails in Keras on torch 2.13)")
        return
    import tensorflow as tf

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "optimum_shift_serving")
    model.export(path, verbose=False)
    loaded = tf.saved_model.load(path)
    served = loaded.serve(tf.constant(x)).numpy()
    diff = float(np.max(np.abs(served - model.predict(x, verbose=0))))
    print(f"export: {path}; max |serving - predict| = {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit("The SavedModel does not serve the shifted model.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument(
        "--calibration",
        type=int,
        default=128,
        help="calibration samples from the training set (0: all of it)",
    )
    parser.add_argument(
        "--layers", default="last", help="'last' (the paper) or 'all'"
    )
    parser.add_argument(
        "--probes",
        type=int,
        default=30,
        help="Hutchinson probes for the Hessian trace",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=1)
    parser.add_argument(
        "--out-dir", default="out", help="folder of the export (created)"
    )
    args = parser.parse_args()

    x_train, x_test, y_train, y_test = load_data(args.seed)
    keras.utils.set_random_seed(args.seed)
    model = keras_sam.SAMModel(build_model(args.width))
    model.compile(
        optimizer=keras_sam.optimizers.SAM(
            keras.optimizers.SGD(args.lr, momentum=0.9), rho=args.rho
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.time()
    model.fit(
        x_train,
        y_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        verbose=args.verbose,
    )
    print(f"trained {args.epochs} epochs in {time.time() - start:.1f}s")

    n = args.calibration or len(x_train)
    x_cal, y_cal = x_train[:n], y_train[:n]
    acc_before = accuracy(model, x_test, y_test)

    start = time.time()
    report = keras_sam.optimum_shift(
        model,
        (x_cal, y_cal),
        layers=args.layers,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        evaluation_data=(x_train, y_train),
        trace_probes=args.probes,
    )
    print(f"\nshifted and measured in {time.time() - start:.1f}s")
    print(report)
    print(
        f"test accuracy: {acc_before:.4f} -> "
        f"{accuracy(model, x_test, y_test):.4f}\n"
    )
    export_and_check(model, x_test, args.out_dir)


if __name__ == "__main__":
    main()
