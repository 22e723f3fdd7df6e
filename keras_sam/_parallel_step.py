"""The step of `SAMPa`: two independent gradients, at once where possible.

```
w_adv, y = points(w, g_y)           # from the state alone
g_adv    = grad L_B'(w_adv)         } backend.in_parallel: two groups of
g_next   = grad L_B(y)              } devices at once, else in turn
g_use    = (1 - lam) g_adv + lam g_next;   g_y = g_next;   B' = B
```

B is the step's batch, B' the previous step's (kept in the optimizer, see
`SAMPa.adversarial_data`).

Same contract as `keras_sam.step.sharpness_aware_step`: values in, values
out, `(grads, new_state, loss, y_pred, update)`, nothing assigned. The pass
at `y` gives the loss, the metrics and the model state; both passes start
from the same model and random state (the same dropout masks).

Non-finite values follow the two-pass step: without loss scaling, a
non-finite `g_adv` with a finite `g_next` skips the update (weights and
optimizer state, `g_y` included, stay as they were) and is counted in
`logs["adv_nonfinite"]`; a non-finite `g_next` reaches the weights as a
plain step would, and is never kept as `g_y`. With loss scaling either one
non-finite skips the step.
"""

import keras
from keras import ops

from keras_sam import _passes as passes
from keras_sam import _step_parts as parts
from keras_sam import backend
from keras_sam import optimizers as sam_optimizers
from keras_sam._passes import StepState


def sampa_step(model, state, data):
    batch = keras.utils.unpack_x_y_sample_weight(data)
    sam, optimizer = model.sam_optimizer, model.optimizer
    variables, w = model.trainable_variables, state.trainable
    hooks = parts.Stateless(optimizer.variables)

    # 1. the two points and the adversarial batch, from what the step
    # starts from.
    (w_adv, w_next, (previous, keep_batch)), _ = hooks.run(
        state.optimizer,
        lambda: (*sam.points(variables, w), sam.adversarial_data(batch)),
    )

    def one_pass(shared, w_j, batch):
        non_trainable, metrics = shared
        (loss, y_pred, new_non_trainable, new_metrics), grads = passes.grad(
            model,
            state.replace(
                trainable=w_j, non_trainable=non_trainable, metrics=metrics
            ),
            batch,
        )
        deltas = [ops.subtract(n, o) for n, o in zip(new_metrics, metrics)]
        return (loss, grads, new_non_trainable), deltas, y_pred

    # 2. g_adv and g_next, independent of each other.
    random_state = backend.random_state()
    adv, after = backend.in_parallel(
        one_pass,
        (state.non_trainable, state.metrics),
        (w_adv, previous),
        (w_next, batch),
        between=lambda: backend.set_random_state(random_state),
    )
    (_, g_adv, _), _, _ = adv
    (loss, g_next, non_trainable), deltas, y_pred = after
    metrics = [ops.add(m, d) for m, d in zip(state.metrics, deltas)]

    # 3. the update's gradient; g_next is kept (unscaled) for the next step.
    def combine():
        g_adv_true = sam_optimizers.unscale_gradients(optimizer, g_adv)
        g_next_true = sam_optimizers.unscale_gradients(optimizer, g_next)
        # The same g_y on every replica (a replica context's sum).
        sam.keep(backend.all_reduce(g_next_true))
        keep_batch()
        sam.count_step(True)  # both gradients, every step
        finite = parts.all_finite(g_adv_true), parts.all_finite(g_next_true)
        return sam.combine(g_adv, g_next), finite

    (g_use, (adv_finite, next_finite)), opt = hooks.run(
        state.optimizer, combine
    )
    # Non-finite values as in the two-pass step, g_next in g's place.
    g_use, opt, update = passes.settle(
        sam,
        optimizer,
        hooks,
        next_finite,
        adv_finite,
        opt,
        state.optimizer,
        g_use,
    )
    g_use = passes.skip_unless_finite_everywhere(optimizer, g_use)
    new_state = StepState(w, non_trainable, opt, metrics)
    return g_use, new_state, loss, y_pred, backend.all_replicas(update)
