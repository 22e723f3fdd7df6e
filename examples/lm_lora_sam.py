"""LoRA fine-tuning of a small GPT-2 with and without SAM, on Python source.

A byte-level GPT-2 (keras-hub's `GPT2Backbone`, built from a config: no
download) is first pretrained with plain AdamW on the Python standard
library of this interpreter, leaving out its `test` package. Standing in
for a preset, that model is then fine-tuned on the `test` package with
LoRA (`backbone.enable_lora(rank)`: only the attention query/value factors
train), twice from the same weights: plain AdamW, and `keras_sam.SAMModel`
with SAM around the same AdamW. Prints the validation loss (nats per byte,
on held-out files of the `test` package) before and after each.

SAM perturbs the trainable variables only: under LoRA its extra memory is
that of the LoRA factors, not a copy of the model.

Runs in about 1-2 minutes on 2 CPU cores with the defaults (start-up
included). Pick the backend with KERAS_BACKEND. Needs keras-hub
(`pip install -e ".[hub]"`).

    python examples/lm_lora_sam.py
    python examples/lm_lora_sam.py --hidden 256 --layers 4 --seq 256 \\
        --pretrain-steps 2000 --steps 500 --rank 8 --rho 0.05
"""

import argparse
import os
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import keras_hub
import numpy as np

import keras_sam

END_OF_FILE = 256  # byte tokens are 0..255


def stdlib_sources():
    """Sorted .py files of the stdlib (no site-packages): (base, test)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if "site-packages" not in p.parts
    )
    test = [p for p in files if p.relative_to(root).parts[0] == "test"]
    base = [p for p in files if p.relative_to(root).parts[0] != "test"]
    return base, test


def tokens(paths):
    parts = []
    for path in paths:
        parts.append(np.frombuffer(path.read_bytes(), np.uint8))
        parts.append(np.array([END_OF_FILE]))
    return np.concatenate(parts).astype("int32")


def windows(data, count, seq, seed):
    """Random windows of seq + 1 tokens: (inputs, next tokens)."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, len(data) - seq - 1, size=count)
    w = data[start[:, None] + np.arange(seq + 1)[None, :]]
    return w[:, :-1], w[:, 1:]


class ByteLM(keras.Model):
    """Token ids -> next-token logits, the head tied to the embedding."""

    def __init__(self, backbone, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone

    def call(self, token_ids):
        mask = keras.ops.ones_like(token_ids)
        hidden = self.backbone({"token_ids": token_ids, "padding_mask": mask})
        logits = self.backbone.token_embedding(hidden, reverse=True)
        return keras.ops.cast(logits, "float32")


def build(args):
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=END_OF_FILE + 4,
        num_layers=args.layers,
        num_heads=args.heads,
        hidden_dim=args.hidden,
        intermediate_dim=4 * args.hidden,
        max_sequence_length=args.seq,
        dropout=0.1,
    )
    model = ByteLM(backbone)
    model(np.zeros((1, args.seq), "int32"))
    return model, backbone


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=100, help="fine-tuning")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=0)
    args = p.parse_args()
    keras.utils.set_random_seed(args.seed)

    base_files, test_files = stdlib_sources()
    # every 10th file of the test package is held out for validation
    tune_files = [f for i, f in enumerate(test_files) if i % 10 != 9]
    val_files = [f for i, f in enumerate(test_files) if i % 10 == 9]
    n = args.batch_size
    x0, y0 = windows(tokens(base_files), args.pretrain_steps * n, args.seq, 1)
    x, y = windows(tokens(tune_files), args.steps * n, args.seq, 2)
    xv, yv = windows(tokens(val_files), 8 * n, args.seq, 3)

    start = time.perf_counter()
    model, _ = build(args)
    model.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate), loss=LOSS
    )
    print(f"pretraining {model.count_params():,} weights on the stdlib ...")
    model.fit(x0, y0, batch_size=n, epochs=1, verbose=args.verbose)
    pretrained = model.get_weights()
    before = model.evaluate(xv, yv, batch_size=n, verbose=0)
    print(f"validation loss of the pretrained model: {before:.4f}")

    for name in ("plain", "sam"):
        keras.utils.set_random_seed(args.seed + 1)  # same LoRA init, order
        model, backbone = build(args)
        model.set_weights(pretrained)
        backbone.enable_lora(args.rank)
        trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
        inner = keras.optimizers.AdamW(args.learning_rate)
        if name == "sam":
            model = keras_sam.SAMModel(model)
            optimizer = keras_sam.optimizers.SAM(inner, rho=args.rho)
        else:
            optimizer = inner
        model.compile(optimizer=optimizer, loss=LOSS)
        t0 = time.perf_counter()
        model.fit(x, y, batch_size=n, epochs=1, verbose=args.verbose)
        after = model.evaluate(xv, yv, batch_size=n, verbose=0)
        print(
            f"{name:>5} + LoRA (rank {args.rank}, {trainable:,} trainable): "
            f"validation loss {before:.4f} -> {after:.4f} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
