"""Step time of two versions of keras_sam in one process, interleaved.

Separate processes on a shared CPU drift by 10-20% (plain training alone
moved 20% between two runs here), which drowns a 3% question such as "is
the refactored step as fast as the old one?". This script imports an older
commit of keras_sam beside the current one (extracted with `git archive`
and renamed `keras_sam_old`), compiles every method of
`step_time.py` once per version from the same weights, and times all of
them in interleaved rounds in the same process, so drift hits both versions
alike. It reports, per version, the ratio to that version's plain step, and
per method the new/old ratio of step times.

    KERAS_BACKEND=tensorflow python benchmarks/refactor_ab.py \\
        --old 6c83c0a --methods sam,sam_every5,looksam5,msam,gsam \\
        --steps 100 --batch-size 64 --out ab.json
"""

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import step_time  # noqa: E402

import keras_sam  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_old(ref, where):
    """`keras_sam` at git `ref`, importable as `keras_sam_old`."""
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", ref, "keras_sam"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", where], input=archive, check=True)
    os.rename(
        os.path.join(where, "keras_sam"), os.path.join(where, "keras_sam_old")
    )
    word = re.compile(r"\bkeras_sam\b")
    for folder, _, files in os.walk(os.path.join(where, "keras_sam_old")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    text = f.read()
                with open(path, "w") as f:
                    f.write(word.sub("keras_sam_old", text))
    sys.path.insert(0, where)
    return importlib.import_module("keras_sam_old")


def build(version, module, model_name, methods, args, x, y, val):
    """`step_time.build_runs` with `module` as the keras_sam it builds on."""
    step_time.keras_sam = module
    try:
        runs = step_time.build_runs(model_name, methods, args, x, y, val)
    finally:
        step_time.keras_sam = keras_sam
    return {(version, name): run for name, run in runs.items()}


def windows(times, k):
    return [sum(times[i : i + k]) / k for i in range(0, len(times) - k + 1, k)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="git ref of the old code")
    parser.add_argument(
        "--model", default="small", choices=list(step_time.MODELS)
    )
    parser.add_argument(
        "--methods", default="sam,sam_every5,looksam5,msam,gsam"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quantile",
        type=float,
        default=0.5,
        help="statistic of the step (window) times: 0.5 is the median; a low "
        "one (0.1) reads the uncontended speed on a shared machine",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.jit = None
    methods = ["plain"] + [m for m in args.methods.split(",") if m != "plain"]

    old = import_old(args.old, tempfile.mkdtemp())
    rng = np.random.default_rng(args.seed)
    shape = (args.batch_size,) + step_time.IMAGE_SHAPE
    x = keras.ops.convert_to_tensor(rng.random(shape, dtype=np.float32))
    y = keras.ops.convert_to_tensor(
        rng.integers(0, step_time.NUM_CLASSES, args.batch_size).astype("int32")
    )
    val = (np.asarray(x), np.asarray(y))
    runs = {}
    for version, module in (("old", old), ("new", keras_sam)):
        runs.update(
            build(version, module, args.model, methods, args, x, y, val)
        )

    block = 10  # a multiple of every host schedule's period (5, 10)
    for _ in range(max(1, -(-args.steps // block))):
        for run in runs.values():
            for _ in range(block):
                start = time.perf_counter()
                run["model"].train_on_batch(x, y)
                run["times"].append(time.perf_counter() - start)

    median = {
        key: float(
            np.quantile(windows(run["times"], run["period"]), args.quantile)
        )
        for key, run in runs.items()
    }
    rows = []
    for name in methods:
        old_ratio = median[("old", name)] / median[("old", "plain")]
        new_ratio = median[("new", name)] / median[("new", "plain")]
        rows.append(
            {
                "method": name,
                "old_ms": 1e3 * median[("old", name)],
                "new_ms": 1e3 * median[("new", name)],
                "old_ratio_to_plain": old_ratio,
                "new_ratio_to_plain": new_ratio,
                "new_over_old": median[("new", name)] / median[("old", name)],
            }
        )
    head = "| method | old (ms) | new (ms) | old / plain | new / plain |"
    lines = [head + " new / old |", "|---|---:|---:|---:|---:|---:|"] + [
        f"| {r['method']} | {r['old_ms']:.1f} | {r['new_ms']:.1f} | "
        f"{r['old_ratio_to_plain']:.3f} | {r['new_ratio_to_plain']:.3f} | "
        f"{r['new_over_old']:.3f} |"
        for r in rows
    ]
    table = "\n".join(lines)
    env = step_time.environment(args)
    env["old"] = args.old
    env["quantile"] = args.quantile
    env["steps"] = args.steps
    print(
        f"{env['backend']} on {env['device']}, model {args.model}, "
        f"batch {args.batch_size}, {args.steps} steps per method and version\n"
    )
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"environment": env, "results": rows, "markdown": table},
                f,
                indent=2,
            )
    return rows


if __name__ == "__main__":
    main()
