"""The two-pass sharpness-aware train step on JAX: a pure function of state.

Every variable, rho included, is read through the step's `state`: the SAM
math runs inside a `keras.StatelessScope` that maps the optimizer's
variables to their values in `state`.
"""

import jax
import keras

from keras_sam import optimizers as sam_optimizers


def _batch_size(x):
    return next(t for t in jax.tree_util.tree_leaves(x) if t is not None).shape[
        0
    ]


def train_step(model, state, data):
    (
        trainable_values,
        non_trainable_values,
        optimizer_values,
        metrics_values,
    ) = state
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    sam = model.sam_optimizer
    optimizer = model.optimizer
    variables = model.trainable_variables
    optimizer_mapping = list(zip(optimizer.variables, optimizer_values))

    def loss_fn(weights, states):
        # Scaled loss and (unscaled loss, y_pred, new states); the loss goes
        # through stateless_compute_loss so regularizers work under jit.
        return model.compute_loss_and_updates(
            weights,
            states,
            metrics_values,
            x,
            y,
            sample_weight,
            training=True,
            optimizer_variables=optimizer_values,
        )

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    with sam.sharpness_aware_step():
        # Clean pass: metrics and BatchNorm statistics come from here only.
        (_, (loss, y_pred, new_non_trainable_values, _)), grads = grad_fn(
            trainable_values, non_trainable_values
        )

        def adversarial_grads(grads):
            with keras.StatelessScope(state_mapping=optimizer_mapping):
                unscaled = sam_optimizers.unscale_gradients(optimizer, grads)
                w_adv = sam.perturbed_values(
                    unscaled, variables, trainable_values
                )
            w_adv = [
                w if wa is None else wa
                for w, wa in zip(trainable_values, w_adv)
            ]
            # Adversarial pass from the same random state as the clean pass
            # (same dropout masks); its BatchNorm updates are discarded.
            _, g_adv = grad_fn(w_adv, non_trainable_values)
            with keras.StatelessScope(state_mapping=optimizer_mapping):
                return sam.pull_back(g_adv, variables, trainable_values)

        if sam.sam_every == 1:
            grads = adversarial_grads(grads)
        else:
            with keras.StatelessScope(state_mapping=optimizer_mapping):
                perturb = sam.should_perturb()
            grads = jax.lax.cond(perturb, adversarial_grads, list, grads)

        trainable_values, optimizer_values = optimizer.stateless_apply(
            optimizer_values, grads, trainable_values
        )

    metrics_mapping = list(zip(model.metrics_variables, metrics_values))
    with keras.StatelessScope(state_mapping=metrics_mapping) as scope:
        model.loss_metric().update_state(
            loss, sample_weight=_batch_size(x)
        )
        logs = model.compute_metrics(x, y, y_pred, sample_weight)
    metrics_values = [
        scope.get_current_value(v)
        if scope.get_current_value(v) is not None
        else v.value
        for v in model.metrics_variables
    ]
    logs["rho"] = optimizer_values[
        [id(v) for v in optimizer.variables].index(id(sam.rho))
    ]
    state = (
        trainable_values,
        new_non_trainable_values,
        optimizer_values,
        metrics_values,
    )
    return logs, state
