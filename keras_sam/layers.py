"""Stiefel-parametrized layers: kernel = U diag(s), U with orthonormal columns.

The R-Stiefel layers of the RSAM paper: a Dense or Conv2D layer whose kernel,
seen as the matrix of shape `(fan_in, units)`, is factored as

```
kernel = U diag(s)        # U^T U = I (a point of the Stiefel manifold)
```

`U` is initialized on the manifold and carries a
`keras_sam.manifolds.ManifoldConstraint`, so `keras_sam.optimizers.RSAM`
trains it on the manifold with no `manifold=` entry (its perturbation,
pull-back and retraction); the scales `s` and the bias are flat variables.
A stock optimizer keeps `U` orthonormal through the constraint (projected
gradient descent).
"""

import math

import keras
from keras import ops

from keras_sam._validation import check_bool
from keras_sam._validation import check_choice
from keras_sam._validation import check_positive_int
from keras_sam._validation import check_seed
from keras_sam.manifolds.constraints import ManifoldConstraint
from keras_sam.manifolds.stiefel import Stiefel
from keras_sam.manifolds.stiefel import StiefelInitializer

_METRICS = ("euclidean", "canonical")
_RETRACTIONS = ("qr", "polar")


def _check_fan_in(layer, fan_in, units, what):
    if fan_in < units:
        raise ValueError(
            f"`{type(layer).__name__}` needs fan_in >= {what} for its "
            f"kernel to have orthonormal columns: fan_in={fan_in} (the "
            f"input size{' times the window' if what == 'filters' else ''})"
            f" < {what}={units}. Use fewer {what} or a plain layer."
        )


class _StiefelFactor:
    """The shared part: U, s, bias, the kernel and the config."""

    def _init_factor(
        self,
        activation,
        use_bias,
        scale_initializer,
        bias_initializer,
        seed,
        retraction,
        metric,
    ):
        self.activation = keras.activations.get(activation)
        self.use_bias = check_bool("use_bias", use_bias)
        self.scale_initializer = keras.initializers.get(scale_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.seed = check_seed(seed)
        self.retraction = check_choice("retraction", retraction, _RETRACTIONS)
        self.metric = check_choice("metric", metric, _METRICS)

    def _build_factor(self, kernel_shape, units):
        self.manifold = Stiefel(self.retraction, metric=self.metric)
        self.u = self.add_weight(
            name="u",
            shape=kernel_shape,
            initializer=StiefelInitializer(seed=self.seed),
            constraint=ManifoldConstraint(self.manifold),
        )
        self.s = self.add_weight(
            name="s", shape=(units,), initializer=self.scale_initializer
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(units,), initializer=self.bias_initializer
            )

    @property
    def kernel(self):
        """The kernel `U diag(s)`, of the shape of a plain layer's kernel."""
        return ops.multiply(self.u, self.s)

    def _finish(self, outputs):
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _factor_config(self):
        return {
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "scale_initializer": keras.initializers.serialize(
                self.scale_initializer
            ),
            "bias_initializer": keras.initializers.serialize(
                self.bias_initializer
            ),
            "seed": self.seed,
            "retraction": self.retraction,
            "metric": self.metric,
        }


@keras.saving.register_keras_serializable(package="keras_sam")
class StiefelDense(_StiefelFactor, keras.layers.Layer):
    """Dense layer with kernel `U diag(s)`, `U` on the Stiefel manifold.

    ```
    y = activation(x U diag(s) + b)      # U: (input_dim, units), U^T U = I
    ```

    `U` (weight `"u"`) is declared on `Stiefel` through its constraint, so
    `keras_sam.optimizers.RSAM` keeps it orthonormal and perturbs it along
    the manifold; the scales `s` (weight `"s"`) and the bias are flat. As in
    the RSAM paper, give `U` its own radius with RSAM's `rho` and the flat
    variables theirs with `flat_rho`.

    Args:
        units: Integer > 0, the output size; needs `input_dim >= units`.
        activation: Activation function or name. Defaults to `None`.
        use_bias: Boolean, whether to add a bias. Defaults to `True`.
        scale_initializer: Initializer of `s`. Defaults to `"ones"`.
        bias_initializer: Initializer of the bias. Defaults to `"zeros"`.
        seed: Optional integer seed of `U`'s initializer. Defaults to `None`.
        retraction: `"qr"` or `"polar"`, the retraction of `Stiefel`.
            Defaults to `"qr"`.
        metric: `"canonical"` or `"euclidean"`, the metric of `Stiefel`
            that RSAM uses for `U` (see `keras_sam.manifolds.Stiefel`).
            Defaults to `"canonical"`.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((64,)),
    ...     keras_sam.layers.StiefelDense(32, activation="relu"),
    ...     keras.layers.Dense(10)])
    >>> model = keras_sam.SAMModel(model)
    >>> model.compile(
    ...     keras_sam.optimizers.RSAM("sgd", rho=0.5, flat_rho=0.05),
    ...     loss="mse")

    References:
        - Truong et al., RSAM: Learning on Manifolds with Riemannian
          Sharpness-aware Minimization, arXiv 2309.17215 (v1).
    """

    def __init__(
        self,
        units,
        activation=None,
        use_bias=True,
        scale_initializer="ones",
        bias_initializer="zeros",
        seed=None,
        retraction="qr",
        metric="canonical",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = check_positive_int("units", units)
        self._init_factor(
            activation,
            use_bias,
            scale_initializer,
            bias_initializer,
            seed,
            retraction,
            metric,
        )
        self.input_spec = keras.layers.InputSpec(min_ndim=2)

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                "`StiefelDense` needs a known last input dimension. "
                f"Received: input_shape={input_shape}"
            )
        _check_fan_in(self, int(input_dim), self.units, "units")
        self._build_factor((int(input_dim), self.units), self.units)
        self.input_spec = keras.layers.InputSpec(
            min_ndim=2, axes={-1: int(input_dim)}
        )

    def call(self, inputs):
        return self._finish(ops.matmul(inputs, self.kernel))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config["units"] = self.units
        config.update(self._factor_config())
        return config


@keras.saving.register_keras_serializable(package="keras_sam")
class StiefelConv2D(_StiefelFactor, keras.layers.Layer):
    """2D convolution with kernel `U diag(s)`, `U` on the Stiefel manifold.

    The kernel of shape `(kh, kw, in, filters)` is seen as the matrix `U`
    of shape `(kh * kw * in, filters)` with orthonormal columns (orthonormal
    filters), scaled per filter by `s`:

    ```
    y = activation(conv(x, U diag(s)) + b)   # U^T U = I over kh*kw*in
    ```

    `U` (weight `"u"`) is declared on `Stiefel` through its constraint, so
    `keras_sam.optimizers.RSAM` trains it on the manifold; `s` and the bias
    are flat. This is the R-Stiefel layer of the RSAM paper's experiments.

    Args:
        filters: Integer > 0, the number of filters; needs
            `kh * kw * in >= filters`.
        kernel_size: Integer or pair of integers, the window.
        strides: Integer or pair. Defaults to `1`.
        padding: `"valid"` or `"same"`. Defaults to `"valid"`.
        data_format: `"channels_last"` or `"channels_first"`.
            Defaults to `keras.config.image_data_format()`.
        dilation_rate: Integer or pair. Defaults to `1`.
        activation: Activation function or name. Defaults to `None`.
        use_bias: Boolean, whether to add a bias. Defaults to `True`.
        scale_initializer: Initializer of `s`. Defaults to `"ones"`.
        bias_initializer: Initializer of the bias. Defaults to `"zeros"`.
        seed: Optional integer seed of `U`'s initializer. Defaults to `None`.
        retraction: `"qr"` or `"polar"`. Defaults to `"qr"`.
        metric: `"canonical"` or `"euclidean"`. Defaults to `"canonical"`.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Example:

    >>> conv = keras_sam.layers.StiefelConv2D(
    ...     16, 3, padding="same", activation="relu")

    References:
        - Truong et al., RSAM: Learning on Manifolds with Riemannian
          Sharpness-aware Minimization, arXiv 2309.17215 (v1).
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="valid",
        data_format=None,
        dilation_rate=1,
        activation=None,
        use_bias=True,
        scale_initializer="ones",
        bias_initializer="zeros",
        seed=None,
        retraction="qr",
        metric="canonical",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = check_positive_int("filters", filters)
        self.kernel_size = _pair("kernel_size", kernel_size)
        self.strides = _pair("strides", strides)
        self.dilation_rate = _pair("dilation_rate", dilation_rate)
        self.padding = check_choice("padding", padding, ("valid", "same"))
        self.data_format = check_choice(
            "data_format",
            data_format or keras.config.image_data_format(),
            ("channels_last", "channels_first"),
        )
        self._init_factor(
            activation,
            use_bias,
            scale_initializer,
            bias_initializer,
            seed,
            retraction,
            metric,
        )
        self.input_spec = keras.layers.InputSpec(ndim=4)

    @property
    def _channel_axis(self):
        return -1 if self.data_format == "channels_last" else 1

    def build(self, input_shape):
        channels = input_shape[self._channel_axis]
        if channels is None:
            raise ValueError(
                "`StiefelConv2D` needs a known number of input channels. "
                f"Received: input_shape={input_shape}"
            )
        channels = int(channels)
        fan_in = math.prod(self.kernel_size) * channels
        _check_fan_in(self, fan_in, self.filters, "filters")
        self._build_factor(
            self.kernel_size + (channels, self.filters), self.filters
        )
        self.input_spec = keras.layers.InputSpec(
            ndim=4, axes={self._channel_axis: channels}
        )

    def call(self, inputs):
        outputs = ops.conv(
            inputs,
            self.kernel,
            strides=self.strides,
            padding=self.padding,
            data_format=self.data_format,
            dilation_rate=self.dilation_rate,
        )
        if self.bias is not None and self.data_format == "channels_first":
            outputs = ops.add(outputs, ops.reshape(self.bias, (-1, 1, 1)))
            return (
                outputs if self.activation is None else self.activation(outputs)
            )
        return self._finish(outputs)

    def compute_output_shape(self, input_shape):
        channels = input_shape[self._channel_axis]
        return ops.conv(
            keras.KerasTensor(input_shape),
            keras.KerasTensor(self.kernel_size + (channels, self.filters)),
            strides=self.strides,
            padding=self.padding,
            data_format=self.data_format,
            dilation_rate=self.dilation_rate,
        ).shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": self.padding,
                "data_format": self.data_format,
                "dilation_rate": self.dilation_rate,
            }
        )
        config.update(self._factor_config())
        return config


def _pair(name, value):
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0
            for v in value
        )
    ):
        raise ValueError(
            f"`{name}` must be a positive integer or a pair of them. "
            f"Received: {name}={value!r}"
        )
    return tuple(int(v) for v in value)
