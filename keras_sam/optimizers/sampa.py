"""`SAMPa`: SAM whose two gradients of a step can run at the same time."""

import warnings

import keras
import numpy as np
from keras import ops

from keras_sam._keras_compat import replace_variable
from keras_sam._validation import check_choice
from keras_sam._validation import check_float
from keras_sam.optimizers.sam import SAM
from keras_sam.radius import LearnedRadius


@keras.saving.register_keras_serializable(package="keras_sam")
class SAMPa(SAM):
    """Sharpness-aware minimization, parallelized (SAMPa).

    SAM's adversarial gradient needs the clean gradient of the same step,
    so its two passes run one after the other. SAMPa perturbs with the
    gradient at an auxiliary point `y_t` computed in the previous step, so
    both gradients of a step depend only on what the step starts from:

    ```
    w_adv  = w_t + rho * g_y / (||g_y|| + 1e-12)    # g_y = grad L_B'(y_t)
    y_t+1  = w_t - lr * g_y                         # SGD: its momentum step
    g_adv  = grad L_B'(w_adv)       } independent: at once on two groups
    g_next = grad L_B(y_t+1)        } of devices, else one after the other
    w_t+1  = inner_optimizer.update(w_t, (1 - lam) g_adv + lam g_next)
    g_y    = g_next;  B' = B                        # kept for the next step
    ```

    B is the step's batch and B' the previous step's, so that, as in SAM,
    the perturbation and the adversarial gradient come from the same batch
    (the paper's code does this; `adversarial_batch="current"` takes both
    gradients on B instead, which measured weaker). The previous batch is
    kept on the device as optimizer state (saved with it, so a `.keras`
    resume continues exactly); the first step, and a step whose batch has
    another shape than the first one (a partial last batch), take the
    adversarial gradient on their own batch, and the step after it too.
    The kept batch follows each `fit`'s batch size (a warm-up `fit` of
    another size does not turn the rule off). The loss, metrics and
    BatchNorm statistics come from the pass at `y_t+1`, on B. On the first
    step `g_y = 0`, so `w_adv = w`.

    The auxiliary point is `w - lr g_y` with the inner optimizer's current
    learning rate (the paper's equation); with Keras' `SGD` it is where
    SGD's own update would move with `g_y`, its momentum and weight decay
    included, as in the paper's code. Computing it changes nothing.

    Under `keras.distribution.DataParallel` (JAX) with an even number of
    devices, the two gradients are computed at the same time on the two
    halves of the devices, each half data-parallel over the whole batch,
    as the paper runs them on two GPUs. Elsewhere (one device, TensorFlow,
    torch) they run one after the other, with the same result.

    Args:
        optimizer: The inner optimizer: a `keras.optimizers.Optimizer`
            instance or a name/config accepted by `keras.optimizers.get`.
            Defaults to `"sgd"`.
        rho: Float >= 0, the radius of the perturbation. Defaults to `0.1`.
        lam: Float in [0, 1], the weight of the gradient at the auxiliary
            point in the update. `rho=0` and `lam=0` give exactly the inner
            optimizer. Defaults to `0.2`.
        adversarial_batch: `"previous"` (the paper's code) or `"current"`:
            the batch of the adversarial gradient. Defaults to
            `"previous"`.
        name: String, the name of the optimizer. Defaults to `"sampa"`.

    Example:

    >>> optimizer = keras_sam.optimizers.SAMPa(
    ...     keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1, lam=0.2)

    References:
        - Xie, Pethick, Cevher, SAMPa: Sharpness-aware Minimization
          Parallelized, NeurIPS 2024.
    """

    # Its two passes are spread over the devices by `grad_at.pair`.
    parallel_passes = True

    def __init__(
        self,
        optimizer="sgd",
        rho=0.1,
        lam=0.2,
        adversarial_batch="previous",
        name=None,
    ):
        if isinstance(rho, LearnedRadius):
            raise TypeError(
                "`SAMPa` takes a float `rho`; a learned radius needs the "
                "clean and adversarial gradients of one point. Received: "
                f"rho={rho!r}"
            )
        lam = check_float("lam", lam, low=0.0, high=1.0, high_open=False)
        adversarial_batch = check_choice(
            "adversarial_batch", adversarial_batch, ("previous", "current")
        )
        super().__init__(optimizer, rho=rho, name=name)
        self.lam = lam
        self.adversarial_batch = adversarial_batch
        self.g_y = []
        # The previous batch (its arrays, `None`s left out) and whether it
        # holds one; built from the first training batch's shapes.
        self._batch = []
        self._has_batch = None

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        # g_y: the gradient at the auxiliary point of the previous step.
        self.g_y = [
            self.add_variable_from_reference(v, name="g_y") for v in var_list
        ]

    # ---- the previous batch: optimizer state shaped like a batch ----

    @property
    def keeps_batch(self):
        """Whether the step needs buffers of the training batch's shape."""
        return self.adversarial_batch == "previous"

    def build_batch(self, data):
        """Creates (or, for a batch of another shape, recreates in place)
        the buffers of the previous batch, shaped like `data`, a training
        batch `(x, y, sample_weight)` of tensors or specs. Returns whether
        anything was (re)built, so the train function must be rebuilt."""
        if not self.keeps_batch:
            return False
        leaves = _leaves(data)
        for leaf in leaves:
            dtype = keras.backend.standardize_dtype(leaf.dtype)
            shape = tuple(leaf.shape)
            if dtype == "string" or None in shape:
                raise ValueError(
                    "`SAMPa(adversarial_batch='previous')` keeps the "
                    "previous batch on the device, which needs numeric "
                    "arrays of known shape; pass "
                    "`adversarial_batch='current'` for this data. Received: "
                    f"a batch array of dtype {dtype} and shape {shape}"
                )
        specs = [
            (tuple(leaf.shape), _device_dtype(leaf.dtype)) for leaf in leaves
        ]
        if self._has_batch is None:
            # Assigned attributes: the optimizer tracks them as its
            # variables.
            with keras.name_scope(self.name, caller=self):
                self._has_batch = keras.Variable(
                    0, dtype="int32", trainable=False, name="has_batch"
                )
                self._batch = [
                    _buffer(shape, dtype, i)
                    for i, (shape, dtype) in enumerate(specs)
                ]
            return True
        if specs == self.batch_shapes():
            return False
        if len(specs) != len(self._batch):
            warnings.warn(
                "SAMPa keeps the previous batch, but this training batch "
                f"has {len(specs)} arrays where the kept one has "
                f"{len(self._batch)} (sample weights added or dropped?): "
                "its steps take the adversarial gradient on their own "
                "batch, as `adversarial_batch='current'` would.",
                stacklevel=2,
            )
            return False
        # Another batch size: new buffers in the old ones' places (the
        # optimizer's variables keep their order), nothing kept yet.
        with keras.name_scope(self.name, caller=self):
            for i, (shape, dtype) in enumerate(specs):
                new = _buffer(shape, dtype, i)
                replace_variable(self, self._batch[i], new)
                self._batch[i] = new
        self._has_batch.assign(0)
        return True

    def adversarial_data(self, data):
        """The batch of the adversarial pass, and `keep()` (to call inside
        the step) that stores `data` as the next step's previous batch.

        Shapes may be known only when the step runs (TensorFlow traces a
        batch dimension of `None`), so the choice between the kept batch
        and `data` is elementwise, on arrays of `data`'s shape.
        """
        if not self._batch:
            return data, lambda: None
        leaves = _leaves(data)
        same = _same_shapes(leaves, self._batch)
        if same is False:  # another structure or shape: its own batch
            return data, lambda: self._has_batch.assign(0)
        has = ops.greater(ops.convert_to_tensor(self._has_batch), 0)
        use = has if same is True else ops.logical_and(has, same)
        previous = [
            ops.where(use, _rows(ops.convert_to_tensor(b), _size(a)), a)
            for a, b in zip(leaves, self._batch)
        ]

        def keep():
            for variable, leaf in zip(self._batch, leaves):
                # A copy: JAX would hand back the input array itself.
                leaf = ops.copy(leaf)
                if same is not True:
                    leaf = ops.where(
                        same, _rows(leaf, variable.shape[0]), variable.value
                    )
                variable.assign(leaf)
            self._has_batch.assign(ops.cast(same, "int32"))

        return _with_leaves(data, previous), keep

    def batch_shapes(self):
        """`[(shape, dtype), ...]` of the kept batch's buffers (empty when
        none are built): what rebuilds them, in this order, before a saved
        state loads."""
        return [(tuple(v.shape), v.dtype) for v in self._batch]

    def points(self, trainable_variables, values):
        """`(w_adv, y)`: where the step's two gradients are taken."""
        if not self.built:
            self.build(list(trainable_variables))
        g_y = [ops.convert_to_tensor(g) for g in self.g_y]
        w_adv = self.perturbed_values(g_y, trainable_variables, values)
        return w_adv, self._auxiliary_point(values, g_y)

    def _auxiliary_point(self, values, g_y):
        """`y = w - lr g_y` (the paper's equation); with Keras' `SGD`, its
        momentum (Nesterov or not) and weight decay as its update would
        apply them (the paper's code). Nothing is assigned."""
        inner = self.inner_optimizer
        lr = ops.cast(inner.learning_rate, "float32")
        sgd = isinstance(inner, keras.optimizers.SGD)
        momentum = inner.momentum if sgd else 0.0
        points = []
        for i, (w, g) in enumerate(zip(values, g_y)):
            step = ops.multiply(-lr, ops.cast(g, "float32"))
            if momentum:
                m = ops.cast(inner.momentums[i], "float32")
                m_next = ops.add(ops.multiply(momentum, m), step)
                if inner.nesterov:
                    step = ops.add(step, ops.multiply(momentum, m_next))
                else:
                    step = m_next
            if sgd and inner.weight_decay:
                decay = ops.multiply(lr * inner.weight_decay, w)
                step = ops.subtract(step, ops.cast(decay, "float32"))
            points.append(ops.add(w, ops.cast(step, w.dtype)))
        return points

    def gradient(self, grad_at, w):
        """(1 - lam) g_adv + lam g_next, both gradients at once."""
        w_adv, y = self.points(grad_at.variables, w)
        previous, keep_batch = self.adversarial_data(grad_at.batch)
        g_adv, g_next = grad_at.pair(w_adv, y, first_batch=previous)
        # g_y for the next step (unscaled), the same on every replica.
        for variable, g in zip(self.g_y, grad_at.replica_mean(g_next)):
            if g is not None:
                variable.assign(ops.cast(g, variable.dtype))
        keep_batch()
        return [
            None if a is None else ops.add((1.0 - self.lam) * a, self.lam * b)
            for a, b in zip(g_adv, g_next)
        ]

    def get_config(self):
        config = super().get_config()
        for key in (
            "sam_every",
            "sync_perturbation",
            "num_batch_splits",
            "normalize",
            "schedule",
            "ascent_steps",
        ):
            config.pop(key, None)
        config["lam"] = self.lam
        config["adversarial_batch"] = self.adversarial_batch
        return config


def _buffer(shape, dtype, i):
    return keras.Variable(
        ops.zeros(shape, dtype), trainable=False, name=f"batch_{i}"
    )


def _leaves(data):
    """The arrays of a batch, in `keras.tree` order, without `None`s."""
    return [t for t in keras.tree.flatten(data) if t is not None]


def _device_dtype(dtype):
    """The dtype the backend gives an array of `dtype` (JAX without 64-bit
    mode holds int64 labels as int32)."""
    dtype = keras.backend.standardize_dtype(dtype)
    try:
        probe = np.zeros((0,), dtype)
    except TypeError:  # e.g. bfloat16: no numpy dtype, kept as is
        return dtype
    return keras.backend.standardize_dtype(ops.convert_to_tensor(probe).dtype)


def _same_shapes(leaves, buffers):
    """Whether the batch `leaves` has the buffers' shapes and dtypes: a
    Python bool, or a boolean tensor where a batch size is known only when
    the step runs."""
    if len(leaves) != len(buffers):
        return False
    same = True
    for leaf, buffer in zip(leaves, buffers):
        dtype = keras.backend.standardize_dtype(leaf.dtype)
        shape = tuple(leaf.shape)
        if (
            dtype != buffer.dtype
            or len(shape) != len(buffer.shape)
            or shape[1:] != tuple(buffer.shape[1:])
        ):
            return False
        if not shape or shape[0] == buffer.shape[0]:
            continue
        if shape[0] is not None:
            return False
        rows = ops.equal(ops.shape(leaf)[0], buffer.shape[0])
        same = rows if same is True else ops.logical_and(same, rows)
    return same


def _size(t):
    """The number of rows of `t` (a tensor where unknown when traced)."""
    if not t.shape or t.shape[0] is not None:
        return t.shape[0] if t.shape else None
    return ops.shape(t)[0]


def _rows(t, n):
    """`t` with `n` rows (its first rows, the last one repeated): the same
    array when it has `n` already; only used where the result is masked
    unless the sizes match."""
    if not t.shape or (isinstance(n, int) and t.shape[0] == n):
        return t
    size = ops.shape(t)[0]
    index = ops.minimum(ops.arange(n), ops.subtract(size, 1))
    return ops.take(t, index, axis=0)


def _with_leaves(data, leaves):
    """`data` with its arrays replaced by `leaves` (see `_leaves`)."""
    leaves = iter(leaves)
    return keras.tree.map_structure(
        lambda t: None if t is None else next(leaves), data
    )
