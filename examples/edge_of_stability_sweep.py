"""Edge of stability on digits: learning rate vs sharpness, norm, test loss.

Fojtik et al. (arXiv 2505.21423) train networks on an MNIST subset with
the squared loss by full-batch gradient descent, stopped once the training
loss falls below a threshold, once per learning rate of a sweep. Below the
critical rate `lr_c = 2 / S_GF` (`S_GF`: the sharpness of the minimum that
gradient flow reaches from the same start) gradient descent lands near
that minimum; above it, the final sharpness follows `2 / lr` down while
the parameter norm grows, and the test loss is U-shaped in the learning
rate: best at an intermediate rate, where neither low norm nor low
sharpness wins alone.

This script does that sweep on scikit-learn's bundled 8x8 digits, standing
in for the MNIST subset (no download; smaller images, an MLP): one-hot
targets, MSE, a fixed initialization, full-batch gradient descent until
the training loss is at most `--threshold` (or `--max-steps`). `lr_c` comes
from `keras_sam.sharpness.critical_learning_rate` (a small-step run as the
gradient-flow proxy). For each learning rate it prints the final sharpness
(the largest |eigenvalue| of the Hessian, the paper's definition) next to
`2 / lr`, the l1 norm of the weights, the test loss and accuracy, says
whether the test loss is U-shaped, and plots all of it
(`edge_of_stability_sweep.png` in `--out-dir`, by default `out/`).

About three minutes on 2 CPU cores with TensorFlow or JAX; pick the
backend with KERAS_BACKEND.

    python examples/edge_of_stability_sweep.py
    python examples/edge_of_stability_sweep.py --samples 1000 --num-lrs 12
    python examples/edge_of_stability_sweep.py --num-lrs 3 --max-steps 500
"""

import argparse
import os
import time

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import keras_sam
from keras_sam import sharpness


def load_data(samples, seed):
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = np.eye(10, dtype="float32")[digits.target]
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, train_size=samples, random_state=seed, stratify=digits.target
    )
    return (x_train, y_train), (x_test, y_test)


def build_model(width, seed, scale=1.0):
    # Glorot uniform times `scale`: a smaller start keeps GD out of the lazy
    # regime, where the weights (and their norm) barely move.
    init = keras.initializers.VarianceScaling(
        scale * scale, "fan_avg", "uniform", seed=seed
    )
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(
                width, activation="tanh", kernel_initializer=init
            ),
            keras.layers.Dense(
                width, activation="tanh", kernel_initializer=init
            ),
            keras.layers.Dense(10, kernel_initializer=init),
        ]
    )


def l1_norm(model):
    return sharpness.parameter_norms(model)["l1"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.02)
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--num-lrs", type=int, default=7)
    parser.add_argument(
        "--max-ratio",
        type=float,
        default=4.0,
        help="largest learning rate of the sweep, in units of lr_c",
    )
    parser.add_argument(
        "--init-scale", type=float, default=1.0, help="times Glorot uniform"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out-dir", default="out", help="folder of the plot (created)"
    )
    args = parser.parse_args()
    start = time.time()
    train, test = load_data(args.samples, args.seed)
    keras.utils.set_random_seed(args.seed)
    init = build_model(args.width, args.seed, args.init_scale)
    init_weights = init.get_weights()

    gf = sharpness.critical_learning_rate(
        init,
        train,
        learning_rate=0.05,
        max_steps=args.max_steps,
        loss_threshold=args.threshold,
        loss="mse",
        check_every=50,
    )
    critical = gf["critical_learning_rate"]
    if not gf["reached_threshold"]:
        print(
            "the gradient-flow proxy did not reach the threshold: raise "
            "--max-steps; lr_c below may be too large"
        )
    print(
        f"gradient-flow proxy: lr {gf['learning_rate']:g}, {gf['steps']} "
        f"steps, loss {gf['loss']:.4f}; S_GF = {gf['sharpness']:.3f}, "
        f"lr_c = 2 / S_GF = {critical:.4f}"
    )

    ratios = np.geomspace(0.35, args.max_ratio, args.num_lrs)
    rows = []
    bar = keras.utils.Progbar(len(ratios), unit_name="learning rate")
    for i, ratio in enumerate(ratios):
        lr = float(ratio * critical)
        model = build_model(args.width, args.seed, args.init_scale)
        model.set_weights(init_weights)
        run = sharpness.full_batch_gradient_descent(
            model,
            train,
            lr,
            max_steps=args.max_steps,
            loss_threshold=args.threshold,
            loss="mse",
            check_every=50,
        )
        if run["diverged"]:
            rows.append((ratio, lr, run["steps"], np.nan, *[np.nan] * 4))
        else:
            s = sharpness.top_eigenvalue(model, train, which="magnitude")
            test_loss = float(model.evaluate(*test, verbose=0))
            logits = model.predict(test[0], verbose=0)
            acc = float(np.mean(logits.argmax(-1) == test[1].argmax(-1)))
            rows.append(
                (
                    ratio,
                    lr,
                    run["steps"],
                    run["loss"],
                    s,
                    l1_norm(model),
                    test_loss,
                    acc,
                )
            )
        bar.update(i + 1)

    print(
        f"\n{'lr/lr_c':>7} {'lr':>7} {'steps':>6} {'train':>7} "
        f"{'S':>8} {'2/lr':>8} {'S*lr/2':>7} {'l1':>8} {'test loss':>9} "
        f"{'test acc':>8}"
    )
    for ratio, lr, steps, loss, s, l1, test_loss, acc in rows:
        print(
            f"{ratio:7.2f} {lr:7.4f} {steps:6d} {loss:7.4f} {s:8.3f} "
            f"{2 / lr:8.3f} {s * lr / 2:7.3f} {l1:8.1f} {test_loss:9.5f} "
            f"{100 * acc:8.2f}"
        )
    table = np.array([r[:2] + r[3:] for r in rows], dtype=float)
    ratio, lrs, _, s, l1, test_loss, _ = table.T
    ok = np.isfinite(test_loss)
    unreached = [r for r in rows if r[3] > args.threshold]
    if unreached:
        print(
            f"{len(unreached)} run(s) stopped at --max-steps above the "
            f"loss threshold {args.threshold}"
        )
    above = ok & (ratio > 1)
    if above.any():
        q = s[above] * lrs[above] / 2
        print(
            f"lr > lr_c: final sharpness / (2 / lr) in "
            f"[{q.min():.3f}, {q.max():.3f}]"
        )
    if ok.sum() >= 3:
        best = int(np.nanargmin(np.where(ok, test_loss, np.nan)))
        valid = np.flatnonzero(ok)
        interior = valid[0] < best < valid[-1]
        print(
            f"l1 norm from {l1[valid[0]]:.1f} (lr/lr_c {ratio[valid[0]]:.2f})"
            f" to {l1[valid[-1]]:.1f} (lr/lr_c {ratio[valid[-1]]:.2f}); "
            f"lowest test loss {test_loss[best]:.5f} at lr/lr_c "
            f"{ratio[best]:.2f}: "
            + (
                "U-shaped (interior minimum)"
                if interior
                else "not U-shaped (minimum at an end of the sweep)"
            )
        )
    print(f"({time.time() - start:.0f}s)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].loglog(lrs[ok], s[ok], "o-", label="final sharpness")
    axes[0].loglog(lrs, 2 / lrs, "k--", label="2 / lr")
    axes[1].semilogx(lrs[ok], l1[ok], "o-", color="C1")
    axes[2].semilogx(lrs[ok], test_loss[ok], "o-", color="C2")
    labels = ("max |eigenvalue| of the Hessian", "l1 norm", "test MSE")
    for ax, label in zip(axes, labels):
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axvline(critical, color="gray", lw=0.5)
        ax.set(xlabel="learning rate", ylabel=label)
    axes[0].legend()
    fig.suptitle(
        f"Digits ({args.samples} samples), MSE, full-batch GD to loss "
        f"{args.threshold} ({keras_sam.__name__}, {keras.backend.backend()})"
    )
    fig.tight_layout()
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "edge_of_stability_sweep.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
