"""The forward/backward passes of the step, on values (keras_sam.step).

A pass runs `model` and its `compute_loss` inside one `keras.StatelessScope`
over a `StepState` of values and differentiates the loss with respect to
the trainable values (`backend.grad_and_aux`): nothing is assigned.
"""

from keras import ops

from keras_sam import _step_parts as parts
from keras_sam import backend
from keras_sam.optimizers import chain


class StepState:
    """Values of every variable the step reads, in the model's orders."""

    __slots__ = ("trainable", "non_trainable", "optimizer", "metrics")

    def __init__(self, trainable, non_trainable, optimizer, metrics):
        self.trainable = list(trainable)
        self.non_trainable = list(non_trainable)
        self.optimizer = list(optimizer)
        self.metrics = list(metrics)

    def replace(self, **changes):
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return StepState(**values)


def loss_fn(model, state, batch, training, scale=None):
    """`(scaled loss, (loss, y_pred, new non-trainable, new metrics))` of
    `model` at `state.trainable` on `batch`, assigning nothing. The loss is
    scaled when `scale` (default: `training`) holds."""
    x, y, sample_weight = batch
    mapping = parts.Stateless(
        model.trainable_variables
        + model.non_trainable_variables
        + model.metrics_variables
        + model.optimizer.variables,
        collect_losses=True,
    )

    def forward():
        y_pred = model(x, training=training)
        loss = model.compute_loss(
            x=x,
            y=y,
            y_pred=y_pred,
            sample_weight=sample_weight,
            training=training,
        )
        scaled = (
            model.optimizer.scale_loss(loss)
            if (training if scale is None else scale)
            else loss
        )
        return scaled, loss, y_pred

    (scaled, loss, y_pred), values = mapping.run(
        state.trainable + state.non_trainable + state.metrics + state.optimizer,
        forward,
    )
    start = len(state.trainable)
    middle = start + len(state.non_trainable)
    end = middle + len(state.metrics)
    return scaled, (loss, y_pred, values[start:middle], values[middle:end])


def grad(model, state, batch, training=True, scale=None):
    """`(loss, y_pred, non_trainable, metrics), grads` at `state`."""

    def fn(w):
        return loss_fn(
            model, state.replace(trainable=w), batch, training, scale
        )

    (_, aux), grads = backend.grad_and_aux(fn, state.trainable)
    return aux, grads


class Pass:
    """One forward/backward pass on a sub-batch: loss, y_pred, grads."""

    def __init__(self, loss, y_pred, grads):
        self.loss, self.y_pred, self.grads = loss, y_pred, grads


class Passes:
    """The passes of one kind (clean or adversarial) over the sub-batches,
    with the model state and random state before each (for replay)."""

    def __init__(self, batches):
        self.batches = batches
        self.fractions = [fraction for _, fraction in batches]
        self.parts, self.before = [], []
        self.non_trainable = self.metrics = self.after = None

    @property
    def present(self):
        return parts.present(self.parts[0].grads)

    @property
    def y_pred(self):
        return parts.concat([p.y_pred for p in self.parts])

    def gradient(self):
        return parts.combine([p.grads for p in self.parts], self.fractions)


def run(model, state, batches, weights, replay=None):
    """Forward/backward passes at `weights[j]` on each sub-batch j.

    Without `replay`, sub-batch j starts from the model state that j-1
    left and the state changes are kept (the clean pass). With it, each
    starts from the state and random state `replay` had before it, and the
    state changes are dropped.
    """
    passes = Passes(batches)
    non_trainable, metrics = state.non_trainable, state.metrics
    for j, ((batch, _), w_j) in enumerate(zip(batches, weights)):
        if replay is None:
            passes.before.append((non_trainable, backend.random_state()))
        else:
            non_trainable = replay.before[j][0]
            backend.set_random_state(replay.before[j][1])
        aux, grads = grad(
            model,
            state.replace(
                trainable=w_j, non_trainable=non_trainable, metrics=metrics
            ),
            batch,
        )
        loss, y_pred, new_non_trainable, new_metrics = aux
        passes.parts.append(Pass(loss, y_pred, grads))
        if replay is None:
            non_trainable, metrics = new_non_trainable, new_metrics
    if replay is None:
        passes.after = backend.random_state()
    else:
        backend.set_random_state(replay.after)
    passes.non_trainable, passes.metrics = non_trainable, metrics
    return passes


def poison(flag, grads):
    """`grads` where `flag` holds, NaN elsewhere (a loss-scale optimizer
    then skips the step)."""
    return [
        None if t is None else ops.where(flag, t, float("nan")) for t in grads
    ]


def settle(sam, optimizer, hooks, first_finite, adv_finite, new, old, grads):
    """`(grads, optimizer values, update)` for a step whose adversarial
    gradient depends on a first one (SAM's clean gradient, SAMPa's
    auxiliary one), given whether each is finite.

    The hooks' new optimizer values `new` are kept only if both are;
    a non-finite adversarial gradient after a finite first one is counted
    (`logs["adv_nonfinite"]`). Without loss scaling that case skips the
    update, and a non-finite first gradient reaches the weights as in plain
    Keras; with loss scaling either one poisons `grads`, so the loss-scale
    optimizer skips the step.
    """
    both = ops.logical_and(first_finite, adv_finite)
    new = parts.select(both, new, old)
    _, new = hooks.run(
        new,
        lambda: sam.count_nonfinite(
            ops.logical_and(first_finite, ops.logical_not(adv_finite))
        ),
    )
    if chain.has_loss_scaling(optimizer):
        return poison(both, grads), new, True
    return grads, new, ops.logical_or(adv_finite, ops.logical_not(first_finite))


def skip_unless_finite_everywhere(optimizer, grads):
    """Under loss scaling, `grads` poisoned on every replica when one has a
    non-finite value (Keras' LossScaleOptimizer checks the first replica's
    gradients only); else `grads`."""
    if not chain.has_loss_scaling(optimizer):
        return grads
    return poison(backend.all_replicas(parts.all_finite(grads)), grads)


def auxiliary(model, state, hooks):
    """`[(loss, grads)]` of the optimizer's auxiliary batches at w
    (unscaled; in training mode, its state updates dropped, when
    `sam.auxiliary_training()`, else in inference mode), or zeros without
    running them when the optimizer says they are not due."""
    sam = model.sam_optimizer
    training = bool(sam.auxiliary_training())
    (batches, due), _ = hooks.run(
        state.optimizer, lambda: (sam.auxiliary_batches(), sam.auxiliary_due())
    )
    w = state.trainable

    def at_w():
        results = []
        for batch in batches:
            (loss, _, _, _), grads = grad(
                model, state, batch, training=training, scale=False
            )
            results.append(
                (ops.cast(loss, "float32"), parts.zeros_for_none(grads, w))
            )
        return results

    def zeros():
        return [
            (ops.zeros((), "float32"), [ops.zeros_like(v) for v in w])
            for _ in batches
        ]

    if not batches or due is True:
        return at_w()
    return ops.cond(due, at_w, zeros)


def single_pass_step(model, state, batches, hooks):
    """A step of one pass at `w + eps`, eps computed before the pass from
    the optimizer's state (MomentumSAM): `(grads, new_state, loss, y_pred,
    update)` as `keras_sam.step.sharpness_aware_step` returns them.

    The pass's loss, metrics and model state are kept (there is no other
    pass); `g(w + eps)` is applied at `w`.
    """
    sam, optimizer = model.sam_optimizer, model.optimizer
    variables, w = model.trainable_variables, state.trainable
    w_adv, _ = hooks.run(
        state.optimizer, lambda: sam.perturbed_values(None, variables, w)
    )
    w_adv = [a if a is not None else w_i for a, w_i in zip(w_adv, w)]
    passes = run(model, state, batches, [w_adv] * len(batches))
    loss = parts.combine([[p.loss] for p in passes.parts], passes.fractions)
    _, opt = hooks.run(state.optimizer, lambda: sam.count_step(False))
    g = passes.gradient()
    if chain.has_loss_scaling(optimizer):
        # Every replica skips when one does.
        g = poison(backend.all_replicas(parts.all_finite(g)), g)
    new_state = state.replace(
        non_trainable=passes.non_trainable,
        optimizer=opt,
        metrics=passes.metrics,
    )
    return g, new_state, loss[0], passes.y_pred, True
