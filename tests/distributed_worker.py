"""Trains SAM on 2 simulated CPU devices; prints the weights as JSON.

Run by `tests/test_distribution.py` in a subprocess, because the devices
must be configured before the framework initializes:

    python -m tests.distributed_worker tensorflow   # MirroredStrategy
    python -m tests.distributed_worker jax          # keras.distribution
    python -m tests.distributed_worker jax 4        # 4 devices: the cases
                                                    # that equal one device

Every case starts from `sam_setup.initial_params()` and trains 2 epochs of
2 global batches of 8 samples (4 per replica) with SGD(0.1, momentum=0.9).
"""

import json
import os
import sys

BACKEND = sys.argv[1]
DEVICES = int(sys.argv[2]) if len(sys.argv) > 2 else 2
os.environ["KERAS_BACKEND"] = BACKEND
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if BACKEND == "jax":
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={DEVICES}"
    )
else:
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 2,
    )

import contextlib  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402
from tests import sam_setup  # noqa: E402

CASES = {
    "per_replica": ("sam", {}),
    "sync": ("sam", {"sync_perturbation": True}),
    "splits": ("sam", {"num_batch_splits": 2}),
    "asam_per_replica": ("asam", {}),
    # JAX: the two gradients at once, one device each.
    "sampa": ("sampa", {}),
    # Cheap variants (issue 16): the host-side schedule under a strategy,
    # and MomentumSAM (its eps is the same on every replica).
    "every3_sync": ("sam", {"sync_perturbation": True, "sam_every": 3}),
    "msam": ("msam", {}),
    # The rules of issue 23, with a synchronized perturbation: each equals
    # one device.
    "wsam_sync": ("wsam", {"sync_perturbation": True, "gamma": 0.8}),
    "friendly_sync": ("friendly", {"sync_perturbation": True, "sigma": 0.5}),
    "ascent_sync": ("sam", {"sync_perturbation": True, "ascent_steps": 2}),
    "late_sync": (
        "sam",
        {
            "sync_perturbation": True,
            "schedule": keras_sam.schedules.LatePhase(2),
        },
    ),
}


def _scope():
    if BACKEND == "tensorflow":
        devices = ["/cpu:0", "/cpu:1"]
        return tf.distribute.MirroredStrategy(devices).scope()
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(
            devices=keras.distribution.list_devices("cpu")
        )
    )
    return contextlib.nullcontext()


def _train(variant, kwargs, x, y, loss_scale=False):
    keras.utils.set_random_seed(0)
    with _scope():
        inner = keras.optimizers.SGD(0.1, momentum=0.9)
        if variant == "sam":
            optimizer = keras_sam.optimizers.SAM(inner, rho=0.1, **kwargs)
        elif variant == "sampa":
            optimizer = keras_sam.optimizers.SAMPa(inner, rho=0.1, lam=0.2)
        elif variant == "msam":
            optimizer = keras_sam.optimizers.MomentumSAM(inner, rho=0.3)
        elif variant == "wsam":
            optimizer = keras_sam.optimizers.WSAM(inner, rho=0.1, **kwargs)
        elif variant == "friendly":
            optimizer = keras_sam.optimizers.FriendlySAM(
                inner, rho=0.1, **kwargs
            )
        else:
            optimizer = keras_sam.optimizers.ASAM(inner, rho=0.5, **kwargs)
        if loss_scale:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model = keras_sam.SAMModel(sam_setup.mlp(sam_setup.initial_params()))
        model.compile(optimizer=optimizer, loss="mse")
    sam_setup.fit(model, x, y, batch_size=8, epochs=2)
    return model


def _local_assign_probe():
    """Assigns `replica_id + 1` in replica context to a model-style Keras
    variable and reads every replica's copy back."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        variable = keras.Variable(np.zeros(2, "float32"))

    @tf.function
    def assign():
        def fn():
            context = tf.distribute.get_replica_context()
            value = tf.cast(context.replica_id_in_sync_group + 1, "float32")
            variable.assign(tf.fill([2], value))
            return variable.value + 0.0

        return strategy.run(fn)

    seen = strategy.experimental_local_results(assign())
    return {
        "type": type(variable.value).__name__,
        "aggregation": str(variable.value.aggregation),
        "seen_in_replica": [np.asarray(t).tolist() for t in seen],
        "copies_after": [np.asarray(c).tolist() for c in variable.value.values],
    }


def main():
    x, y = sam_setup.data(16)
    out = {"cases": {}}
    if DEVICES != 2:
        # SAMPa: two halves of 2 devices, each data-parallel; synchronized
        # SAM. Both equal one device.
        for name in ("sampa", "sync"):
            model = _train(*CASES[name], x, y)
            out["cases"][name] = [w.tolist() for w in sam_setup.weights(model)]
        print("RESULT " + json.dumps(out))
        return
    for name, (variant, kwargs) in CASES.items():
        model = _train(variant, kwargs, x, y)
        out["cases"][name] = [w.tolist() for w in sam_setup.weights(model)]
    # A non-finite pass on one replica only skips the step on both (the
    # loss-scale optimizer's check, as in plain Keras).
    x_bad = x.copy()
    x_bad[5, 0] = np.inf
    model = _train("sam", {}, x_bad[:8], y[:8], loss_scale=True)
    out["cases"]["non_finite"] = [w.tolist() for w in sam_setup.weights(model)]
    if BACKEND == "tensorflow":
        out["probe"] = _local_assign_probe()
        out["replicas"] = tf.distribute.MirroredStrategy(
            ["/cpu:0", "/cpu:1"]
        ).num_replicas_in_sync
    else:
        import jax

        kernel = model.trainable_weights[0].value
        out["replicas"] = len(jax.devices())
        out["weight_devices"] = len(kernel.sharding.device_set)
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
