"""Trains SAM, ASAM and RSAM with sharded kernels; prints weights and memory.

Run by `tests/test_model_parallel.py` in a subprocess (2 simulated CPU
devices must exist before JAX starts):

    python -m tests.model_parallel_worker

Each case trains twice from the same initial weights: on one device, then
under `keras.distribution.ModelParallel` on a (1, 2) mesh whose `LayoutMap`
shards every Dense kernel over the "model" axis. For the memory check, XLA's
memory analysis of the compiled step (per device) for a plain optimizer and
for SAM on a wider network whose weights dwarf its activations.
"""

import json
import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402

D_IN, D_HIDDEN, D_OUT = 6, 8, 4


def _optimizer(name, sam=True):
    inner = keras.optimizers.SGD(0.1, momentum=0.9)
    if name == "plain":
        return inner
    if name == "sam":
        return keras_sam.optimizers.SAM(inner, rho=0.1)
    if name == "asam":
        return keras_sam.optimizers.ASAM(inner, rho=0.5)
    # A kernel on the sphere, sharded over the devices: its norm, tangent
    # projection and retraction need both shards.
    return keras_sam.optimizers.RSAM(
        inner, rho=0.1, manifold={"hidden/kernel": "sphere"}
    )


def _model(width_in, width_hidden, width_out):
    return keras.Sequential(
        [
            keras.Input((width_in,)),
            keras.layers.Dense(width_hidden, activation="tanh", name="hidden"),
            keras.layers.Dense(width_out, name="out"),
        ]
    )


def _distribution():
    devices = keras.distribution.list_devices("cpu")
    mesh = keras.distribution.DeviceMesh(
        shape=(1, 2), axis_names=("batch", "model"), devices=devices
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*hidden/kernel"] = (None, "model")
    layout_map[".*hidden/bias"] = ("model",)
    layout_map[".*out/kernel"] = ("model", None)
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )


def _train(name, initial, x, y):
    model = keras_sam.SAMModel(_model(D_IN, D_HIDDEN, D_OUT))
    model.set_weights(initial)
    model.compile(optimizer=_optimizer(name), loss="mse")
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    kernel = model.trainable_weights[0].value
    return model.get_weights(), len(kernel.sharding.device_set), kernel


def _step_memory(name, width):
    """Per-device bytes of the compiled step (XLA memory analysis) and the
    per-device bytes of the weights."""
    plain = name == "plain"
    base = _model(width, width, width)
    model = base if plain else keras_sam.SAMModel(base)
    model.compile(optimizer=_optimizer(name), loss="mse")
    x = np.zeros((8, width), "float32")
    model.fit(x, x, batch_size=8, epochs=1, verbose=0)  # builds everything
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    step = jax.jit(model.train_step, donate_argnums=0)
    stats = step.lower(state, (x, x)).compile().memory_analysis()
    total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
    )
    weights = sum(
        v.value.addressable_shards[0].data.nbytes
        for v in model.trainable_variables
    )
    return int(total), int(weights)


def main():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, D_IN)).astype("float32")
    y = rng.normal(size=(16, D_OUT)).astype("float32")
    keras.utils.set_random_seed(0)
    initial = _model(D_IN, D_HIDDEN, D_OUT).get_weights()
    out = {"cases": {}, "memory": {}, "initial": [w.tolist() for w in initial]}
    names = ("sam", "asam", "rsam")
    one_device = {name: _train(name, initial, x, y)[0] for name in names}
    keras.distribution.set_distribution(_distribution())
    for name in names:
        weights, devices, kernel = _train(name, initial, x, y)
        shard = kernel.addressable_shards[0].data.shape
        out["cases"][name] = {
            "one_device": [w.tolist() for w in one_device[name]],
            "sharded": [w.tolist() for w in weights],
            "kernel_devices": devices,
            "kernel_shard_shape": list(shard),
        }
        rsam_kernel = np.asarray(weights[0])
        out["cases"][name]["kernel_norm"] = float(np.linalg.norm(rsam_kernel))
        out["cases"][name]["initial_kernel_norm"] = float(
            np.linalg.norm(initial[0])
        )
    for name in ("plain", "sam"):
        out["memory"][name] = _step_memory(name, 512)
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
