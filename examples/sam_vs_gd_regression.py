"""SAM versus gradient descent on noisy linear regression, early stopped.

A linear model `y = <beta, x> + noise` is fit by full-batch gradient descent
and by full-batch SAM (same step size, `keras_sam.SAMModel`), each stopped
early on a held-out validation set (best weights restored). Over several
seeds it prints the prediction error `||X_test (beta_hat - beta)||^2 / n`
of each and plots them; Behdin and Mazumder (arXiv 2302.11836) show that
SAM can have a smaller error than early-stopped gradient descent in such
problems.

Runs in about a minute on 2 CPU cores with the defaults; pick the backend
with KERAS_BACKEND.

    python examples/sam_vs_gd_regression.py
    python examples/sam_vs_gd_regression.py --seeds 20 --rho 0.5 --noise 2
"""

import argparse

import keras
import numpy as np

import keras_sam


def make_data(n, d, noise, seed):
    rng = np.random.default_rng(seed)
    # Features with a decaying spectrum: some directions are learned slowly.
    scales = 1.0 / np.sqrt(np.arange(1, d + 1))
    beta = rng.normal(size=d).astype("float32")

    def sample(m):
        x = (rng.normal(size=(m, d)) * scales).astype("float32")
        y = x @ beta + noise * rng.normal(size=m)
        return x, y[:, None].astype("float32")

    return sample(n), sample(n // 2), sample(1000), beta


def prediction_error(model, x_test, beta):
    kernel = keras.ops.convert_to_numpy(model.layers[-1].kernel)[:, 0]
    return float(np.mean((x_test @ (kernel - beta)) ** 2))


def fit(train, val, lr, rho, max_steps, patience, seed):
    keras.utils.set_random_seed(seed)
    base = keras.Sequential(
        [
            keras.Input((train[0].shape[1],)),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros"),
        ]
    )
    optimizer = keras.optimizers.SGD(lr)
    if rho is None:
        model = base
    else:
        model = keras_sam.SAMModel(base)
        optimizer = keras_sam.optimizers.SAM(optimizer, rho=rho)
    model.compile(optimizer=optimizer, loss="mse")
    stop = keras.callbacks.EarlyStopping(
        patience=patience, restore_best_weights=True
    )  # patience in validation checks
    # Every batch is the whole training set (one GD / SAM step); an "epoch"
    # is `check_every` such steps, after which validation decides.
    check_every = 10
    x, y = (np.tile(a, (check_every, 1)) for a in train)
    history = model.fit(
        x,
        y,
        batch_size=len(train[0]),
        epochs=max(max_steps // check_every, 1),
        validation_data=val,
        shuffle=False,
        verbose=0,
        callbacks=[stop],
    )
    return base, check_every * len(history.history["loss"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--features", type=int, default=40)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--rho", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--output", default="sam_vs_gd_regression.png")
    args = parser.parse_args()

    errors = {"GD": [], "SAM": []}
    bar = keras.utils.Progbar(args.seeds, unit_name="seed")
    for seed in range(args.seeds):
        train, val, test, beta = make_data(
            args.samples, args.features, args.noise, seed
        )
        for name, rho in (("GD", None), ("SAM", args.rho)):
            model, steps = fit(
                train, val, args.lr, rho, args.max_steps, args.patience, seed
            )
            errors[name].append(prediction_error(model, test[0], beta))
        bar.update(seed + 1)

    print(f"{'seed':>4} {'GD error':>10} {'SAM error':>10}")
    for seed, (gd, sam) in enumerate(zip(errors["GD"], errors["SAM"])):
        print(f"{seed:4d} {gd:10.4f} {sam:10.4f}")
    for name, values in errors.items():
        print(
            f"{name}: mean prediction error {np.mean(values):.4f} "
            f"+- {np.std(values) / np.sqrt(len(values)):.4f}"
        )
    wins = np.mean(np.array(errors["SAM"]) < np.array(errors["GD"]))
    print(f"SAM better on {100 * wins:.0f}% of seeds")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.boxplot([errors["GD"], errors["SAM"]])
    ax.set_xticks([1, 2], ["GD", f"SAM (rho={args.rho})"])
    ax.set_ylabel("prediction error (early stopped)")
    ax.set_title(f"Linear regression, {args.seeds} seeds")
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
