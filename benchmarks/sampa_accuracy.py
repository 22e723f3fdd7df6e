"""SAMPa against SAM on noisy digits, over a grid of rho.

Trains the digits MLP of `benchmarks/accuracy.py` (64-256-256-10, SGD with
momentum 0.9, 30 epochs, batch 32) on labels with 20% symmetric noise, from
the same initial weights per seed, with

- `sam`: `SAM(sgd, rho)`;
- `sampa`: `SAMPa(sgd, rho, lam=0.2)`, the adversarial gradient on the
  previous batch (the paper's code, the default);
- `sampa_current`: the same with `adversarial_batch="current"`;
- `plain`: SGD alone (once per seed, no rho),

for every rho of `--rhos`. Reports clean test accuracy (mean and std over
the seeds) per method and rho, and per method at the rho its mean
*validation* accuracy picks (the noisy 10% split that `accuracy.py` holds
out; test labels are never used to choose). Writes `sampa_accuracy.md` and
`.json` to `--out`.

The default run (3 methods x 4 rhos x 3 seeds + plain) takes about ten
minutes on 2 CPU cores with `--jobs 2`.

    python benchmarks/sampa_accuracy.py --jobs 2 --out benchmarks/results
    python benchmarks/sampa_accuracy.py --quick
"""

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from accuracy import make_splits  # noqa: E402
from accuracy import mlp  # noqa: E402

import keras_sam  # noqa: E402

METHODS = ("sam", "sampa", "sampa_current")


def optimizer(method, rho, lr):
    sgd = keras.optimizers.SGD(lr, momentum=0.9)
    if method == "plain":
        return sgd
    if method == "sam":
        return keras_sam.optimizers.SAM(sgd, rho=rho)
    batch = "current" if method == "sampa_current" else "previous"
    return keras_sam.optimizers.SAMPa(
        sgd, rho=rho, lam=0.2, adversarial_batch=batch
    )


def run(method, rho, seed, args):
    """`(validation accuracy, test accuracy)` of one training run."""
    keras.utils.set_random_seed(seed)
    train, val, test = make_splits("digits", args.noise, seed)
    keras.utils.set_random_seed(seed)
    net = mlp()
    model = net if method == "plain" else keras_sam.SAMModel(net)
    model.compile(
        optimizer=optimizer(method, rho, args.lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(*train, batch_size=32, epochs=args.epochs, verbose=0)
    scores = [model.evaluate(*split, verbose=0)[1] for split in (val, test)]
    print(
        f"{method:>13} rho {rho:<5} seed {seed}: validation "
        f"{scores[0]:.4f} test {scores[1]:.4f}",
        flush=True,
    )
    return scores


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rhos", default="0.05,0.1,0.2,0.5")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 seed, 1 epoch, rho 0.1",
    )
    parser.add_argument("--out", default="sampa_accuracy_results")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.rhos = 1, 1, "0.1"
    rhos = [float(r) for r in args.rhos.split(",")]
    seeds = list(range(args.seeds))
    jobs = [("plain", 0.0, s) for s in seeds] + [
        (m, r, s) for m in METHODS for r in rhos for s in seeds
    ]
    if args.jobs > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            args.jobs, mp_context=context
        ) as pool:
            scores = list(pool.map(run, *zip(*jobs), [args] * len(jobs)))
    else:
        scores = [run(*job, args) for job in jobs]

    results = {}
    for (method, rho, _), (val, test) in zip(jobs, scores):
        entry = results.setdefault(method, {}).setdefault(
            rho, {"val": [], "test": []}
        )
        entry["val"].append(val)
        entry["test"].append(test)

    def cell(values):
        return f"{100 * np.mean(values):.2f} ± " f"{100 * np.std(values):.2f}"

    lines = [
        f"digits, {args.noise:.0%} label noise, {args.epochs} epochs, "
        f"{len(seeds)} seeds, {keras.backend.backend()} backend; test "
        "accuracy (%), mean ± std",
        "",
        "| method | "
        + " | ".join(f"rho {r}" for r in rhos)
        + " | rho picked on validation | test at that rho |",
        "|---|" + "---:|" * len(rhos) + "---:|---:|",
    ]
    picked = {}
    for method in METHODS:
        row = results[method]
        best = max(rhos, key=lambda r: np.mean(row[r]["val"]))
        picked[method] = best
        lines.append(
            f"| {method} | "
            + " | ".join(cell(row[r]["test"]) for r in rhos)
            + f" | {best} | {cell(row[best]['test'])} |"
        )
    plain = results["plain"][0.0]["test"]
    lines.append(f"| plain | {cell(plain)} (no rho) |" + " |" * (len(rhos) + 1))
    table = "\n".join(lines)
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sampa_accuracy.md"), "w") as f:
        f.write(table + "\n")
    report = {
        "date": datetime.date.today().isoformat(),
        "backend": keras.backend.backend(),
        "args": vars(args),
        "picked_rho": picked,
        "results": {
            m: {str(r): v for r, v in row.items()} for m, row in results.items()
        },
    }
    with open(os.path.join(args.out, "sampa_accuracy.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
