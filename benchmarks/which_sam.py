"""Which SAM should I use? Every variant on real data, at its tuned radius.

For each task (`digits`, `mnist1d_cnn`, `mnist1d_mlp`; see
`which_sam_setup.py`: no download) and label-noise rate, every method:

1. is tuned on a validation split (10% of the training data, labels as
   noisy as the training ones): rho on its grid, then its one main knob
   (LookSAM's alpha, GSAM's alpha, SAMPa's lambda, RST's probability, ...)
   at that rho; one run per value (seed 0); a pick at the grid's edge
   extends the grid by one step (at most `--extend` times);
2. is run with `--seeds` seeds at the pick: clean test accuracy with a 95%
   t-interval, and the paired difference to plain and to SAM on the same
   seeds (same initial weights, splits and noise);
3. is costed: forward/backward passes per step (from `logs["sam_fraction"]`
   where a schedule skips steps) and the median time per epoch inside `fit`
   (epoch 1, which compiles, excluded).

Every run is stored in the JSON as it finishes; a rerun with the same
`--out` skips finished runs (resumable, incremental). Writes
`which_sam.json`, `which_sam.md` and `which_sam_<task>.png` (accuracy
against passes per step, one point per method with its interval).

    python benchmarks/which_sam.py --smoke                   # < 1 min, CPU
    python benchmarks/which_sam.py --baseline                # MNIST-1D, paper
    KERAS_BACKEND=jax python benchmarks/which_sam.py \\
        --out benchmarks/results/which_sam
    python benchmarks/which_sam.py --looksam-ablation --seeds 2
"""

import argparse
import datetime
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import which_sam_report as report  # noqa: E402
from which_sam_setup import METHODS  # noqa: E402
from which_sam_setup import TASKS  # noqa: E402
from which_sam_setup import available  # noqa: E402
from which_sam_setup import splits  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    """Seconds per epoch inside `fit` (the first one compiles)."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def train(task, method, rho, knob, noise, seed, epochs, lr=None):
    """One run: validation and test accuracy, passes and time per epoch."""
    net_fn, inner_fn, batch_size, _ = TASKS[task]
    train_split, val, (x_test, y_test) = splits(task, noise, seed)
    keras.utils.set_random_seed(seed)
    net = net_fn()
    steps = epochs * -(-len(train_split[0]) // batch_size)
    builder, _, _, _, passes = METHODS[method]
    model, optimizer = builder(net, inner_fn(lr), rho, knob, val, steps)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    timer = EpochTimer()
    history = model.fit(
        *train_split,
        batch_size=batch_size,
        epochs=epochs,
        verbose=0,
        callbacks=[timer],
    ).history
    _, val_acc = model.evaluate(*val, batch_size=512, verbose=0)
    _, test_acc = model.evaluate(x_test, y_test, batch_size=512, verbose=0)
    if "sam_fraction" in history:
        ascent = 2.0 if method == "sam_ascent2" else 1.0
        passes = 1.0 + ascent * float(history["sam_fraction"][-1])
    timed = timer.seconds[1:] or timer.seconds
    return {
        "val_accuracy": float(val_acc),
        "test_accuracy": float(test_acc),
        "passes": float(passes),
        "epoch_seconds": float(np.median(timed)),
        "final_rho": float(history["rho"][-1]) if "rho" in history else rho,
        "final_loss": float(history["loss"][-1]),
    }


class Store:
    """Runs keyed by their settings, written to the JSON after each."""

    def __init__(self, path, meta):
        self.path = path
        self.data = {"runs": {}}
        if os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)
        self.data.update(meta)

    def run(self, task, method, rho, knob, noise, seed, epochs, lr=None):
        key = f"{task}|{noise:g}|{method}|{rho:g}|{knob}|{seed}|{epochs}"
        if lr is not None:
            key += f"|lr{lr:g}"
        if key not in self.data["runs"]:
            start = time.time()
            result = train(task, method, rho, knob, noise, seed, epochs, lr)
            self.data["runs"][key] = result
            self.save()
            print(
                f"{key:<48} val {result['val_accuracy']:.4f} test "
                f"{result['test_accuracy']:.4f} passes {result['passes']:.2f}"
                f" ({time.time() - start:.0f} s)",
                flush=True,
            )
        return self.data["runs"][key]

    def save(self):
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=1)


def pick(store, task, noise, epochs, grid, value_of, extend, factor):
    """The grid value with the best validation accuracy (seed 0); an edge
    pick extends the grid geometrically by `factor`, `extend` times."""
    grid = sorted(grid)
    for _ in range(extend + 1):
        scores = {v: value_of(v)["val_accuracy"] for v in grid}
        best = max(grid, key=lambda v: scores[v])
        if len(grid) == 1 or best not in (grid[0], grid[-1]):
            break
        edge = grid[0] / factor if best == grid[0] else grid[-1] * factor
        grid = sorted(grid + [edge])
    return best, {f"{v:g}": s for v, s in scores.items()}


def tune(store, task, method, noise, epochs, args):
    """`(rho, knob, validation scores)` picked on the validation split."""
    _, rhos, knob_name, knobs, _ = METHODS[method]
    knob0 = None if knobs is None else knobs[len(knobs) // 2]
    if args.smoke:
        rhos = rhos[len(rhos) // 2 : len(rhos) // 2 + 1]
    rho, rho_scores = pick(
        store,
        task,
        noise,
        epochs,
        rhos,
        lambda r: store.run(task, method, r, knob0, noise, 0, epochs),
        0 if args.smoke or len(rhos) == 1 else args.extend,
        2.5,
    )
    knob, knob_scores = knob0, {}
    if knobs is not None and not args.smoke:
        # Probabilities, fractions and weights stay within (0, 1].
        cap = knob_name in ("probability", "fraction", "gamma", "sigma")
        knob, knob_scores = pick(
            store,
            task,
            noise,
            epochs,
            knobs,
            lambda k: store.run(
                task,
                method,
                rho,
                min(k, 1.0) if cap else k,
                noise,
                0,
                epochs,
            ),
            0 if cap else args.extend,
            2.0,
        )
        knob = min(knob, 1.0) if cap else knob
    return rho, knob, {"rho": rho_scores, knob_name or "knob": knob_scores}


def benchmark(args, store):
    for task in args.dataset:
        epochs = args.epochs or TASKS[task][3]
        for noise in args.noise:
            for method in args.methods:
                message = available(method, task)
                if message:
                    print(message, flush=True)
                    continue
                rho, knob, scores = tune(
                    store, task, method, noise, epochs, args
                )
                runs = [
                    store.run(task, method, rho, knob, noise, seed, epochs)
                    for seed in range(args.seeds)
                ]
                store.data.setdefault("picks", {})[
                    f"{task}|{noise:g}|{method}"
                ] = {"rho": rho, "knob": knob, "scores": scores, "runs": runs}
                store.save()


def baseline(args, store):
    """Plain Adam 1e-2, batch 100, 6,000 steps (150 epochs) on clean
    MNIST-1D: the paper reports about 94% (CNN) and 68% (MLP)."""
    for task in ("mnist1d_cnn", "mnist1d_mlp"):
        epochs = args.epochs or 150
        accs = [
            store.run(task, "plain", 0.0, None, 0.0, seed, epochs)[
                "test_accuracy"
            ]
            for seed in range(args.seeds)
        ]
        mean, half = report.interval(accs)
        store.data.setdefault("baseline", {})[task] = {
            "epochs": epochs,
            "accuracy": accs,
            "mean": mean,
            "ci95": half,
        }
        store.save()
        print(f"{task}: {100 * mean:.2f} ± {100 * half:.2f} % ({epochs} ep)")


def looksam_ablation(args, store):
    """LookSAM over k and alpha against SAM, sam_every=k (alpha = 0) and
    plain SGD at the step size LookSAM's one-pass steps take: their
    gradient g + alpha |g| g_v/|g_v| (g_v orthogonal to g) has norm
    sqrt(1 + alpha^2) |g|, so plain with lr x sqrt(1 + alpha^2)."""
    task, noise = "digits", args.noise[-1]
    epochs = args.epochs or TASKS[task][3]
    from which_sam_setup import _cls

    rows = {}
    settings = [(k, a) for k in (2, 5, 10) for a in (0.0, 0.7)]
    settings.insert(4, (5, 1.0))
    for k, alpha in settings:
        name = f"looksam_k{k}"
        METHODS[name] = (
            _cls("LookSAM", "alpha", k=k),
            [0.05],
            "alpha",
            None,
            1.0 + 1.0 / k,
        )
        rows[f"LookSAM k={k} alpha={alpha:g}"] = [
            store.run(task, name, 0.05, alpha, noise, s, epochs)
            for s in range(args.seeds)
        ]
    for alpha in (0.0, 0.7, 1.0):
        lr = 0.05 * float(np.sqrt(1 + alpha**2))
        rows[f"plain lr={lr:.3g} (= 0.05 sqrt(1 + {alpha:g}^2))"] = [
            store.run(task, "plain", 0.0, None, noise, s, epochs, lr)
            for s in range(args.seeds)
        ]
    rows["sam rho=0.05"] = [
        store.run(task, "sam", 0.05, None, noise, s, epochs)
        for s in range(args.seeds)
    ]
    store.data["looksam_ablation"] = {
        name: [r["test_accuracy"] for r in runs] for name, runs in rows.items()
    }
    store.save()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits,mnist1d_cnn,mnist1d_mlp")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default: per task (digits 30, MNIST-1D 40)",
    )
    parser.add_argument("--noise", default="0,0.2")
    parser.add_argument(
        "--extend", type=int, default=2, help="grid extensions at an edge pick"
    )
    parser.add_argument("--out", default="which_sam_results")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--looksam-ablation", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.dataset, args.noise = "digits", "0.2"
        args.seeds, args.epochs = min(args.seeds, 2), args.epochs or 2
        if args.methods == parser.get_default("methods"):
            args.methods = "plain,sam,sam_every5,wsam"
    args.dataset = args.dataset.split(",")
    args.methods = args.methods.split(",")
    args.noise = [float(n) for n in args.noise.split(",")]
    for name in args.methods:
        if name not in METHODS:
            parser.error(f"unknown method {name!r}; known: {list(METHODS)}")
    return args


def _devices():
    """The devices Keras sees (the torch backend has no distribution API)."""
    try:
        return str(keras.distribution.list_devices())
    except AttributeError:
        return keras.backend.backend()


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "backend": keras.backend.backend(),
        "devices": _devices(),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    if args.looksam_ablation:
        store = Store(os.path.join(args.out, "looksam_ablation.json"), meta)
        looksam_ablation(args, store)
        text = report.ablation_markdown(store.data)
    elif args.baseline:
        store = Store(os.path.join(args.out, "baseline.json"), meta)
        baseline(args, store)
        return store.data
    else:
        store = Store(os.path.join(args.out, "which_sam.json"), meta)
        benchmark(args, store)
        text = report.markdown(store.data)
        report.plots(store.data, args.out)
    with open(os.path.join(store.path[:-5] + ".md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return store.data


if __name__ == "__main__":
    main()
