"""SAM's gain at a fraction of its cost: accuracy against training time.

Trains the digits MLP of `benchmarks/accuracy.py` (scikit-learn's 8x8
digits, 64-256-256-10, SGD with momentum 0.9) on labels with 20% symmetric
noise, from the same initial weights per seed, with plain SGD, SAM and
each cheap variant for the same number of epochs, and with plain SGD for
as long as SAM takes (`plain_long`: epochs scaled by SAM's measured time
over plain's, per seed: the fair baseline). Reports clean test accuracy
and measured training wall-clock (the `fit` call) per method, mean and std
over seeds, and asks: does a variant at <= 1.3x plain's cost keep >= 80%
of SAM's accuracy gain over plain? Cost is given twice: forward/backward
passes per step relative to plain (from the logged fraction of two-pass
steps; load-free), and measured time relative to plain (the median over
seeds of the per-seed ratio; on a shared machine this is noisy).

Methods: `plain`, `sam` (rho 0.05), `sam_every5`, `random50` (RST,
p = 0.5), `adaptive` (AE-SAM), `looksam5` (k = 5, alpha = 0.7), `msam`
(Momentum-SAM, rho 0.3), `gsam` (alpha = 0.1), `plain_long`.

Writes `equal_compute.md`, `.json` and `.png` (accuracy against time) to
`--out`. The default run (9 methods x 3 seeds, 30 epochs) takes about ten
minutes on 2 CPU cores; `--quick` is a smoke run.

    python benchmarks/equal_compute.py --out benchmarks/results/equal_compute
    python benchmarks/equal_compute.py --quick
"""

import argparse
import datetime
import importlib.util
import json
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402


def _accuracy_module():
    path = os.path.join(os.path.dirname(__file__), "accuracy.py")
    spec = importlib.util.spec_from_file_location("benchmark_accuracy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


accuracy = _accuracy_module()


def method_table(total_steps):
    """name -> builder(net, sgd) -> (model, optimizer)."""
    opt, sched = keras_sam.optimizers, keras_sam.schedules
    wrap = keras_sam.SAMModel
    return {
        "plain": lambda net, sgd: (net, sgd),
        "sam": lambda net, sgd: (wrap(net), opt.SAM(sgd, rho=0.05)),
        "sam_every5": lambda net, sgd: (
            wrap(net),
            opt.SAM(sgd, rho=0.05, sam_every=5),
        ),
        "random50": lambda net, sgd: (
            wrap(net),
            opt.SAM(sgd, rho=0.05, schedule=sched.Random(0.5, seed=0)),
        ),
        "adaptive": lambda net, sgd: (
            wrap(net),
            opt.SAM(sgd, rho=0.05, schedule=sched.Adaptive(total_steps)),
        ),
        "looksam5": lambda net, sgd: (
            wrap(net),
            opt.LookSAM(sgd, rho=0.05, k=5, alpha=0.7),
        ),
        "msam": lambda net, sgd: (wrap(net), opt.MomentumSAM(sgd, rho=0.3)),
        "gsam": lambda net, sgd: (
            wrap(net),
            opt.GSAM(sgd, rho=0.05, alpha=0.1),
        ),
    }


def train(method, initial, splits, epochs, args, total_steps):
    """`(test accuracy, fit seconds, fraction of two-pass steps)`."""
    (x_train, y_train), _, (x_test, y_test) = splits
    net = accuracy.mlp()
    net.set_weights(initial)
    sgd = keras.optimizers.SGD(args.lr, momentum=0.9)
    model, optimizer = method_table(total_steps)[method](net, sgd)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=epochs,
        verbose=0,
    )
    seconds = time.perf_counter() - start
    _, acc = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    # Logged under schedules that skip steps; else every step is two-pass
    # (SAM, GSAM) or one-pass (plain, MomentumSAM).
    sam = getattr(model, "sam_optimizer", None)
    two_pass = sam is not None and sam.passes_per_step > 1
    fraction = history.history.get("sam_fraction", [float(two_pass)])[-1]
    return float(acc), seconds, float(fraction)


def summarize(runs):
    summary = {}
    for method, rows in runs.items():
        acc = np.array([r["accuracy"] for r in rows])
        sec = np.array([r["seconds"] for r in rows])
        summary[method] = {
            "accuracy_mean": float(acc.mean()),
            "accuracy_std": float(acc.std()),
            "seconds_mean": float(sec.mean()),
            "sam_fraction": float(np.mean([r["sam_fraction"] for r in rows])),
            "epochs": float(np.mean([r["epochs"] for r in rows])),
        }
    plain = summary["plain"]
    gain = summary["sam"]["accuracy_mean"] - plain["accuracy_mean"]
    for method, s in summary.items():
        # Measured cost: the median over seeds of the time over plain's on
        # the same seed (robust to a run slowed by other load), and the
        # cost in forward/backward passes per step (load-free).
        s["cost"] = float(
            np.median(
                [
                    r["seconds"] / p["seconds"]
                    for r, p in zip(runs[method], runs["plain"])
                ]
            )
        )
        passes = 2.0 if method in ("sam", "gsam") else 1.0 + s["sam_fraction"]
        s["passes"] = passes * s["epochs"] / plain["epochs"]
        s["gain_kept"] = (
            (s["accuracy_mean"] - plain["accuracy_mean"]) / gain
            if gain > 0
            else float("nan")
        )
    return summary, gain


_COST_NAMES = {"passes": "in passes", "cost": "in measured time"}


def verdict(summary, gain, key="passes"):
    cheap = [
        m
        for m, s in summary.items()
        if m not in ("plain", "sam", "plain_long") and s[key] <= 1.3
    ]
    winners = [m for m in cheap if summary[m]["gain_kept"] >= 0.8]
    if gain <= 0:
        return (
            "SAM did not beat plain SGD on this run (gain "
            f"{100 * gain:+.2f} points), so no variant can keep a share of "
            "its gain."
        )
    if winners:
        return (
            f"At <= 1.3x plain's cost {_COST_NAMES[key]}, "
            f"{', '.join(winners)} kept "
            ">= 80% of "
            f"SAM's gain of {100 * gain:.2f} points over plain."
        )
    kept = (
        ", ".join(f"{m} {100 * summary[m]['gain_kept']:.0f}%" for m in cheap)
        or "none ran that cheaply"
    )
    return (
        f"No variant at <= 1.3x plain's cost {_COST_NAMES[key]} kept >= 80% of "
        "SAM's gain of "
        f"{100 * gain:.2f} points over plain (kept: {kept})."
    )


def markdown(summary, seeds):
    lines = [
        f"| method | test accuracy (mean ± std, {seeds} seeds) | epochs "
        "| fit time (s) | time / plain (median) | passes / plain "
        "| two-pass steps | SAM gain kept |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, s in summary.items():
        kept = (
            "n/a"
            if not math.isfinite(s["gain_kept"])
            else f"{100 * s['gain_kept']:.0f}%"
        )
        lines.append(
            f"| {method} | {100 * s['accuracy_mean']:.2f} ± "
            f"{100 * s['accuracy_std']:.2f} | {s['epochs']:.0f} "
            f"| {s['seconds_mean']:.1f} | {s['cost']:.2f} "
            f"| {s['passes']:.2f} "
            f"| {100 * s['sam_fraction']:.0f}% | {kept} |"
        )
    return "\n".join(lines)


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, s in summary.items():
        ax.errorbar(
            s["seconds_mean"],
            100 * s["accuracy_mean"],
            yerr=100 * s["accuracy_std"],
            fmt="o",
            capsize=3,
        )
        ax.annotate(
            method,
            (s["seconds_mean"], 100 * s["accuracy_mean"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits, 20% label noise: accuracy against cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset (plain, sam always run)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 seed, 2 epochs"
    )
    parser.add_argument("--out", default="equal_compute_results")
    parser.add_argument(
        "--summarize",
        default=None,
        help="an equal_compute.json to summarize again (no training)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 1, 2
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.summarize:  # re-summarize a saved run
        with open(args.summarize) as f:
            saved = json.load(f)
        for key in ("seeds", "noise", "epochs", "batch_size", "lr"):
            setattr(args, key, saved["environment"][key])
        return write(saved["runs"], args)
    table = method_table(1)
    methods = list(table) if args.methods is None else args.methods.split(",")
    unknown = sorted(set(methods) - set(table))
    if unknown:
        raise SystemExit(f"Unknown methods {unknown}; known: {list(table)}")
    methods = ["plain", "sam"] + [
        m for m in methods if m not in ("plain", "sam")
    ]
    runs = {m: [] for m in methods + ["plain_long"]}
    for seed in range(args.seeds):
        splits = accuracy.make_splits("digits", args.noise, seed)
        keras.utils.set_random_seed(seed)
        initial = accuracy.mlp().get_weights()
        steps_per_epoch = math.ceil(len(splits[0][0]) / args.batch_size)
        total_steps = steps_per_epoch * args.epochs
        for method in methods:
            acc, seconds, fraction = train(
                method, initial, splits, args.epochs, args, total_steps
            )
            runs[method].append(
                {
                    "seed": seed,
                    "accuracy": acc,
                    "seconds": seconds,
                    "sam_fraction": fraction,
                    "epochs": args.epochs,
                }
            )
            print(
                f"seed {seed} {method}: {100 * acc:.2f}% in {seconds:.1f}s",
                flush=True,
            )
        # Plain SGD for as long as SAM took on this seed.
        ratio = runs["sam"][-1]["seconds"] / runs["plain"][-1]["seconds"]
        epochs = max(args.epochs, int(round(args.epochs * ratio)))
        acc, seconds, _ = train(
            "plain", initial, splits, epochs, args, total_steps
        )
        runs["plain_long"].append(
            {
                "seed": seed,
                "accuracy": acc,
                "seconds": seconds,
                "sam_fraction": 0.0,
                "epochs": epochs,
            }
        )
        print(
            f"seed {seed} plain_long ({epochs} epochs): {100 * acc:.2f}% "
            f"in {seconds:.1f}s",
            flush=True,
        )
    return write(runs, args)


def write(runs, args):
    summary, gain = summarize(runs)
    table_md = markdown(summary, args.seeds)
    conclusion = " ".join(
        [verdict(summary, gain, "passes"), verdict(summary, gain, "cost")]
    )
    print("\n" + table_md + "\n\n" + conclusion)
    os.makedirs(args.out, exist_ok=True)
    report = {
        "environment": {
            "date": datetime.date.today().isoformat(),
            "backend": keras.backend.backend(),
            "keras": keras.__version__,
            "cpu_count": os.cpu_count(),
            "noise": args.noise,
            "seeds": args.seeds,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
        },
        "runs": runs,
        "summary": summary,
        "sam_gain": gain,
        "conclusion": conclusion,
        "markdown": table_md,
    }
    with open(os.path.join(args.out, "equal_compute.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.out, "equal_compute.md"), "w") as f:
        f.write(table_md + "\n\n" + conclusion + "\n")
    plot(summary, os.path.join(args.out, "equal_compute.png"))
    return report


if __name__ == "__main__":
    main()
