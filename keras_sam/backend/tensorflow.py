"""The two-pass sharpness-aware train step on TensorFlow (GradientTape)."""

import keras
import tensorflow as tf

from keras_sam import optimizers as sam_optimizers
from keras_sam.backend import _common as common


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
    """Loss and gradient of the optimizer's auxiliary batches at w; zeros,
    without running the passes, when `sam.auxiliary_due()` is false."""
    batches = sam.auxiliary_batches()

    def passes():
        results = []
        for ax, ay, aw in batches:
            loss, _, grads = _loss_and_grads(
                model, ax, ay, aw, variables, training=False
            )
            grads = _zeros_for_none(grads, [v.value for v in variables])
            results.append((tf.cast(loss, "float32"), grads))
        return results

    due = sam.auxiliary_due()
    if not batches or due is True:
        return passes()
    zeros = [
        (tf.zeros((), "float32"), [tf.zeros_like(v.value) for v in variables])
        for _ in batches
    ]
    return tf.cond(due, passes, lambda: zeros)


def _split_batch(x, y, sample_weight, num_splits):
    """Contiguous sub-batches `[((x, y, sw), n_j / n)]` of the batch.

    One split gives the batch itself with fraction `None`. The batch size may
    be unknown when tracing; a sub-batch past its end is empty (fraction 0).
    """
    if num_splits == 1:
        return [((x, y, sample_weight), None)]
    n = _batch_size(x)
    size = (n + num_splits - 1) // num_splits
    parts = []
    for j in range(num_splits):
        start = tf.minimum(j * size, n)
        stop = tf.minimum(start + size, n)
        part = tf.nest.map_structure(
            lambda t: None if t is None else t[start:stop],
            (x, y, sample_weight),
        )
        fraction = tf.cast(stop - start, "float32") / tf.cast(n, "float32")
        parts.append((part, fraction))
    return parts


def _concat(structures):
    if len(structures) == 1:
        return structures[0]
    return tf.nest.map_structure(
        lambda *t: tf.concat(t, axis=0), *structures
    )


def _sync(grads):
    """All-reduce of per-replica gradients (of the loss scaled by 1/replicas,
    so the sum is the gradient of the global batch)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return grads
    present = [g for g in grads if g is not None]
    reduced = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present))
    return [None if g is None else next(reduced) for g in grads]


def _agree_on_finite(optimizer, grads):
    """Makes every replica's gradients non-finite if one replica's are.

    Under a strategy, Keras' LossScaleOptimizer checks the gradients of the
    first replica only (it assumes they were all-reduced); a non-finite
    pass on another replica would then be applied. Nothing changes on one
    device or without loss scaling.
    """
    context = tf.distribute.get_replica_context()
    if (
        not common.has_loss_scaling(optimizer)
        or context is None
        or context.num_replicas_in_sync == 1
    ):
        return grads

    def every_replica(strategy, finite):
        # Each replica's flag, read in cross-replica context (no collective).
        return tf.reduce_all(
            tf.stack(strategy.experimental_local_results(finite))
        )

    finite = context.merge_call(
        every_replica, args=(common.all_finite(grads),)
    )
    return [
        None
        if g is None
        else tf.where(finite, g, tf.fill(tf.shape(g), float("nan")))
        for g in grads
    ]


def train_step(model, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    sam = model.sam_optimizer
    if sam is None:
        raise ValueError(
            "SAMModel must be compiled before training. Call "
            "`model.compile(optimizer=..., loss=...)` first."
        )
    optimizer = model.optimizer
    if not model.built:
        # TF defers building to the first trace: build symbolically first,
        # so that the variables exist before the step reads them.
        model(
            tf.nest.map_structure(
                lambda t: keras.KerasTensor(tuple(t.shape), t.dtype.name), x
            )
        )
    variables = model.trainable_variables
    states = model.non_trainable_variables
    if not optimizer.built:
        # Also deferred on TF: the loss scale must exist before unscaling.
        optimizer.build(variables)
    # Under tf.distribute this runs per replica, on the replica's part of
    # the batch: eps is per replica (m-sharpness) unless synchronized.
    parts = _split_batch(x, y, sample_weight, sam.num_batch_splits)
    fractions = [fraction for _, fraction in parts]

    with sam.sharpness_aware_step():
        # Clean passes: metrics and BatchNorm statistics come from here only.
        states_before, losses, y_preds, grads, unscaled = [], [], [], [], []
        for (px, py, pw), _ in parts:
            states_before.append(_snapshot(states))
            loss, y_pred, g = _loss_and_grads(model, px, py, pw, variables)
            losses.append([loss])
            y_preds.append(y_pred)
            grads.append(g)
            g = sam_optimizers.unscale_gradients(optimizer, g)
            unscaled.append(_sync(g) if sam.sync_perturbation else g)
        (loss,) = common.combine(losses, fractions)
        y_pred = _concat(y_preds)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        model.loss_metric().update_state(
            loss * replicas, sample_weight=_batch_size(x)
        )
        g_clean = common.combine(grads, fractions)
        g_unscaled = common.combine(unscaled, fractions)
        sam.on_clean_pass(
            loss, g_unscaled, variables, _auxiliary(model, sam, variables)
        )

        present = [i for i, g in enumerate(g_clean) if g is not None]

        def adversarial_grads():
            states_after = _snapshot(states)
            w = _snapshot(variables)
            g_adv = []
            try:
                for ((px, py, pw), _), g, before in zip(
                    parts, unscaled, states_before
                ):
                    # Ascend to w + eps_j; rerun with the clean pass's random
                    # state so that dropout draws the same masks.
                    _assign(variables, sam.perturbed_values(g, variables, w))
                    _assign(states, before)
                    g_adv.append(
                        _loss_and_grads(model, px, py, pw, variables)[2]
                    )
            finally:
                # Restore w and the clean passes' BatchNorm statistics (also
                # when an eager adversarial pass raises).
                _assign(variables, w)
                _assign(states, states_after)
            g_adv = sam.pull_back(
                common.combine(g_adv, fractions), variables, w
            )
            sam.on_adversarial_pass(
                g_unscaled,
                sam_optimizers.unscale_gradients(optimizer, g_adv),
                variables,
            )
            if common.has_loss_scaling(optimizer):
                # A non-finite clean pass hands its own gradient on, so that
                # the LossScaleOptimizer skips the step even if eps happened
                # to be finite.
                g_adv = common.select(
                    common.all_finite(g_unscaled), g_adv, g_clean
                )
            return [g_adv[i] for i in present]

        if sam.sam_every == 1:
            chosen = adversarial_grads()
        else:
            chosen = tf.cond(
                sam.should_perturb(),
                adversarial_grads,
                lambda: [g_clean[i] for i in present],
            )
        final = [None] * len(g_clean)
        for i, g in zip(present, chosen):
            final[i] = g
        # With loss scaling, the LossScaleOptimizer skips a non-finite step
        # (weights and state untouched); without it, as in plain Keras.
        optimizer.apply(_agree_on_finite(optimizer, final), variables)

    logs = model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
    for key, value in sam.log_values().items():
        logs[key] = tf.identity(value)
    return logs


# ---------------------------------------------------------------------------
# Hessian-vector products (keras_sam.sharpness). `fn(values, *args)` is a
# scalar function of a list of tensors; nothing here touches a variable.


def _zeros_for_none(tensors, like):
    return [tf.zeros_like(w) if t is None else t for t, w in zip(tensors, like)]


def value_and_grad(fn, values, *args):
    """`(fn(values, *args), grad fn)` with respect to the list `values`."""
    values = [tf.convert_to_tensor(w) for w in values]
    with tf.GradientTape() as tape:
        tape.watch(values)
        loss = fn(values, *args)
    return loss, _zeros_for_none(tape.gradient(loss, values), values)


def hvp(fn, values, vectors, *args):
    """H v, the Hessian of `fn(values, *args)` at `values` times `vectors`.

    Reverse over reverse with nested tapes: the inner tape gives
    `g = grad fn`, the outer one differentiates `g . v`.
    """
    values = [tf.convert_to_tensor(w) for w in values]
    with tf.GradientTape() as outer:
        outer.watch(values)
        with tf.GradientTape() as inner:
            inner.watch(values)
            loss = fn(values, *args)
        grads = _zeros_for_none(inner.gradient(loss, values), values)
        g_dot_v = tf.add_n(
            [
                tf.reduce_sum(g * tf.cast(v, g.dtype))
                for g, v in zip(grads, vectors)
            ]
        )
    return _zeros_for_none(outer.gradient(g_dot_v, values), values)


def compile_function(fn, jit_compile=False):
    """`fn` traced once per input signature (`tf.function`) and reused.

    Python scalars in the arguments are part of the signature (a new value
    retraces); pass tensors for values that change between calls.
    `jit_compile=True` fuses with XLA: for vector algebra only (a model's
    graph is slower under XLA on CPU and may hold ops XLA lacks).
    """
    return tf.function(fn, reduce_retracing=True, jit_compile=jit_compile)


def on_accelerator():
    """Whether TensorFlow places computations on a GPU or TPU."""
    return bool(
        tf.config.list_logical_devices("GPU")
        or tf.config.list_logical_devices("TPU")
    )
