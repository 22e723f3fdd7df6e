"""Sharpness-aware training of a GPT-2-style language model: cost and loss.

A causal LM on keras-hub's `GPT2Backbone` (built from a config, no preset
download; byte-level tokens, the head tied to the embedding) is trained
with `fit` on the source files of the Python standard library that runs
this script (sorted paths; every 10th file is validation, the rest
training). For each method it reports:

- `step_ms`: the training step inside `fit`, compile excluded, two ways.
  After `--warmup` untimed steps, `fit` runs three more times on the next
  batches: (1) with a per-step callback that reads the loss (as `verbose=1`
  does: every step waits for the device), timed per step, mean (amortized
  over cheap variants' periods) and median: `step_ms_mean`,
  `step_ms_median`; then (2) `n1` and (3) `n2 = 2 n1` steps with no
  callback, which Keras dispatches without waiting (the host keeps ahead of
  the device): `step_ms_async = (t3 - t2) / (n2 - n1)`, so what each `fit`
  costs once cancels. `n1` is a multiple of 5 (whole periods);
- `ratio`, `ratio_async`: over the plain method's with the same LoRA
  setting;
- `peak_bytes`: peak device memory of the run (JAX/TF/torch on a GPU:
  the allocator's peak), and on JAX also `xla_step_bytes`, XLA's memory
  analysis of the compiled step (arguments + outputs - donated +
  temporaries; the two-pass program for host-scheduled variants);
- `val_loss`: validation loss (nats per byte) after `--steps` steps.

Methods: `plain` (AdamW), `sam`, `looksam` (k=5), `sam_every5`, `msam`
(MomentumSAM), and each with `_lora` (`backbone.enable_lora(rank)`: only the
attention query/value factors train). Each method runs in its own process
(the script calls itself with `--one METHOD`), so memory peaks do not mix
and an out-of-memory error stays in its child.

`--bisect`: at fixed batch and sequence length, the largest GPT-2 family
model (a ladder scaling depth and width together) that trains with each
method, found by bisection over the ladder from `--guess`, one child per
probe (training only, `--probe-steps` steps). `--ladder-depth D` bisects
over width at depth D instead (compiling a probe stays fast).

    python benchmarks/transformer.py --size small --methods plain,sam   # CPU
    KERAS_BACKEND=jax python benchmarks/transformer.py --size gpt2 \\
        --out benchmarks/results/transformer_gpt2.json                # GPU
    KERAS_BACKEND=jax python benchmarks/transformer.py --size gpt2 --bisect

Needs keras-hub (`pip install -e ".[hub]"`).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

MARK = "@@RESULT@@ "
VOCAB = 260  # 256 bytes, 256 = end of file, 3 spare ids

SIZES = {
    # CPU smoke: tiny model, few steps
    "small": {
        "layers": 2, "hidden": 64, "heads": 2, "seq": 64, "batch": 8,
        "steps": 40, "warmup": 10, "lr": 1e-3, "dtype": "float32",
        "val_windows": 16,
    },
    # GPT-2 small: 12 x 768, 12 heads (85M weights with the byte vocabulary,
    # 124M with --vocab-size 50257), seq 512, batch 8, bf16 compute
    "gpt2": {
        "layers": 12, "hidden": 768, "heads": 12, "seq": 512, "batch": 8,
        "steps": 300, "warmup": 20, "lr": 3e-4, "dtype": "mixed_bfloat16",
        "val_windows": 64,
    },
}  # fmt: skip

BASE_METHODS = ("plain", "sam", "looksam", "sam_every5", "msam")
METHODS = BASE_METHODS + tuple(m + "_lora" for m in BASE_METHODS)


def ladder(rung, depth=None):
    """A rung of the GPT-2 family, head dim 64: width 768 + 64 i, depth
    12 + 3 i. Rung 0 is GPT-2 small (12 x 768); 4 is medium (24 x 1024);
    8 is large (36 x 1280); 12 is XL (48 x 1536); each rung adds 10-25%
    weights.

    With `depth`, the width ladder at that depth: width 768 + 128 i (at
    depth 24, rung 2 is GPT-2 medium; a rung of a 3B model adds 7%
    weights, and compiling stays as fast as at depth 24).
    """
    if depth:
        hidden = 768 + 128 * rung
        return {"layers": depth, "hidden": hidden, "heads": hidden // 64}
    hidden = 768 + 64 * rung
    return {"layers": 12 + 3 * rung, "hidden": hidden, "heads": hidden // 64}


# ---------------------------------------------------------------------------
# Data: the standard library's Python sources as bytes


def stdlib_files():
    """Sorted .py files of the stdlib, without site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts
    )


def corpus():
    """(train, validation) token arrays; every 10th file is validation."""
    import numpy as np

    parts = {"train": [], "val": []}
    for i, path in enumerate(stdlib_files()):
        data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        split = "val" if i % 10 == 9 else "train"
        parts[split] += [data.astype(np.int32), np.array([256], np.int32)]
    return np.concatenate(parts["train"]), np.concatenate(parts["val"])


def windows(tokens, count, seq, seed):
    """`count` random windows of seq + 1 tokens: inputs and next tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    start = rng.integers(0, len(tokens) - seq - 1, size=count)
    idx = start[:, None] + np.arange(seq + 1)[None, :]
    w = tokens[idx]
    return w[:, :-1], w[:, 1:]


# ---------------------------------------------------------------------------
# Model and methods (imported in the child only)


def build_lm(cfg, vocab_size):
    import keras
    import keras_hub

    class ByteLM(keras.Model):
        """token ids -> logits, the head tied to the embedding."""

        def __init__(self, backbone, **kwargs):
            super().__init__(**kwargs)
            self.backbone = backbone

        def call(self, token_ids):
            mask = keras.ops.ones_like(token_ids)
            hidden = self.backbone(
                {"token_ids": token_ids, "padding_mask": mask}
            )
            logits = self.backbone.token_embedding(hidden, reverse=True)
            return keras.ops.cast(logits, "float32")

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocab_size,
        num_layers=cfg["layers"],
        num_heads=cfg["heads"],
        hidden_dim=cfg["hidden"],
        intermediate_dim=4 * cfg["hidden"],
        max_sequence_length=cfg["seq"],
        dropout=0.0,
    )
    model = ByteLM(backbone)
    model(keras.ops.zeros((1, cfg["seq"]), "int32"))
    return model, backbone


def compile_method(method, model, lr, rho):
    import keras

    import keras_sam

    base = method.removesuffix("_lora")
    inner = keras.optimizers.AdamW(lr, weight_decay=0.01)
    opt = keras_sam.optimizers
    optimizers = {
        "plain": lambda: inner,
        "sam": lambda: opt.SAM(inner, rho=rho),
        "looksam": lambda: opt.LookSAM(inner, rho=rho, k=5, alpha=0.7),
        "sam_every5": lambda: opt.SAM(inner, rho=rho, sam_every=5),
        "msam": lambda: opt.MomentumSAM(inner, rho=rho),
    }
    wrapped = model if base == "plain" else keras_sam.SAMModel(model)
    wrapped.compile(
        optimizer=optimizers[base](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile="auto",
    )
    return wrapped


def step_timer(warmup):
    """Times each step inside `fit` (after `warmup` untimed ones); the
    first is timed from its `on_train_batch_begin`."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times, self.seen, self.last = [], 0, None

        def on_train_batch_begin(self, batch, logs=None):
            if self.last is None and self.seen >= warmup:
                self.last = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])  # wait for the device
            now = time.perf_counter()
            self.seen += 1
            if self.seen > warmup and self.last is not None:
                self.times.append(now - self.last)
            self.last = now

    return StepTimer()


def fit_parts(steps, warmup):
    """Steps of the successive `fit` calls: `[warmup, n1 (per-step timer),
    n1, 2 n1 (no callback)]`, `n1` a multiple of 5; None when `steps`
    leaves too few for that."""
    n1 = 5 * ((steps - warmup) // 20)
    if n1 < 5:
        return None
    return [steps - 4 * n1, n1, n1, 2 * n1]


def device_peak_bytes():
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            stats = jax.devices()[0].memory_stats()
            return stats.get("peak_bytes_in_use") if stats else None
        if backend == "tensorflow":
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                return tf.config.experimental.get_memory_info("GPU:0")["peak"]
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                return torch.cuda.max_memory_allocated()
    except (RuntimeError, ValueError, KeyError):  # a report, not a failure
        return None
    return None


def compiled_train_step(model, x, y):
    """`(compiled step, state)`: the train step as Keras' JAX trainer jits
    it (state donated), lowered and compiled for the batch `(x, y)`."""
    import jax

    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    step = jax.jit(lambda s, d: model.train_step(s, d), donate_argnums=0)
    return step.lower(state, (x, y)).compile(), state


def xla_step_bytes(model, x, y):
    """XLA memory analysis of the compiled step (JAX), or None."""
    import keras

    if keras.backend.backend() != "jax":
        return None
    stats = compiled_train_step(model, x, y)[0].memory_analysis()
    if stats is None:
        return None
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
    )


def is_oom(error):
    text = f"{type(error).__name__}: {error}".lower()
    return any(
        s in text for s in ("resource_exhausted", "out of memory", "oom")
    )


def run_one(method, cfg, args):
    """Train one method; returns its result dict (the child's work)."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(args.seed)
    if cfg["dtype"] != "float32":
        keras.mixed_precision.set_global_policy(cfg["dtype"])
    train, val = corpus()
    steps = cfg["steps"]
    x, y = windows(train, steps * cfg["batch"], cfg["seq"], args.seed)
    xv, yv = windows(val, cfg["val_windows"], cfg["seq"], args.seed + 1)
    model, backbone = build_lm(cfg, args.vocab_size)
    if method.endswith("_lora"):
        backbone.enable_lora(args.rank)
    model = compile_method(method, model, cfg["lr"], args.rho)
    b, parts = cfg["batch"], fit_parts(steps, cfg["warmup"])
    # Too few steps to split: one fit, timed per step after the warmup.
    timed = 0 if parts is None else 1
    timer = step_timer(cfg["warmup"] if parts is None else 0)
    seconds, start, t0 = [], 0, time.perf_counter()
    for i, n in enumerate(parts or [steps]):
        chunk = slice(start * b, (start + n) * b)
        start += n
        t = time.perf_counter()
        model.fit(
            x[chunk], y[chunk], batch_size=b, epochs=1, shuffle=False,
            verbose=0, callbacks=[timer] if i == timed else [],
        )  # fmt: skip
        seconds.append(time.perf_counter() - t)
    async_ms = None
    if parts is not None:
        async_ms = 1e3 * (seconds[3] - seconds[2]) / (parts[3] - parts[2])
    fit_s = time.perf_counter() - t0
    result = {
        "method": method,
        "weights": int(sum(np.prod(v.shape) for v in model.weights)),
        "trainable": int(
            sum(np.prod(v.shape) for v in model.trainable_variables)
        ),
        "steps": steps,
        "timed_steps": len(timer.times),
        "step_ms_mean": (
            1e3 * statistics.fmean(timer.times) if timer.times else None
        ),
        "step_ms_median": (
            1e3 * statistics.median(timer.times) if timer.times else None
        ),
        "step_ms_async": async_ms,
        "fit_s": fit_s,
        "peak_bytes": device_peak_bytes(),
    }
    if args.probe:  # fits or not: nothing more to compile
        return result
    result["val_loss"] = float(
        model.evaluate(xv, yv, batch_size=cfg["batch"], verbose=0)
    )
    if args.xla_memory:
        b = cfg["batch"]
        result["xla_step_bytes"] = xla_step_bytes(model, x[:b], y[:b])
    return result


# ---------------------------------------------------------------------------
# Parent: one child per method or probe


def child(method, args, extra=()):
    cmd = [sys.executable, os.path.abspath(__file__), "--one", method]
    cmd += ["--size", args.size, "--seed", str(args.seed)]
    cmd += ["--rank", str(args.rank), "--rho", str(args.rho)]
    cmd += ["--vocab-size", str(args.vocab_size)]
    for key in ("steps", "warmup", "batch", "seq", "layers", "hidden", "heads"):
        if getattr(args, key) is not None:
            cmd += [f"--{key}", str(getattr(args, key))]
    cmd += ["--xla-memory"] if args.xla_memory else []
    cmd += list(extra)
    # the child imports the keras_sam of this checkout, not an installed one
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, env.get("PYTHONPATH")) if p
    )
    try:
        done = subprocess.run(
            cmd,
            env=env,
            capture_output=True,
            text=True,
            timeout=args.child_timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"method": method, "error": "timeout"}
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    tail = (done.stderr or done.stdout)[-2000:]
    return {"method": method, "error": f"rc={done.returncode}", "tail": tail}


def config_for(args):
    cfg = dict(SIZES[args.size])
    for key in ("steps", "warmup", "batch", "seq", "layers", "hidden", "heads"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    return cfg


def environment():
    import keras

    return {
        "date": datetime.date.today().isoformat(),
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "argv": sys.argv[1:],
    }


def compare(args, methods):
    results = {}
    for m in methods:  # each printed when done: a cut-off run keeps them
        results[m] = child(m, args)
        print(json.dumps(results[m]), flush=True)
    for m, r in results.items():
        plain = results.get("plain_lora" if m.endswith("_lora") else "plain")
        for key, ratio in (("step_ms_mean", "ratio"),
                           ("step_ms_async", "ratio_async")):  # fmt: skip
            if r.get(key) and plain and plain.get(key):
                r[ratio] = r[key] / plain[key]
    print("\n| method | trainable | synced step ms (mean / median) "
          "| ratio | async step ms | ratio | peak MB | XLA step MB "
          "| val loss |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    nan = float("nan")
    for m, r in results.items():
        if "error" in r:
            print(f"| {m} | error: {r['error']} | | | | | | | |")
            continue

        def mb(v):
            return f"{v / 2**20:.1f}" if v else "n/a"

        print(
            f"| {m} | {r['trainable']:,} | {r['step_ms_mean']:.1f} / "
            f"{r['step_ms_median']:.1f} | {r.get('ratio', nan):.2f} "
            f"| {r.get('step_ms_async') or nan:.1f} "
            f"| {r.get('ratio_async', nan):.2f} "
            f"| {mb(r['peak_bytes'])} | {mb(r.get('xla_step_bytes'))} "
            f"| {r['val_loss']:.4f} |"
        )
    return results


def bisect(args, methods):
    """Largest ladder rung that trains, per method (fitting is monotone in
    the rung): from `--guess`, outward in doubling steps until a probe
    that fits and one that does not bracket the answer, then bisection.
    With a good guess that is two probes per method."""
    found = {}
    guesses = [int(g) for g in str(args.guess).split(",")]
    for i, m in enumerate(methods):
        lo, hi, probes = -1, args.max_rung + 1, []

        def probe(rung_index):
            rung = ladder(rung_index, args.ladder_depth)
            extra = ["--steps", str(args.probe_steps), "--warmup", "1"]
            for key, value in rung.items():
                extra += [f"--{key}", str(value)]
            r = child(m, args, extra + ["--probe"])
            ok = "error" not in r and not r.get("oom")
            probes.append({"rung": rung_index, **rung, "ok": ok, **r})
            print(json.dumps(probes[-1]), flush=True)
            return ok

        guess = min(max(guesses[min(i, len(guesses) - 1)], 0), args.max_rung)
        step = 1
        if probe(guess):
            lo = guess
            while hi - lo > 1:  # up until one does not fit
                rung = min(lo + step, hi - 1)
                if not probe(rung):
                    hi = rung
                    break
                lo, step = rung, 2 * step
        else:
            hi = guess
            while hi - lo > 1:  # down until one fits
                rung = max(hi - step, lo + 1)
                if probe(rung):
                    lo = rung
                    break
                hi, step = rung, 2 * step
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if probe(mid) else (lo, mid)
        config = ladder(lo, args.ladder_depth) if lo >= 0 else None
        found[m] = {"largest_rung": lo, "config": config, "probes": probes}
        print(f"{m}: largest rung {lo} {config}", flush=True)
    return found


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--one", help="(internal) run one method, print JSON")
    p.add_argument("--bisect", action="store_true")
    p.add_argument("--max-rung", type=int, default=30)
    p.add_argument("--probe-steps", type=int, default=3)
    p.add_argument(
        "--guess",
        default="0",
        help="first rung --bisect probes; a comma list: one per method",
    )
    p.add_argument(
        "--ladder-depth",
        type=int,
        default=None,
        help="--bisect over width at this depth (else the GPT-2 family)",
    )
    p.add_argument("--probe", action="store_true", help="(internal) train only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--vocab-size", type=int, default=VOCAB)
    for key in ("steps", "warmup", "batch", "seq", "layers", "hidden", "heads"):
        p.add_argument(f"--{key}", type=int, default=None)
    p.add_argument(
        "--xla-memory",
        action="store_true",
        help="also XLA's memory analysis of the step (JAX)",
    )
    p.add_argument("--child-timeout", type=float, default=3600)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()  # fmt: skip

    if args.one:
        try:
            result = run_one(args.one, config_for(args), args)
        except Exception as error:  # OOM goes to the parent; others raise
            if not is_oom(error):
                raise
            result = {"method": args.one, "oom": True, "error": "oom",
                      "message": str(error)[:500]}  # fmt: skip
        print(MARK + json.dumps(result), flush=True)
        return

    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    report = {"environment": environment(), "config": config_for(args)}
    if args.bisect:
        # JAX takes 75% of the GPU's memory by default; a model that needs
        # more should count as fitting.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
        report["environment"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] = os.environ[
            "XLA_PYTHON_CLIENT_MEM_FRACTION"
        ]
        report["bisect"] = bisect(args, methods)
    else:
        report["results"] = compare(args, methods)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
