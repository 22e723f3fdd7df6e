"""Every use of a Keras-private member, in one place.

keras-sam uses public Keras API everywhere else. What Keras does not make
public, and the library needs, is named here once, each with a test in
`tests/test_keras_compat.py`, so a Keras upgrade that moves one of them
breaks here and in that test, not somewhere in a train step.
"""

import contextlib
import functools

import keras

# ---- optimizers ----


def own_variables(optimizer):
    """The variables an optimizer created itself (not its inner one's):
    `Optimizer._variables`."""
    return optimizer._variables


def replace_variable(optimizer, old, new):
    """Puts `new` in `old`'s place among the optimizer's own variables (so
    saved state keeps its order): `Optimizer._variables`."""
    variables = optimizer._variables
    index = next(i for i, v in enumerate(variables) if v is old)
    variables[index] = new


def variable_index(optimizer, variable):
    """The index of a trainable variable in the optimizer's slots:
    `Optimizer._get_variable_index`."""
    return optimizer._get_variable_index(variable)


def built_variables(optimizer):
    """The trainable variables the optimizer was built for:
    `Optimizer._trainable_variables`."""
    return optimizer._trainable_variables


def adam_first_moments(optimizer):
    """Adam's (and AdamW's) first moments, one per variable:
    `Adam._momentums`."""
    return optimizer._momentums


# ---- models and trainers ----


def all_layers(model):
    """Every layer inside `model` at any depth, including those a layer
    holds as attributes (keras-hub's attention projections):
    `Layer._flatten_layers`."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def call_without_scope(model, inputs, training):
    """`model.call` as Keras' JAX trainer runs a model (`Layer.stateless_call`
    calls `call` itself, not `__call__`): the model opens no autocast scope
    of its own, so a layer that opts out of autocasting (`Embedding`,
    whose reverse use ties an LM head) sees what it sees in plain `fit`;
    `training` is passed only where `call` takes it
    (`Layer._call_has_training_arg`)."""
    if model._call_has_training_arg:
        return model.call(inputs, training=training)
    return model.call(inputs)


def symbolic_build(model, data_batch):
    """Keras' own symbolic build of a model, its compiled loss and metrics
    and its optimizer from a batch (a no-op once they exist):
    `Trainer._symbolic_build`."""
    model._symbolic_build(data_batch=data_batch)


# The trainer methods that build from a training batch: the TensorFlow
# trainer's entry (`_maybe_symbolic_build`) and the others'
# (`_symbolic_build`).
SYMBOLIC_BUILDS = ("_symbolic_build", "_maybe_symbolic_build")


def note_batch_before_build(cls, note):
    """Makes `cls` (a `keras.Model` subclass) call `note(model, iterator,
    data_batch) -> data_batch` before Keras' symbolic builds."""

    def wrap(name):
        def build(self, iterator=None, data_batch=None):
            if name == "_symbolic_build" or not distribute_strategy(self):
                # Without a strategy TensorFlow builds nothing until the
                # step is traced (with one it calls `_symbolic_build`).
                data_batch = note(self, iterator, data_batch)
            return getattr(super(cls, self), name)(
                iterator=iterator, data_batch=data_batch
            )

        build.__name__ = name
        return build

    for name in SYMBOLIC_BUILDS:
        if hasattr(keras.Model, name):  # `_maybe_...`: TensorFlow only
            setattr(cls, name, wrap(name))
    return cls


def distribute_strategy(model):
    """The `tf.distribute` strategy a model was compiled under, or `None`:
    `Trainer._distribute_strategy`."""
    return getattr(model, "_distribute_strategy", None)


def compiled_loss(model):
    """A compiled model's loss container: `Trainer._compile_loss`."""
    return model._compile_loss


COMPILED_LOSS = "_compile_loss"


def make_train_function_as(model, train_step, force=True):
    """`model.make_train_function(force)` built around `train_step`
    instead of the class's `train_step` (Keras' trainers read
    `self.train_step` when they build the function)."""
    model.__dict__["train_step"] = train_step
    try:
        built = keras.Model.make_train_function(model, force=force)
    finally:
        del model.__dict__["train_step"]
    # The JAX trainer returns nothing and keeps it as `train_function`.
    return model.train_function if built is None else built


# ---- layers ----

_BatchNormalization = keras.layers.BatchNormalization


@contextlib.contextmanager
def batchnorm_moments(moments):
    """Within the context, `BatchNormalization` layers in training take
    their batch moments from `moments(layer, inputs, mask, own)`, where
    `own(inputs, mask)` is Keras' own computation for that layer.

    Meant for the time a step is traced (the replica glue replaces the
    moments of a replica's part of the batch with the global batch's); the
    class attribute is restored on exit, exceptions included. Subclasses
    that override `_moments` keep their own.
    """
    own = _BatchNormalization.__dict__["_moments"]

    def replaced(layer, inputs, mask=None):
        return moments(layer, inputs, mask, functools.partial(own, layer))

    _BatchNormalization._moments = replaced
    try:
        yield
    finally:
        _BatchNormalization._moments = own


def batchnorm_reduction_axes(layer):
    """The axes a `BatchNormalization` layer's moments reduce over."""
    return tuple(layer._reduction_axes)


def learning_rate_of(optimizer):
    """The learning rate `optimizer` was given: a schedule as the schedule
    object (`optimizer.learning_rate` is its value at the current step),
    else the variable holding the constant."""
    return optimizer._learning_rate
