"""LETS: robustness to the initial rho, against SAM at fixed rho.

On a task of `benchmarks/which_sam_setup.py` with symmetric label noise
(20% by default): `digits` (the setup of `benchmarks/accuracy.py`:
64-256-256-10 MLP, SGD 0.05 with momentum 0.9, batch 32) or `mnist1d_mlp`
(40-100-100-10, Adam 1e-2, batch 100); a 10% validation split as noisy as
the training split:

1. SAM at a sweep of fixed rho, to find the best one (mean test accuracy
   over the seeds), or `--best` to skip the sweep;
2. `LearnedRadius` started at 0.01x and 10x that best rho, with the
   Adam-normalized log-rho step (secant dw/drho) and either objective:
   `lets_gap_lr{x}` (squared gap) and `lets_val_lr{x}` (validation loss),
   and with the paper's update (`lets_paper_lr{x}`: squared gap, diagonal
   Hessian approximation, plain gradient step on rho);
3. SAM at each of those start values, for comparison.

Reports the final rho and the clean test accuracy (mean, std over seeds) and
writes `lets_robustness.json` and `lets_robustness.md` to `--out`.

    python benchmarks/lets_robustness.py --jobs 2 --out benchmarks/results
    python benchmarks/lets_robustness.py --quick
"""

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from which_sam_setup import TASKS  # noqa: E402
from which_sam_setup import splits as make_splits  # noqa: E402

import keras_sam  # noqa: E402

# name -> LearnedRadius options
GAP = dict(hypergradient="secant", rho_step="normalized", objective="gap")
VALIDATION = dict(GAP, objective="validation")
PAPER = dict(hypergradient="diagonal", rho_step="plain", objective="gap")


def updates(args):
    """`lets_{gap,val,paper}_lr{x}` -> LearnedRadius options."""
    table = {}
    for kind, options, rates in (
        ("gap", GAP, args.rho_lr_gap),
        ("val", VALIDATION, args.rho_lr_val),
        ("paper", PAPER, args.rho_lr_paper),
    ):
        for lr in filter(None, rates.split(",")):
            table[f"lets_{kind}_lr{float(lr):g}"] = dict(
                options, learning_rate=float(lr)
            )
    return table


def run(splits, initial, rho, args, update=None):
    """Trains once; returns (test accuracy, final rho)."""
    (x, y), val, (x_test, y_test) = splits
    net_fn, inner_fn, batch_size, _ = TASKS[args.task]
    net = net_fn()
    net.set_weights(initial)
    sgd = inner_fn(args.lr)
    if update is None:
        radius = rho
    else:
        radius = keras_sam.LearnedRadius(
            initial=rho,
            validation_data=val,
            bounds=(min(1e-4, rho), max(10.0, rho)),
            seed=0,
            **updates(args)[update],
        )
    optimizer = keras_sam.optimizers.SAM(sgd, rho=radius)
    model = keras_sam.SAMModel(net)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        x,
        y,
        batch_size=args.batch_size or batch_size,
        epochs=args.epochs,
        verbose=0,
    )
    _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    return float(accuracy), float(keras.ops.convert_to_numpy(optimizer.rho))


def task(job):
    """One run in a worker process: (key, seed, accuracy, final rho)."""
    key, seed, args = job
    method, rho = key.split("@")
    keras.utils.set_random_seed(seed)
    splits = make_splits(args.task, args.noise, seed)
    initial = TASKS[args.task][0]().get_weights()
    update = None if method == "sam" else method
    start = time.time()
    acc, final = run(splits, initial, float(rho), args, update)
    print(
        f"{key:<22} seed {seed}: acc {acc:.4f} rho {final:.4g} "
        f"({time.time() - start:.0f} s)",
        flush=True,
    )
    return key, seed, acc, final


def stats(values):
    return float(np.mean(values)), float(np.std(values))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits", choices=sorted(TASKS))
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--sweep", default="0.02,0.05,0.1,0.2,0.5,1.0")
    parser.add_argument(
        "--best",
        type=float,
        default=None,
        help="best fixed rho (skips the sweep)",
    )
    parser.add_argument("--rho-lr-gap", default="0.01", help="comma-separated")
    parser.add_argument("--rho-lr-val", default="0.01", help="comma-separated")
    parser.add_argument(
        "--rho-lr-paper", default="100,1000", help="comma-separated"
    )
    parser.add_argument(
        "--starts", default="0.01,10", help="start rho / best rho"
    )
    parser.add_argument(
        "--skip-sam",
        action="store_true",
        help="with --best: no fixed-rho SAM runs (compare with an earlier "
        "JSON)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="lets_results")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.sweep = 1, 1, "0.05,0.5"
        args.rho_lr_paper = "1000"
    os.makedirs(args.out, exist_ok=True)
    seeds = list(range(args.seeds))
    results = {}  # "method@rho" -> list of (accuracy, final rho)
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=args.jobs, mp_context=context
    )

    def measure(keys):
        jobs = [
            (k, seed, args) for k in keys if k not in results for seed in seeds
        ]
        out = {}
        if args.jobs == 1:
            done = map(task, jobs)
        else:
            done = pool.map(task, jobs)
        for key, seed, acc, final in done:
            out.setdefault(key, {})[seed] = (acc, final)
        for key, by_seed in out.items():
            results[key] = [by_seed[seed] for seed in seeds]

    sweep = [float(r) for r in args.sweep.split(",")]
    if args.best is None:
        measure([f"sam@{rho:g}" for rho in sweep])
        best = max(
            sweep,
            key=lambda r: np.mean([a for a, _ in results[f"sam@{r:g}"]]),
        )
    else:
        best = args.best
        measure([] if args.skip_sam else [f"sam@{best:g}"])
    starts = [float(m) * best for m in args.starts.split(",")]
    measure(
        [
            f"{method}@{rho:g}"
            for rho in starts
            for method in ([] if args.skip_sam else ["sam"])
            + list(updates(args))
        ]
    )
    pool.shutdown()

    rows = []
    for key, values in results.items():
        method, rho = key.split("@")
        acc, final = zip(*values)
        rows.append(
            {
                "method": method,
                "start_rho": float(rho),
                "accuracy": stats(acc),
                "final_rho": stats(final),
                "runs": [{"accuracy": a, "final_rho": f} for a, f in values],
            }
        )
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "backend": keras.backend.backend(),
        "settings": vars(args),
        "best_fixed_rho": best,
        "rows": rows,
    }
    stem = "lets_robustness" + (
        "" if args.task == "digits" else f"_{args.task}"
    )
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [
        f"{args.task}, {args.noise:.0%} label noise, {args.epochs} epochs, "
        f"{args.seeds} seeds; best fixed rho for SAM: {best:g}.",
        "",
        "| method | start rho | final rho (mean ± std) | test acc. (%) |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        (fm, fs), (am, as_) = row["final_rho"], row["accuracy"]
        lines.append(
            f"| {row['method']} | {row['start_rho']:g} | {fm:.4g} ± {fs:.2g} "
            f"| {100 * am:.2f} ± {100 * as_:.2f} |"
        )
    lines.append(
        "\nlets_gap_lr{x} / lets_val_lr{x}: secant dw/drho, Adam-normalized "
        "log-rho step, squared gap / validation loss objective; "
        "lets_paper_lr{x}: diagonal Hessian approximation, plain rho step; "
        "{x} is LearnedRadius' learning_rate."
    )
    text = "\n".join(lines)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
