"""Multi-device SAM on 2 simulated CPU devices, against the reference.

TensorFlow: `tf.distribute.MirroredStrategy`; JAX: `keras.distribution.
DataParallel`. The devices must exist before the framework initializes, so
`tests/distributed_worker.py` trains every case in one subprocess and the
checks here read its output.

- Per-replica perturbation (default): replica r perturbs with the gradient
  of its half of the batch, the adversarial gradients are averaged: the
  reference with 2 contiguous sub-batches.
- `sync_perturbation=True`: eps from the gradient of the whole batch: the
  single-device reference.
- `num_batch_splits=2` on 2 replicas: 4 sub-batches.
"""

import numpy as np
import pytest

from tests import reference
from tests import reference_variants
from tests import sam_setup
from tests import workers
from tests.conftest import BACKEND

TOLERANCE = 1e-5

pytestmark = pytest.mark.skipif(
    BACKEND not in ("tensorflow", "jax"),
    reason="Keras multi-device training: TensorFlow and JAX backends",
)


@pytest.fixture(scope="module")
def result():
    out = workers.run("distributed_worker", BACKEND)
    out["cases"] = {
        name: [np.asarray(w) for w in weights]
        for name, weights in out["cases"].items()
    }
    return out


def _expected(num_splits, variant="sam"):
    x, y = sam_setup.data(16)
    return reference.train_sam_general(
        sam_setup.initial_params(),
        sam_setup.batches(x, y, 8, epochs=2),
        reference.mlp_loss_and_grads,
        rho=0.1 if variant == "sam" else 0.5,
        lr=0.1,
        momentum=0.9,
        num_splits=num_splits,
        variant=variant,
        weight_like=sam_setup.WEIGHT_LIKE,
    )


def test_two_replicas(result):
    assert result["replicas"] == 2
    if BACKEND == "jax":
        # The weights are replicated over both devices.
        assert result["weight_devices"] == 2


def test_default_perturbation_is_per_replica(result):
    got = result["cases"]["per_replica"]
    per_replica, synced = _expected(2), _expected(1)
    # The two modes are far apart compared with the tolerance ...
    assert sam_setup.max_difference(per_replica, synced) > 1e-3
    # ... and the default follows per-replica (m-sharpness) SAM.
    assert sam_setup.max_difference(got, per_replica) < TOLERANCE


def test_asam_per_replica(result):
    got = result["cases"]["asam_per_replica"]
    assert sam_setup.max_difference(got, _expected(2, "asam")) < TOLERANCE


def _sampa_reference():
    x, y = sam_setup.data(16)
    return reference.train_sampa(
        sam_setup.initial_params(),
        sam_setup.batches(x, y, 8, epochs=2),
        reference.mlp_loss_and_grads,
        rho=0.1,
        lam=0.2,
        lr=0.1,
        momentum=0.9,
    )


def test_sampa_matches_single_device(result):
    """SAMPa's two gradients (at once on two devices with JAX, per replica
    with TensorFlow) give the one-device SAMPa trajectory."""
    got = result["cases"]["sampa"]
    assert sam_setup.max_difference(got, _sampa_reference()) < TOLERANCE


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution")
def test_four_devices_sampa_and_sync():
    """On 4 devices SAMPa's halves have 2 devices each, data-parallel
    within the half; synchronized SAM averages over all 4."""
    out = workers.run("distributed_worker", BACKEND, 4)
    got = [np.asarray(w) for w in out["cases"]["sampa"]]
    assert sam_setup.max_difference(got, _sampa_reference()) < TOLERANCE
    got = [np.asarray(w) for w in out["cases"]["sync"]]
    assert sam_setup.max_difference(got, _expected(1)) < TOLERANCE


def test_sync_perturbation_matches_single_device(result):
    got = result["cases"]["sync"]
    assert sam_setup.max_difference(got, _expected(1)) < TOLERANCE


def test_batch_splits_on_each_replica(result):
    got = result["cases"]["splits"]
    assert sam_setup.max_difference(got, _expected(4)) < TOLERANCE


def test_non_finite_on_one_replica_skips_the_step(result):
    got = result["cases"]["non_finite"]
    assert sam_setup.max_difference(got, sam_setup.initial_params()) < 1e-7


@pytest.mark.skipif(BACKEND != "tensorflow", reason="MirroredStrategy")
def test_assign_in_replica_context_touches_the_local_copy(result):
    """Keras model variables under MirroredStrategy are MirroredVariables
    with aggregation NONE: `assign` in replica context writes only the
    replica's own copy. That is what makes w + eps per replica, and why the
    step must restore w before the (all-reduced) update."""
    probe = result["probe"]
    assert probe["type"] == "MirroredVariable"
    assert probe["aggregation"].endswith("NONE")
    assert probe["seen_in_replica"] == [[1.0, 1.0], [2.0, 2.0]]
    assert probe["copies_after"] == [[1.0, 1.0], [2.0, 2.0]]


def test_host_schedule_and_momentum_sam_on_two_replicas(result):
    x, y = sam_setup.data(16)
    batches = sam_setup.batches(x, y, 8, epochs=2)
    params = sam_setup.initial_params()
    every3 = reference.train_sam(
        params,
        batches,
        reference.mlp_loss_and_grads,
        rho=0.1,
        lr=0.1,
        momentum=0.9,
        sam_every=3,
    )
    got = result["cases"]["every3_sync"]
    assert sam_setup.max_difference(got, every3) < TOLERANCE
    msam = reference.train_variant(
        params,
        batches,
        reference.mlp_loss_and_grads,
        0.1,
        0.9,
        "msam",
        rho=0.3,
    )
    assert sam_setup.max_difference(result["cases"]["msam"], msam) < TOLERANCE


@pytest.mark.parametrize(
    "case, variant, kwargs",
    [
        ("wsam_sync", "wsam", {"gamma": 0.8}),
        ("friendly_sync", "friendly", {"sigma": 0.5}),
        ("ascent_sync", "ascent", {"ascent_steps": 2}),
        ("late_sync", "late", {"start_step": 2}),
    ],
)
def test_gradient_rules_with_a_synchronized_perturbation(
    result, case, variant, kwargs
):
    """WSAM, FriendlySAM, several ascent steps and late-phase SAM on two
    replicas with a synchronized perturbation equal one device."""
    x, y = sam_setup.data(16)
    expected = reference_variants.train(
        sam_setup.initial_params(),
        sam_setup.batches(x, y, 8, epochs=2),
        reference.mlp_loss_and_grads,
        0.1,
        0.9,
        variant,
        rho=0.1,
        **kwargs,
    )
    got = result["cases"][case]
    assert sam_setup.max_difference(got, expected) < TOLERANCE
