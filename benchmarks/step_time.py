"""Step time and memory of sharpness-aware training, relative to plain training.

For a small CNN and a ResNet-18-style CIFAR network (both built here), times
the training step of plain training and of each sharpness-aware method on
the current Keras backend, and reports for each:

- `ratio`: median step time divided by the plain step's, measured in the
  same process on the same model and batch. Methods are timed in
  interleaved rounds so that load drifting over time hits all of them
  alike. A step is one `model.train_on_batch` call on a fixed batch of
  random CIFAR-shaped data (its loss is read back to the host, which
  synchronizes the device). For `sam_every=k` the statistic is the median
  over windows of k consecutive steps of their mean time (one two-pass step
  and k-1 plain steps), i.e. the amortized cost.
- `memory`: peak device memory of the step, and the extra memory of the
  method over plain in units of the trainable weights' size (target: at
  most 1.1, one copy of the weights plus 10%). On JAX this is XLA's memory
  analysis of the compiled step (arguments + outputs - donated + temporaries,
  exact per method on CPU and GPU); on a TensorFlow or torch GPU, the
  allocator's peak during a step; otherwise "n/a".

Methods: plain, SAM, ASAM, RSAM (sphere on the conv kernels, which
BatchNorm makes scale-invariant), SAM with `sam_every=5`, LETS (SAM with a
`LearnedRadius` updated every step from one validation batch of the same
size), and LETS updated every 10th step (`lets10`, timed over windows of 10
steps like `sam_every5`). The cheap variants: RST with probability 0.5
(`random50`, windows of 10), AE-SAM (`adaptive`, windows of 10), LookSAM
with k=5 (`looksam5`), Momentum-SAM (`msam`) and GSAM (`gsam`); the
host-scheduled ones (`sam_every5`, `random50`, `looksam5`) run a two-pass
or a one-pass program per step, chosen on the host, through
`train_on_batch` as `fit` does, and their memory is the larger of the two
programs'. Prints a Markdown table and writes JSON to `--out`.

Defaults (small CNN, batch 128) run in a few minutes on 2 CPU cores:

    KERAS_BACKEND=jax python benchmarks/step_time.py
    KERAS_BACKEND=tensorflow python benchmarks/step_time.py --model both
    # GPU, as in the README:
    KERAS_BACKEND=jax python benchmarks/step_time.py --model both \\
        --batch-size 256 --jit --steps 100 --out step_time_gpu.json
"""

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)

# ---------------------------------------------------------------------------
# Models


def conv_bn_relu(x, filters, strides=1):
    x = keras.layers.Conv2D(
        filters, 3, strides=strides, padding="same", use_bias=False
    )(x)
    x = keras.layers.BatchNormalization()(x)
    return keras.layers.ReLU()(x)


def small_cnn():
    """Three conv/BN/ReLU blocks and a linear head (~0.1M weights)."""
    inputs = keras.Input(IMAGE_SHAPE)
    x = conv_bn_relu(inputs, 32)
    x = keras.layers.MaxPooling2D()(x)
    x = conv_bn_relu(x, 64)
    x = keras.layers.MaxPooling2D()(x)
    x = conv_bn_relu(x, 128)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(NUM_CLASSES)(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def basic_block(x, filters, strides):
    shortcut = x
    y = conv_bn_relu(x, filters, strides)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
    y = keras.layers.BatchNormalization()(y)
    if strides != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(
            filters, 1, strides=strides, use_bias=False
        )(x)
        shortcut = keras.layers.BatchNormalization()(shortcut)
    return keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))


def resnet18():
    """ResNet-18 for 32x32 inputs: 3x3 stem, 4 stages of 2 basic blocks
    (64, 128, 256, 512 filters), global pooling, linear head (~11.2M)."""
    inputs = keras.Input(IMAGE_SHAPE)
    x = conv_bn_relu(inputs, 64)
    for stage, filters in enumerate((64, 128, 256, 512)):
        x = basic_block(x, filters, 1 if stage == 0 else 2)
        x = basic_block(x, filters, 1)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(NUM_CLASSES)(x)
    return keras.Model(inputs, outputs, name="resnet18")


def tiny_cnn():
    """One conv/BN/ReLU block and a linear head: for smoke tests."""
    inputs = keras.Input(IMAGE_SHAPE)
    x = conv_bn_relu(inputs, 4, strides=4)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(NUM_CLASSES)(x)
    return keras.Model(inputs, outputs, name="tiny_cnn")


MODELS = {"small": small_cnn, "resnet18": resnet18, "tiny": tiny_cnn}

# ---------------------------------------------------------------------------
# Methods: name -> (period, builder). A builder takes the network, the SGD
# optimizer and the validation batch, and returns (model, optimizer).


def conv_kernels_on_sphere(net):
    return {
        layer.name: "sphere"
        for layer in net.layers
        if isinstance(layer, keras.layers.Conv2D)
    }


def method_table():
    """Methods available in this version of keras_sam, in table order."""
    opt = keras_sam.optimizers
    wrap = keras_sam.SAMModel

    def plain(net, sgd, val):
        return net, sgd

    def sam(net, sgd, val):
        return wrap(net), opt.SAM(sgd, rho=0.05)

    def asam(net, sgd, val):
        return wrap(net), opt.ASAM(sgd, rho=0.5)

    def rsam(net, sgd, val):
        manifold = conv_kernels_on_sphere(net)
        return wrap(net), opt.RSAM(sgd, rho=0.05, manifold=manifold)

    def sam_every5(net, sgd, val):
        return wrap(net), opt.SAM(sgd, rho=0.05, sam_every=5)

    def lets(net, sgd, val, update_every=1):
        radius = keras_sam.LearnedRadius(
            initial=0.05,
            learning_rate=0.01,
            validation_data=val,
            batch_size=len(val[0]),
            update_every=update_every,
            seed=0,
        )
        return wrap(net), opt.SAM(sgd, rho=radius)

    def lets10(net, sgd, val):
        return lets(net, sgd, val, update_every=10)

    # The cheap variants (issue 16). Host-scheduled ones (every k, random,
    # LookSAM) dispatch between a two-pass and a one-pass program in
    # `train_on_batch`, as in `fit`.
    def random50(net, sgd, val):
        schedule = keras_sam.schedules.Random(0.5, seed=0)
        return wrap(net), opt.SAM(sgd, rho=0.05, schedule=schedule)

    def adaptive(net, sgd, val):
        schedule = keras_sam.schedules.Adaptive(total_steps=1000)
        return wrap(net), opt.SAM(sgd, rho=0.05, schedule=schedule)

    def looksam5(net, sgd, val):
        return wrap(net), opt.LookSAM(sgd, rho=0.05, k=5, alpha=0.7)

    def msam(net, sgd, val):
        return wrap(net), opt.MomentumSAM(sgd, rho=0.3)

    def gsam(net, sgd, val):
        return wrap(net), opt.GSAM(sgd, rho=0.05, alpha=0.1)

    def one_pass(net, sgd, val):
        # After its first step only the one-pass program runs: what the
        # SAMModel step costs over plain Keras when it takes one pass.
        return wrap(net), opt.SAM(sgd, rho=0.05, sam_every=10**9)

    # name: (window of steps timed together, builder)
    return {
        "plain": (1, plain),
        "sam": (1, sam),
        "asam": (1, asam),
        "rsam": (1, rsam),
        "sam_every5": (5, sam_every5),
        "lets": (1, lets),
        "lets10": (10, lets10),
        "random50": (10, random50),
        "adaptive": (10, adaptive),
        "looksam5": (5, looksam5),
        "msam": (1, msam),
        "gsam": (1, gsam),
        "one_pass": (1, one_pass),
    }


# ---------------------------------------------------------------------------
# Memory (backend-specific; imports happen only on the backend in use)


def device_description():
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        return f"{d.platform}: {d.device_kind} x{jax.device_count()}"
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name(0)}"
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return f"gpu: {gpus[0].name} x{len(gpus)}"
    return f"cpu: {platform.processor() or platform.machine()}"


def step_memory(model, x, y):
    """Bytes the compiled step needs on JAX (XLA memory analysis), or None.

    arguments + outputs - aliased (donated state) + temporaries.
    """
    if keras.backend.backend() != "jax":
        return None
    import jax

    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    programs = getattr(model.train_function, "programs", None)
    kinds = list(programs) if programs else [None]
    sizes = []
    for kind in kinds:
        # Host-scheduled methods: the larger of their two programs.
        model._pass_kind = kind
        try:
            step = jax.jit(
                lambda state, data: model.train_step(state, data),
                donate_argnums=0,
            )
            stats = step.lower(state, (x, y)).compile().memory_analysis()
        finally:
            model._pass_kind = None
        if stats is None:
            return None
        sizes.append(
            int(
                stats.argument_size_in_bytes
                + stats.output_size_in_bytes
                - stats.alias_size_in_bytes
                + stats.temp_size_in_bytes
            )
        )
    return max(sizes)


def reset_peak():
    """Resets the allocator's peak on a TF/torch GPU; False if there is none."""
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return True
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            tf.config.experimental.reset_memory_stats("GPU:0")
            return True
    return False


def read_peak():
    if keras.backend.backend() == "torch":
        import torch

        return int(torch.cuda.max_memory_allocated())
    import tensorflow as tf

    return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])


# ---------------------------------------------------------------------------
# Measurement


def build_runs(model_name, methods, args, x, y, val):
    """Compiles one copy of the network per method, from the same weights."""
    keras.utils.set_random_seed(args.seed)
    initial = MODELS[model_name]().get_weights()
    table = method_table()
    runs = {}
    for name in methods:
        period, builder = table[name]
        net = MODELS[model_name]()
        net.set_weights(initial)
        sgd = keras.optimizers.SGD(0.01, momentum=0.9)
        model, optimizer = builder(net, sgd, val)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile="auto" if args.jit is None else args.jit,
        )
        # Warm-up: compile, and fill the caches and allocator.
        # (host-scheduled methods: at least one window, so that both
        # programs are compiled before timing).
        for _ in range(max(args.warmup, period)):
            model.train_on_batch(x, y)
        runs[name] = {"model": model, "period": period, "times": []}
    return runs


def weights_bytes(model):
    return int(
        sum(
            np.prod(v.shape) * np.dtype(v.dtype).itemsize
            for v in model.trainable_variables
        )
    )


def measure(model_name, methods, args):
    rng = np.random.default_rng(args.seed)
    shape = (args.batch_size,) + IMAGE_SHAPE
    x_np = rng.random(shape, dtype=np.float32)
    y_np = rng.integers(0, NUM_CLASSES, args.batch_size).astype("int32")
    val = (
        rng.random(shape, dtype=np.float32),
        rng.integers(0, NUM_CLASSES, args.batch_size).astype("int32"),
    )
    # Device-resident batch: no host-to-device copy inside the timed step.
    x = keras.ops.convert_to_tensor(x_np)
    y = keras.ops.convert_to_tensor(y_np)
    runs = build_runs(model_name, methods, args, x, y, val)

    # Interleaved rounds: every method runs `block` steps per round.
    block = 5
    rounds = max(1, -(-args.steps // block))
    for _ in range(rounds):
        for run in runs.values():
            for _ in range(block):
                start = time.perf_counter()
                run["model"].train_on_batch(x, y)  # returns numpy: synced
                run["times"].append(time.perf_counter() - start)

    results = []
    for name, run in runs.items():
        times, k = run["times"], run["period"]
        windows = [
            sum(times[i : i + k]) / k for i in range(0, len(times) - k + 1, k)
        ] or [
            sum(times) / len(times)
        ]  # fewer steps than one window
        model = run["model"]
        memory = step_memory(model, x, y) if args.memory else None
        if memory is None and args.memory and reset_peak():
            model.train_on_batch(x, y)
            memory = read_peak()
        results.append(
            {
                "model": model_name,
                "method": name,
                "steps": len(times),
                "median_step_s": statistics.median(windows),
                "memory_bytes": memory,
                "weights_bytes": weights_bytes(model),
                "step_times_s": times,
            }
        )
    plain = next(r for r in results if r["method"] == "plain")
    for r in results:
        r["ratio"] = r["median_step_s"] / plain["median_step_s"]
        r["extra_memory_over_weights"] = (
            None
            if r["memory_bytes"] is None or plain["memory_bytes"] is None
            else (r["memory_bytes"] - plain["memory_bytes"])
            / r["weights_bytes"]
        )
    del runs
    keras.backend.clear_session()
    gc.collect()
    return results


def markdown(results):
    lines = [
        "| model | method | step (ms) | ratio to plain | step memory (MiB) "
        "| extra memory / weights |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        memory = (
            "n/a"
            if r["memory_bytes"] is None
            else f"{r['memory_bytes'] / 2**20:.1f}"
        )
        extra = (
            "n/a"
            if r["extra_memory_over_weights"] is None
            else f"{r['extra_memory_over_weights']:.2f}"
        )
        lines.append(
            f"| {r['model']} | {r['method']} "
            f"| {1000 * r['median_step_s']:.1f} | {r['ratio']:.2f} "
            f"| {memory} | {extra} |"
        )
    return "\n".join(lines)


def environment(args):
    env = {
        "date": datetime.date.today().isoformat(),
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "keras_sam": keras_sam.__version__,
        "device": device_description(),
        "cpu_count": os.cpu_count(),
        "jit_compile": "auto" if args.jit is None else args.jit,
        "batch_size": args.batch_size,
    }
    if env["backend"] == "jax":
        import jax

        env["jax"] = jax.__version__
    return env


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        choices=["small", "resnet18", "both", "tiny"],
        default="small",
        help="'tiny' is a smoke-test network",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--steps", type=int, default=30, help="timed steps per method"
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps per method"
    )
    parser.add_argument(
        "--jit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="jit_compile=True/False (default: Keras' 'auto')",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset (plain is always included); "
        "default: all available",
    )
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure step memory (on JAX: one extra compile per method)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="step_time.json")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    available = list(method_table())
    methods = available if args.methods is None else args.methods.split(",")
    unknown = sorted(set(methods) - set(available))
    if unknown:
        raise SystemExit(
            f"Unknown or unavailable methods {unknown}; "
            f"available: {available}"
        )
    methods = ["plain"] + [m for m in methods if m != "plain"]
    models = ["small", "resnet18"] if args.model == "both" else [args.model]
    env = environment(args)
    results = []
    for model_name in models:
        print(f"measuring {model_name}: {', '.join(methods)}", flush=True)
        results += measure(model_name, methods, args)
    table = markdown(results)
    print(
        f"\n{env['backend']} on {env['device']}, batch {args.batch_size}, "
        f"jit_compile={env['jit_compile']}, keras {env['keras']}\n"
    )
    print(table)
    report = {"environment": env, "results": results, "markdown": table}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
