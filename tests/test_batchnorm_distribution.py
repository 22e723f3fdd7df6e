"""BatchNorm under JAX `keras.distribution.DataParallel` (issue 26).

Plain Keras on JAX takes BatchNorm statistics over the global batch: on 2
or 4 devices it equals one device. The sharpness-aware step runs once per
replica (a `shard_map`), so without care each replica would normalize
with the statistics of its own part of the batch. By default the step
pools them over the replicas, and every variant whose perturbation is the
same on every replica equals one device, as plain Keras does;
`SAMModel(per_replica_batchnorm=True)` keeps per-replica ("ghost")
statistics, tested against one device with the batch split the same way.

The devices must exist before JAX initializes: `tests/batchnorm_worker.py`
trains every case in one subprocess with 4 simulated CPU devices.
"""

import keras
import numpy as np
import pytest

import keras_sam
from tests import sam_setup
from tests import workers
from tests.conftest import BACKEND

TOLERANCE = 1e-5

jax_only = pytest.mark.skipif(
    BACKEND != "jax", reason="keras.distribution.DataParallel on JAX"
)


def _base():
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.BatchNormalization()]
    )


def test_per_replica_batchnorm_is_in_the_config():
    model = keras_sam.SAMModel(_base(), per_replica_batchnorm=True)
    restored = keras_sam.SAMModel.from_config(model.get_config())
    assert restored.per_replica_batchnorm is True
    assert keras_sam.SAMModel(_base()).per_replica_batchnorm is False


def test_per_replica_batchnorm_must_be_a_bool():
    with pytest.raises(TypeError, match="per_replica_batchnorm=1"):
        keras_sam.SAMModel(_base(), per_replica_batchnorm=1)


@pytest.fixture(scope="module")
def result():
    out = workers.run("batchnorm_worker", BACKEND, 4)
    for key in ("cases", "one_device"):
        out[key] = {
            name: [np.asarray(w) for w in weights]
            for name, weights in out[key].items()
        }
    return out


def _gap(result, name, devices):
    got = result["cases"][f"{name}/{devices}"]
    return sam_setup.max_difference(got, result["one_device"][name])


@jax_only
@pytest.mark.parametrize("devices", [2, 4])
def test_plain_keras_equals_one_device(result, devices):
    """The behaviour to follow: Keras' own step on DataParallel."""
    assert _gap(result, "plain", devices) < TOLERANCE


@jax_only
@pytest.mark.parametrize("devices", [2, 4])
@pytest.mark.parametrize("name", ["sync", "sampa", "every2_sync", "msam"])
def test_sharpness_aware_equals_one_device(result, name, devices):
    """Synchronized SAM, SAMPa (two halves at once), the host-scheduled
    step (`sam_every=2`: two programs) and the one-pass MomentumSAM, with
    BatchNorm at its defaults: weights and moving statistics as on one
    device."""
    assert _gap(result, name, devices) < TOLERANCE


@jax_only
@pytest.mark.parametrize("devices", [2, 4])
def test_per_replica_batchnorm_equals_split_batches(result, devices):
    """Per-replica statistics and perturbation: each replica is the SAM
    problem of its part of the batch, as the sub-batches of
    `num_batch_splits=devices` on one device."""
    key = f"ghost/{devices}"
    got, expected = result["cases"][key], result["one_device"][key]
    assert sam_setup.max_difference(got, expected) < TOLERANCE
