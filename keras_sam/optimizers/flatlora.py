"""`FlatLoRA`: LoRA trained at a random perturbation of the merged weight."""

import math
import random

import keras
from keras import ops

from keras_sam._keras_compat import all_layers
from keras_sam._validation import check_float
from keras_sam._validation import check_seed
from keras_sam.optimizers.base import SharpnessAware


def lora_layers(model):
    """`[(layer, frozen kernel, in_axes)]` of the LoRA layers of `model`:
    `in_axes` are the kernel axes contracted with the input."""
    found = []
    for layer in all_layers(model):
        kernel = [v for v in layer.non_trainable_weights if v.name == "kernel"]
        if not getattr(layer, "lora_enabled", False) or not kernel:
            continue  # no LoRA, or a quantized kernel
        equation = getattr(layer, "equation", None)  # EinsumDense
        if equation is None:
            in_axes = (0,)  # Dense: (in, units)
        else:
            inputs, output = equation.split("->")
            spec = inputs.split(",")[1]
            in_axes = tuple(i for i, c in enumerate(spec) if c not in output)
        found.append((layer, kernel[0], in_axes))
    return found


def noise_std(merged, sigma, in_axes):
    """`sigma * ||W'_{:, j}|| / sqrt(n)` per output unit, broadcastable;
    the norm over the `in_axes` of the merged kernel, `n` their size."""
    n = math.prod(merged.shape[i] for i in in_axes)
    norm = ops.sqrt(ops.sum(ops.square(merged), axis=in_axes, keepdims=True))
    return ops.multiply(ops.cast(sigma, "float32") / math.sqrt(n), norm)


def _spread(seed):
    """`seed` times Knuth's multiplicative-hash constant, modulo 2^31."""
    return (seed * 2654435761) % 2**31


@keras.saving.register_keras_serializable(package="keras_sam")
class FlatLoRA(SharpnessAware):
    """Flat-LoRA: LoRA factors trained at a randomly perturbed merged weight.

    A LoRA layer computes with `W' = W + s A B` (`W` frozen, `s = alpha /
    r`). Flat-LoRA minimizes the expected loss under Gaussian noise on the
    merged weight, one forward/backward pass per step, its noise fresh at
    every step, drawn from `seed` and the step count, never stored:

    ```
    std_j = sigma * ||W'_{:, j}|| / sqrt(n)  # per output unit; n = fan-in
    eps   = std * z,  z ~ N(0, 1)            # one draw per LoRA kernel
    g     = grad L(W + eps + s A B)          # the only pass, w.r.t. A, B, ...
    w     = inner_optimizer.update(w, g)     # at the unperturbed A, B
    ```

    Only the frozen kernels of LoRA layers (`Dense`, `EinsumDense` after
    `layer.enable_lora(rank)`) are perturbed, as values handed to the
    pass: the kernels are never written. The loss, metrics and BatchNorm
    statistics of `fit` come from that pass. `sigma=0`, or a model without
    LoRA layers, is exactly the inner optimizer. The paper's
    cosine-increasing sigma schedule is not included.

    Args:
        optimizer: The inner optimizer: a `keras.optimizers.Optimizer`
            instance or a name/config accepted by `keras.optimizers.get`.
            Defaults to `"sgd"`.
        sigma: Float >= 0, the noise std relative to a unit's weight norm
            times `sqrt(fan_in)`. Defaults to `0.05`.
        seed: Integer or `None`, the seed of the noise; `None` draws one
            (from Python's `random`, seeded by
            `keras.utils.set_random_seed`). Defaults to `None`.
        name: String, the name of the optimizer. Defaults to `"flatlora"`.

    Example:

    >>> optimizer = keras_sam.optimizers.FlatLoRA(
    ...     keras.optimizers.AdamW(1e-4), sigma=0.05, seed=0)

    References:
        - Li, He, Li, Wang, Shang, Huang, Flat-LoRA: Low-Rank Adaptation
          over a Flat Loss Landscape, ICML 2025.
    """

    passes_per_step = 1

    def __init__(self, optimizer="sgd", sigma=0.05, seed=None, name=None):
        sigma = check_float("sigma", sigma, low=0.0)
        seed = check_seed(seed)
        super().__init__(optimizer, rho=sigma, name=name)
        self.sigma = sigma
        self.seed = random.randrange(2**30) if seed is None else seed
        self._noise = keras.random.SeedGenerator(0, name="flatlora_noise")

    def gradient(self, grad_at, w):
        """g(W + eps + s A B) w.r.t. the trainable variables."""
        layers = lora_layers(grad_at.model)
        if self.sigma == 0.0 or not layers:
            return grad_at(w)  # the inner optimizer, exactly
        at = dict(zip(map(id, grad_at.variables), w))
        frozen = grad_at.non_trainable_variables
        values = dict(zip(map(id, frozen), grad_at.state.non_trainable))
        kernels = [values[id(k)] for _, k, _ in layers]
        given = {}
        z = self._draw([k.shape for k in kernels], self.steps)
        for (layer, k, in_axes), kernel, z_l in zip(layers, kernels, z):
            kernel_f = ops.cast(kernel, "float32")
            lora = ops.matmul(
                at[id(layer.lora_kernel_a)], at[id(layer.lora_kernel_b)]
            )
            scale = layer.lora_alpha / layer.lora_rank
            merged = ops.add(kernel_f, scale * ops.cast(lora, "float32"))  # W'
            eps = ops.multiply(noise_std(merged, self.rho, in_axes), z_l)
            # W + eps: the layer adds s A B itself
            given[id(k)] = ops.cast(ops.add(kernel_f, eps), kernel.dtype)
        return grad_at(w, non_trainable=[given.get(id(v)) for v in frozen])

    def _draw(self, shapes, step):
        """Standard normal draws of `shapes`, keyed by `(seed, step)`: the
        generator's state is set to the key for this draw only (torch seeds
        from the key's sum, so the seed is spread over 31 bits first)."""
        sizes = [math.prod(s) for s in shapes]
        state = self._noise.state
        key = ops.stack(
            [
                ops.convert_to_tensor(_spread(self.seed), state.dtype),
                ops.cast(step, state.dtype),
            ]
        )
        with keras.StatelessScope(state_mapping=[(state, key)]):
            flat = keras.random.normal((sum(sizes),), seed=self._noise)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [
            ops.reshape(flat[s : s + size], shape)
            for s, size, shape in zip(starts, sizes, shapes)
        ]

    def log_values(self):
        values = super().log_values()
        values["sigma"] = values.pop("rho")
        return values

    def get_config(self):
        config = super().get_config()
        del config["rho"]
        config.update({"sigma": self.sigma, "seed": self.seed})
        return config
