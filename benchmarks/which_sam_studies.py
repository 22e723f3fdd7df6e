"""The studies beside the benchmark of `which_sam.py`, as chains (see
`which_sam_pool.py`): the MNIST-1D baselines of the paper (`--baseline`)
and the LookSAM ablation (`--looksam-ablation`)."""

import numpy as np
import which_sam_report as report
from which_sam_pool import run_args
from which_sam_setup import TASKS


def baseline_chain(store, args):
    """Plain Adam 1e-2, batch 100, 6,000 steps (150 epochs) on clean
    MNIST-1D: the paper reports about 94% (CNN) and 68% (MLP)."""
    tasks = ("mnist1d_cnn", "mnist1d_mlp")
    epochs = args.epochs or 150
    runs = yield [
        run_args(task, "plain", 0.0, None, 0.0, seed, epochs)
        for task in tasks
        for seed in range(args.seeds)
    ]
    for i, task in enumerate(tasks):
        accs = [
            r["test_accuracy"]
            for r in runs[i * args.seeds : (i + 1) * args.seeds]
        ]
        mean, half = report.interval(accs)
        store.data.setdefault("baseline", {})[task] = {
            "epochs": epochs,
            "accuracy": accs,
            "mean": mean,
            "ci95": half,
        }
        print(f"{task}: {100 * mean:.2f} ± {100 * half:.2f} % ({epochs} ep)")
    store.save()


def looksam_ablation_chain(store, args):
    """LookSAM over k and alpha against SAM, sam_every=k (alpha = 0) and
    plain SGD at the step size LookSAM's one-pass steps take: their
    gradient g + alpha |g| g_v/|g_v| (g_v orthogonal to g) has norm
    sqrt(1 + alpha^2) |g|, so plain with lr x sqrt(1 + alpha^2)."""
    task, noise = "digits", args.noise[-1]
    epochs = args.epochs or TASKS[task][3]
    seeds = range(args.seeds)
    rows = {}
    settings = [(k, a) for k in (2, 5, 10) for a in (0.0, 0.7)]
    settings.insert(4, (5, 1.0))
    for k, alpha in settings:
        rows[f"LookSAM k={k} alpha={alpha:g}"] = [
            run_args(task, f"looksam_k{k}", 0.05, alpha, noise, s, epochs)
            for s in seeds
        ]
    for alpha in (0.0, 0.7, 1.0):
        lr = 0.05 * float(np.sqrt(1 + alpha**2))
        rows[f"plain lr={lr:.3g} (= 0.05 sqrt(1 + {alpha:g}^2))"] = [
            run_args(task, "plain", 0.0, None, noise, s, epochs, lr)
            for s in seeds
        ]
    rows["sam rho=0.05"] = [
        run_args(task, "sam", 0.05, None, noise, s, epochs) for s in seeds
    ]
    results = yield [a for runs in rows.values() for a in runs]
    accs = iter(r["test_accuracy"] for r in results)
    store.data["looksam_ablation"] = {
        name: [next(accs) for _ in runs] for name, runs in rows.items()
    }
    store.save()
