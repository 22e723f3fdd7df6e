"""The two-pass sharpness-aware train step on JAX: a pure function of state.

Every variable, rho included, is read through the step's `state`: the SAM
math and the optimizer's hooks run inside a `keras.StatelessScope` that maps
the optimizer's variables to their values in `state`, and whatever the hooks
assign is read back from the scope into the new state.
"""

import jax
import keras

from keras_sam import optimizers as sam_optimizers
from keras_sam.backend import _common as common


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


def _data_parallel_replicas():
    """Replicas along the batch axis of the `keras.distribution` in use."""
    distribution = keras.distribution.distribution()
    batch_axis = getattr(distribution, "batch_dim_name", None)
    if batch_axis is None:
        return 1
    mesh = distribution.device_mesh
    return int(mesh.shape[list(mesh.axis_names).index(batch_axis)])


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
    if common.has_loss_scaling(sam.inner_optimizer):
        # Its stateful apply cannot run inside a jitted stateless step.
        raise ValueError(
            "On JAX, wrap the sharpness-aware optimizer in the "
            "LossScaleOptimizer, not its inner optimizer: "
            "`LossScaleOptimizer(SAM(inner))`, which is what `compile` does "
            "under the 'mixed_float16' policy. Received: "
            f"{sam.__class__.__name__}(LossScaleOptimizer(...))"
        )
    variables = model.trainable_variables
    # The step sees the global batch. Per-replica perturbation (the default
    # under keras.distribution) splits it along the data-parallel axis,
    # whose shards are contiguous, times `num_batch_splits` per replica.
    num_splits = sam.num_batch_splits
    if not sam.sync_perturbation:
        num_splits *= _data_parallel_replicas()
    parts = common.split_batch(
        x, y, sample_weight, num_splits, _batch_size(x)
    )
    fractions = [fraction for _, fraction in parts]

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
        # Clean passes: metrics and BatchNorm statistics come from here
        # only; each sub-batch starts from the states the previous left.
        states_before, losses, y_preds, grads = [], [], [], []
        new_non_trainable_values = non_trainable_values
        for (px, py, pw), _ in parts:
            states_before.append(new_non_trainable_values)
            (_, (loss, y_pred, new_non_trainable_values, _)), g = grad_fn(
                trainable_values, new_non_trainable_values, px, py, pw
            )
            losses.append([loss])
            y_preds.append(y_pred)
            grads.append(g)
        (loss,) = common.combine(losses, fractions)
        if len(y_preds) == 1:
            y_pred = y_preds[0]
        else:
            y_pred = jax.tree_util.tree_map(
                lambda *t: jax.numpy.concatenate(t, axis=0), *y_preds
            )
        g_clean = common.combine(grads, fractions)
        # Auxiliary passes at w (inference mode), skipped (zeros) when the
        # optimizer says they are not due; both read the step's state.
        (batches, due), _ = _run_stateless(
            optimizer,
            optimizer_values,
            lambda: (sam.auxiliary_batches(), sam.auxiliary_due()),
        )

        def auxiliary_passes(batches):
            results = []
            for ax, ay, aw in batches:
                (aux_loss, _), aux_grads = grad_fn(
                    trainable_values, non_trainable_values, ax, ay, aw, False
                )
                results.append((aux_loss, aux_grads))
            return results

        if not batches or due is True:
            auxiliary = auxiliary_passes(batches)
        else:
            auxiliary = jax.lax.cond(
                due,
                auxiliary_passes,
                lambda batches: jax.tree_util.tree_map(
                    lambda s: jax.numpy.zeros(s.shape, s.dtype),
                    jax.eval_shape(auxiliary_passes, batches),
                ),
                batches,
            )

        def clean_hooks():
            unscaled = [
                sam_optimizers.unscale_gradients(optimizer, g) for g in grads
            ]
            g_unscaled = common.combine(unscaled, fractions)
            sam.on_clean_pass(loss, g_unscaled, variables, auxiliary)
            return unscaled, g_unscaled

        (unscaled, g_unscaled), optimizer_values = _run_stateless(
            optimizer, optimizer_values, clean_hooks
        )

        def adversarial(optimizer_values):
            g_adv = []
            for ((px, py, pw), _), g, before in zip(
                parts, unscaled, states_before
            ):
                # Ascend to w + eps_j.
                w_adv, _ = _run_stateless(
                    optimizer,
                    optimizer_values,
                    lambda: sam.perturbed_values(
                        g, variables, trainable_values
                    ),
                )
                w_adv = [
                    w if wa is None else wa
                    for w, wa in zip(trainable_values, w_adv)
                ]
                # Adversarial pass from the clean pass's random state (same
                # dropout masks); its BatchNorm updates are discarded.
                g_adv.append(grad_fn(w_adv, before, px, py, pw)[1])
            g_adv = common.combine(g_adv, fractions)

            def adversarial_hooks():
                g = sam.pull_back(g_adv, variables, trainable_values)
                sam.on_adversarial_pass(
                    g_unscaled,
                    sam_optimizers.unscale_gradients(optimizer, g),
                    variables,
                )
                if not common.has_loss_scaling(optimizer):
                    return g
                # A non-finite clean pass hands its own gradient on, so that
                # the LossScaleOptimizer skips the step even if eps happened
                # to be finite.
                return common.select(
                    common.all_finite(g_unscaled), g, g_clean
                )

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
                lambda values: (g_clean, values),
                optimizer_values,
            )

        # With loss scaling, the LossScaleOptimizer skips a non-finite step
        # (weights and state untouched); without it, as in plain Keras.
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


# ---------------------------------------------------------------------------
# Hessian-vector products (keras_sam.sharpness). `fn(values, *args)` is a
# pure scalar function of a list of arrays; nothing here touches a variable.


def value_and_grad(fn, values, *args):
    """`(fn(values, *args), grad fn)` with respect to the list `values`."""
    return jax.value_and_grad(lambda w: fn(w, *args))(list(values))


def hvp(fn, values, vectors, *args):
    """H v, the Hessian of `fn(values, *args)` at `values` times `vectors`.

    Forward over reverse: the directional derivative (jvp) of `grad fn`
    along `v`, one forward-mode sweep through the gradient computation.
    """
    values = list(values)
    vectors = [
        jax.numpy.asarray(v, dtype=w.dtype) for v, w in zip(vectors, values)
    ]
    grad_fn = jax.grad(lambda w: fn(w, *args))
    _, hv = jax.jvp(grad_fn, (values,), (vectors,))
    return hv


def compile_function(fn, jit_compile=False):
    """`fn` compiled once per input shape (`jax.jit`) and reused; JAX
    always compiles, `jit_compile` is accepted for the other backends."""
    return jax.jit(fn)


def on_accelerator():
    """Whether JAX computes on a GPU or TPU (not the CPU)."""
    return jax.default_backend() != "cpu"
