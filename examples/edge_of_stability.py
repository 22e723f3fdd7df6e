"""Edge of stability: sharpness versus norm for a diagonal linear network.

A diagonal linear network `f(x) = <u * v, x>` is fit to a sparse linear
target (fewer samples than features, so many weights interpolate) by
full-batch gradient descent, once per learning rate of a sweep. It starts
small (`u = 0.1`, `v = 0`), where gradient descent with a small step finds
a sparse interpolator of low l1 norm. Call `S_ref` the sharpness of that
minimum (found here with a small learning rate,
`keras_sam.sharpness.critical_learning_rate`) and `lr_c = 2 / S_ref` the
critical learning rate. Below `lr_c` gradient descent reaches about the same
minimum, so the final sharpness stays flat. Gradient descent cannot settle
where the top Hessian eigenvalue exceeds `2 / lr`, so above `lr_c` the
sharpness rises during training until it meets `2 / lr` and stays there:
the final sharpness follows the `2 / lr` line down, and the flatter minimum
it settles in is less sparse, with a larger l1 norm (Fojtik et al., arXiv
2505.21423: the learning rate trades low norm for low sharpness). The
script prints and plots the final sharpness (with `2 / lr`) and the l1
norm of the learned regressor `u * v` against the learning rate
(`edge_of_stability.png` in `--out-dir`, by default `out/`).

Every batch is the whole training set, so each optimizer step is one step
of full-batch gradient descent. Runs in about a minute on 2 CPU cores with
the defaults; pick the backend with KERAS_BACKEND.

    python examples/edge_of_stability.py
    python examples/edge_of_stability.py --steps 6000 --num-lrs 17
    python examples/edge_of_stability.py --steps 300 --num-lrs 3  # quick
"""

import argparse
import os

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

    def get_config(self):
        return {**super().get_config(), "init": self.init}


def make_data(n, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    beta = np.zeros(d, "float32")
    beta[:3] = [1.5, -1.0, 1.0]
    return x, (x @ beta)[:, None].astype("float32"), beta


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
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--num-lrs", type=int, default=9)
    parser.add_argument("--u0", type=float, default=0.1)
    parser.add_argument("--v0", type=float, default=0.0)
    parser.add_argument(
        "--ref-lr",
        type=float,
        default=0.1,
        help="small learning rate whose minimum defines the critical one",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out-dir", default="out", help="folder of the plot (created)"
    )
    args = parser.parse_args()
    keras.utils.set_random_seed(args.seed)
    x, y, beta = make_data(args.samples, args.features, args.seed)

    # The minimum that small steps reach (close to gradient flow); the step
    # is halved until it sits well inside the stable region, lr < 1 / S.
    gf = sharpness.critical_learning_rate(
        build_model(x.shape[1], args.u0, args.v0),
        (x, y),
        learning_rate=args.ref_lr,
        max_steps=args.steps,
        loss="mse",
        check_every=100,
    )
    ref_lr, s_ref = gf["learning_rate"], gf["sharpness"]
    critical = gf["critical_learning_rate"]
    # Much past 1.3 lr_c, GD keeps oscillating at the edge for thousands of
    # steps (past about 1.5 lr_c it does not settle at all).
    lrs = critical * np.linspace(0.5, 1.3, args.num_lrs)
    print(
        f"sharpness after GD with lr {ref_lr:g}: {s_ref:.3f}, "
        f"critical learning rate 2 / {s_ref:.3f} = {critical:.4f}"
    )

    results = []
    bar = keras.utils.Progbar(len(lrs), unit_name="learning rate")
    for i, lr in enumerate(lrs):
        results.append(run(x, y, float(lr), args.steps, args.u0, args.v0))
        bar.update(i + 1)
    print(
        f"{'lr/lr_c':>7} {'lr':>8} {'2/lr':>8} {'sharpness':>10} "
        f"{'s*lr/2':>7} {'l1(u*v)':>9} {'loss':>9}"
    )
    for lr, (s, l1, loss) in zip(lrs, results):
        print(
            f"{lr / critical:7.2f} {lr:8.4f} {2 / lr:8.3f} {s:10.3f} "
            f"{s * lr / 2:7.3f} {l1:9.3f} {loss:9.2e}"
        )
    s, l1, _ = map(np.array, zip(*results))
    above, below = lrs > critical, lrs <= critical
    if above.any():
        ratio = s[above] * lrs[above] / 2
        print(
            f"lr > lr_c: final sharpness / (2 / lr) in "
            f"[{ratio.min():.3f}, {ratio.max():.3f}]"
        )
    if below.any():
        print(
            f"lr <= lr_c: final sharpness / S_ref in "
            f"[{s[below].min() / s_ref:.3f}, {s[below].max() / s_ref:.3f}]"
        )
    print(
        f"l1(u*v): {l1[below].mean():.3f} on average below lr_c, "
        f"{l1[-1]:.3f} at {lrs[-1] / critical:.2f} lr_c "
        f"(target: {np.abs(beta).sum():.3f})"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "edge_of_stability.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
