"""Trains a Dense-BatchNorm-ReLU-Dense model on simulated CPU devices;
prints every case's weights (moving statistics included) as JSON.

Run by `tests/test_batchnorm_distribution.py` in a subprocess, because the
devices must be configured before JAX initializes:

    python -m tests.batchnorm_worker jax 4   # 4 devices: one device,
                                             # DataParallel over 2 and 4

Every case starts from the same weights and trains 3 epochs of 2 global
batches of 16 samples with SGD(0.1, momentum=0.9). One-device runs use no
distribution; the others `keras.distribution.DataParallel` over the first
2 or 4 devices.
"""

import json
import os
import sys

BACKEND = sys.argv[1]
DEVICES = int(sys.argv[2]) if len(sys.argv) > 2 else 4
os.environ["KERAS_BACKEND"] = BACKEND
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402

BATCH = 16
EPOCHS = 3

# name: (optimizer, its arguments, SAMModel arguments). The one-device
# reference of each is the same case without a distribution, except where
# `REFERENCE` names another one-device case.
CASES = {
    "plain": (None, {}, {}),
    "sync": ("sam", {"sync_perturbation": True}, {}),
    "sampa": ("sampa", {}, {}),
    "every2_sync": ("sam", {"sync_perturbation": True, "sam_every": 2}, {}),
    "msam": ("msam", {}, {}),
    # Per-replica statistics with a per-replica perturbation: each replica
    # is a SAM problem on its own part of the batch, as the sub-batches of
    # `num_batch_splits` are on one device.
    "ghost": ("sam", {}, {"per_replica_batchnorm": True}),
}
# Its moving statistics differ: one device carries them from one sub-batch
# to the next, replicas average theirs; only the weights are compared.
REFERENCE = {"ghost": ("sam", {"num_batch_splits": "replicas"}, {})}


def data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2 * BATCH, 4)).astype("float32")
    y = rng.normal(size=(2 * BATCH, 1)).astype("float32")
    return x, y


def model_fn():
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(1),
        ]
    )


def _optimizer(variant, kwargs):
    inner = keras.optimizers.SGD(0.1, momentum=0.9)
    if variant is None:
        return inner
    if variant == "sam":
        return keras_sam.optimizers.SAM(inner, rho=0.1, **kwargs)
    if variant == "sampa":
        return keras_sam.optimizers.SAMPa(inner, rho=0.1, lam=0.2, **kwargs)
    return keras_sam.optimizers.MomentumSAM(inner, rho=0.3, **kwargs)


def train(case, devices, initial, x, y, trainable_only=False):
    """The weights (moving statistics included unless `trainable_only`)
    after training `case` on `devices` (1: no distribution); `case` as in
    `CASES`."""
    variant, kwargs, model_kwargs = case
    if devices == 1:
        keras.distribution.set_distribution(None)
    else:
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(
                devices=keras.distribution.list_devices("cpu")[:devices]
            )
        )
    keras.utils.set_random_seed(0)
    base = model_fn()
    base.set_weights(initial)
    if variant is None:
        model = base
    else:
        model = keras_sam.SAMModel(base, **model_kwargs)
    model.compile(optimizer=_optimizer(variant, kwargs), loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    weights = base.trainable_weights if trainable_only else base.weights
    return [
        np.asarray(keras.ops.convert_to_numpy(w), "float64").tolist()
        for w in weights
    ]


def main():
    x, y = data()
    keras.utils.set_random_seed(0)
    initial = model_fn().get_weights()
    out = {"devices": DEVICES, "one_device": {}, "cases": {}}
    for name, case in CASES.items():
        for devices in sorted({2, DEVICES}):
            out["cases"][f"{name}/{devices}"] = train(
                case, devices, initial, x, y, name in REFERENCE
            )
            if name in REFERENCE:
                # One device, its batch split as the devices split it.
                out["one_device"][f"{name}/{devices}"] = _one_device(
                    REFERENCE[name], devices, initial, x, y
                )
        if name not in REFERENCE:
            out["one_device"][name] = train(case, 1, initial, x, y)
    print("RESULT " + json.dumps(out))


def _one_device(case, replicas, initial, x, y):
    variant, kwargs, model_kwargs = case
    kwargs = {
        key: replicas if value == "replicas" else value
        for key, value in kwargs.items()
    }
    return train((variant, kwargs, model_kwargs), 1, initial, x, y, True)


if __name__ == "__main__":
    main()
