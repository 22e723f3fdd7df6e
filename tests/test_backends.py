"""Cross-backend parity: every backend follows the same float64 reference.

CI runs this file once per `KERAS_BACKEND`; each run compares the weights
after several SAM / ASAM steps, from fixed initial weights and data, with
the numpy reference to 1e-5, so the three backends agree with each other
to 2e-5.
"""

import keras
import numpy as np
import pytest

import keras_sam
from keras_sam import optimizers
from tests import reference
from tests import sam_setup

TOLERANCE = 1e-5


@pytest.mark.parametrize("variant", ["sam", "asam"])
def test_weights_match_reference_after_several_steps(variant, mode):
    params = sam_setup.initial_params()
    x, y = sam_setup.data(24)
    inner = keras.optimizers.SGD(0.1, momentum=0.9)
    if variant == "sam":
        rho, optimizer = 0.05, optimizers.SAM(inner, rho=0.05)
    else:
        rho, optimizer = 0.5, optimizers.ASAM(inner, rho=0.5, eta=0.01)
    model = keras_sam.SAMModel(sam_setup.mlp(params))
    model.compile(optimizer=optimizer, loss="mse", **mode)
    sam_setup.fit(model, x, y, batch_size=8, epochs=3)

    expected = reference.train_sam(
        params,
        sam_setup.batches(x, y, 8, epochs=3),
        reference.mlp_loss_and_grads,
        rho=rho,
        lr=0.1,
        momentum=0.9,
        variant=variant,
        eta=0.01,
        weight_like=sam_setup.WEIGHT_LIKE,
    )
    got = sam_setup.weights(model)
    # The steps moved the weights well beyond the tolerance ...
    assert sam_setup.max_difference(expected, params) > 0.05
    # ... and every backend lands on the reference.
    assert sam_setup.max_difference(got, expected) < TOLERANCE
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 9


def test_reference_numbers_are_pinned():
    """The reference itself is pinned, so a change to it cannot move all
    three backends together unnoticed."""
    params = sam_setup.initial_params()
    x, y = sam_setup.data(24)
    expected = reference.train_sam(
        params,
        sam_setup.batches(x, y, 8, epochs=3),
        reference.mlp_loss_and_grads,
        rho=0.05,
        lr=0.1,
        momentum=0.9,
    )
    checksum = [float(np.sum(p)) for p in expected]
    np.testing.assert_allclose(checksum, PINNED_SAM_SUMS, rtol=0, atol=1e-9)


# Sums of W1, b1, W2, b2 after the 9 SAM steps, from the reference.
PINNED_SAM_SUMS = [
    -2.583655457477656,
    -0.5697273663510563,
    2.273187204604164,
    -0.13049086027208645,
]
