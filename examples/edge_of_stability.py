"""Edge of stability: sharpness versus norm for a diagonal linear network.

A diagonal linear network `f(x) = <u * v, x>` is fit to a sparse linear
target (fewer samples than features, so many weights interpolate) by
full-batch gradient descent, once per learning rate of a sweep. Gradient
descent cannot settle where the top Hessian eigenvalue exceeds `2 / lr`, so
past the critical learning rate the final sharpness follows the `2 / lr`
line down, and the minimum it reaches changes: the plot shows the final
sharpness (with `2 / lr`) and the l1 norm of the learned regressor `u * v`
against the learning rate (Fojtik et al., arXiv 2505.21423).

Every batch is the whole training set, so each optimizer step is one step
of full-batch gradient descent. Runs in about a minute on 2 CPU cores with
the defaults; pick the backend with KERAS_BACKEND.

    python examples/edge_of_stability.py
    python examples/edge_of_stability.py --steps 5000 --num-lrs 16
"""

import argparse

import keras
import numpy as np

import keras_sam
from keras_sam import sharpness


class Diagonal(keras.layers.Layer):
    """`x -> x * u`, one trainable scale per feature."""

    def __init__(self, init=1.0, **kwargs):
        super().__init__(**kwargs)
        self.init = init

    def build(self, input_shape):
        self.u = self.add_weight(
            shape=(input_shape[-1],),
            initializer=keras.initializers.Constant(self.init),
            name="u",
        )

    def call(self, x):
        return x * self.u


def make_data(n, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    beta = np.zeros(d, "float32")
    beta[:3] = [1.5, -1.0, 1.0]
    return x, (x @ beta)[:, None].astype("float32")


def build_model(d, u0, v0):
    model = keras.Sequential(
        [
            keras.Input((d,)),
            Diagonal(u0),
            keras.layers.Dense(
                1,
                use_bias=False,
                kernel_initializer=keras.initializers.Constant(v0),
            ),
        ]
    )
    return model


def regressor(model):
    u = keras.ops.convert_to_numpy(model.layers[0].u)
    v = keras.ops.convert_to_numpy(model.layers[1].kernel)[:, 0]
    return u * v


def run(x, y, lr, steps, u0, v0):
    """Full-batch GD; returns (final sharpness, l1 of u*v, final loss)."""
    model = build_model(x.shape[1], u0, v0)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    repeats = 100
    x_steps = np.tile(x, (repeats, 1))  # `repeats` full batches per epoch
    y_steps = np.tile(y, (repeats, 1))
    model.fit(
        x_steps,
        y_steps,
        batch_size=len(x),
        epochs=max(steps // repeats, 1),
        shuffle=False,
        verbose=0,
    )
    loss = float(model.evaluate(x, y, verbose=0))
    if not np.isfinite(loss):
        return np.nan, np.nan, loss
    return (
        sharpness.top_eigenvalue(model, (x, y)),
        float(np.abs(regressor(model)).sum()),
        loss,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--features", type=int, default=40)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--num-lrs", type=int, default=8)
    parser.add_argument("--u0", type=float, default=1.5)
    parser.add_argument("--v0", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="edge_of_stability.png")
    args = parser.parse_args()
    keras.utils.set_random_seed(args.seed)
    x, y = make_data(args.samples, args.features, args.seed)

    initial = build_model(args.features, args.u0, args.v0)
    s0 = sharpness.top_eigenvalue(initial, (x, y), loss="mse")
    critical = 2.0 / s0
    lrs = critical * np.linspace(0.4, 1.6, args.num_lrs)
    print(f"initial sharpness {s0:.3f}: critical learning rate {critical:.4f}")

    results = []
    bar = keras.utils.Progbar(len(lrs), unit_name="learning rate")
    for i, lr in enumerate(lrs):
        results.append(run(x, y, float(lr), args.steps, args.u0, args.v0))
        bar.update(i + 1)
    print(f"{'lr':>8} {'2/lr':>8} {'sharpness':>10} {'l1(u*v)':>9} {'loss':>9}")
    for lr, (s, l1, loss) in zip(lrs, results):
        print(f"{lr:8.4f} {2 / lr:8.3f} {s:10.3f} {l1:9.3f} {loss:9.2e}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, l1, _ = map(np.array, zip(*results))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(lrs, s, "o-", label="final sharpness")
    grid = np.linspace(lrs[0], lrs[-1], 200)
    left.plot(grid, 2 / grid, "k--", label="2 / lr")
    left.axvline(critical, color="gray", lw=0.5)
    left.set(xlabel="learning rate", ylabel="top Hessian eigenvalue")
    left.legend()
    right.plot(lrs, l1, "o-", color="C1")
    right.axvline(critical, color="gray", lw=0.5)
    right.set(xlabel="learning rate", ylabel="l1 norm of u * v")
    fig.suptitle(
        f"Diagonal linear network, full-batch GD ({keras_sam.__name__}, "
        f"{keras.backend.backend()})"
    )
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
