"""The gradient oracle: everything of a step that is not the algorithm.

A sharpness-aware optimizer is a gradient rule: the step hands it
`grad_at`, and it answers with the gradient to apply, written as its paper
writes it (`keras_sam.optimizers.base`):

```
g     = grad_at(w)                  # the first call is the kept pass
g_adv = grad_at(ascend)             # ascend(point_j, g_j) -> w_adv_j, for
                                    # each sub-batch from its own gradient
```

`grad_at` owns what the paper leaves out:

- passes on values: the model runs in a `keras.StatelessScope` over a
  `StepState`, so a perturbed point (of the trainable variables, and of
  non-trainable ones where a rule gives them) is handed to the forward
  pass, never assigned;
- the kept pass: the first call's loss, predictions, metrics and model
  state (BatchNorm statistics) are the step's; every later call starts
  from the model state and random state the first one started from (the
  same dropout masks) and its state changes are dropped;
- sub-batches (m-sharpness, `num_batch_splits`): each gets its own
  perturbation, and a call returns the gradients combined with weights
  `n_j / n`; with a synchronized perturbation the gradient a point is
  computed from is the replicas' mean;
- loss scaling: the rule sees true gradients; the commit scales back;
- finiteness: whether the kept pass and the other passes were finite.
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
        # The wrapped model, run as plain `fit` runs it on this backend.
        y_pred = backend.forward(model.model, x, training)
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


class GradientOracle:
    """`grad_at(point)`: the true gradient of the step's loss at `point`,
    this replica's own (what it adds to the update).

    Args:
        model: the `SAMModel`.
        state: the `StepState` the step starts from.
        batch: `(x, y, sample_weight)`.
        num_splits: sub-batches with their own perturbation.
        sync: whether a point is computed from the replicas' mean gradient.

    A point is a list of values, one per trainable variable (`None` keeps
    the variable at w), or a callable `ascend(point_j, g_j)` applied per
    sub-batch j to where that sub-batch's last pass was and its gradient
    there. `grad_at(point, non_trainable)` also runs the pass with other
    values of non-trainable variables (a list, one per
    `non_trainable_variables`, `None` keeps the state's value): a frozen
    kernel plus noise (Flat-LoRA). They are inputs of that pass only:
    those variables keep the values the step started from, and the
    pass's changes to the others (BatchNorm statistics) are kept as usual.
    """

    def __init__(self, model, state, batch, num_splits=1, sync=False):
        self.model, self.state, self.batch = model, state, batch
        self.variables = model.trainable_variables
        self.non_trainable_variables = model.non_trainable_variables
        self.sync = sync
        self.splits = parts.split_batch(batch, num_splits)
        self.fractions = [fraction for _, fraction in self.splits]
        self.kept = None  # the first call: its passes and random states
        self.kept_finite = None
        self.others_finite = []
        self._last = None  # per sub-batch: (point, gradient) of the last call
        self._scaled = {}  # id(true gradient) -> (it, the scaled one)
        self._clean = self._clean_last = self._clean_shared = None

    # ---- the oracle ----

    def __call__(self, point, non_trainable=None):
        w = self.state.trainable
        clean = point is w and non_trainable is None
        if clean and self._clean is not None:
            self._last = self._clean_last  # the pass at w has run already
            return self._clean
        points = [self._point(point, j) for j in range(len(self.splits))]
        first = self.kept is None
        passes = self._run(points, non_trainable)
        own = [self._unscaled(p.grads) for p in passes.parts]
        g = parts.combine(own, self.fractions)
        if first:
            # The clean gradient as every replica sees it: what points and
            # statistics are computed from, and whose finiteness counts.
            seen = [self.shared(g_j) for g_j in own] if self.sync else own
            shared = parts.combine(seen, self.fractions) if self.sync else g
            self.kept, self.kept_finite = passes, parts.all_finite(shared)
            self._last = [(p, g_j, True) for p, g_j in zip(points, seen)]
            if clean:
                self._clean, self._clean_last = g, self._last
                self._clean_shared = shared
        else:
            self.others_finite.append(parts.all_finite(g))
            self._last = [(p, g_j, False) for p, g_j in zip(points, own)]
        return g

    def pair(self, first, second, first_batch=None):
        """`(grad_at(first), grad_at(second))` for two independent points,
        at once on two groups of devices where `backend.in_parallel` can
        (SAMPa); the first on `first_batch` (default: the step's batch).
        The second pass is the kept one."""
        state = self.state

        def one_pass(shared, w_j, batch):
            non_trainable, metrics = shared
            (loss, y_pred, new_non_trainable, new_metrics), grads = grad(
                self.model,
                state.replace(
                    trainable=w_j, non_trainable=non_trainable, metrics=metrics
                ),
                batch,
            )
            deltas = [ops.subtract(n, o) for n, o in zip(new_metrics, metrics)]
            return (loss, grads, new_non_trainable), deltas, y_pred

        random_state = backend.random_state()
        adv, kept = backend.in_parallel(
            one_pass,
            (state.non_trainable, state.metrics),
            (first, self.batch if first_batch is None else first_batch),
            (second, self.batch),
            between=lambda: backend.set_random_state(random_state),
        )
        (_, g_first, _), _, _ = adv
        (loss, g_second, non_trainable), deltas, y_pred = kept
        metrics = [ops.add(m, d) for m, d in zip(state.metrics, deltas)]
        self.kept = _Kept(loss, y_pred, non_trainable, metrics)
        g_first, g_second = self._unscaled(g_first), self._unscaled(g_second)
        self.kept_finite = parts.all_finite(g_second)
        self.others_finite.append(parts.all_finite(g_first))
        return g_first, g_second

    def elsewhere(self, batches, training, due=True):
        """`[(loss, true gradient)]` at w on other batches (validation
        data), their state updates dropped; zeros, without running the
        passes, where `due` (a boolean tensor) does not hold."""
        w = self.state.trainable

        def at_w():
            results = []
            for batch in batches:
                (loss, _, _, _), grads = grad(
                    self.model, self.state, batch, training, scale=False
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

    def shared(self, g):
        """`g` as every replica sees it: the replicas' mean when the
        perturbation is synchronized (`grad_at` answers with this
        replica's own gradient, what it adds to the update). Perturbations
        and the rule's statistics come from the shared one."""
        if g is self._clean:
            return self._clean_shared
        return self.replica_mean(g) if self.sync else g

    def replica_mean(self, g):
        """The replicas' mean of `g` (itself outside a replica context)."""
        return backend.all_reduce(g)

    @property
    def loss(self):
        """The kept pass's loss."""
        return self.kept.loss

    # ---- for the commit ----

    def scaled(self, grads):
        """`grads` times the loss scale: what the optimizer chain applies.
        A gradient this oracle returned maps back to the one it unscaled."""
        out = [None if g is None else self._scaled.get(id(g)) for g in grads]
        out = [
            s[1] if s is not None and s[0] is g else None
            for s, g in zip(out, grads)
        ]
        missing = [
            i
            for i, (g, s) in enumerate(zip(grads, out))
            if g is not None and s is None
        ]
        if missing:
            rescaled = self._on_optimizer(
                chain.scale_gradients, [grads[i] for i in missing]
            )
            for i, s in zip(missing, rescaled):
                out[i] = s
        return out

    def others_are_finite(self):
        """Whether every pass but the kept one was finite (True if none)."""
        if not self.others_finite:
            return True
        return ops.all(ops.stack(self.others_finite))

    # ---- passes ----

    def _point(self, point, j):
        if not callable(point):
            return point
        last, g, synced = self._last[j]
        if not synced:
            g = self.shared(g)
        moved = point(last, g)
        return [m if m is not None else w for m, w in zip(moved, last)]

    def _run(self, points, given=None):
        """Passes at `points[j]` on each sub-batch j, with the non-trainable
        values `given` (`None` entries: the state's). The first call keeps
        its state changes (sub-batch j starts from the state j-1 left),
        except to the variables `given`, and records the state and random
        state before each sub-batch; a later call replays them and drops
        its changes."""
        given = given or [None] * len(self.state.non_trainable)
        passes = _Passes(self.splits)
        replay = self.kept
        state = self.state
        non_trainable, metrics = state.non_trainable, state.metrics
        for j, ((batch, _), w_j) in enumerate(zip(self.splits, points)):
            if replay is None:
                passes.before.append((non_trainable, backend.random_state()))
            else:
                non_trainable = replay.before[j][0]
                backend.set_random_state(replay.before[j][1])
            aux, grads = grad(
                self.model,
                state.replace(
                    trainable=w_j,
                    non_trainable=parts.unchanged_from(given, non_trainable),
                    metrics=metrics,
                ),
                batch,
            )
            loss, y_pred, new_non_trainable, new_metrics = aux
            passes.parts.append(_Pass(loss, y_pred, grads))
            if replay is None:  # a given value is never the new state
                non_trainable = [
                    old if value is not None else new
                    for new, old, value in zip(
                        new_non_trainable, non_trainable, given
                    )
                ]
                metrics = new_metrics
        if replay is None:
            passes.after = backend.random_state()
        else:
            backend.set_random_state(replay.after)
        passes.non_trainable, passes.metrics = non_trainable, metrics
        return passes

    def _unscaled(self, grads):
        unscaled = self._on_optimizer(chain.unscale_gradients, grads)
        for true, scaled in zip(unscaled, grads):
            if true is not None:  # kept alive: ids stay unique
                self._scaled[id(true)] = (true, scaled)
        return unscaled

    def _on_optimizer(self, fn, grads):
        """`fn(optimizer, grads)` reading the loss scale from the state."""
        optimizer = self.model.optimizer
        result, _ = parts.Stateless(optimizer.variables).run(
            self.state.optimizer, lambda: fn(optimizer, grads)
        )
        return result


class _Pass:
    """One forward/backward pass on a sub-batch: loss, y_pred, grads."""

    def __init__(self, loss, y_pred, grads):
        self.loss, self.y_pred, self.grads = loss, y_pred, grads


class _Passes:
    """One call's passes over the sub-batches, with the model state and
    random state before each (for replay)."""

    def __init__(self, splits):
        self.fractions = [fraction for _, fraction in splits]
        self.parts, self.before = [], []
        self.non_trainable = self.metrics = self.after = None

    @property
    def loss(self):
        return parts.combine([[p.loss] for p in self.parts], self.fractions)[0]

    @property
    def y_pred(self):
        return parts.concat([p.y_pred for p in self.parts])


class _Kept:
    """The kept pass of `GradientOracle.pair`."""

    def __init__(self, loss, y_pred, non_trainable, metrics):
        self.loss, self.y_pred = loss, y_pred
        self.non_trainable, self.metrics = non_trainable, metrics
