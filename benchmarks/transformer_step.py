"""Where a transformer's sharpness-aware step spends its time (JAX).

`transformer.py` times steps inside `fit`. This script times the same
compiled step outside it, to split the cost into the device's work and
what `fit` adds around it: for each method, the train step of the model
that `transformer.py` builds is jitted as Keras jits it (state donated) and
run on one fixed batch,

- `synced_ms`: each step waited for (`block_until_ready`), as `fit` with a
  per-step callback does;
- `pipelined_ms`: `--steps` steps dispatched back to back, one wait at the
  end (the device's time when the host keeps ahead);
- XLA's cost analysis of the compiled step (flops, bytes accessed), which
  needs no clock.

Every method in one process, in interleaved rounds; ratios to plain.

    KERAS_BACKEND=jax python benchmarks/transformer_step.py --size gpt2 \\
        --vocab-size 50257 --methods plain,sam,msam,sam_every5_one
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import transformer  # noqa: E402


def compiled_step(method, cfg, args, x, y):
    """(jitted step, state, cost) of one method; `sam_every5_one` is the
    one-pass program of `sam_every=5`."""
    import keras

    keras.utils.set_random_seed(args.seed)
    model, backbone = transformer.build_lm(cfg, args.vocab_size)
    base = method.removesuffix("_one")
    if base.endswith("_lora"):
        backbone.enable_lora(args.rank)
    model = transformer.compile_method(base, model, cfg["lr"], args.rho)
    model._symbolic_build(data_batch=(x, y))  # Keras' build, as in `fit`
    if method.endswith("_one"):
        model._pass_kind = "one"
    compiled, state = transformer.compiled_train_step(model, x, y)
    model._pass_kind = None
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return (
        compiled,
        state,
        {
            "flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        },
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", default="small", choices=list(transformer.SIZES)
    )
    parser.add_argument("--methods", default="plain,sam,msam,sam_every5_one")
    parser.add_argument("--vocab-size", type=int, default=transformer.VOCAB)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--dump-hlo", default=None, help="write each compiled step's HLO here"
    )
    args = parser.parse_args(argv)

    import jax
    import keras
    import numpy as np

    cfg = dict(transformer.SIZES[args.size])
    if args.layers:
        cfg["layers"] = args.layers
    if cfg["dtype"] != "float32":
        keras.mixed_precision.set_global_policy(cfg["dtype"])
    rng = np.random.default_rng(args.seed)
    x = rng.integers(0, 256, (cfg["batch"], cfg["seq"])).astype("int32")
    x, y = jax.device_put(x), jax.device_put(np.roll(x, -1, axis=1))
    methods = ["plain"] + [m for m in args.methods.split(",") if m != "plain"]
    runs = {}
    for method in methods:
        step, state, cost = compiled_step(method, cfg, args, x, y)
        runs[method] = {"step": step, "state": state, "cost": cost}
        if args.dump_hlo:
            os.makedirs(args.dump_hlo, exist_ok=True)
            with open(os.path.join(args.dump_hlo, f"{method}.hlo"), "w") as f:
                f.write(step.as_text())
        runs[method].update(synced=[], pipelined=[])
        print(f"compiled {method}", flush=True)

    for _ in range(args.rounds):
        for run in runs.values():
            step = run["step"]
            for _ in range(args.steps):  # each step waited for
                start = time.perf_counter()
                _, run["state"] = step(run["state"], (x, y))
                jax.block_until_ready(run["state"])
                run["synced"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(args.steps):  # back to back
                _, run["state"] = step(run["state"], (x, y))
            jax.block_until_ready(run["state"])
            run["pipelined"].append((time.perf_counter() - start) / args.steps)

    def synced_of(run):  # the first round warms up, unless it is the only one
        return statistics.median(run["synced"][args.steps :] or run["synced"])

    plain = runs["plain"]
    rows = []
    for method, run in runs.items():
        synced = synced_of(run)
        pipelined = statistics.median(run["pipelined"])
        rows.append(
            {
                "method": method,
                "synced_ms": 1e3 * synced,
                "pipelined_ms": 1e3 * pipelined,
                "synced_ratio": synced / synced_of(plain),
                "pipelined_ratio": pipelined
                / statistics.median(plain["pipelined"]),
                "flops_ratio": run["cost"]["flops"] / plain["cost"]["flops"],
                "bytes_ratio": run["cost"]["bytes_accessed"]
                / plain["cost"]["bytes_accessed"],
                **run["cost"],
            }
        )
    head = "| method | synced (ms) | x plain | pipelined (ms) | x plain |"
    lines = [
        head + " flops x plain | bytes x plain |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ] + [
        f"| {r['method']} | {r['synced_ms']:.2f} | {r['synced_ratio']:.3f} | "
        f"{r['pipelined_ms']:.2f} | {r['pipelined_ratio']:.3f} | "
        f"{r['flops_ratio']:.3f} | {r['bytes_ratio']:.3f} |"
        for r in rows
    ]
    table = "\n".join(lines)
    device = jax.devices()[0]
    print(f"\n{device.platform} {getattr(device, 'device_kind', '')}, {cfg}\n")
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"device": str(device), "config": cfg, "results": rows},
                f,
                indent=2,
            )
    return rows


if __name__ == "__main__":
    main()
