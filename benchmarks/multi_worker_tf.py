"""Does `tf.distribute.MultiWorkerMirroredStrategy` train a Keras 3 model?

Starts two TensorFlow workers on this machine (localhost ports, one CPU
each) and calls `fit` in both, once with a plain `keras.Model` and once
with a `keras_sam.SAMModel`, and prints what happened in each worker.

    python benchmarks/multi_worker_tf.py

Measured with Keras 3.15.1 and TensorFlow 2.21 (2026-11-30): both fail
inside Keras' own `fit`, before any keras-sam code runs, with
"Attempt to convert a value (PerReplica...) with an unsupported type"
(Keras' TensorFlow trainer reduces the whole distributed data batch with one
`strategy.reduce`, which the collective all-reduce strategy refuses); with
that bypassed, the scalar logs of the step fail in `reduce_per_replica`
("Invalid reduction dimension 0 for input with 0 dimensions"). This is
keras-team/keras issue 20585 (open since Keras 3 became TensorFlow's
default). Multi-process training therefore goes through JAX:
`jax.distributed` with `keras.distribution.DataParallel` (see the README's
"Several devices and machines" and tests/test_multiprocess.py).
"""

import json
import os
import socket
import subprocess
import sys

WORKER = r"""
import json, os, sys
index, ports, kind = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
os.environ["TF_CONFIG"] = json.dumps({
    "cluster": {"worker": [f"localhost:{p}" for p in ports]},
    "task": {"type": "worker", "index": index},
})
os.environ["KERAS_BACKEND"] = "tensorflow"
import numpy as np
import tensorflow as tf
import keras
strategy = tf.distribute.MultiWorkerMirroredStrategy()
with strategy.scope():
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    if kind == "sam":
        import keras_sam
        model = keras_sam.SAMModel(model, rho=0.05)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
rng = np.random.default_rng(0)
x = rng.normal(size=(16, 5)).astype("float32")
y = rng.normal(size=(16, 3)).astype("float32")
try:
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    print("OUTCOME trained")
except Exception as e:  # the point is to report it
    print("OUTCOME " + type(e).__name__ + ": " + str(e).splitlines()[0][:160])
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(kind):
    ports = f"{_free_port()},{_free_port()}"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(i), ports, kind],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for i in range(2)
    ]
    outcomes = []
    for worker in workers:
        try:
            stdout, _ = worker.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            worker.kill()
            stdout, _ = worker.communicate()
        lines = [
            line for line in stdout.splitlines() if line.startswith("OUTCOME ")
        ]
        outcomes.append(lines[-1][len("OUTCOME ") :] if lines else "no output")
    return outcomes


def main():
    results = {kind: run(kind) for kind in ("plain", "sam")}
    for kind, outcomes in results.items():
        for i, outcome in enumerate(outcomes):
            print(f"{kind:5s} worker {i}: {outcome}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
