"""m-sharpness on one device, gradient accumulation and clipping.

Each is checked against the float64 reference of `tests/reference.py`:
`num_batch_splits=m` perturbs every sub-batch with its own gradient and
averages the adversarial gradients; the inner optimizer's
`gradient_accumulation_steps` accumulates g_adv (one perturbation per
micro-batch); `clipnorm` / `global_clipnorm` clip g_adv only.
"""

import keras
import pytest

import keras_sam
from keras_sam import optimizers
from tests import reference
from tests import sam_setup

TOLERANCE = 1e-5


def _train(optimizer, x, y, batch_size, epochs=1, mode=None):
    params = sam_setup.initial_params()
    model = keras_sam.SAMModel(sam_setup.mlp(params))
    model.compile(optimizer=optimizer, loss="mse", **(mode or {}))
    sam_setup.fit(model, x, y, batch_size=batch_size, epochs=epochs)
    return model, sam_setup.weights(model)


def _expected(x, y, batch_size, epochs=1, **kwargs):
    return reference.train_sam_general(
        sam_setup.initial_params(),
        sam_setup.batches(x, y, batch_size, epochs=epochs),
        reference.mlp_loss_and_grads,
        **kwargs,
    )


def test_batch_splits_match_reference(mode):
    # 30 samples in batches of 8: the last batch has 6, so the sub-batches
    # are 3/3/2 and then 2/2/2.
    x, y = sam_setup.data(30)
    optimizer = optimizers.SAM(
        keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1, num_batch_splits=3
    )
    _, got = _train(optimizer, x, y, batch_size=8, mode=mode)
    expected = _expected(x, y, 8, rho=0.1, lr=0.1, momentum=0.9, num_splits=3)
    plain = _expected(x, y, 8, rho=0.1, lr=0.1, momentum=0.9)
    # Splitting changes the trajectory, and the step follows the split one.
    assert sam_setup.max_difference(expected, plain) > 1e-3
    assert sam_setup.max_difference(got, expected) < TOLERANCE


def test_asam_batch_splits_match_reference():
    x, y = sam_setup.data(16)
    optimizer = optimizers.ASAM(
        keras.optimizers.SGD(0.1), rho=0.5, num_batch_splits=2
    )
    _, got = _train(optimizer, x, y, batch_size=8, epochs=2)
    expected = _expected(
        x,
        y,
        8,
        epochs=2,
        rho=0.5,
        lr=0.1,
        num_splits=2,
        variant="asam",
        weight_like=sam_setup.WEIGHT_LIKE,
    )
    assert sam_setup.max_difference(got, expected) < TOLERANCE


def test_more_splits_than_samples():
    # A batch of 2 split 3 ways: one sub-batch is empty and counts zero.
    x, y = sam_setup.data(2)
    optimizer = optimizers.SAM(
        keras.optimizers.SGD(0.1), rho=0.1, num_batch_splits=3
    )
    _, got = _train(optimizer, x, y, batch_size=2, epochs=3)
    expected = _expected(x, y, 2, epochs=3, rho=0.1, lr=0.1, num_splits=3)
    assert sam_setup.max_difference(got, expected) < TOLERANCE


def test_rho_zero_with_splits_is_the_inner_optimizer():
    x, y = sam_setup.data(24)
    sam = optimizers.SAM(
        keras.optimizers.SGD(0.1, momentum=0.9), rho=0.0, num_batch_splits=4
    )
    _, got = _train(sam, x, y, batch_size=8, epochs=2)
    plain = sam_setup.mlp(sam_setup.initial_params())
    plain.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    sam_setup.fit(plain, x, y, batch_size=8, epochs=2)
    # Sub-batch gradients weighted by size add up to the batch gradient.
    assert sam_setup.max_difference(got, sam_setup.weights(plain)) < 1e-6


def test_gradient_accumulation_perturbs_each_micro_batch(mode):
    x, y = sam_setup.data(32)
    inner = keras.optimizers.SGD(
        0.1, momentum=0.9, gradient_accumulation_steps=2
    )
    model, got = _train(
        optimizers.SAM(inner, rho=0.1), x, y, batch_size=8, mode=mode
    )
    expected = _expected(
        x, y, 8, rho=0.1, lr=0.1, momentum=0.9, accumulation_steps=2
    )
    assert sam_setup.max_difference(got, expected) < TOLERANCE
    # Perturbing the mean of two micro-batches instead is another step.
    merged = _expected(x, y, 16, rho=0.1, lr=0.1, momentum=0.9)
    assert sam_setup.max_difference(merged, expected) > 1e-4
    # `iterations` counts applied (accumulated) steps: 4 micro-batches.
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 2


@pytest.mark.parametrize("clip", ["global_clipnorm", "clipnorm"])
def test_clipping_applies_to_adversarial_gradient_only(clip):
    x, y = sam_setup.data(16)
    inner = keras.optimizers.SGD(0.1, momentum=0.9, **{clip: 0.05})
    _, got = _train(
        optimizers.SAM(inner, rho=0.1),
        x,
        y,
        batch_size=8,
        epochs=2,
    )
    expected = _expected(
        x, y, 8, epochs=2, rho=0.1, lr=0.1, momentum=0.9, **{clip: 0.05}
    )
    assert sam_setup.max_difference(got, expected) < TOLERANCE
    unclipped = _expected(x, y, 8, epochs=2, rho=0.1, lr=0.1, momentum=0.9)
    assert sam_setup.max_difference(unclipped, expected) > 1e-3


def test_per_variable_clipping_is_not_applied_to_the_perturbation():
    """With `clipnorm` the direction of g changes, so a perturbation taken
    from the clipped g would be another step: the test can tell."""
    params = sam_setup.initial_params()
    x, y = sam_setup.data(8)
    x, y = x.astype("float64"), y.astype("float64")
    _, g = reference.mlp_loss_and_grads(params, x, y)
    wrong = reference.sam_eps(reference.clip_by_norm(g, 0.05), 0.1)
    right = reference.sam_eps(g, 0.1)
    assert sam_setup.max_difference(wrong, right) > 1e-3

    inner = keras.optimizers.SGD(1.0, clipnorm=0.05)
    _, got = _train(optimizers.SAM(inner, rho=0.1), x, y, batch_size=8)
    _, g_adv = reference.mlp_loss_and_grads(
        [p + e for p, e in zip(params, right)], x, y
    )
    expected = [
        p - c for p, c in zip(params, reference.clip_by_norm(g_adv, 0.05))
    ]
    assert sam_setup.max_difference(got, expected) < TOLERANCE


def test_arguments_are_validated_and_serialized():
    with pytest.raises(ValueError, match="num_batch_splits=0"):
        optimizers.SAM("sgd", num_batch_splits=0)
    with pytest.raises(TypeError, match="num_batch_splits=2.0"):
        optimizers.SAM("sgd", num_batch_splits=2.0)
    with pytest.raises(TypeError, match="sync_perturbation='yes'"):
        optimizers.SAM("sgd", sync_perturbation="yes")
    with pytest.raises(ValueError, match="num_batch_splits=2"):
        optimizers.SAM("sgd", sync_perturbation=True, num_batch_splits=2)
    for cls in (optimizers.SAM, optimizers.ASAM):
        sam = cls("sgd", sync_perturbation=True)
        config = sam.get_config()
        assert config["sync_perturbation"] is True
        assert config["num_batch_splits"] == 1
        again = cls.from_config(config)
        assert again.sync_perturbation is True
        sam = cls("sgd", num_batch_splits=4)
        assert cls.from_config(sam.get_config()).num_batch_splits == 4


def test_hooks_run_once_per_step_with_splits():
    calls = []

    class Recorder(optimizers.SAM):
        def gradient(self, grad_at, w):
            calls.append("rule")
            g_adv = super().gradient(grad_at, w)
            calls.append(len(grad_at.splits))
            return g_adv

    x, y = sam_setup.data(16)
    optimizer = Recorder(keras.optimizers.SGD(0.1), num_batch_splits=2)
    _train(optimizer, x, y, batch_size=8, mode={"run_eagerly": True})
    assert calls == ["rule", 2] * 2
