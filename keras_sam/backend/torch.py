"""The two-pass sharpness-aware train step on PyTorch (backward())."""

import keras
import torch

from keras_sam import optimizers as sam_optimizers


def _loss_and_grads(model, x, y, sample_weight, variables, training=True):
    """One forward/backward pass at the current weights.

    With `training=True` the loss is scaled for the gradient (mixed
    precision); the returned loss is unscaled either way.
    """
    model.zero_grad()
    y_pred = model(x, training=training)
    loss = model.compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
    )
    scaled_loss = model.optimizer.scale_loss(loss) if training else loss
    scaled_loss.backward()
    grads = [v.value.grad for v in variables]
    model.zero_grad()
    return loss.detach(), y_pred, grads


def _snapshot(variables):
    return [v.value.detach().clone() for v in variables]


def _assign(variables, values):
    for v, value in zip(variables, values):
        if value is not None:
            v.assign(value)


def _batch_size(x):
    return next(t for t in keras.tree.flatten(x) if t is not None).shape[0]


def _auxiliary(model, sam, variables):
    """Loss and gradient of the optimizer's auxiliary batches at w."""
    results = []
    for ax, ay, aw in sam.auxiliary_batches():
        loss, _, grads = _loss_and_grads(
            model, ax, ay, aw, variables, training=False
        )
        results.append((loss, grads))
    return results


def train_step(model, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    sam = model.sam_optimizer
    if sam is None:
        raise ValueError(
            "SAMModel must be compiled before training. Call "
            "`model.compile(optimizer=..., loss=...)` first."
        )
    variables = model.trainable_variables
    states = model.non_trainable_variables

    with sam.sharpness_aware_step():
        states_before = _snapshot(states)
        # Clean pass: metrics and BatchNorm statistics come from here only.
        loss, y_pred, grads = _loss_and_grads(
            model, x, y, sample_weight, variables
        )
        model.loss_metric().update_state(loss, sample_weight=_batch_size(x))
        auxiliary = _auxiliary(model, sam, variables)
        with torch.no_grad():
            unscaled = sam_optimizers.unscale_gradients(model.optimizer, grads)
            sam.on_clean_pass(loss, unscaled, variables, auxiliary)
            perturb = sam.sam_every == 1 or bool(sam.should_perturb())
        if perturb:
            with torch.no_grad():
                states_after = _snapshot(states)
                w = _snapshot(variables)
                w_adv = sam.perturbed_values(unscaled, variables, w)
            try:
                # Ascend to w + eps; rerun with the clean pass's random state
                # so that dropout draws the same masks.
                with torch.no_grad():
                    _assign(variables, w_adv)
                    _assign(states, states_before)
                _, _, grads = _loss_and_grads(
                    model, x, y, sample_weight, variables
                )
            finally:
                # Restore w and the clean pass's BatchNorm statistics, even
                # if the adversarial pass raised.
                with torch.no_grad():
                    _assign(variables, w)
                    _assign(states, states_after)
            with torch.no_grad():
                grads = sam.pull_back(grads, variables, w)
                sam.on_adversarial_pass(
                    unscaled,
                    sam_optimizers.unscale_gradients(model.optimizer, grads),
                    variables,
                )

        with torch.no_grad():
            model.optimizer.apply(grads, variables)

    logs = model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
    with torch.no_grad():
        for key, value in sam.log_values().items():
            logs[key] = keras.ops.convert_to_tensor(value).detach().clone()
    return logs
