"""SAM across two JAX processes (`jax.distributed`, localhost, CPU).

`tests/multiprocess_worker.py` runs in two processes, one CPU device each,
joined by `jax.distributed` with Gloo collectives; `keras.distribution.
DataParallel` spans both, and each process feeds its half of every global
batch. The weights must equal one process training on the global batch:
per-replica SAM is the reference with 2 contiguous sub-batches,
`sync_perturbation=True` the single-device reference.
"""

import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import reference
from tests import sam_setup
from tests import workers
from tests.conftest import BACKEND

TOLERANCE = 1e-5

pytestmark = pytest.mark.skipif(
    BACKEND != "jax", reason="jax.distributed: JAX backend"
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results():
    port = str(_free_port())
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multiprocess_worker", str(i), port],
            cwd=workers.ROOT,
            env=workers.environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=300))
    finally:
        for process in processes:  # never leave a process behind
            if process.poll() is None:
                process.kill()
                process.communicate()
    out = []
    for process, (stdout, stderr) in zip(processes, outputs):
        result = workers.result_of(process.returncode, stdout, stderr)
        result["cases"] = {
            name: [np.asarray(w) for w in weights]
            for name, weights in result["cases"].items()
        }
        out.append(result)
    return out


def _expected(num_splits):
    x, y = sam_setup.data(16)
    return reference.train_sam_general(
        sam_setup.initial_params(),
        sam_setup.batches(x, y, 8, epochs=2),
        reference.mlp_loss_and_grads,
        rho=0.1,
        lr=0.1,
        momentum=0.9,
        num_splits=num_splits,
        weight_like=sam_setup.WEIGHT_LIKE,
    )


def test_two_processes_one_device_each(results):
    assert [r["process"] for r in results] == [0, 1]
    assert all(r["processes"] == 2 and r["devices"] == 2 for r in results)


def test_processes_hold_the_same_weights(results):
    for name in results[0]["cases"]:
        assert (
            sam_setup.max_difference(
                results[0]["cases"][name], results[1]["cases"][name]
            )
            == 0.0
        )


def test_per_replica_perturbation_across_processes(results):
    got = results[0]["cases"]["per_replica"]
    assert sam_setup.max_difference(got, _expected(1)) > 1e-3
    assert sam_setup.max_difference(got, _expected(2)) < TOLERANCE


def test_sync_perturbation_across_processes(results):
    got = results[0]["cases"]["sync"]
    assert sam_setup.max_difference(got, _expected(1)) < TOLERANCE
