"""The two-pass sharpness-aware train step on PyTorch (backward())."""

import keras
import torch

from keras_sam import optimizers as sam_optimizers
from keras_sam.backend import _common as common


def _loss_and_grads(model, x, y, sample_weight, variables, training=True):
    """One forward/backward pass at the current weights.

    With `training=True` the loss is scaled for the gradient (mixed
    precision); the returned loss is unscaled either way.
    """
    model.zero_grad()
    y_pred = model(x, training=training)
    loss = model.compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
    )
    scaled_loss = model.optimizer.scale_loss(loss) if training else loss
    scaled_loss.backward()
    grads = [v.value.grad for v in variables]
    model.zero_grad()
    return loss.detach(), y_pred, grads


def _snapshot(variables):
    return [v.value.detach().clone() for v in variables]


def _rng_state():
    """torch's global generators: Keras' torch dropout draws from them when
    the layer has no seed, so they are part of the step's random state."""
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return torch.get_rng_state(), cuda


def _set_rng_state(state):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _assign(variables, values):
    for v, value in zip(variables, values):
        if value is not None:
            v.assign(value)


def _batch_size(x):
    return next(t for t in keras.tree.flatten(x) if t is not None).shape[0]


def _auxiliary(model, sam, variables):
    """Loss and gradient of the optimizer's auxiliary batches at w; zeros,
    without running the passes, when `sam.auxiliary_due()` is false."""
    batches = sam.auxiliary_batches()
    if not bool(sam.auxiliary_due()):
        zeros = [torch.zeros_like(v.value) for v in variables]
        return [(torch.zeros(()), zeros) for _ in batches]
    results = []
    for ax, ay, aw in batches:
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
    optimizer = model.optimizer
    variables = model.trainable_variables
    states = model.non_trainable_variables
    parts = common.split_batch(
        x, y, sample_weight, sam.num_batch_splits, _batch_size(x)
    )
    fractions = [fraction for _, fraction in parts]

    with sam.sharpness_aware_step():
        # Clean passes: metrics and BatchNorm statistics come from here only.
        states_before, losses, y_preds, grads = [], [], [], []
        for (px, py, pw), _ in parts:
            states_before.append((_snapshot(states), _rng_state()))
            loss, y_pred, g = _loss_and_grads(model, px, py, pw, variables)
            losses.append([loss])
            y_preds.append(y_pred)
            grads.append(g)
        with torch.no_grad():
            (loss,) = common.combine(losses, fractions)
            if len(y_preds) == 1:
                y_pred = y_preds[0]
            else:
                y_pred = keras.tree.map_structure(
                    lambda *t: torch.cat(t, dim=0), *y_preds
                )
            g_clean = common.combine(grads, fractions)
        model.loss_metric().update_state(loss, sample_weight=_batch_size(x))
        auxiliary = _auxiliary(model, sam, variables)
        with torch.no_grad():
            unscaled = [
                sam_optimizers.unscale_gradients(optimizer, g) for g in grads
            ]
            g_unscaled = common.combine(unscaled, fractions)
            sam.on_clean_pass(loss, g_unscaled, variables, auxiliary)
            perturb = sam.sam_every == 1 or bool(sam.should_perturb())
        final = g_clean
        if perturb:
            with torch.no_grad():
                states_after = _snapshot(states)
                rng_after = _rng_state()
                w = _snapshot(variables)
            g_adv = []
            try:
                for ((px, py, pw), _), g, before in zip(
                    parts, unscaled, states_before
                ):
                    # Ascend to w + eps_j; rerun with the clean pass's random
                    # state so that dropout draws the same masks.
                    with torch.no_grad():
                        _assign(
                            variables, sam.perturbed_values(g, variables, w)
                        )
                        _assign(states, before[0])
                        _set_rng_state(before[1])
                    g_adv.append(
                        _loss_and_grads(model, px, py, pw, variables)[2]
                    )
            finally:
                # Restore w and the clean passes' BatchNorm statistics, even
                # if an adversarial pass raised.
                with torch.no_grad():
                    _assign(variables, w)
                    _assign(states, states_after)
                    _set_rng_state(rng_after)
            with torch.no_grad():
                g_adv = sam.pull_back(
                    common.combine(g_adv, fractions), variables, w
                )
                sam.on_adversarial_pass(
                    g_unscaled,
                    sam_optimizers.unscale_gradients(optimizer, g_adv),
                    variables,
                )
                final = g_adv
                if common.has_loss_scaling(optimizer):
                    # A non-finite clean pass hands its own gradient on, so
                    # that the LossScaleOptimizer skips the step even if eps
                    # happened to be finite.
                    final = common.select(
                        common.all_finite(g_unscaled), g_adv, g_clean
                    )

        with torch.no_grad():
            # With loss scaling, the LossScaleOptimizer skips a non-finite
            # step (weights and state untouched); without it, as in Keras.
            optimizer.apply(final, variables)

    logs = model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
    with torch.no_grad():
        for key, value in sam.log_values().items():
            logs[key] = keras.ops.convert_to_tensor(value).detach().clone()
    return logs


# ---------------------------------------------------------------------------
# Hessian-vector products (keras_sam.sharpness). `fn(values, *args)` is a
# scalar function of a list of tensors; nothing here touches a variable.


def _leaves(values):
    """Detached views of `values` (the same storage, no copy: nothing here
    writes to it) that autograd differentiates against."""
    return [torch.as_tensor(w).detach().requires_grad_(True) for w in values]


def _zeros_for_none(tensors, like):
    return [
        torch.zeros_like(w) if t is None else t.detach()
        for t, w in zip(tensors, like)
    ]


def value_and_grad(fn, values, *args):
    """`(fn(values, *args), grad fn)` with respect to the list `values`."""
    with torch.enable_grad():
        values = _leaves(values)
        loss = fn(values, *args)
        grads = torch.autograd.grad(loss, values, allow_unused=True)
    return loss.detach(), _zeros_for_none(grads, values)


def hvp(fn, values, vectors, *args):
    """H v, the Hessian of `fn(values, *args)` at `values` times `vectors`.

    Double backward: `g = grad fn` is built with `create_graph=True`, then
    `g . v` is differentiated once more.
    """
    with torch.enable_grad():
        values = _leaves(values)
        loss = fn(values, *args)
        grads = torch.autograd.grad(
            loss, values, create_graph=True, allow_unused=True
        )
        terms = [
            torch.vdot(
                g.reshape(-1), torch.as_tensor(v, dtype=g.dtype).reshape(-1)
            )
            for g, v in zip(grads, vectors)
            if g is not None and g.requires_grad
        ]
        if not terms:
            # The gradient does not depend on the values: H = 0.
            return [torch.zeros_like(w) for w in values]
        hv = torch.autograd.grad(sum(terms), values, allow_unused=True)
    return _zeros_for_none(hv, values)


def compile_function(fn, jit_compile=False):
    """`fn` itself: torch runs eagerly, as Keras' torch backend does
    without `jit_compile` (`jit_compile` is accepted and ignored)."""
    return fn


def on_accelerator():
    """Whether Keras' torch backend computes on a GPU (it picks CUDA, then
    MPS, when available)."""
    return torch.cuda.is_available() or torch.backends.mps.is_available()
