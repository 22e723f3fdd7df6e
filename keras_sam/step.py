"""The sharpness-aware step, written once for every optimizer (DESIGN 2).

```
grad_at = GradientOracle(model, state, batch)   # keras_sam._oracle
g_use   = optimizer.gradient(grad_at, w)         # the rule, as its paper
commit(g_use)                                    # one commit, at the end
```

A sharpness-aware optimizer is a gradient rule (`keras_sam.optimizers.base`):
given the oracle, it answers with the gradient to apply. The oracle owns the
passes (stateless, on values; the kept pass and replays of its random
state; sub-batches; loss scaling), the rule runs on the optimizer's values
(what it assigns is its new state), and one commit at the end writes the
result:

- TensorFlow and torch: assign the model's state, the metrics and the
  sharpness-aware optimizer's own variables, then `optimizer.apply`.
- JAX: `optimizer.stateless_apply` and the new state is returned.

An exception anywhere before the commit leaves every variable as it was.

Non-finite values. With loss scaling (a `LossScaleOptimizer`), a
non-finite pass makes the loss-scale optimizer skip the step and lower its
scale. Without it, a non-finite kept (clean) pass is applied as plain Keras
would, while a non-finite other pass after a finite kept one skips the
update: weights, optimizer slots and iteration count stay as they were, as
a loss-scale optimizer would leave them. Either way the rule's own state
(Fisher EMA, learned radius, LookSAM's direction) never absorbs a
non-finite pass, and `logs["adv_nonfinite"]` counts the steps whose other
passes were non-finite.

Schedules that the host can decide (`Every`, `Random`, `LatePhase`) make
`SAMModel` compile a program per kind of step (`model.pass_kind`); others
(AE-SAM) decide here, after the clean pass.
"""

import keras
from keras import ops

from keras_sam import _keras_compat
from keras_sam import _step_parts as parts
from keras_sam import backend
from keras_sam._oracle import GradientOracle
from keras_sam._oracle import StepState
from keras_sam.optimizers.chain import has_loss_scaling


def sharpness_aware_step(model, state, data):
    """One step as values: `(grads, new_state, loss, y_pred, update)`.

    `grads` is what the commit hands to `optimizer.apply` when `update`
    (a boolean scalar) holds; `new_state` has the kept pass's model and
    metric state and the rule's new optimizer variables (the weights are
    still `state.trainable`).
    """
    sam, w = model.sam_optimizer, state.trainable
    batch = keras.utils.unpack_x_y_sample_weight(data)
    grad_at = GradientOracle(
        model, state, batch, _num_splits(sam), sam.sync_perturbation
    )
    rule = parts.Stateless(model.optimizer.variables)  # runs on the values

    def step(sharp, opt):
        # The rule: its gradient, and its state as values.
        grad_at.others_finite = []
        gradient = sam.gradient if sharp else sam.cheap_gradient
        g_use, new = rule.run(opt, lambda: gradient(grad_at, w))
        return _settle(model, grad_at, rule, g_use, new, opt, sharp)

    kind = "two" if sam.schedule.always else model.pass_kind
    if kind:
        g_use, opt, update = step(kind == "two", state.optimizer)
    else:  # decided here from the clean pass, whose statistics the
        # schedule absorbs only when it is finite
        g_sq = parts.squared_norm(grad_at(w))
        sharp, opt = rule.run(
            state.optimizer,
            lambda: sam.should_perturb(backend.all_reduce([g_sq])[0]),
        )
        opt = parts.select(grad_at.kept_finite, opt, state.optimizer)
        present = parts.present(grad_at.kept.parts[0].grads)

        def branch(sharp):
            g_use, opt_, update = step(sharp, opt)
            return [g_use[i] for i in present], opt_, _tensor(update)

        g_use, opt, update = ops.cond(
            sharp, lambda: branch(True), lambda: branch(False)
        )
        g_use = parts.fill(present, g_use, len(w))
    kept = grad_at.kept
    new_state = StepState(w, kept.non_trainable, opt, kept.metrics)
    # Every replica skips the update when one does.
    return (
        g_use,
        new_state,
        kept.loss,
        kept.y_pred,
        backend.all_replicas(update),
    )


def _settle(model, grad_at, rule, g_use, new, old, sharp):
    """`(scaled gradient, optimizer values, update)` after the rule.

    The rule's new state is kept only where every pass was finite; a
    non-finite other pass after a finite kept one is counted and, without
    loss scaling, skips the update; with loss scaling any non-finite pass
    poisons the gradient, so the loss-scale optimizer skips the step.
    """
    sam, optimizer = model.sam_optimizer, model.optimizer
    g_use = grad_at.scaled(g_use)
    update, adv_nonfinite = True, None
    if not grad_at.others_finite:  # one pass: its statistics if finite
        new = parts.select(grad_at.kept_finite, new, old)
    else:
        kept, others = grad_at.kept_finite, grad_at.others_are_finite()
        both = ops.logical_and(kept, others)
        new = parts.select(both, new, old)
        adv_nonfinite = ops.logical_and(kept, ops.logical_not(others))
        if has_loss_scaling(optimizer):
            g_use = _poison(both, g_use)
        else:
            update = ops.logical_or(others, ops.logical_not(kept))
    _, new = rule.run(new, lambda: sam.count(sharp, adv_nonfinite))
    if has_loss_scaling(optimizer):
        # Every replica skips when one does (Keras' LossScaleOptimizer
        # checks the first replica's gradients only).
        g_use = _poison(backend.all_replicas(parts.all_finite(g_use)), g_use)
    return g_use, new, update


def _poison(flag, grads):
    """`grads` where `flag` holds, NaN elsewhere."""
    return [
        None if t is None else ops.where(flag, t, float("nan")) for t in grads
    ]


def _tensor(flag):
    return ops.convert_to_tensor(flag)


def _num_splits(sam):
    """Sub-batches with their own perturbation: `num_batch_splits` per
    replica, times the data-parallel replicas of a `keras.distribution`
    unless the perturbation is synchronized (or the step already runs once
    per replica)."""
    if sam.sync_perturbation or backend.in_replica():
        return sam.num_batch_splits
    return sam.num_batch_splits * parts.data_parallel_replicas()


# ---------------------------------------------------------------------------
# Entry points: Keras calls `train_step(data)` on TensorFlow and torch and
# `train_step(state, data)` on JAX; both run the step above, then commit.


def train_step(model, *args):
    """`SAMModel.train_step`: the step, then its one commit."""
    if len(args) == 2:
        return _stateless_train_step(model, *args)
    return _stateful_train_step(model, *args)


def _stateful_train_step(model, data):
    sam = _prepare(model, data)
    optimizer = model.optimizer
    state = StepState(
        backend.read(model.trainable_variables),
        backend.read(model.non_trainable_variables),
        backend.read(optimizer.variables),
        backend.read(model.metrics_variables),
    )
    with sam.sharpness_aware_step():
        grads, new, loss, y_pred, update = _step_of(sam)(model, state, data)
        logs, metrics = _metrics(model, new.metrics, loss, data, y_pred)
        logs.update(_log_values(model, new.optimizer))
        # The commit: nothing was assigned before this point.
        with backend.no_grad():
            _assign(model.non_trainable_variables, new.non_trainable)
            _assign(model.metrics_variables, metrics)
            own = {id(v) for v in sam.own_variables}
            _assign(
                [v for v in optimizer.variables if id(v) in own],
                [
                    value
                    for v, value in zip(optimizer.variables, new.optimizer)
                    if id(v) in own
                ],
            )
            backend.apply_if(
                update, optimizer.apply, grads, model.trainable_variables
            )
    return logs


def _stateless_train_step(model, state, data):
    sam = _prepare(model, data)
    if has_loss_scaling(sam.inner_optimizer):
        # Its stateful apply cannot run inside a stateless step.
        raise ValueError(
            "With a stateless step (JAX), wrap the sharpness-aware optimizer "
            "in the LossScaleOptimizer, not its inner optimizer: "
            "`LossScaleOptimizer(SAM(inner))`, which is what `compile` does "
            "under the 'mixed_float16' policy. Received: "
            f"{sam.__class__.__name__}(LossScaleOptimizer(...))"
        )
    state = StepState(*(list(values) for values in state))
    with sam.sharpness_aware_step():
        step = _step_of(sam, per_replica=True)
        grads, new, loss, y_pred, update = step(model, state, data)

        w, opt = model.optimizer.stateless_apply(
            new.optimizer, grads, new.trainable
        )
        if update is not True:
            # A skipped update keeps the old values: selected elementwise,
            # which XLA fuses into the update itself (a conditional around
            # the update would not fuse, and costs time).
            w = parts.select(update, w, new.trainable)
            opt = parts.select(update, opt, new.optimizer)
    logs, metrics = _metrics(model, new.metrics, loss, data, y_pred)
    logs.update(_log_values(model, opt))
    return logs, (w, new.non_trainable, opt, metrics)


def _step_of(sam, per_replica=False):
    """The step, once per data-parallel replica of a `keras.distribution`
    when `per_replica` unless the rule spreads its passes over the devices
    itself (SAMPa); `tf.distribute` runs the stateful step per replica
    itself."""
    if per_replica and not sam.parallel_passes:
        return _each_replica
    return sharpness_aware_step


def _each_replica(model, state, data):
    """`sharpness_aware_step` once per data-parallel replica of a
    `keras.distribution.DataParallel`, each on its own part of the batch
    and its own device; then the gradients and changed state are averaged
    (metric updates summed). Without one, the step on the whole batch."""
    mapped = []

    def step(values, data):  # the state as lists: a JAX pytree
        grads, new, loss, y_pred, update = sharpness_aware_step(
            model, StepState(*values), data
        )
        mapped.append((backend.in_replica(), update is True))
        if not mapped[0][0]:
            return (grads, new, loss, update), new.metrics, y_pred
        # Only what the step changed crosses devices (`None` elsewhere).
        non_trainable = parts.changed(new.non_trainable, state.non_trainable)
        optimizer = parts.changed(new.optimizer, state.optimizer)
        metrics = [
            None if m is None else ops.subtract(m, old)
            for m, old in zip(
                parts.changed(new.metrics, state.metrics), state.metrics
            )
        ]
        flag = ops.convert_to_tensor(update)
        return (grads, non_trainable, optimizer, loss, flag), metrics, y_pred

    means, sums, y_pred = backend.per_replica(
        step,
        (state.trainable, state.non_trainable, state.optimizer, state.metrics),
        data,
    )
    in_replica, static_update = mapped[0]
    if not in_replica:
        return means[:3] + (y_pred, means[3])
    grads, non_trainable, optimizer, loss, update = means
    new = StepState(
        state.trainable,
        parts.unchanged_from(non_trainable, state.non_trainable),
        parts.unchanged_from(optimizer, state.optimizer),
        [
            old if delta is None else ops.add(old, delta)
            for delta, old in zip(sums, state.metrics)
        ],
    )
    return grads, new, loss, y_pred, True if static_update else update


def _prepare(model, data):
    """The compiled SAM optimizer, with every variable the step reads built
    (TensorFlow defers building to the first trace)."""
    sam = model.sam_optimizer
    if sam is None:
        raise ValueError(
            "SAMModel must be compiled before training. Call "
            "`model.compile(optimizer=..., loss=...)` first."
        )
    # Keras' own symbolic build (a no-op once everything exists) creates
    # the model's, the compiled loss's and metrics' and the optimizer's
    # variables, which the step reads as values before running anything.
    _keras_compat.symbolic_build(model, data)
    if sam.radius is not None:  # its validation data against the model
        _, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        sam.radius.check_model(model, y)
    return sam


def _metrics(model, metrics, loss, data, y_pred):
    """`(logs, new metric values)`: the loss tracker and compiled metrics
    updated from the clean pass."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)

    def update():
        model.loss_metric().update_state(
            backend.unscale_loss_for_distribution(loss),
            sample_weight=parts.batch_size(x),
        )
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    return parts.Stateless(model.metrics_variables).run(metrics, update)


def _log_values(model, optimizer_values):
    """The optimizer's scalars for `logs` (rho, counters), as copies."""
    sam = model.sam_optimizer
    logs, _ = parts.Stateless(model.optimizer.variables).run(
        optimizer_values,
        lambda: {
            key: ops.copy(ops.convert_to_tensor(value))
            for key, value in sam.log_values().items()
        },
    )
    return logs


def _assign(variables, values):
    for variable, value in zip(variables, values):
        variable.assign(value)
