"""`SAM`: the sharpness-aware rule every variant builds on.

```
g     = grad_at(w)                   # clean pass at w
g_adv = grad_at(w + eps(g))          # eps from the geometry and the radius
g_adv = P_w(g_adv)                   # pulled back to the tangent space at w
```

The geometry (`keras_sam.optimizers.geometry`: metric, projection,
retraction) and the radius (a float or `keras_sam.LearnedRadius`) are parts
of the rule; the update itself is the wrapped (inner) optimizer's, so
learning-rate schedules, momentum, weight decay, clipping, EMA and gradient
accumulation work as they do without SAM.
"""

import keras

from keras_sam import schedules as sam_schedules
from keras_sam._validation import check_bool
from keras_sam._validation import check_positive_int
from keras_sam.optimizers.base import SharpnessAware
from keras_sam.optimizers.base import get_inner  # noqa: F401
from keras_sam.optimizers.chain import find_optimizer
from keras_sam.optimizers.geometry import Geometry
from keras_sam.optimizers.geometry import is_weight_like  # noqa: F401
from keras_sam.radius import LearnedRadius


def _check_splits(sync_perturbation, num_batch_splits):
    sync_perturbation = check_bool("sync_perturbation", sync_perturbation)
    num_batch_splits = check_positive_int("num_batch_splits", num_batch_splits)
    if sync_perturbation and num_batch_splits > 1:
        raise ValueError(
            "`sync_perturbation=True` perturbs with the gradient of the "
            "whole global batch and cannot be combined with "
            "`num_batch_splits` > 1. Received: sync_perturbation=True, "
            f"num_batch_splits={num_batch_splits}"
        )
    return sync_perturbation, num_batch_splits


def find_sam(optimizer):
    """The sharpness-aware optimizer in `optimizer`, unwrapping loss scaling.

    Returns `None` when there is none (a plain optimizer).
    """
    return find_optimizer(optimizer, SharpnessAware)


@keras.saving.register_keras_serializable(package="keras_sam")
class SAM(Geometry, SharpnessAware):
    """Sharpness-Aware Minimization around a stock Keras optimizer.

    SAM seeks weights whose whole neighbourhood has low loss. Each step takes
    the gradient at weights perturbed towards higher loss and hands it to the
    inner optimizer, which updates the unperturbed weights:

    ```
    g     = grad L(w)
    eps   = rho * g / (||g|| + 1e-12)        # ||.|| global over all variables
          = rho * g                          # normalize=False
    g_adv = grad L(w + eps)
    w     = inner_optimizer.update(w, g_adv)
    ```

    With `ascent_steps=k`, `w + eps` is reached in `k` steps of radius
    `rho / k`, each along the gradient where the last one ended.

    The two passes are run by `keras_sam.SAMModel`, which must wrap the
    model being trained; compiling this optimizer into a plain `keras.Model`
    raises an error on the first training step.

    Args:
        optimizer: The inner optimizer: a `keras.optimizers.Optimizer`
            instance or a name/config accepted by `keras.optimizers.get`.
            Defaults to `"sgd"`.
        rho: Float >= 0, the radius of the neighbourhood. `rho=0` gives
            exactly the inner optimizer. Stored as a non-trainable variable,
            so it can be changed during training without retracing.
            Defaults to `0.05`.
        sam_every: Integer >= 1. Run the two-pass step on every
            `sam_every`-th step and a plain step (one pass) otherwise:
            shorthand for `schedule=keras_sam.schedules.Every(sam_every)`.
            Defaults to `1`.
        sync_perturbation: Boolean. On several devices
            (`tf.distribute`, `keras.distribution`), each replica perturbs
            with the gradient of its own part of the batch by default
            (m-sharpness with m the per-replica batch). `True` averages `g`
            over all replicas before the norm, so every replica uses the
            perturbation of the global batch. Defaults to `False`.
        num_batch_splits: Integer >= 1. Split each (per-replica) batch into
            this many sub-batches, perturb each with its own gradient and
            average their adversarial gradients (m-sharpness on one device).
            Cannot be combined with `sync_perturbation=True`.
            Defaults to `1`.
        normalize: Boolean. `True` divides the ascent direction by its
            norm (`eps = rho * xi / ||xi||_D`, Foret et al.); `False` takes
            the unnormalized step `eps = rho * xi` of the analysis of
            Behdin and Mazumder (for ASAM `xi = T^2 g`, for RSAM the
            projected `D^-1 g`), so rho is then a step size, not a radius.
            Defaults to `True`.
        name: String, the name of the optimizer. Defaults to `"sam"`.
        schedule: Optional `keras_sam.schedules` object choosing which
            steps run the two passes: `Every(k)`, `Random(p, seed)` (RST),
            `LatePhase(start_step)` or `Adaptive(total_steps)` (AE-SAM).
            `Every`, `Random` and `LatePhase` are decided on the host, so a
            plain step runs a program compiled for one pass.
            `logs["sam_fraction"]` is the fraction of two-pass steps so
            far. Defaults to `None` (`Every(sam_every)`).
        ascent_steps: Integer >= 1. Take `k` ascent steps of radius
            `rho / k` each, every one from the gradient where the last one
            ended, and the gradient at the last point (multi-step ascent,
            `k + 1` passes per step). `1` is SAM. Defaults to `1`.

    Example:

    >>> model = keras_sam.SAMModel(keras.Sequential([keras.layers.Dense(1)]))
    >>> model.compile(
    ...     optimizer=keras_sam.optimizers.SAM(keras.optimizers.SGD(0.1)),
    ...     loss="mse")

    References:
        - Foret et al., Sharpness-Aware Minimization for Efficiently Improving
          Generalization, ICLR 2021.
        - Behdin, Mazumder, On Statistical Properties of Sharpness-Aware
          Minimization: Provable Guarantees, arXiv 2302.11836
          (`normalize=False`).
        - Mordido, Malviya, Baratin, Chandar, Lookbehind-SAM: k steps back,
          1 step forward, ICML 2024 (several ascent steps).
    """

    def __init__(
        self,
        optimizer="sgd",
        rho=0.05,
        sam_every=1,
        name=None,
        sync_perturbation=False,
        num_batch_splits=1,
        normalize=True,
        schedule=None,
        ascent_steps=1,
    ):
        radius = rho if isinstance(rho, LearnedRadius) else None
        every = check_positive_int("sam_every", sam_every)
        if schedule is not None and every != 1:
            raise ValueError(
                "Give either `sam_every` or `schedule`, not both. Received: "
                f"sam_every={sam_every}, schedule={schedule!r}"
            )
        steps = check_positive_int("ascent_steps", ascent_steps)
        if radius is not None and steps > 1:
            raise ValueError(
                "A `LearnedRadius` learns rho from one ascent step; it "
                "cannot be combined with `ascent_steps` > 1. Received: "
                f"ascent_steps={ascent_steps}, rho=LearnedRadius(...)"
            )
        super().__init__(
            optimizer,
            rho=rho if radius is None else radius.initial,
            name=name,
            schedule=(
                sam_schedules.Every(every) if schedule is None else schedule
            ),
        )
        self.sam_every, self.ascent_steps = every, steps
        self.normalize = check_bool("normalize", normalize)
        # A LearnedRadius drives the `rho` variable from the rule.
        self.radius = radius
        self.sync_perturbation, self.num_batch_splits = _check_splits(
            sync_perturbation, num_batch_splits
        )

    @property
    def passes_per_step(self):
        return 1 + self.ascent_steps

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        if self.radius is not None:
            self.radius.build(self, var_list)

    # ---- the rule ----

    def gradient(self, grad_at, w):
        """g_adv at w + eps(g), pulled back to w (DESIGN 2)."""
        variables = grad_at.variables
        if not self.built:
            self.build(list(variables))
        g = grad_at(w)  # the clean pass at w
        self._after_clean(grad_at, g)
        k = self.ascent_steps
        scale = None if k == 1 else 1.0 / k
        for _ in range(k):  # ascend to w + eps, each sub-batch from its g
            g_adv = grad_at(
                lambda point, g_j: self.perturbed_values(
                    self._ascent_direction(g_j), variables, point, scale
                )
            )
        g_adv = self.pull_back(g_adv, variables, w)  # back at w
        self._after_adversarial(grad_at.shared(g), g_adv)
        return g_adv

    def cheap_gradient(self, grad_at, w):
        """g: a plain step (the radius still learns from its clean pass)."""
        g = grad_at(w)
        self._after_clean(grad_at, g)
        return g

    def _ascent_direction(self, g):
        """The gradient the ascent follows (FriendlySAM changes it)."""
        return g

    def _after_clean(self, grad_at, g):
        """After the clean pass, on every step: the learned radius's step
        (from the replicas' shared gradient)."""
        radius = self.radius
        if radius is None:
            return
        validation = grad_at.elsewhere(
            radius.auxiliary_batches(self),
            radius.validation_mode == "training",
            radius.auxiliary_due(self),
        )
        radius.on_clean_pass(self, grad_at.loss, grad_at.shared(g), validation)

    def _after_adversarial(self, g, g_adv):
        """After the adversarial pass (unscaled, pulled back to w)."""
        if self.radius is not None:
            self.radius.on_adversarial_pass(self, g, g_adv)

    # ---- config ----

    def get_config(self):
        config = super().get_config()
        if self.radius is not None:
            config["rho"] = keras.saving.serialize_keras_object(self.radius)
        config.update(
            {
                "sam_every": self.sam_every,
                "sync_perturbation": self.sync_perturbation,
                "num_batch_splits": self.num_batch_splits,
                "normalize": self.normalize,
                "schedule": (
                    None
                    if self.sam_every != 1
                    or (
                        isinstance(self.schedule, sam_schedules.Every)
                        and self.schedule.k == 1
                    )
                    else keras.saving.serialize_keras_object(self.schedule)
                ),
                "ascent_steps": self.ascent_steps,
            }
        )
        return config
