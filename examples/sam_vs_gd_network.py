"""SAM versus gradient descent on a one-hidden-layer network (teacher/student).

The second statistical problem of Behdin and Mazumder (arXiv 2302.11836):
a network with one hidden layer, trained by full-batch gradient descent and
by full-batch SAM on noisy labels from a teacher network. Here:

- inputs `x ~ N(0, I_d)`; teacher `y = sum_k tanh(w_k . x) + noise`, with
  `--teacher-width` units, `||w_k|| = 1`, Gaussian noise of std `--noise`;
- student: `Dense(width, tanh) -> Dense(1)`, wider than the teacher, MSE;
- GD, SAM without normalization as in the analysis (`SAM(normalize=False)`:
  `g_adv = grad L(w + rho g)`) and normalized SAM (`eps = rho g / ||g||`),
  all with the same step size, from the same initial weights per seed; each
  SAM's rho is picked from a small grid by the validation loss;
- two stopping rules: oracle (the best test error over the run, which the
  analysis bounds) and validated (the weights at the lowest validation loss);
- the sharpness of each validated solution: top Hessian eigenvalue and
  Hessian trace of the training loss (`keras_sam.sharpness`).

The test error is the mean squared distance to the noiseless teacher.

Printed by the defaults (TensorFlow, 3 seeds; test error mean +- s.e.):

    method              oracle error     validated error  top eig.  trace
    GD                  0.1333 +- 0.0128 0.1367 +- 0.0130  7.80     88.06
    SAM (unnormalized)  0.1272 +- 0.0148 0.1296 +- 0.0138  6.47     61.85
    SAM (normalized)    0.1326 +- 0.0123 0.1363 +- 0.0126  7.59     84.62

Unnormalized SAM beats GD on 3/3 seeds under both stopping rules (paired:
oracle -0.0061 +- 0.0028, validated -0.0071 +- 0.0017); the validation loss
picked rho = 1, the top of its grid, on every seed. Normalized SAM is even
with GD (-0.0007 +- 0.0008 and -0.0003 +- 0.0018). Both SAM solutions are
flatter than GD's (lower top eigenvalue and trace on 3/3 seeds). At a step
size of 0.1 the best stopping time of GD falls before the first check (20
steps): keep `lr * check_every` small.

Runs in a few minutes on 2 CPU cores with the defaults (9 minutes when
the 2 cores were shared by several other jobs); pick the backend with
KERAS_BACKEND.

    python examples/sam_vs_gd_network.py
    python examples/sam_vs_gd_network.py --seeds 10 --steps 3000
    python examples/sam_vs_gd_network.py --seeds 1 --steps 200  # quick
"""

import argparse

import keras
import numpy as np

import keras_sam


def make_data(n, d, teacher_width, noise, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, teacher_width))
    w /= np.linalg.norm(w, axis=0, keepdims=True)

    def sample(m, noisy=True):
        x = rng.normal(size=(m, d)).astype("float32")
        f = np.tanh(x @ w).sum(axis=1, keepdims=True)
        y = f + (noise * rng.normal(size=f.shape) if noisy else 0.0)
        return x, y.astype("float32")

    # train, validation (same size, noisy), test (noiseless teacher)
    return sample(n), sample(n), sample(2000, noisy=False)


def student(d, width, seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((d,)),
            keras.layers.Dense(width, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )


class Track(keras.callbacks.Callback):
    """Test error at each check; the weights at the lowest val loss."""

    def __init__(self, net, test):
        super().__init__()
        self.net, self.test = net, test
        self.errors, self.best = [], (np.inf, np.inf, None)

    def on_train_begin(self, logs=None):
        self.best = (np.inf, np.inf, self.net.get_weights())

    def on_epoch_end(self, epoch, logs=None):
        x, y = self.test
        pred = self.net.predict_on_batch(x)
        error = float(np.mean((keras.ops.convert_to_numpy(pred) - y) ** 2))
        self.errors.append(error if np.isfinite(error) else np.inf)
        if np.isfinite(error) and logs["val_loss"] < self.best[0]:
            self.best = (logs["val_loss"], error, self.net.get_weights())


def train(data, args, seed, rho=None, normalize=True):
    train_set, val, test = data
    net = student(train_set[0].shape[1], args.width, seed)
    optimizer = keras.optimizers.SGD(args.lr)
    model = net
    if rho is not None:
        model = keras_sam.SAMModel(net)
        optimizer = keras_sam.optimizers.SAM(
            optimizer, rho=rho, normalize=normalize
        )
    model.compile(optimizer=optimizer, loss="mse")
    track = Track(net, test)
    # Each batch is the whole training set (one GD / SAM step); an "epoch"
    # is `check_every` steps, after which validation and test are measured.
    x, y = (np.tile(a, (args.check_every, 1)) for a in train_set)
    model.fit(
        x,
        y,
        batch_size=len(train_set[0]),
        epochs=args.steps // args.check_every,
        validation_data=val,
        shuffle=False,
        verbose=0,
        callbacks=[track],
    )
    val_loss, validated, weights = track.best
    net.set_weights(weights)
    return {
        "errors": track.errors,
        "oracle": min(track.errors),
        "validated": validated,
        "val_loss": val_loss,
        "net": net,
    }


def sharpness(net, train_set):
    net.compile(loss="mse")
    top = keras_sam.sharpness.top_eigenvalue(net, train_set)
    trace = keras_sam.sharpness.hessian_trace(net, train_set, num_probes=50)
    return top, trace


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--dim", type=int, default=20)
    parser.add_argument("--teacher-width", type=int, default=2)
    parser.add_argument("--width", type=int, default=50)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--check-every", type=int, default=20)
    parser.add_argument(
        "--rho-unnormalized", default="0.2,0.5,1", help="comma-separated grid"
    )
    parser.add_argument(
        "--rho-normalized", default="0.05,0.1", help="comma-separated"
    )
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    grids = {
        "SAM (unnormalized)": (
            [float(r) for r in args.rho_unnormalized.split(",")],
            False,
        ),
        "SAM (normalized)": (
            [float(r) for r in args.rho_normalized.split(",")],
            True,
        ),
    }
    names = ["GD"] + list(grids)
    rows = {name: [] for name in names}
    bar = keras.utils.Progbar(args.seeds, unit_name="seed")
    for seed in range(args.seeds):
        data = make_data(
            args.samples, args.dim, args.teacher_width, args.noise, seed
        )
        runs = {"GD": (train(data, args, seed), None)}
        for name, (grid, normalize) in grids.items():
            # rho by validation loss: the test set plays no part in it
            best = min(
                (
                    (train(data, args, seed, rho, normalize), rho)
                    for rho in grid
                ),
                key=lambda run: run[0]["val_loss"],
            )
            runs[name] = best
        for name, (run, rho) in runs.items():
            top, trace = sharpness(run["net"], data[0])
            rows[name].append(
                (run["oracle"], run["validated"], top, trace, rho or 0.0)
            )
        bar.update(seed + 1)

    sem = lambda v: np.std(v) / np.sqrt(len(v))  # noqa: E731
    print(
        f"\n{'method':<20} {'oracle error':>16} {'validated error':>16} "
        f"{'top eig.':>9} {'trace':>9}  rho picked"
    )
    for name in names:
        oracle, validated, top, trace, rho = map(np.array, zip(*rows[name]))
        print(
            f"{name:<20} {oracle.mean():8.4f} +- {sem(oracle):.4f} "
            f"{validated.mean():8.4f} +- {sem(validated):.4f} "
            f"{top.mean():9.3f} {trace.mean():9.2f}  "
            f"{','.join(f'{r:g}' for r in rho) if name != 'GD' else '-'}"
        )
    gd = np.array(rows["GD"])
    for name in names[1:]:
        sam = np.array(rows[name])
        for i, rule in enumerate(("oracle", "validated")):
            diff = sam[:, i] - gd[:, i]
            print(
                f"{name} - GD, {rule}: {diff.mean():+.4f} +- {sem(diff):.4f}"
                f" (better on {np.sum(diff < 0)}/{len(diff)} seeds)"
            )
        print(
            f"{name}: lower top eigenvalue on {np.sum(sam[:, 2] < gd[:, 2])}"
            f"/{len(gd)} seeds, lower trace on "
            f"{np.sum(sam[:, 3] < gd[:, 3])}/{len(gd)}"
        )


if __name__ == "__main__":
    main()
