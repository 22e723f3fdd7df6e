"""Two minima: plain SGD settles in the sharp one, SAM in the flat one.

A 2-D loss with two minima: a narrow quadratic pit (sharp: curvature
`2 * SHARP_DEPTH / SHARP_RADIUS**2`, about 11) on the side of a wide
Gaussian well (flat: curvature about 0.44). The 2-D point is the one weight
of a tiny Keras model whose output is the loss there. Both runs start from
the same point inside the sharp pit and take the same steps of
`keras.optimizers.SGD(0.15)`; the SAM run wraps that SGD in
`keras_sam.optimizers.SAM` through `keras_sam.SAMModel`.

Why they part: gradient descent with step `lr` is stable at a minimum of
curvature `lam` if `lr * lam < 2` (here 1.67: SGD stays in the pit). SAM's
update takes the gradient at `w + rho * g`, which near a minimum is
`lam * (1 + rho * lam)` times the offset, so SAM is stable there only if
`lr * lam * (1 + rho * lam) < 2` (here 3.5 in the pit, 0.07 in the flat
well): its iterates are thrown out of the sharp pit and settle in the wide
well. The example uses SAM's unnormalized form (`normalize=False`,
`eps = rho * g`), the one this stability argument is about; the normalized
step (`eps = rho * g / ||g||`) also oscillates out of the pit, but on a
landscape this small it can stop on the ridge between the two basins.

Runs in a few seconds on a laptop CPU, on any Keras backend, and writes the
two paths over the contour plot to `out/two_minima.png`.

    python examples/two_minima.py
    python examples/two_minima.py --rho 0.05 --steps 300 --out-dir docs/images
"""

import argparse
import os

# TensorFlow's C++ info lines are not errors; hide the ones it lets us hide.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
from keras import ops

import keras_sam

SHARP_CENTER = (1.0, 0.5)
SHARP_RADIUS = 0.3
SHARP_DEPTH = 0.5
FLAT_CENTER = (-1.0, -0.5)
FLAT_WIDTH = 1.5
FLAT_DEPTH = 1.0
START = (1.15, 0.65)


def landscape(w):
    """The loss at `w` (last axis of size 2), in `keras.ops` or numpy."""
    dx = w[..., 0] - FLAT_CENTER[0]
    dy = w[..., 1] - FLAT_CENTER[1]
    flat = -FLAT_DEPTH * ops.exp(-(dx**2 + dy**2) / (2 * FLAT_WIDTH**2))
    sx = w[..., 0] - SHARP_CENTER[0]
    sy = w[..., 1] - SHARP_CENTER[1]
    pit = -SHARP_DEPTH * ops.relu(1 - (sx**2 + sy**2) / SHARP_RADIUS**2)
    return flat + pit


class Point(keras.Model):
    """A model whose one weight is the 2-D point; its output is the loss."""

    def __init__(self, start=START, **kwargs):
        super().__init__(**kwargs)
        self.w = self.add_weight(
            shape=(2,),
            initializer=keras.initializers.Constant(start),
            name="w",
        )

    def call(self, x):
        # One loss value per sample of the (dummy) batch.
        return ops.zeros_like(x) + landscape(self.w)


def landscape_loss(y_true, y_pred):
    return ops.mean(y_pred, axis=-1)


def train(optimizer, steps, start=START, sam=False):
    """Run `steps` full-batch steps from `start`; return the path."""
    point = Point(start)
    model = keras_sam.SAMModel(point) if sam else point
    model.compile(optimizer=optimizer, loss=landscape_loss)
    x = np.ones((1, 1), "float32")
    y = np.zeros((1, 1), "float32")
    path = [np.array(start, "float32")]
    for _ in range(steps):
        model.train_on_batch(x, y)
        path.append(keras.ops.convert_to_numpy(point.w))
    return np.stack(path)


def run(steps=150, lr=0.15, rho=0.1, start=START):
    """Plain SGD and SAM(SGD) from `start`: returns `{name: path}`."""
    sgd = train(keras.optimizers.SGD(lr), steps, start)
    sam = train(
        keras_sam.optimizers.SAM(
            keras.optimizers.SGD(lr), rho=rho, normalize=False
        ),
        steps,
        start,
        sam=True,
    )
    return {"SGD": sgd, "SAM": sam}


def basin(w):
    """'sharp' or 'flat': which minimum the point `w` is nearer to."""
    w = np.asarray(w)
    sharp = np.linalg.norm(w - np.array(SHARP_CENTER))
    flat = np.linalg.norm(w - np.array(FLAT_CENTER))
    return "sharp" if sharp < flat else "flat"


def plot(paths, filename, rho):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = np.linspace(-3.0, 2.0, 300)
    ys = np.linspace(-2.5, 2.0, 270)
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).astype("float32")
    z = keras.ops.convert_to_numpy(landscape(keras.ops.convert_to_tensor(grid)))
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    levels = np.linspace(z.min(), z.max(), 30)
    contour = ax.contourf(xs, ys, z, levels=levels, cmap="viridis")
    ax.contour(xs, ys, z, levels=levels, colors="k", linewidths=0.3)
    fig.colorbar(contour, ax=ax, label="loss")
    styles = {"SGD": ("tab:red", "o"), "SAM": ("white", "s")}
    for name, path in paths.items():
        color, marker = styles[name]
        label = name if name == "SGD" else f"SAM (rho={rho}) around SGD"
        ax.plot(path[:, 0], path[:, 1], "-", color=color, lw=1.2, label=label)
        ax.plot(*path[-1], marker, color=color, ms=8, mec="k")
    ax.plot(*START, "*", color="gold", ms=14, mec="k", label="start")
    ax.annotate("sharp", SHARP_CENTER, xytext=(1.2, 1.2), color="white")
    ax.annotate("flat", FLAT_CENTER, xytext=(-1.3, -1.3), color="white")
    ax.set_xlabel("w[0]")
    ax.set_ylabel("w[1]")
    ax.set_title("Same start, same SGD steps: SGD stays sharp, SAM goes flat")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(filename, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.15)
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--out-dir", default="out")
    args = parser.parse_args()

    paths = run(args.steps, args.lr, args.rho)
    for name, path in paths.items():
        w = path[-1]
        loss = float(keras.ops.convert_to_numpy(landscape(w)))
        print(
            f"{name}: ends at ({w[0]:+.3f}, {w[1]:+.3f}), loss {loss:.4f}, "
            f"in the {basin(w)} minimum"
        )
    os.makedirs(args.out_dir, exist_ok=True)
    filename = os.path.join(args.out_dir, "two_minima.png")
    plot(paths, filename, args.rho)
    print(f"wrote {filename}")


if __name__ == "__main__":
    main()
