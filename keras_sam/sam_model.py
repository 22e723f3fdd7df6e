"""`SAMModel`: wraps any Keras model and trains it with the two-pass step."""

import keras

from keras_sam import optimizers as sam_optimizers
from keras_sam import step
from keras_sam._validation import check_rho


@keras.saving.register_keras_serializable(package="keras_sam")
class SAMModel(keras.Model):
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

    def __init__(self, model, rho=None, **kwargs):
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
        if rho is not None:
            rho = check_rho(rho)
        super().__init__(**kwargs)
        self.model = model
        self.rho = rho
        if model.built:
            self.built = True

    # ---- delegation to the wrapped model ----

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

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

    def compile(self, optimizer="rmsprop", **kwargs):
        """Like `keras.Model.compile`; a stock optimizer is wrapped in SAM.

        Args:
            optimizer: a sharpness-aware optimizer (used as is), or any
                optimizer accepted by `keras.Model.compile`, which is wrapped
                in `keras_sam.optimizers.SAM(optimizer, rho=self.rho)`.
            **kwargs: the other arguments of `keras.Model.compile`.
        """
        optimizer = keras.optimizers.get(optimizer)
        sam = sam_optimizers.find_sam(optimizer)
        if sam is None:
            rho = 0.05 if self.rho is None else self.rho
            optimizer = sam_optimizers.SAM(optimizer, rho=rho)
        elif self.rho is not None and self.rho != sam.initial_rho:
            raise ValueError(
                "`rho` was given both to `SAMModel` and to the optimizer, "
                "with different values. Give it in one place. Received: "
                f"SAMModel(rho={self.rho}) and "
                f"{sam.__class__.__name__}(rho={sam.initial_rho})"
            )
        if sam_optimizers.find_optimizer(
            optimizer, keras.optimizers.LossScaleOptimizer
        ):
            # The user scales the loss already (e.g. SAM(LossScaleOptimizer
            # (...))): Keras must not wrap the whole chain a second time.
            kwargs["auto_scale_loss"] = False
        super().compile(optimizer=optimizer, **kwargs)
        if self.built and self.trainable_variables:
            # Build now, eagerly, so the optimizer can check the weights
            # (e.g. RSAM's manifolds) before TF defers it into a trace.
            self.optimizer.build(self.trainable_variables)

    def compile_from_config(self, config):
        # `compile` is overridden, so Keras leaves restoring it to us.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            # Create the optimizer variables so the saved state loads.
            self.optimizer.build(self.trainable_variables)

    def train_step(self, *args):
        # TensorFlow and torch call train_step(data); JAX train_step(state,
        # data). `keras_sam.step` runs the two-pass step for both.
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
