"""One of two JAX processes training SAM together; prints its weights.

Run by `tests/test_multiprocess.py`, which starts two of these on this
machine (one CPU device each, Gloo collectives over localhost):

    python -m tests.multiprocess_worker PROCESS_ID PORT

`keras.distribution.DataParallel` spans the devices of both processes; each
process feeds its half of every global batch of 8 samples (so
`auto_shard_dataset` is off), as a multi-host input pipeline would. Every
case starts from `sam_setup.initial_params()` and trains 2 epochs with
SGD(0.1, momentum=0.9).
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ.pop("XLA_FLAGS", None)  # one CPU device per process

import jax  # noqa: E402

PROCESS_ID, PORT = int(sys.argv[1]), sys.argv[2]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{PORT}",
    num_processes=2,
    process_id=PROCESS_ID,
    initialization_timeout=120,
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402
from tests import sam_setup  # noqa: E402

GLOBAL_BATCH = 8
CASES = {
    "per_replica": {},
    "sync": {"sync_perturbation": True},
}


def _local_half(x, y):
    """This process's half of every global batch (contiguous: the first
    half of each batch is process 0's, as the global array is laid out)."""
    half = GLOBAL_BATCH // 2
    index = np.concatenate(
        [
            np.arange(
                start + PROCESS_ID * half, start + (PROCESS_ID + 1) * half
            )
            for start in range(0, len(x), GLOBAL_BATCH)
        ]
    )
    return x[index], y[index]


def _train(kwargs, x, y):
    # The same initial values in both processes (Keras checks it).
    keras.utils.set_random_seed(0)
    model = keras_sam.SAMModel(sam_setup.mlp(sam_setup.initial_params()))
    inner = keras.optimizers.SGD(0.1, momentum=0.9)
    model.compile(
        optimizer=keras_sam.optimizers.SAM(inner, rho=0.1, **kwargs),
        loss="mse",
    )
    x_local, y_local = _local_half(x, y)
    model.fit(
        x_local,
        y_local,
        batch_size=GLOBAL_BATCH // 2,
        epochs=2,
        shuffle=False,
        verbose=0,
    )
    return [np.asarray(w).tolist() for w in model.get_weights()]


def main():
    distribution = keras.distribution.DataParallel(
        devices=keras.distribution.list_devices("cpu")
    )
    distribution.auto_shard_dataset = False
    keras.distribution.set_distribution(distribution)
    x, y = sam_setup.data(16)
    out = {
        "process": PROCESS_ID,
        "processes": jax.process_count(),
        "devices": len(jax.devices()),
        "cases": {name: _train(kwargs, x, y) for name, kwargs in CASES.items()},
    }
    print("RESULT " + json.dumps(out), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
