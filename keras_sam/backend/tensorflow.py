"""The two-pass sharpness-aware train step on TensorFlow (GradientTape)."""

import keras
import tensorflow as tf

from keras_sam import optimizers as sam_optimizers


def _loss_and_grads(model, x, y, sample_weight, variables, training=True):
    """One forward/backward pass at the current weights.

    With `training=True` the loss is scaled for the gradient (mixed
    precision); the returned loss is unscaled either way.
    """
    with tf.GradientTape() as tape:
        y_pred = model(x, training=training)
        loss = model.compute_loss(
            x=x,
            y=y,
            y_pred=y_pred,
            sample_weight=sample_weight,
            training=training,
        )
        scaled_loss = model.optimizer.scale_loss(loss) if training else loss
    return loss, y_pred, tape.gradient(scaled_loss, variables)


def _snapshot(variables):
    return [tf.identity(v.value) for v in variables]


def _assign(variables, values):
    for v, value in zip(variables, values):
        if value is not None:
            v.assign(value)


def _batch_size(x):
    first = next(t for t in tf.nest.flatten(x) if t is not None)
    return tf.shape(first)[0]


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
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        model.loss_metric().update_state(
            loss * replicas, sample_weight=_batch_size(x)
        )
        unscaled = sam_optimizers.unscale_gradients(model.optimizer, grads)
        sam.on_clean_pass(
            loss, unscaled, variables, _auxiliary(model, sam, variables)
        )

        present = [i for i, g in enumerate(grads) if g is not None]

        def adversarial_grads():
            states_after = _snapshot(states)
            w = _snapshot(variables)
            # Ascend to w + eps; rerun with the clean pass's random state so
            # that dropout draws the same masks.
            _assign(variables, sam.perturbed_values(unscaled, variables, w))
            _assign(states, states_before)
            try:
                _, _, g_adv = _loss_and_grads(
                    model, x, y, sample_weight, variables
                )
            finally:
                # Restore w and the clean pass's BatchNorm statistics (also
                # when an eager adversarial pass raises).
                _assign(variables, w)
                _assign(states, states_after)
            g_adv = sam.pull_back(g_adv, variables, w)
            sam.on_adversarial_pass(
                unscaled,
                sam_optimizers.unscale_gradients(model.optimizer, g_adv),
                variables,
            )
            return [g_adv[i] for i in present]

        if sam.sam_every == 1:
            chosen = adversarial_grads()
        else:
            chosen = tf.cond(
                sam.should_perturb(),
                adversarial_grads,
                lambda: [grads[i] for i in present],
            )
        final = [None] * len(grads)
        for i, g in zip(present, chosen):
            final[i] = g
        model.optimizer.apply(final, variables)

    logs = model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
    for key, value in sam.log_values().items():
        logs[key] = tf.identity(value)
    return logs
