"""SAM, ASAM and RSAM with sharded weights (`keras.distribution.ModelParallel`).

`tests/model_parallel_worker.py` trains each optimizer on one device and
then with every Dense kernel sharded over 2 simulated CPU devices by a
`LayoutMap`, from the same weights; the two runs must agree. The step's
extra memory per device, from XLA's memory analysis of the compiled step,
must be one shard of the weights (`w + eps` stays sharded like `w`), not a
gathered copy.
"""

import numpy as np
import pytest

from tests import sam_setup
from tests import workers
from tests.conftest import BACKEND

pytestmark = pytest.mark.skipif(
    BACKEND != "jax", reason="keras.distribution.ModelParallel: JAX backend"
)


@pytest.fixture(scope="module")
def result():
    return workers.run("model_parallel_worker")


@pytest.mark.parametrize("name", ["sam", "asam", "rsam"])
def test_sharded_weights_equal_one_device(result, name):
    case = result["cases"][name]
    # The kernel really is split: each device holds half of its columns.
    assert case["kernel_devices"] == 2
    assert case["kernel_shard_shape"] == [6, 4]
    one_device = [np.asarray(w) for w in case["one_device"]]
    sharded = [np.asarray(w) for w in case["sharded"]]
    assert sam_setup.max_difference(one_device, sharded) < 1e-6
    # ... and training moved them.
    initial = [np.asarray(w) for w in result["initial"]]
    assert sam_setup.max_difference(initial, sharded) > 1e-2


def test_rsam_sharded_kernel_stays_on_its_sphere(result):
    case = result["cases"]["rsam"]
    assert case["kernel_norm"] == pytest.approx(
        case["initial_kernel_norm"], rel=1e-5
    )


def test_extra_memory_per_device_is_one_shard(result):
    plain_bytes, weights_per_device = result["memory"]["plain"]
    sam_bytes, sam_weights = result["memory"]["sam"]
    assert sam_weights == weights_per_device
    # Weights sharded in two: per device half of the 2 x 512 x 512 kernels.
    assert weights_per_device < 0.6 * (2 * 512 * 512 * 4)
    extra = (sam_bytes - plain_bytes) / weights_per_device
    # One shard of the weights (w + eps, or g kept for the update), with
    # 10% to spare; a gathered copy would be 2.
    assert 0.5 < extra < 1.1
