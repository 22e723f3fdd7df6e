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
   in a separate timing stage at the end: each method at its pick, one run
   at a time on the machine, `--timing-epochs` epochs (the first two, which
   compile, excluded), plain in the same stage.

`--workers N` runs N runs at a time, each in its own (spawned) process:
the chains of different methods, tasks and noise rates, and the seeds, are
independent; a method's tuning stages wait for each other. Every run is a
function of its arguments alone, so the results are those of one process
(autotuning of GPU kernels is off for that). Every run is stored in the
JSON as it finishes; a rerun with the same `--out` skips finished runs
(resumable, incremental). Writes
`which_sam.json`, `which_sam.md` and `which_sam_<task>.png` (accuracy
against passes per step, one point per method with its interval).

    python benchmarks/which_sam.py --smoke                   # < 1 min, CPU
    python benchmarks/which_sam.py --baseline                # MNIST-1D, paper
    KERAS_BACKEND=jax python benchmarks/which_sam.py --workers 14 \\
        --out benchmarks/results/which_sam                  # one GPU
    python benchmarks/which_sam.py --looksam-ablation --seeds 2
"""

import argparse
import datetime
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Worker processes (`--workers`) share the GPU: no preallocation; and no
# autotuning, whose kernel choice depends on the load and so would make a
# run's numbers depend on what ran beside it (inherited by the workers).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if "xla_gpu_autotune_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0"
    ).strip()

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import which_sam_pool as pool  # noqa: E402
import which_sam_report as report  # noqa: E402
import which_sam_studies as studies  # noqa: E402
from which_sam_pool import run_args  # noqa: E402
from which_sam_setup import ALL_METHODS  # noqa: E402
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


def fit(task, method, rho, knob, noise, seed, epochs, lr=None):
    """Builds and trains one model; `(model, history, seconds per epoch,
    validation split, test split)`."""
    net_fn, inner_fn, batch_size, _ = TASKS[task]
    train_split, val, test = splits(task, noise, seed)
    keras.utils.set_random_seed(seed)
    net = net_fn()
    steps = epochs * -(-len(train_split[0]) // batch_size)
    builder = ALL_METHODS[method][0]
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
    return model, history, timer.seconds, val, test


def passes_per_step(method, history):
    """1 + the logged `sam_fraction` where a schedule skips steps, else the
    method's count."""
    if "sam_fraction" in history:
        ascent = 2.0 if method == "sam_ascent2" else 1.0
        return 1.0 + ascent * float(history["sam_fraction"][-1])
    return float(ALL_METHODS[method][4])


def train(task, method, rho, knob, noise, seed, epochs, lr=None):
    """One run: validation and test accuracy, passes and time per epoch
    (the time is contaminated when runs share the machine: see
    `timing`)."""
    model, history, seconds, val, test = fit(
        task, method, rho, knob, noise, seed, epochs, lr
    )
    _, val_acc = model.evaluate(*val, batch_size=512, verbose=0)
    _, test_acc = model.evaluate(*test, batch_size=512, verbose=0)
    return {
        "val_accuracy": float(val_acc),
        "test_accuracy": float(test_acc),
        "passes": passes_per_step(method, history),
        "epoch_seconds": float(np.median(seconds[1:] or seconds)),
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

    @staticmethod
    def key(args):
        task, method, rho, knob, noise, seed, epochs, lr = args
        key = f"{task}|{noise:g}|{method}|{rho:g}|{knob}|{seed}|{epochs}"
        return key if lr is None else key + f"|lr{lr:g}"

    def get(self, args):
        return self.data["runs"].get(self.key(args))

    def put(self, args, result, seconds):
        key = self.key(args)
        self.data["runs"][key] = result
        self.save()
        print(
            f"{key:<48} val {result['val_accuracy']:.4f} test "
            f"{result['test_accuracy']:.4f} passes {result['passes']:.2f}"
            f" ({seconds:.0f} s)",
            flush=True,
        )

    def run(self, args):
        """`train(*args)` here, unless stored."""
        if self.get(args) is None:
            start = time.time()
            self.put(args, train(*args), time.time() - start)
        return self.get(args)

    def save(self):
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=1)


def pick(grid, args_of, extend, factor):
    """Chain stage: the grid value with the best validation accuracy (seed
    0); an edge pick extends the grid geometrically by `factor`, `extend`
    times. Yields the runs it needs, returns `(best, scores)`."""
    grid = sorted(grid)
    for _ in range(extend + 1):
        results = yield [args_of(v) for v in grid]
        scores = {v: r["val_accuracy"] for v, r in zip(grid, results)}
        best = max(grid, key=lambda v: scores[v])
        if len(grid) == 1 or best not in (grid[0], grid[-1]):
            break
        edge = grid[0] / factor if best == grid[0] else grid[-1] * factor
        grid = sorted(grid + [edge])
    return best, {f"{v:g}": s for v, s in scores.items()}


def tune(task, method, noise, epochs, args):
    """Chain stage: `(rho, knob, validation scores)` picked on the
    validation split."""
    _, rhos, knob_name, knobs, _ = METHODS[method]
    knob0 = None if knobs is None else knobs[len(knobs) // 2]
    if args.smoke:
        rhos = rhos[len(rhos) // 2 : len(rhos) // 2 + 1]
    rho, rho_scores = yield from pick(
        rhos,
        lambda r: run_args(task, method, r, knob0, noise, 0, epochs),
        0 if args.smoke or len(rhos) == 1 else args.extend,
        2.5,
    )
    knob, knob_scores = knob0, {}
    if knobs is not None and not args.smoke:
        # Probabilities, fractions and weights stay within (0, 1].
        cap = knob_name in ("probability", "fraction", "gamma", "sigma")
        knob, knob_scores = yield from pick(
            knobs,
            lambda k: run_args(
                task, method, rho, min(k, 1.0) if cap else k, noise, 0, epochs
            ),
            0 if cap else args.extend,
            2.0,
        )
        knob = min(knob, 1.0) if cap else knob
    return rho, knob, {"rho": rho_scores, knob_name or "knob": knob_scores}


def method_chain(store, task, method, noise, epochs, args):
    """Tunes `method`, then runs `--seeds` seeds at the pick."""
    rho, knob, scores = yield from tune(task, method, noise, epochs, args)
    runs = yield [
        run_args(task, method, rho, knob, noise, seed, epochs)
        for seed in range(args.seeds)
    ]
    store.data.setdefault("picks", {})[f"{task}|{noise:g}|{method}"] = {
        "rho": rho,
        "knob": knob,
        "scores": scores,
        "runs": runs,
    }
    store.save()


def benchmark(args, store):
    chains, order = [], []
    for task in args.dataset:
        epochs = args.epochs or TASKS[task][3]
        for noise in args.noise:
            for method in args.methods:
                message = available(method, task)
                if message:
                    print(message, flush=True)
                    continue
                order.append(f"{task}|{noise:g}|{method}")
                chains.append(
                    method_chain(store, task, method, noise, epochs, args)
                )
    start, runs = time.time(), len(store.data["runs"])
    pool.drive(chains, store, args.workers)
    runs = len(store.data["runs"]) - runs
    seconds = time.time() - start
    print(
        f"{runs} runs in {seconds:.0f} s ({args.workers} workers, "
        f"{runs / max(seconds, 1e-9):.2f} runs/s)",
        flush=True,
    )
    # The table's order is the command's, whatever order runs finished in.
    picks = store.data.setdefault("picks", {})
    store.data["picks"] = {
        k: picks[k] for k in order + [k for k in picks if k not in order]
    }
    timing(args, store)


def timing(args, store):
    """Seconds per epoch of every method at its pick (the first noise
    rate's), each run alone on the machine (after the tuning, so no other
    run shares it), `--timing-epochs` epochs, the median over epochs 3 and
    later (epoch 1 compiles; the host-scheduled variants compile again in
    epoch 2); plain is measured in the same stage, first."""
    table = store.data.setdefault("timing", {})
    picks = store.data.get("picks", {})
    noise = args.noise[0]
    epochs = args.timing_epochs
    for task in args.dataset:
        for method in ["plain"] + [m for m in args.methods if m != "plain"]:
            key = f"{task}|{method}|{epochs}"
            picked = picks.get(f"{task}|{noise:g}|{method}")
            if key in table or picked is None:
                continue
            _, history, seconds, _, _ = fit(
                task, method, picked["rho"], picked["knob"], noise, 0, epochs
            )
            table[key] = {
                "noise": noise,
                "rho": picked["rho"],
                "knob": picked["knob"],
                "epoch_seconds": float(np.median(seconds[2:] or seconds)),
                "seconds": [float(s) for s in seconds],
                "passes": passes_per_step(method, history),
            }
            store.save()
            print(f"timing {key}: {table[key]['epoch_seconds']:.4f} s/epoch")


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
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="runs at a time, each in its own process (the time per epoch "
        "comes from a separate stage that runs one at a time)",
    )
    parser.add_argument(
        "--timing-epochs",
        type=int,
        default=8,
        help="epochs of the timing stage (median over epochs 3..N)",
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--looksam-ablation", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.dataset, args.noise = "digits", "0.2"
        args.seeds, args.epochs = min(args.seeds, 2), args.epochs or 2
        args.timing_epochs = min(args.timing_epochs, 3)
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
    start = time.time()
    if args.looksam_ablation:
        store = Store(os.path.join(args.out, "looksam_ablation.json"), meta)
        pool.drive(
            [studies.looksam_ablation_chain(store, args)], store, args.workers
        )
        text = report.ablation_markdown(store.data)
    elif args.baseline:
        store = Store(os.path.join(args.out, "baseline.json"), meta)
        pool.drive([studies.baseline_chain(store, args)], store, args.workers)
        text = None
    else:
        store = Store(os.path.join(args.out, "which_sam.json"), meta)
        benchmark(args, store)
        text = report.markdown(store.data)
        report.plots(store.data, args.out)
    # One entry per invocation: a resumed suite's wall time is their sum.
    store.data.setdefault("sessions", []).append(
        dict(meta, workers=args.workers, wall_seconds=time.time() - start)
    )
    store.save()
    if text is not None:
        with open(os.path.join(store.path[:-5] + ".md"), "w") as f:
            f.write(text + "\n")
        print(text)
    return store.data


if __name__ == "__main__":
    main()
