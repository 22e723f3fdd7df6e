"""`SAMModel`: wraps any Keras model and trains it with the two-pass step."""

import contextlib
import inspect
import types

import keras

from keras_sam import _keras_compat
from keras_sam import backend
from keras_sam import optimizers as sam_optimizers
from keras_sam import step
from keras_sam._batch_state import BatchState
from keras_sam._host_programs import HostPrograms
from keras_sam._validation import check_bool
from keras_sam._validation import check_rho
from keras_sam.optimizers.chain import find_optimizer


@keras.saving.register_keras_serializable(package="keras_sam")
class SAMModel(HostPrograms, BatchState, keras.Model):
    """Wraps a Keras model so that `fit` runs the sharpness-aware step.

    Calling, `predict`, `evaluate`, `summary`, saving and `export` behave as
    for the wrapped model; only `train_step` changes:

    ```
    g     = grad L_B(w)            # clean pass, training=True: metrics and
                                   # BatchNorm statistics come from it
    w_adv = R_w(eps(g))            # ascend to w + eps
    g_adv = grad L_B(w_adv)        # adversarial pass, training=True; its
                                   # BatchNorm updates are discarded
    w     = inner update(w, g_adv) # restore w, then step
    ```

    Args:
        model: The `keras.Model` to train (Sequential, functional or
            subclassed).
        rho: Optional float. If given, compiling with a stock optimizer wraps
            it in `keras_sam.optimizers.SAM(optimizer, rho=rho)`. Without it a
            stock optimizer is wrapped with SAM's default `rho=0.05`, and a
            sharpness-aware optimizer is used as is. Defaults to `None`.
        per_replica_batchnorm: Boolean. Under a JAX
            `keras.distribution.DataParallel`, plain Keras takes BatchNorm
            statistics over the global batch, and so does the step by
            default; `True` takes them over each replica's part of the
            batch instead ("ghost" batch norm, what
            `tf.distribute.MirroredStrategy` gives for layers that are not
            `synchronized`). No effect elsewhere. Defaults to `False`.
        **kwargs: Passed to `keras.Model` (e.g. `name`).

    Example:

    >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model = keras_sam.SAMModel(base)
    >>> model.compile(
    ...     optimizer=keras_sam.optimizers.SAM(keras.optimizers.SGD(0.1)),
    ...     loss="mse")
    >>> model.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0)

    References:
        - Foret et al., Sharpness-Aware Minimization for Efficiently Improving
          Generalization, ICLR 2021.
    """

    def __init__(self, model, rho=None, per_replica_batchnorm=False, **kwargs):
        if not isinstance(model, keras.Model):
            raise TypeError(
                "`model` must be a `keras.Model` (Sequential, functional or "
                f"subclassed). Received: model={model!r} of type "
                f"{type(model).__name__}"
            )
        if isinstance(model, SAMModel):
            raise TypeError(
                "`model` is already a `SAMModel`; wrap the underlying model "
                "once. Received: model=SAMModel(...)"
            )
        if _overrides(model, "train_step"):
            raise TypeError(
                "`model` overrides `train_step`, which SAMModel cannot use: "
                "sharpness-aware training needs its own two-pass step, so "
                "the override would be silently ignored. Move custom loss "
                "terms into `compute_loss` (SAMModel minimizes the wrapped "
                "model's own `compute_loss`), or write the two-pass step by "
                "hand. Received: model of type "
                f"{type(model).__name__!r} with its own `train_step`"
            )
        if rho is not None:
            rho = check_rho(rho)
        super().__init__(**kwargs)
        self.model = model
        self.rho = rho
        self.per_replica_batchnorm = check_bool(
            "per_replica_batchnorm", per_replica_batchnorm
        )
        self._compile_args = None
        if model.built:
            self.built = True

    # ---- delegation to the wrapped model ----

    def build(self, input_shape=None):
        """Builds the wrapped model (whose weights are this model's)."""
        if not self.model.built:
            if input_shape is None:
                raise ValueError(
                    "The wrapped model is not built: pass its input shape, "
                    "e.g. `model.build((None, 64))`. Received: "
                    "input_shape=None"
                )
            # A symbolic call builds it as its first call would (with its
            # own `build` where it has one).
            self.model(
                keras.tree.map_shape_structure(keras.KerasTensor, input_shape)
            )

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def compute_output_spec(self, *args, **kwargs):
        return self.model.compute_output_spec(*args, **kwargs)

    def get_layer(self, name=None, index=None):
        """A layer of the wrapped model, by name or index (or the wrapped
        model itself, by its name); see `keras.Model.get_layer`."""
        if index is None and name is not None and name == self.model.name:
            return self.model
        return self.model.get_layer(name=name, index=index)

    @property
    def inputs(self):
        """The wrapped model's symbolic inputs (functional, Sequential)."""
        return self.model.inputs

    @property
    def outputs(self):
        """The wrapped model's symbolic outputs (functional, Sequential)."""
        return self.model.outputs

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """The loss SAM minimizes: the wrapped model's own `compute_loss`
        where it overrides it (custom terms included), else Keras'.

        The wrapped model is usually not compiled itself: while its
        `compute_loss` runs, its compiled loss is this model's, so an
        override that calls `super().compute_loss(...)` and adds a term
        gets the loss given to `SAMModel.compile` plus that term.
        """
        if not _overrides(self.model, "compute_loss"):
            return super().compute_loss(
                x, y, y_pred, sample_weight, training=training
            )
        kwargs = {}
        if "training" in inspect.signature(self.model.compute_loss).parameters:
            kwargs["training"] = training
        loss = {_keras_compat.COMPILED_LOSS: _keras_compat.compiled_loss(self)}
        with _routed(self.model, **loss):
            return self.model.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, **kwargs
            )

    def save_weights(self, filepath, overwrite=True, max_shard_size=None):
        """Saves the weights in the wrapped model's layout (and the
        optimizer state, as Keras does for a compiled model), so the file
        loads into the bare model as well; see `keras.Model.save_weights`.
        """
        with _routed(self.model, optimizer=getattr(self, "optimizer", None)):
            return self.model.save_weights(
                filepath, overwrite=overwrite, max_shard_size=max_shard_size
            )

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """Loads weights saved by `save_weights` or by the bare model; see
        `keras.Model.load_weights`."""
        self._resync_host_step()
        with _routed(self.model, optimizer=getattr(self, "optimizer", None)):
            return self.model.load_weights(
                filepath, skip_mismatch=skip_mismatch, **kwargs
            )

    def export(self, filepath, *args, **kwargs):
        """Exports the wrapped model for serving (see `keras.Model.export`).

        The wrapper only changes training, so the artifact is the wrapped
        model's: its serving output equals `predict`.
        """
        return self.model.export(filepath, *args, **kwargs)

    @property
    def output_names(self):
        return getattr(self.model, "output_names", None)

    @property
    def sam_optimizer(self):
        """The sharpness-aware optimizer inside `self.optimizer`."""
        return sam_optimizers.find_sam(getattr(self, "optimizer", None))

    # ---- training ----

    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        loss_weights=None,
        metrics=None,
        weighted_metrics=None,
        run_eagerly=False,
        steps_per_execution=1,
        jit_compile="auto",
        auto_scale_loss=True,
    ):
        """Like `keras.Model.compile`; a stock optimizer is wrapped in SAM.

        The new optimizer is built against the weights (when the model is
        built) before anything changes: if that or Keras' `compile` raises,
        the model keeps its previous optimizer, with its state, and its
        compiled configuration.

        Args:
            optimizer: a sharpness-aware optimizer (used as is), or any
                optimizer accepted by `keras.Model.compile`, which is wrapped
                in `keras_sam.optimizers.SAM(optimizer, rho=self.rho)`.
            loss, loss_weights, metrics, weighted_metrics, run_eagerly,
            steps_per_execution, jit_compile, auto_scale_loss: as for
                `keras.Model.compile`.
        """
        optimizer = self._sharpness_aware(optimizer)
        if find_optimizer(optimizer, keras.optimizers.LossScaleOptimizer):
            # The user scales the loss already (e.g. SAM(LossScaleOptimizer
            # (...))): Keras must not wrap the whole chain a second time.
            auto_scale_loss = False
        if self.built and self.trainable_variables:
            # Build now, eagerly, so the optimizer can check the weights
            # (e.g. RSAM's manifolds) before TF defers it into a trace.
            if not optimizer.built:
                optimizer.build(self.trainable_variables)
            radius = sam_optimizers.find_sam(optimizer).radius
            if radius is not None:
                radius.check_model(self)
        arguments = dict(
            optimizer=optimizer,
            loss=loss,
            loss_weights=loss_weights,
            metrics=metrics,
            weighted_metrics=weighted_metrics,
            run_eagerly=run_eagerly,
            steps_per_execution=steps_per_execution,
            jit_compile=jit_compile,
            auto_scale_loss=auto_scale_loss,
        )
        try:
            super().compile(**arguments)
        except Exception:
            if self._compile_args is not None:
                # Back to the last compiled configuration, same optimizer.
                super().compile(**self._compile_args)
            raise
        if self.built and self.trainable_variables and not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)  # loss scaling
        # Not a dict: Keras would track the metrics in it as this model's.
        arguments["optimizer"] = self.optimizer
        self._compile_args = types.MappingProxyType(arguments)

    def _sharpness_aware(self, optimizer):
        """`optimizer`, wrapped in SAM if it is a stock optimizer."""
        optimizer = keras.optimizers.get(optimizer)
        sam = sam_optimizers.find_sam(optimizer)
        if sam is None:
            rho = 0.05 if self.rho is None else self.rho
            return sam_optimizers.SAM(optimizer, rho=rho)
        if self.rho is not None and self.rho != sam.initial_rho:
            raise ValueError(
                "`rho` was given both to `SAMModel` and to the optimizer, "
                "with different values. Give it in one place. Received: "
                f"SAMModel(rho={self.rho}) and "
                f"{sam.__class__.__name__}(rho={sam.initial_rho})"
            )
        return optimizer

    def train_step(self, *args):
        # TensorFlow and torch call train_step(data); JAX train_step(state,
        # data). `keras_sam.step` runs the two-pass step for both.
        with backend.per_replica_batchnorm(self.per_replica_batchnorm):
            return step.train_step(self, *args)

    def loss_metric(self):
        """The metric tracking the loss (named `"loss"`), if compiled."""
        for metric in self.metrics:
            if metric.name == "loss":
                return metric
        return None

    # ---- serialization ----

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.model),
                "rho": self.rho,
                "per_replica_batchnorm": self.per_replica_batchnorm,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects
        )
        return cls(model, **config)


def _overrides(model, method):
    """Whether `model`'s class defines its own `method` (not Keras')."""
    return getattr(type(model), method) is not getattr(keras.Model, method)


@contextlib.contextmanager
def _routed(model, **attributes):
    """Sets attributes of `model` for the block, then restores them.

    Used to run the wrapped model's own methods with this model's compiled
    loss or optimizer (Keras reads them from `self`).
    """
    missing = object()
    previous = {name: getattr(model, name, missing) for name in attributes}
    for name, value in attributes.items():
        setattr(model, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is missing:
                delattr(model, name)
            else:
                setattr(model, name, value)
