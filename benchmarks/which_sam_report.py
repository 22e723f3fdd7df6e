"""Statistics, tables and plots of `benchmarks/which_sam.py`."""

import os

import numpy as np


def interval(values):
    """`(mean, half-width of the 95% t-interval)`; 0 for one value."""
    values = np.asarray(values, "float64")
    if len(values) < 2:
        return float(values.mean()), 0.0
    from scipy import stats

    sem = values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(
        stats.t.ppf(0.975, len(values) - 1) * sem
    )


def summary(data):
    """`{(task, noise): {method: row}}` from the picks of `data`."""
    picks = data.get("picks", {})
    alone = {}  # the timing stage: one run at a time on the machine
    for key, timed in data.get("timing", {}).items():
        task, method, _ = key.split("|")
        alone[(task, method)] = timed["epoch_seconds"]
    table = {}
    for key, pick in picks.items():
        task, noise, method = key.split("|")
        acc = [r["test_accuracy"] for r in pick["runs"]]
        mean, half = interval(acc)
        table.setdefault((task, noise), {})[method] = {
            "rho": pick["rho"],
            "knob": pick["knob"],
            "accuracy": acc,
            "mean": mean,
            "ci95": half,
            "passes": float(np.mean([r["passes"] for r in pick["runs"]])),
            "epoch_seconds": alone.get(
                (task, method),
                float(np.median([r["epoch_seconds"] for r in pick["runs"]])),
            ),
            "timed_alone": (task, method) in alone,
        }
    for rows in table.values():
        for ref in ("plain", "sam"):
            if ref not in rows:
                continue
            for row in rows.values():
                n = min(len(row["accuracy"]), len(rows[ref]["accuracy"]))
                diff = np.subtract(
                    row["accuracy"][:n], rows[ref]["accuracy"][:n]
                )
                row[f"vs_{ref}"] = interval(diff)
        plain = rows.get("plain")
        for row in rows.values():
            row["time_ratio"] = (
                row["epoch_seconds"] / plain["epoch_seconds"]
                if plain
                else float("nan")
            )
    return table


def _pm(pair, scale=100.0):
    if pair is None:
        return "n/a"
    return f"{scale * pair[0]:+.2f} ± {scale * pair[1]:.2f}"


def markdown(data):
    lines = []
    for (task, noise), rows in summary(data).items():
        lines += [
            f"\n**{task}, {float(noise):.0%} label noise** "
            f"(backend {data.get('backend')}; test accuracy in %, mean ± "
            "95% t-interval over seeds; differences paired by seed; "
            "s/epoch from the timing stage, one run at a time, where "
            "marked *)\n",
            "| method | rho | knob | test acc. | vs plain | vs SAM "
            "| passes/step | s/epoch | time / plain |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for method, r in rows.items():
            knob = "" if r["knob"] is None else f"{r['knob']:g}"
            lines.append(
                f"| {method} | {r['rho']:g} | {knob} | {100 * r['mean']:.2f}"
                f" ± {100 * r['ci95']:.2f} | {_pm(r.get('vs_plain'))} | "
                f"{_pm(r.get('vs_sam'))} | {r['passes']:.2f} | "
                f"{r['epoch_seconds']:.3f}{'*' if r['timed_alone'] else ''}"
                f" | {r['time_ratio']:.2f} |"
            )
    return "\n".join(lines)


def plots(data, out):
    """One PNG per task: accuracy against passes per step, per noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary(data)
    for task in sorted({t for t, _ in table}):
        noises = sorted(n for t, n in table if t == task)
        fig, axes = plt.subplots(
            1, len(noises), figsize=(6 * len(noises), 4.5), squeeze=False
        )
        for ax, noise in zip(axes[0], noises):
            for method, r in table[(task, noise)].items():
                ax.errorbar(
                    r["passes"],
                    100 * r["mean"],
                    yerr=100 * r["ci95"],
                    fmt="o",
                    capsize=3,
                )
                ax.annotate(
                    method,
                    (r["passes"], 100 * r["mean"]),
                    textcoords="offset points",
                    xytext=(4, 3),
                    fontsize=7,
                )
            ax.set_xlabel("forward/backward passes per step")
            ax.set_ylabel("clean test accuracy (%)")
            ax.set_title(f"{task}, {float(noise):.0%} label noise")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"which_sam_{task}.png"), dpi=110)
        plt.close(fig)


def ablation_markdown(data):
    lines = [
        "| setting | test acc. (%, mean ± 95% t-interval) |",
        "|---|---:|",
    ]
    for name, accs in data.get("looksam_ablation", {}).items():
        mean, half = interval(accs)
        lines.append(f"| {name} | {100 * mean:.2f} ± {100 * half:.2f} |")
    return "\n".join(lines)
