"""Optimizer state shaped like a training batch, for `SAMModel`.

A rule may keep state shaped like a training batch (SAMPa keeps the
previous batch on the device). Its buffers must exist before the train
function reads the optimizer's state, and before a saved state loads:
`SAMModel` notes the shapes of the batch Keras builds from (peeking the
epoch iterator as Keras does), builds the buffers in `make_train_function`,
and saves their shapes in its compile config.
"""

import contextlib
import warnings

import keras

from keras_sam import _keras_compat


class BatchState:
    """The `SAMModel` side of state shaped like a training batch."""

    def get_compile_config(self):
        config = super().get_compile_config()
        sam = self.sam_optimizer
        shapes = sam.batch_shapes() if sam is not None else []
        if config is not None and shapes:
            # The optimizer keeps a batch (SAMPa): its buffers must exist
            # before its saved state loads.
            config = dict(config)
            config["optimizer_batch"] = [
                [list(shape), dtype] for shape, dtype in shapes
            ]
        return config

    def compile_from_config(self, config):
        # `compile` is overridden, so Keras leaves restoring it to us; it
        # builds the optimizer when the model is built, so the saved state
        # loads.
        config = dict(config)
        shapes = config.pop("optimizer_batch", None)
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if shapes:
            self._batch_spec = tuple(
                keras.KerasTensor(tuple(shape), dtype=dtype)
                for shape, dtype in shapes
            )
            self._build_batch_state()

    def _wants_batch_spec(self):
        sam = self.sam_optimizer
        return sam is not None and sam.keeps_batch

    def _note_batch(self, iterator, data_batch):
        """Remembers the shapes of a batch about to be trained on (or
        evaluated: `fit` notes its own batch last, before it builds its
        train function), read from `iterator` if not given (Keras resets
        it afterwards). Returns the batch, for Keras' own build."""
        if not self._wants_batch_spec():
            return data_batch
        if data_batch is None and iterator is not None:
            data_batch = _first_batch(iterator)
        if data_batch is None:
            return None
        batch = keras.utils.unpack_x_y_sample_weight(data_batch)
        leaves = [t for t in keras.tree.flatten(batch) if t is not None]
        if all(None not in tuple(t.shape) for t in leaves):
            self._batch_spec = keras.tree.map_structure(
                lambda t: (
                    None
                    if t is None
                    else keras.KerasTensor(tuple(t.shape), dtype=t.dtype)
                ),
                batch,
            )
        elif not self.sam_optimizer.batch_shapes():
            warnings.warn(
                "SAMPa keeps the previous batch on the device, which needs "
                "the batch's shape before training, but this data's batch "
                "dimension is unknown (a `tf.data` pipeline batched without "
                "`drop_remainder=True`?): its steps take the adversarial "
                "gradient on their own batch, as "
                "`adversarial_batch='current'` would.",
                stacklevel=4,
            )
        return data_batch

    def _build_batch_state(self):
        """Builds the optimizer's buffers for a training batch from the
        batch noted last (`fit` and `train_on_batch` note their own), before
        the train function reads the state; rebuilds them when the batch
        has another shape. Returns whether they were (re)built."""
        spec = getattr(self, "_batch_spec", None)
        if spec is None or not self._wants_batch_spec():
            return False
        strategy = getattr(self, "distribute_strategy", None)
        scope = strategy.scope() if strategy is not None else None
        with scope or contextlib.nullcontext():
            return self.sam_optimizer.build_batch(spec)


def _first_batch(iterator):
    """The first batch of a Keras epoch iterator (as Keras' own symbolic
    build reads it; the trainer resets the iterator afterwards)."""
    for _, _, data in iterator:
        if isinstance(data, (list, tuple)):
            return data[0]
        return next(data)
    return None


_keras_compat.note_batch_before_build(
    BatchState,
    lambda model, iterator, data_batch: model._note_batch(iterator, data_batch),
)
