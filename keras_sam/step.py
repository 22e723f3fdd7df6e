"""The sharpness-aware step, written once for every backend (DESIGN 2).

```
g     = grad L_B(w)          # clean pass, training=True: metrics and
                             # BatchNorm statistics come from it
eps   = rho * xi / ||xi||_D  # xi = P_w(D^-1 g), the optimizer's formula
g_adv = grad L_B(w + eps)    # adversarial pass from the same random state;
                             # its state updates are dropped
w     = inner update(w, g_adv)
```

Everything is a function of values: the weights, the model's other state,
the optimizer's variables and the metrics' variables are read once into a
`StepState`, the passes run `model` in a `keras.StatelessScope` over them
(so `w + eps` is a value handed to the forward pass, never assigned), the
optimizer's hooks (learned radius, Fisher metric) compute their new
variables the same way, and one commit at the end writes the result:

- TensorFlow and torch: assign the model's state, the metrics and the
  sharpness-aware optimizer's own variables, then `optimizer.apply`.
- JAX: `optimizer.stateless_apply` and the new state is returned.

An exception anywhere before the commit leaves every variable as it was.

Non-finite values. With loss scaling (a `LossScaleOptimizer`), a
non-finite clean or adversarial gradient makes the loss-scale optimizer
skip the step and lower its scale. Without it, a non-finite clean pass is
applied as plain Keras would, while a non-finite adversarial pass after a
finite clean one skips the update: weights, optimizer slots and iteration
count stay as they were, as a loss-scale optimizer would leave them
(falling back to the clean gradient instead would keep it alive through
the second pass: a copy of the weights). Either way the optimizer's own
statistics (Fisher EMA, learned-radius state) never absorb a non-finite
pass, and `logs["adv_nonfinite"]` counts the steps whose adversarial
gradient was non-finite.

Cheap variants (issue 16) are hooks on the same step: a schedule picks
two passes or one (on the host, where `SAMModel` compiles one program per
kind and `model.pass_kind` says which this one is; else a conditional
after the clean pass), `combine_gradients` turns `(g, g_adv)` into the
gradient to apply (GSAM), `one_pass_gradients` does the same for `g` on a
one-pass step (LookSAM), and `single_pass` optimizers (MomentumSAM)
perturb before their only pass (`_passes.single_pass_step`).

Only a gradient of a function of values (`backend.grad_and_aux`) and a
little glue (replica context, torch's random generators, no-grad, a
conditional stateful update) come from `keras_sam.backend`.
"""

import keras
from keras import ops

from keras_sam import _parallel_step
from keras_sam import _passes as passes
from keras_sam import _step_parts as parts
from keras_sam._passes import StepState
from keras_sam import backend
from keras_sam import optimizers as sam_optimizers


def _num_splits(sam):
    """Sub-batches with their own perturbation: `num_batch_splits` per
    replica, times the data-parallel replicas of a `keras.distribution`
    unless the perturbation is synchronized (or the step already runs once
    per replica)."""
    if sam.sync_perturbation or backend.in_replica():
        return sam.num_batch_splits
    return sam.num_batch_splits * parts.data_parallel_replicas()


def sharpness_aware_step(model, state, data):
    """One step as values: `(grads, new_state, loss, y_pred, update)`.

    `grads` is what the commit hands to `optimizer.apply` when `update`
    (a boolean scalar) holds; `new_state` has the clean pass's model and
    metric state and the hooks' new optimizer variables (the weights are
    still `state.trainable`).
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    sam, optimizer = model.sam_optimizer, model.optimizer
    variables, w = model.trainable_variables, state.trainable
    hooks = parts.Stateless(optimizer.variables)  # hooks run on the values
    batches = parts.split_batch((x, y, sample_weight), _num_splits(sam))
    fractions = [fraction for _, fraction in batches]
    if sam.single_pass:  # MomentumSAM: w + eps first, then the only pass
        return passes.single_pass_step(model, state, batches, hooks)

    def present(values):  # TensorFlow's cond takes no `None`
        return [values[i] for i in clean.present]

    def unscaled(g_j):  # the true gradient, for the norm and the hooks
        g_j, _ = hooks.run(
            state.optimizer,
            lambda: sam_optimizers.unscale_gradients(optimizer, g_j),
        )
        return backend.all_reduce(g_j) if sam.sync_perturbation else g_j

    # 1. g = grad L_B(w), the clean pass: its metrics and model state are
    #    kept. Sub-batch j starts from the state j-1 left; the state and
    #    random state before each are kept, for the second pass to replay.
    clean = passes.run(model, state, batches, [w] * len(batches))
    loss = parts.combine([[p.loss] for p in clean.parts], fractions)[0]
    g_parts = [unscaled(p.grads) for p in clean.parts]
    g = parts.combine(g_parts, fractions)
    # This replica's own clean gradient, for the hooks that combine it
    # with the adversarial one (`g` is the global one when synchronized).
    g_own = g
    if sam.sync_perturbation:
        g_own, _ = hooks.run(
            state.optimizer,
            lambda: sam_optimizers.unscale_gradients(
                optimizer, clean.gradient()
            ),
        )
    clean_finite = parts.all_finite(g)
    # The clean-pass hook (Fisher EMA, learned radius), kept if g is finite.
    auxiliary = passes.auxiliary(model, state, hooks)
    _, opt = hooks.run(
        state.optimizer,
        lambda: sam.on_clean_pass(loss, g, variables, auxiliary),
    )
    opt = parts.select(clean_finite, opt, state.optimizer)

    def two_pass(opt):
        # 2. ascend to w + eps_j and take g_adv there, from the clean pass's
        #    states and random states (the same dropout masks); the state
        #    changes of this pass are dropped.
        w_adv = [
            hooks.run(opt, lambda: sam.perturbed_values(g_j, variables, w))[0]
            for g_j in g_parts
        ]
        w_adv = [
            [a if a is not None else w_i for a, w_i in zip(wj, w)]
            for wj in w_adv
        ]
        adv = passes.run(
            model, state.replace(optimizer=opt), batches, w_adv, replay=clean
        )
        g_adv = parts.combine([p.grads for p in adv.parts], fractions)

        # 3. pull g_adv back to w; the hooks see it unscaled, and may
        #    combine it with g into the gradient to apply (GSAM).
        def pull_back():
            pulled = sam.pull_back(g_adv, variables, w)
            g_adv_true = sam_optimizers.unscale_gradients(optimizer, pulled)
            sam.on_adversarial_pass(g, g_adv_true, variables)
            g_use = sam.combine_gradients(g_own, g_adv_true, variables)
            if g_use is not None:
                pulled = sam_optimizers.scale_gradients(optimizer, g_use)
            return pulled, parts.all_finite(g_adv_true)

        (g_adv, adv_finite), new_opt = hooks.run(opt, pull_back)
        # Non-finite passes: skipped, counted, or poisoned for loss scaling.
        g_adv, new_opt, update = passes.settle(
            sam, optimizer, hooks, clean_finite, adv_finite, new_opt, opt, g_adv
        )
        return present(g_adv), new_opt, true if update is True else update

    def one_pass(opt):
        # A plain step: g, or the optimizer's one-pass gradient (LookSAM).
        def gradient():
            g_use = sam.one_pass_gradients(g_own, variables)
            if g_use is None:
                return clean.gradient()
            return sam_optimizers.scale_gradients(optimizer, g_use)

        return present(hooks.run(opt, gradient)[0]), opt, true

    # Two passes or one: fixed for this program when the host chose
    # (`SAMModel` compiles one program per kind), else decided here by
    # the schedule, whose statistics only absorb a finite g.
    kind = "two" if sam.schedule.always else model.pass_kind
    true = True if kind else ops.convert_to_tensor(True)
    if kind == "two":
        (g_use, opt, update), two = two_pass(opt), True
    elif kind == "one":
        (g_use, opt, update), two = one_pass(opt), False
    else:
        grad_sq = backend.all_reduce([parts.squared_norm(g_own)])[0]
        two, new_opt = hooks.run(opt, lambda: sam.should_perturb(grad_sq))
        opt = parts.select(clean_finite, new_opt, opt)
        g_use, opt, update = ops.cond(
            two, lambda: two_pass(opt), lambda: one_pass(opt)
        )
    _, opt = hooks.run(opt, lambda: sam.count_step(two))
    g_use = parts.fill(clean.present, g_use, len(w))
    g_use = passes.skip_unless_finite_everywhere(optimizer, g_use)
    new_state = StepState(w, clean.non_trainable, opt, clean.metrics)
    # Every replica skips the update when one does.
    return g_use, new_state, loss, clean.y_pred, backend.all_replicas(update)


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
    if sam_optimizers.has_loss_scaling(sam.inner_optimizer):
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
    """The step for `sam`: SAMPa's own, or the two-pass step (once per
    data-parallel replica of a `keras.distribution` when `per_replica`;
    `tf.distribute` runs the stateful step per replica itself)."""
    if sam.parallel_passes:
        return _parallel_step.sampa_step
    return _each_replica if per_replica else sharpness_aware_step


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
    model._symbolic_build(data_batch=data)
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
