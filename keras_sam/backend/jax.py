"""The two-pass sharpness-aware train step on JAX: a pure function of state.

Every variable, rho included, is read through the step's `state`: the SAM
math and the optimizer's hooks run inside a `keras.StatelessScope` that maps
the optimizer's variables to their values in `state`, and whatever the hooks
assign is read back from the scope into the new state.
"""

import jax
import keras

from keras_sam import optimizers as sam_optimizers


def _batch_size(x):
    leaves = jax.tree_util.tree_leaves(x)
    return next(t for t in leaves if t is not None).shape[0]


def _run_stateless(optimizer, optimizer_values, fn):
    """Runs `fn()` with the optimizer's variables read from (and assigned
    into) `optimizer_values`; returns `(fn(), new optimizer_values)`."""
    mapping = list(zip(optimizer.variables, optimizer_values))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        result = fn()
    new_values = [
        scope.get_current_value(v) for v in optimizer.variables
    ]
    return result, new_values


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

    def loss_fn(weights, states, x, y, sample_weight, training=True):
        # Scaled loss (when training) and (unscaled loss, y_pred, new
        # states); stateless_compute_loss inside keeps regularizers working
        # under jit.
        return model.compute_loss_and_updates(
            weights,
            states,
            metrics_values,
            x,
            y,
            sample_weight,
            training=training,
            optimizer_variables=optimizer_values,
        )

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    with sam.sharpness_aware_step():
        # Clean pass: metrics and BatchNorm statistics come from here only.
        (_, (loss, y_pred, new_non_trainable_values, _)), grads = grad_fn(
            trainable_values, non_trainable_values, x, y, sample_weight
        )
        auxiliary = []
        for ax, ay, aw in sam.auxiliary_batches():
            (aux_loss, _), aux_grads = grad_fn(
                trainable_values, non_trainable_values, ax, ay, aw, False
            )
            auxiliary.append((aux_loss, aux_grads))

        def clean_hooks():
            unscaled = sam_optimizers.unscale_gradients(optimizer, grads)
            sam.on_clean_pass(loss, unscaled, variables, auxiliary)
            return unscaled

        unscaled, optimizer_values = _run_stateless(
            optimizer, optimizer_values, clean_hooks
        )

        def adversarial(optimizer_values):
            w_adv, _ = _run_stateless(
                optimizer,
                optimizer_values,
                lambda: sam.perturbed_values(
                    unscaled, variables, trainable_values
                ),
            )
            w_adv = [
                w if wa is None else wa
                for w, wa in zip(trainable_values, w_adv)
            ]
            # Adversarial pass from the same random state as the clean pass
            # (same dropout masks); its BatchNorm updates are discarded.
            _, g_adv = grad_fn(
                w_adv, non_trainable_values, x, y, sample_weight
            )

            def adversarial_hooks():
                g = sam.pull_back(g_adv, variables, trainable_values)
                sam.on_adversarial_pass(
                    unscaled,
                    sam_optimizers.unscale_gradients(optimizer, g),
                    variables,
                )
                return g

            return _run_stateless(
                optimizer, optimizer_values, adversarial_hooks
            )

        if sam.sam_every == 1:
            grads, optimizer_values = adversarial(optimizer_values)
        else:
            perturb, _ = _run_stateless(
                optimizer, optimizer_values, sam.should_perturb
            )
            grads, optimizer_values = jax.lax.cond(
                perturb,
                adversarial,
                lambda values: (grads, values),
                optimizer_values,
            )

        trainable_values, optimizer_values = optimizer.stateless_apply(
            optimizer_values, grads, trainable_values
        )

    metrics_mapping = list(zip(model.metrics_variables, metrics_values))
    with keras.StatelessScope(state_mapping=metrics_mapping) as scope:
        model.loss_metric().update_state(loss, sample_weight=_batch_size(x))
        logs = model.compute_metrics(x, y, y_pred, sample_weight)
    metrics_values = [
        scope.get_current_value(v) for v in model.metrics_variables
    ]
    extra_logs, _ = _run_stateless(
        optimizer,
        optimizer_values,
        lambda: {
            key: keras.ops.convert_to_tensor(value)
            for key, value in sam.log_values().items()
        },
    )
    logs.update(extra_logs)
    state = (
        trainable_values,
        new_non_trainable_values,
        optimizer_values,
        metrics_values,
    )
    return logs, state
