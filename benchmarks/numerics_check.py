"""Numerical baseline: every sharpness-aware variant, every execution mode.

Trains a small model for a few `fit` steps per case (variant x mode) and
saves the weights and optimizer variables, so that a refactoring can show
its numerics are unchanged:

```
KERAS_BACKEND=jax python benchmarks/numerics_check.py --save golden/jax.npz
KERAS_BACKEND=jax python benchmarks/numerics_check.py \
    --compare golden/jax.npz --atol 1e-6
```

`--compare` re-runs every case with the `keras_sam` that is importable now
and prints, per case, the largest absolute difference of the weights and
of the optimizer variables and whether both are bit for bit equal; it
exits with status 1 if any case is over `--atol` or fails to run.

Modes: `eager` (`run_eagerly=True`), `compiled` (`jit_compile=False`) and
`jit` (`jit_compile=True`, not on torch). Only the public `keras_sam` API
is used.
"""

import argparse
import os
import sys
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402

D_IN, D_HIDDEN, D_OUT = 8, 16, 3
N, N_VAL, BATCH, EPOCHS = 64, 16, 16, 1
LR = 0.05

MODES = {
    "eager": {"run_eagerly": True, "jit_compile": False},
    "compiled": {"run_eagerly": False, "jit_compile": False},
    "jit": {"run_eagerly": False, "jit_compile": True},
}


def _data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D_IN)).astype("float32")
    y = rng.integers(0, D_OUT, size=(n,)).astype("int32")
    return x, y


def _initial_weights():
    """Fixed weights for every case and backend; "out/kernel" orthonormal
    (a point of Stiefel), so that RSAM can put it on that manifold."""
    rng = np.random.default_rng(42)
    out_kernel, _ = np.linalg.qr(rng.normal(size=(D_HIDDEN, D_OUT)))
    return [
        0.4 * rng.normal(size=(D_IN, D_HIDDEN)),  # hidden/kernel
        0.1 * rng.normal(size=(D_HIDDEN,)),  # hidden/bias
        1.0 + 0.1 * rng.normal(size=(D_HIDDEN,)),  # bn/gamma
        0.1 * rng.normal(size=(D_HIDDEN,)),  # bn/beta
        np.zeros((D_HIDDEN,)),  # bn/moving_mean
        np.ones((D_HIDDEN,)),  # bn/moving_variance
        out_kernel,  # out/kernel
        0.1 * rng.normal(size=(D_OUT,)),  # out/bias
    ]


def _model():
    model = keras.Sequential(
        [
            keras.Input((D_IN,)),
            keras.layers.Dense(D_HIDDEN, name="hidden"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.ReLU(name="relu"),
            keras.layers.Dropout(0.2, name="dropout"),
            keras.layers.Dense(D_OUT, activation="softmax", name="out"),
        ]
    )
    model.set_weights([w.astype("float32") for w in _initial_weights()])
    return model


def _sgd(**kwargs):
    return keras.optimizers.SGD(LR, momentum=0.9, **kwargs)


def _adam():
    return keras.optimizers.Adam(0.01)


def _learned_radius():
    return keras_sam.LearnedRadius(
        initial=0.05,
        learning_rate=0.01,
        validation_data=_data(N_VAL, seed=2),
        batch_size=N_VAL,
        seed=0,
    )


opt = keras_sam.optimizers
schedules = keras_sam.schedules

# name -> (optimizer factory, extra `compile` arguments, global dtype policy)
CASES = {
    "sam_sgd": (lambda: opt.SAM(_sgd(), rho=0.05), {}, None),
    "sam_adam": (lambda: opt.SAM(_adam(), rho=0.05), {}, None),
    "sam_unnormalized": (
        lambda: opt.SAM(_sgd(), rho=0.05, normalize=False),
        {},
        None,
    ),
    "sam_splits2": (
        lambda: opt.SAM(_sgd(), rho=0.05, num_batch_splits=2),
        {},
        None,
    ),
    "sam_every3": (lambda: opt.SAM(_sgd(), rho=0.05, sam_every=3), {}, None),
    "sam_random": (
        lambda: opt.SAM(
            _sgd(), rho=0.05, schedule=schedules.Random(0.5, seed=1)
        ),
        {},
        None,
    ),
    "sam_adaptive": (
        lambda: opt.SAM(
            _sgd(), rho=0.05, schedule=schedules.Adaptive(total_steps=8)
        ),
        {},
        None,
    ),
    "asam": (lambda: opt.ASAM(_sgd(), rho=0.5, eta=0.01), {}, None),
    "rsam_fisher_stiefel": (
        lambda: opt.RSAM(
            _sgd(),
            rho=0.1,
            manifold={"out/kernel": "stiefel"},
            metric="fisher",
            damping=0.01,
            fisher_decay=0.9,
        ),
        {},
        None,
    ),
    "rsam_adaptive_sphere": (
        lambda: opt.RSAM(
            _sgd(),
            rho=0.3,
            manifold={"hidden/kernel": "sphere"},
            metric="adaptive",
            eta=0.05,
        ),
        {},
        None,
    ),
    "looksam_k2": (lambda: opt.LookSAM(_sgd(), rho=0.05, k=2), {}, None),
    "gsam": (lambda: opt.GSAM(_sgd(), rho=0.05, alpha=0.1), {}, None),
    "gsam_rho_min": (
        lambda: opt.GSAM(_sgd(), rho=0.05, alpha=0.1, rho_min=0.01),
        {},
        None,
    ),
    "msam_sgd": (lambda: opt.MomentumSAM(_sgd(), rho=0.3), {}, None),
    "msam_adam": (lambda: opt.MomentumSAM(_adam(), rho=0.3), {}, None),
    "sampa_previous": (
        lambda: opt.SAMPa(_sgd(), rho=0.1, adversarial_batch="previous"),
        {},
        None,
    ),
    "sampa_current": (
        lambda: opt.SAMPa(_sgd(), rho=0.1, adversarial_batch="current"),
        {},
        None,
    ),
    "sam_learned_radius": (
        lambda: opt.SAM(_sgd(), rho=_learned_radius()),
        {},
        None,
    ),
    "sam_mixed_float16": (
        lambda: opt.SAM(_sgd(), rho=0.05),
        {},
        "mixed_float16",
    ),
    "sam_grad_accum2": (
        lambda: opt.SAM(_sgd(gradient_accumulation_steps=2), rho=0.05),
        {},
        None,
    ),
    "sam_steps_per_execution2": (
        lambda: opt.SAM(_sgd(), rho=0.05),
        {"steps_per_execution": 2},
        None,
    ),
    "sam_sync_perturbation": (
        lambda: opt.SAM(_sgd(), rho=0.05, sync_perturbation=True),
        {},
        None,
    ),
}

# (case or "*", mode) -> why the old code does not run it.
SKIPS = {
    ("*", "jit"): {"torch": "torch.compile is not a supported mode on CPU"},
    ("sam_steps_per_execution2", "eager"): {
        "torch": "Keras requires steps_per_execution=1 on torch"
    },
    ("sam_steps_per_execution2", "compiled"): {
        "torch": "Keras requires steps_per_execution=1 on torch"
    },
}


def skip_reason(backend, case, mode):
    for key in ((case, mode), ("*", mode)):
        reason = SKIPS.get(key, {}).get(backend)
        if reason:
            return reason
    return None


def run_case(case, mode):
    """Trains one case; returns (weights, optimizer variables) as numpy."""
    make_optimizer, compile_kwargs, policy = CASES[case]
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    if policy is not None:
        keras.mixed_precision.set_global_policy(policy)
    try:
        model = keras_sam.SAMModel(_model())
        model.compile(
            optimizer=make_optimizer(),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            **MODES[mode],
            **compile_kwargs,
        )
        x, y = _data(N, seed=1)
        model.fit(
            x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0
        )
        weights = [
            keras.ops.convert_to_numpy(v.value)
            for v in model.trainable_variables + model.non_trainable_variables
        ]
        opt_vars = [
            keras.ops.convert_to_numpy(v.value)
            for v in model.optimizer.variables
        ]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return weights, opt_vars


def _cases():
    for case in CASES:
        for mode in MODES:
            yield case, mode


def save(path):
    backend = keras.backend.backend()
    arrays = {"meta/backend": np.array(backend)}
    failures = 0
    for case, mode in _cases():
        key = f"{case}/{mode}"
        reason = skip_reason(backend, case, mode)
        if reason:
            arrays[f"{key}/skipped"] = np.array(reason)
            print(f"{key:40s} skipped: {reason}")
            continue
        start = time.time()
        try:
            weights, opt_vars = run_case(case, mode)
        except Exception as e:  # noqa: BLE001 (recorded, counted)
            failures += 1
            arrays[f"{key}/error"] = np.array(f"{type(e).__name__}: {e}")
            print(f"{key:40s} ERROR {type(e).__name__}: {e}")
            traceback.print_exc(limit=3)
            continue
        for i, w in enumerate(weights):
            arrays[f"{key}/w/{i}"] = w
        for i, v in enumerate(opt_vars):
            arrays[f"{key}/opt/{i}"] = v
        print(
            f"{key:40s} saved {len(weights)} weights, "
            f"{len(opt_vars)} optimizer variables ({time.time() - start:.1f}s)"
        )
    np.savez(path, **arrays)
    print(f"wrote {path} (backend {backend}, {failures} failures)")
    return 1 if failures else 0


def _stored(golden, key, kind):
    out, i = [], 0
    while f"{key}/{kind}/{i}" in golden:
        out.append(golden[f"{key}/{kind}/{i}"])
        i += 1
    return out


def _max_diff(old, new):
    """Largest absolute difference, `inf` when the structure differs, and
    whether every array is bit for bit equal (NaNs equal to NaNs)."""
    if len(old) != len(new):
        return float("inf"), False
    diff, exact = 0.0, True
    for a, b in zip(old, new):
        b = np.asarray(b)
        if a.shape != b.shape:
            return float("inf"), False
        exact = (
            exact
            and a.dtype == b.dtype
            and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
        )
        if a.size:
            d = np.abs(a.astype("float64") - b.astype("float64"))
            d = np.where(np.isnan(a) & np.isnan(b), 0.0, d)
            diff = max(diff, float(np.nan_to_num(d, nan=np.inf).max()))
    return diff, exact


def compare(path, atol):
    golden = np.load(path)
    backend = keras.backend.backend()
    saved_backend = str(golden["meta/backend"])
    if saved_backend != backend:
        print(
            f"{path} was saved on {saved_backend}; KERAS_BACKEND is "
            f"{backend}. Set KERAS_BACKEND={saved_backend}."
        )
        return 2
    print(f"{'case/mode':40s} {'weights':>10s} {'opt vars':>10s}  exact")
    counts = {"exact": 0, "close": 0, "over": 0, "failed": 0, "skipped": 0}
    for case, mode in _cases():
        key = f"{case}/{mode}"
        if f"{key}/skipped" in golden:
            counts["skipped"] += 1
            print(f"{key:40s} skipped: {golden[f'{key}/skipped']}")
            continue
        if f"{key}/error" in golden:
            counts["failed"] += 1
            print(f"{key:40s} FAILED in the baseline: {golden[f'{key}/error']}")
            continue
        if f"{key}/w/0" not in golden:
            counts["failed"] += 1
            print(f"{key:40s} FAILED: not in {path}")
            continue
        try:
            weights, opt_vars = run_case(case, mode)
        except Exception as e:  # noqa: BLE001 (a failed case)
            counts["failed"] += 1
            print(f"{key:40s} FAILED {type(e).__name__}: {e}")
            traceback.print_exc(limit=3)
            continue
        dw, exact_w = _max_diff(_stored(golden, key, "w"), weights)
        do, exact_o = _max_diff(_stored(golden, key, "opt"), opt_vars)
        exact = exact_w and exact_o
        over = not (dw <= atol and do <= atol)
        counts["over" if over else "exact" if exact else "close"] += 1
        flag = "OVER" if over else ""
        print(f"{key:40s} {dw:10.3e} {do:10.3e}  {exact!s:5s} {flag}")
    print(
        f"summary ({backend}, atol={atol:g}): {counts['exact']} exact, "
        f"{counts['close']} within atol, {counts['over']} over atol, "
        f"{counts['failed']} failed, {counts['skipped']} skipped"
    )
    return 1 if counts["over"] or counts["failed"] else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", metavar="FILE.npz")
    group.add_argument("--compare", metavar="OLD.npz")
    parser.add_argument("--atol", type=float, default=1e-6)
    parser.add_argument(
        "--cases", help="comma-separated subset of cases (for debugging)"
    )
    args = parser.parse_args()
    if args.cases:
        for name in set(CASES) - set(args.cases.split(",")):
            del CASES[name]
    print(f"keras_sam from {os.path.dirname(keras_sam.__file__)}")
    start = time.time()
    if args.save:
        status = save(args.save)
    else:
        status = compare(args.compare, args.atol)
    print(f"total {time.time() - start:.0f}s")
    return status


if __name__ == "__main__":
    sys.exit(main())
