"""SAMPa: the paper's equations, its invariant, state kept across saves."""

import os

import keras
import numpy as np
import pytest

import keras_sam
from keras_sam import optimizers
from tests import reference
from tests import sam_setup
from tests.conftest import BACKEND


def _sampa(rho=0.1, lam=0.2, adversarial_batch="previous", **inner):
    sgd = keras.optimizers.SGD(0.1, momentum=0.9, **inner)
    return optimizers.SAMPa(
        sgd, rho=rho, lam=lam, adversarial_batch=adversarial_batch
    )


def _trained(optimizer, x, y, epochs=2, **compile_kwargs):
    model = keras_sam.SAMModel(sam_setup.mlp(sam_setup.initial_params()))
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    sam_setup.fit(model, x, y, batch_size=8, epochs=epochs)
    return model


def _reference(x, y, rho, lam, adversarial_batch="previous"):
    return reference.train_sampa(
        sam_setup.initial_params(),
        sam_setup.batches(x, y, 8, epochs=2),
        reference.mlp_loss_and_grads,
        rho=rho,
        lam=lam,
        lr=0.1,
        momentum=0.9,
        adversarial_batch=adversarial_batch,
    )


def test_matches_the_reference(mode):
    rho, lam = 0.3, 0.5
    x, y = sam_setup.data(16)
    model = _trained(_sampa(rho, lam), x, y, **mode)
    expected = _reference(x, y, rho, lam)
    assert sam_setup.max_difference(sam_setup.weights(model), expected) < 1e-5
    # The adversarial gradient really is taken on the previous batch.
    current = _reference(x, y, rho, lam, adversarial_batch="current")
    assert sam_setup.max_difference(expected, current) > 1e-3
    # ... and differs from SAM (the perturbation comes from g_y).
    sam = _trained(
        optimizers.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=rho),
        x,
        y,
    )
    assert (
        sam_setup.max_difference(model.get_weights(), sam.get_weights()) > 1e-3
    )


def test_adversarial_batch_current_matches_the_reference(mode):
    x, y = sam_setup.data(16)
    model = _trained(
        _sampa(0.3, 0.5, adversarial_batch="current"), x, y, **mode
    )
    expected = _reference(x, y, 0.3, 0.5, adversarial_batch="current")
    assert sam_setup.max_difference(sam_setup.weights(model), expected) < 1e-5
    # Nothing is kept: no buffers.
    assert model.optimizer.batch_shapes() == []


def test_partial_batches_take_their_own_batch():
    """20 samples in batches of 8: each epoch ends with 4. That step, and
    the next, take the adversarial gradient on their own batch."""
    x, y = sam_setup.data(20)
    model = _trained(_sampa(0.3, 0.5), x, y)
    expected = _reference(x, y, 0.3, 0.5)
    assert sam_setup.max_difference(sam_setup.weights(model), expected) < 1e-5
    assert model.optimizer.batch_shapes() == [
        ((8, sam_setup.D_IN), "float32"),
        ((8, sam_setup.D_OUT), "float32"),
    ]


@pytest.mark.parametrize("first, then", [(10, 8), (8, 10)])
def test_kept_batch_follows_the_batch_size_of_each_fit(first, then):
    """A warm-up `fit` with another batch size does not switch the
    previous-batch rule off for the next `fit` (issue 26): the buffers
    follow each fit's batch size, and the steps follow the reference."""
    x, y = sam_setup.data(40)
    model = keras_sam.SAMModel(sam_setup.mlp(sam_setup.initial_params()))
    model.compile(optimizer=_sampa(0.3, 0.5), loss="mse")
    model.fit(x, y, batch_size=first, epochs=1, shuffle=False, verbose=0)
    model.fit(x, y, batch_size=then, epochs=1, shuffle=False, verbose=0)
    assert model.optimizer.batch_shapes() == [
        ((then, sam_setup.D_IN), "float32"),
        ((then, sam_setup.D_OUT), "float32"),
    ]
    batches = sam_setup.batches(x, y, first) + sam_setup.batches(x, y, then)
    expected = reference.train_sampa(
        sam_setup.initial_params(),
        batches,
        reference.mlp_loss_and_grads,
        rho=0.3,
        lam=0.5,
        lr=0.1,
        momentum=0.9,
        fits=(len(x) // first,),
    )
    assert sam_setup.max_difference(sam_setup.weights(model), expected) < 1e-5
    # Not the `"current"` rule, which the second fit used to fall back to.
    current = reference.train_sampa(
        sam_setup.initial_params(),
        batches,
        reference.mlp_loss_and_grads,
        rho=0.3,
        lam=0.5,
        lr=0.1,
        momentum=0.9,
        adversarial_batch="current",
    )
    assert sam_setup.max_difference(expected, current) > 1e-3


def test_unknown_batch_size_warns():
    model = keras_sam.SAMModel(sam_setup.mlp(sam_setup.initial_params()))
    model.compile(optimizer=_sampa(), loss="mse")
    spec = keras.KerasTensor((None, sam_setup.D_IN))
    with pytest.warns(UserWarning, match="batch dimension is unknown"):
        model._note_batch(None, (spec, spec))


@pytest.mark.parametrize("adversarial_batch", ["previous", "current"])
def test_rho_and_lam_zero_is_the_inner_optimizer(adversarial_batch):
    """With `"current"`, exactly the inner optimizer; with `"previous"`, the
    inner optimizer on the batches one step late (the first one twice)."""
    x, y = sam_setup.data(16)
    model = _trained(_sampa(0.0, 0.0, adversarial_batch), x, y)
    plain = sam_setup.mlp(sam_setup.initial_params())
    plain.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    batches = [(x[:8], y[:8]), (x[8:], y[8:])] * 2
    if adversarial_batch == "previous":
        batches = batches[:1] + batches[:-1]
    for batch_x, batch_y in batches:
        plain.train_on_batch(batch_x, batch_y)
    for got, want in zip(model.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_nesterov_and_weight_decay_auxiliary_point():
    """With Nesterov momentum and weight decay, y is where Keras' SGD would
    move with g_y: one SGD step from w with g_y, its state discarded."""
    x, y = sam_setup.data(8)
    sgd = keras.optimizers.SGD(
        0.1, momentum=0.9, nesterov=True, weight_decay=0.01
    )
    model = keras_sam.SAMModel(sam_setup.mlp(sam_setup.initial_params()))
    optimizer = optimizers.SAMPa(sgd, rho=0.1)
    model.compile(optimizer=optimizer, loss="mse")
    sam_setup.fit(model, x, y, batch_size=8, epochs=2)  # momentum and g_y move
    w = model.get_weights()
    g_y = [np.asarray(v) for v in optimizer.g_y]
    y_point = optimizer._auxiliary_point(
        [keras.ops.convert_to_tensor(v) for v in w],
        [keras.ops.convert_to_tensor(g) for g in g_y],
    )
    # Keras' SGD on a copy of the model, one step with g_y.
    probe = sam_setup.mlp(w)
    probe_sgd = keras.optimizers.SGD(
        0.1, momentum=0.9, nesterov=True, weight_decay=0.01
    )
    probe_sgd.build(probe.trainable_variables)
    for m, source in zip(probe_sgd.momentums, sgd.momentums):
        m.assign(source)
    probe_sgd.iterations.assign(sgd.iterations)
    probe_sgd.apply(
        [keras.ops.convert_to_tensor(g) for g in g_y],
        probe.trainable_variables,
    )
    for got, want in zip(y_point, probe.get_weights()):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(got), want, rtol=0, atol=1e-6
        )


def test_save_and_resume_exactly(tmp_path):
    x, y = sam_setup.data(16)
    model = _trained(_sampa(), x, y, epochs=1)
    path = os.path.join(tmp_path, "sampa.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    optimizer = restored.optimizer
    assert isinstance(optimizer, optimizers.SAMPa)
    assert optimizer.lam == 0.2
    for a, b in zip(model.optimizer.g_y, optimizer.g_y):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The kept batch is state too: the next step's adversarial batch.
    assert optimizer.batch_shapes() == model.optimizer.batch_shapes()
    for a, b in zip(model.optimizer._batch, optimizer._batch):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    sam_setup.fit(model, x, y, batch_size=8, epochs=1)
    sam_setup.fit(restored, x, y, batch_size=8, epochs=1)
    for a, b in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_non_finite_adversarial_gradient_skips_the_update():
    x, y = sam_setup.data(16)
    model = _trained(_sampa(), x, y, epochs=1)  # g_y is set now
    before = model.get_weights()
    g_y = [np.asarray(v) for v in model.optimizer.g_y]
    model.optimizer.rho.assign(1e30)  # w_adv overflows: g_adv is NaN
    history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert history.history["adv_nonfinite"][-1] == 2.0
    # A skipped step leaves the optimizer's state, g_y included.
    for a, b in zip(g_y, model.optimizer.g_y):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_bad_arguments():
    with pytest.raises(ValueError, match="lam"):
        optimizers.SAMPa("sgd", lam=1.5)
    with pytest.raises(ValueError, match="adversarial_batch.*'next'"):
        optimizers.SAMPa("sgd", adversarial_batch="next")
    with pytest.raises(TypeError, match="rho"):
        optimizers.SAMPa(
            "sgd",
            rho=keras_sam.LearnedRadius(0.1, validation_data=sam_setup.data(8)),
        )
    assert isinstance(optimizers.get("sampa"), optimizers.SAMPa)


@pytest.mark.skipif(
    BACKEND == "torch", reason="Keras runs one step per execution on torch"
)
def test_steps_per_execution():
    """Several steps in one compiled execution keep the batch rule."""
    x, y = sam_setup.data(16)
    model = _trained(_sampa(0.3, 0.5), x, y, steps_per_execution=2)
    expected = _reference(x, y, 0.3, 0.5)
    assert sam_setup.max_difference(sam_setup.weights(model), expected) < 1e-5
