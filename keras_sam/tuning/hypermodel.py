"""`SAMHyperModel`: a model-building function as a Keras-Tuner hypermodel."""

import inspect
import math
import numbers

import keras
import keras_tuner

from keras_sam import optimizers as sam_optimizers
from keras_sam.optimizers.base import get_inner
from keras_sam.radius import LearnedRadius
from keras_sam.sam_model import SAMModel
from keras_sam.tuning.space import DEFAULT_RHO
from keras_sam.tuning.space import DEFAULT_RHO_RANGES
from keras_sam.tuning.space import FALLBACK_VARIANT
from keras_sam.tuning.space import LETS
from keras_sam.tuning.space import RHO
from keras_sam.tuning.space import VARIANT
from keras_sam.tuning.space import rho_name

# Compile arguments reused from a model that `build_model` compiled.
_COMPILE_ARGS = (
    "loss",
    "loss_weights",
    "metrics",
    "weighted_metrics",
    "run_eagerly",
    "steps_per_execution",
    "jit_compile",
)


def _check_variants(variants):
    if isinstance(variants, str):
        variants = (variants,)
    if not isinstance(variants, (list, tuple)) or not variants:
        raise ValueError(
            "`variants` must be a non-empty list of sharpness-aware optimizer "
            f"names such as ('sam', 'asam'). Received: variants={variants!r}"
        )
    checked = []
    for variant in variants:
        if not isinstance(variant, str):
            raise TypeError(
                "Each entry of `variants` must be a string. Received: "
                f"variants={variants!r}"
            )
        variant = variant.lower()
        if variant != LETS:
            # Raises a ValueError that lists the registered names.
            sam_optimizers.get(variant, optimizer="sgd")
        if variant in checked:
            raise ValueError(
                f"`variants` lists {variant!r} twice. Received: "
                f"variants={variants!r}"
            )
        checked.append(variant)
    return tuple(checked)


def _check_range(value, name):
    """Validates a `(min_value, max_value)` log-scale range of rho."""
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool)
            for v in value
        )
    ):
        raise TypeError(
            f"`{name}` must be a pair `(min_value, max_value)` of floats. "
            f"Received: {name}={value!r}"
        )
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0:
        raise ValueError(
            f"`{name}` is searched on a log scale: both ends must be finite "
            f"and > 0. Received: {name}={value!r}"
        )
    if lo >= hi:
        raise ValueError(
            f"`{name}` is an empty range: `min_value` must be smaller than "
            f"`max_value` (to fix rho, pass "
            f"`hyperparameters` with `hp.Fixed('rho', value)`). Received: "
            f"{name}={value!r}"
        )
    return lo, hi


def _check_rho_ranges(rho, variants):
    """`{variant: (min_value, max_value)}` from the `rho` argument."""
    if rho is None:
        return {
            v: DEFAULT_RHO_RANGES.get(v, DEFAULT_RHO_RANGES[FALLBACK_VARIANT])
            for v in variants
        }
    if isinstance(rho, dict):
        unknown = sorted(set(rho) - set(variants))
        if unknown:
            raise ValueError(
                f"`rho` gives ranges for {unknown}, which are not in "
                f"`variants`={list(variants)}. Received: rho={rho!r}"
            )
        ranges = {}
        for v in variants:
            if v in rho:
                ranges[v] = _check_range(rho[v], f"rho[{v!r}]")
            else:
                ranges[v] = DEFAULT_RHO_RANGES.get(
                    v, DEFAULT_RHO_RANGES[FALLBACK_VARIANT]
                )
        return ranges
    lo_hi = _check_range(rho, "rho")
    return {v: lo_hi for v in variants}


def _wants_hp(build_model):
    """Whether `build_model` takes the `HyperParameters` argument."""
    try:
        parameters = inspect.signature(build_model).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    )
    return any(p.kind in positional for p in parameters)


def _clone_optimizer(optimizer):
    """A fresh copy, so that no optimizer state leaks from one trial."""
    if isinstance(optimizer, keras.optimizers.Optimizer):
        # get_config/from_config rather than `keras.optimizers.serialize`,
        # which imports TensorFlow on the other backends.
        return optimizer.__class__.from_config(optimizer.get_config())
    return optimizer


class SAMHyperModel(keras_tuner.HyperModel):
    """A Keras-Tuner hypermodel that searches rho and the SAM variant.

    Each trial builds the user's model, wraps it in `keras_sam.SAMModel` and
    compiles it with the chosen variant around the inner optimizer:

    ```
    variant = hp.Choice("variant", variants)
    rho     = hp.Float(f"rho_{variant}", lo, hi, sampling="log")
    model   = SAMModel(build_model(hp))
    model.compile(optimizer=Variant(inner_optimizer, rho=rho), ...)
    ```

    If the built model is compiled, its loss, metrics and other compile
    arguments are reused and its optimizer becomes the inner optimizer;
    arguments given here take precedence. Each `rho_<variant>` is
    conditional on its variant, so the ranges may differ (`get_rho` reads
    the one in use); an unconditional `"rho"` that the user registers first
    (for example `hp.Fixed("rho", 0.1)` in the `hyperparameters` of a
    tuner) replaces them all. A trial whose rho is 0 trains with exactly
    the inner optimizer; `search_rho` runs that baseline first, a stock
    Keras-Tuner tuner only if its search proposes it.

    Args:
        build_model: A function that returns a `keras.Model`, taking the
            `keras_tuner.HyperParameters` as its argument or no argument, or
            a `keras_tuner.HyperModel`. It must build a new model each call.
        rho: The log-scale search range of rho: `None` for the default range
            of each variant (`DEFAULT_RHO_RANGES`: SAM and LETS 0.01..0.5,
            ASAM 0.1..2.0; other registered variants use SAM's), a pair
            `(min_value, max_value)` for all variants, or a dict from variant
            name to such a pair. Defaults to `None`.
        optimizer: The inner optimizer (instance, name or config) when the
            built model is not compiled; an instance is copied for each
            trial. Defaults to `None`: the compiled model's optimizer, or
            `"sgd"`.
        variants: Names of the sharpness-aware optimizers to choose from:
            any name registered in `keras_sam.optimizers` (`"sam"`,
            `"asam"`, ...) and `"lets"` (SAM with a `keras_sam.LearnedRadius`
            starting at rho, learned on `validation_data`). The first one
            is the default. Defaults to `("sam", "asam")`.
        loss: The loss when the built model is not compiled. Defaults to
            `None`: the compiled model's loss.
        metrics: Metrics to compile with. Defaults to `None`: the compiled
            model's metrics, if any.
        validation_data: Held-out data for the `"lets"` variant, in any form
            that `keras_sam.LearnedRadius` accepts. Required when `variants`
            contains `"lets"`. Defaults to `None`.
        name: Optional name of the hypermodel. Defaults to `None`.

    Example:

    >>> def build_model(hp):
    ...     units = hp.Int("units", 16, 64, step=16)
    ...     return keras.Sequential([
    ...         keras.Input((64,)),
    ...         keras.layers.Dense(units, activation="relu"),
    ...         keras.layers.Dense(10, activation="softmax"),
    ...     ])
    >>> hypermodel = keras_sam.tuning.SAMHyperModel(
    ...     build_model, optimizer=keras.optimizers.SGD(0.1),
    ...     loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    >>> tuner = keras_tuner.RandomSearch(
    ...     hypermodel, objective="val_accuracy", max_trials=5)

    References:
        - Foret et al., Sharpness-Aware Minimization for Efficiently Improving
          Generalization, ICLR 2021.
        - Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization, ICML 2021.
        - Wang, Jiang, Fu, Zhang, Enhancing Sharpness-Aware Minimization by
          Learning Perturbation Radius (LETS), ECML-PKDD 2024.
    """

    def __init__(
        self,
        build_model,
        rho=None,
        optimizer=None,
        variants=("sam", "asam"),
        loss=None,
        metrics=None,
        validation_data=None,
        name=None,
    ):
        if isinstance(build_model, keras.Model) or not callable(
            getattr(build_model, "build", build_model)
        ):
            raise TypeError(
                "`build_model` must be a function that builds a new "
                "`keras.Model` (taking `hp` or no argument) or a "
                "`keras_tuner.HyperModel`. Received: "
                f"build_model={build_model!r} of type "
                f"{type(build_model).__name__}"
            )
        super().__init__(name=name)
        self.build_model = build_model
        self.variants = _check_variants(variants)
        self.rho_ranges = _check_rho_ranges(rho, self.variants)
        if LETS in self.variants and validation_data is None:
            raise ValueError(
                "The 'lets' variant learns rho on held-out data: pass "
                "`validation_data`. Received: validation_data=None"
            )
        if optimizer is not None:
            # Fail now rather than inside a trial.
            get_inner(_clone_optimizer(optimizer))
        self.optimizer = optimizer
        self.loss = loss
        self.metrics = metrics
        self.validation_data = validation_data

    # ---- the search space ----

    def _default_rho(self, variant):
        lo, hi = self.rho_ranges[variant]
        usual = DEFAULT_RHO.get(variant, DEFAULT_RHO[FALLBACK_VARIANT])
        if lo <= usual <= hi:
            return usual
        return math.sqrt(lo * hi)

    def declare_rho(self, hp):
        """Registers `variant` and `rho_<variant>`; returns their values."""
        variant = hp.Choice(
            VARIANT, list(self.variants), default=self.variants[0]
        )
        if variant not in self.variants:
            raise keras_tuner.errors.FatalValueError(
                f"The hyperparameter `variant` must be one of "
                f"{list(self.variants)}. Received: variant={variant!r}"
            )

        def user_defined(name):
            # Registered without condition by the user (hp.Fixed, or a range
            # of their own), not by an earlier build of this hypermodel.
            return any(p.name == name and not p.conditions for p in hp.space)

        if user_defined(RHO):
            return variant, hp.get(RHO)
        rho = None
        for v in self.variants:
            name = rho_name(v)
            if user_defined(name):
                value = hp.get(name)
            else:
                lo, hi = self.rho_ranges[v]
                with hp.conditional_scope(VARIANT, [v]):
                    value = hp.Float(
                        name,
                        min_value=lo,
                        max_value=hi,
                        sampling="log",
                        default=self._default_rho(v),
                    )
            if v == variant:
                rho = value
        return variant, rho

    # ---- building a trial's model ----

    def _build_base(self, hp):
        if isinstance(self.build_model, keras_tuner.HyperModel):
            model = self.build_model.build(hp)
        elif _wants_hp(self.build_model):
            model = self.build_model(hp)
        else:
            model = self.build_model()
        if not isinstance(model, keras.Model):
            # A fatal error: Keras-Tuner stops the search instead of
            # recording a failed trial.
            raise keras_tuner.errors.FatalTypeError(
                "`build_model` must return a `keras.Model`. Received: "
                f"{model!r} of type {type(model).__name__} from "
                f"build_model={self.build_model!r}"
            )
        if isinstance(model, SAMModel):
            raise keras_tuner.errors.FatalTypeError(
                "`build_model` must return the model to wrap, not a "
                "`keras_sam.SAMModel`: the hypermodel wraps it. Received: "
                "a SAMModel"
            )
        return model

    def _compile_args(self, model):
        """Inner optimizer and compile arguments for a trial."""
        config = model.get_compile_config()
        compile_args = {}
        inner = None
        if config:
            config = keras.saving.deserialize_keras_object(config)
            compile_args = {
                k: config[k] for k in _COMPILE_ARGS if config.get(k) is not None
            }
            inner = model.optimizer
            sam = sam_optimizers.find_sam(inner)
            if sam is not None:
                inner = sam.inner_optimizer
        if self.optimizer is not None:
            inner = _clone_optimizer(self.optimizer)
        if inner is None:
            inner = "sgd"
        if self.loss is not None:
            compile_args["loss"] = self.loss
        if self.metrics is not None:
            compile_args["metrics"] = self.metrics
        if compile_args.get("loss") is None:
            raise keras_tuner.errors.FatalValueError(
                "The model returned by `build_model` is not compiled and no "
                "`loss` was given: compile it in `build_model` or pass "
                f"`loss`. Received: loss={self.loss!r}"
            )
        return inner, compile_args

    def make_optimizer(self, variant, inner, rho):
        """The sharpness-aware optimizer of a trial."""
        if variant == LETS:
            if rho == 0:
                # A learned radius cannot start at 0; rho = 0 is the
                # baseline, which is SAM with rho = 0 (the inner optimizer).
                return sam_optimizers.SAM(inner, rho=0.0)
            learned_radius = LearnedRadius(
                initial=rho, validation_data=self.validation_data
            )
            return sam_optimizers.SAM(inner, rho=learned_radius)
        return sam_optimizers.get(variant, optimizer=inner, rho=rho)

    def build(self, hp):
        variant, rho = self.declare_rho(hp)
        model = self._build_base(hp)
        inner, compile_args = self._compile_args(model)
        sam_model = SAMModel(model)
        sam_model.compile(
            optimizer=self.make_optimizer(variant, inner, rho),
            **compile_args,
        )
        return sam_model
