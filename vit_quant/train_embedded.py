"""Train the embedded ViT, or a candidate recipe, and write it as a weights file with its record:
``python -m vit_quant.train_embedded [--candidate NAME] [--output FILE.safetensors]`` (``make train-embedded-vit``).

The weights are written in float16 (``FILE.safetensors``) beside a JSON record (``FILE.json``): the recipe,
the SHA-256 of the Fashion-MNIST files trained on, the training time and device, per-epoch loss and train
top-1, the probes of :mod:`vit_quant.weight_tolerance` on the float16 weights (test top-1, top-1 with no
block, with the first k blocks, under weight noise, and a linear probe on the mean patch embedding), and the
SHA-256 of the weights file, which :func:`vit_quant.embedded_weights.load_embedded` verifies.

``--fit_seconds S`` picks the number of epochs that fits in S seconds on this machine (measured on a
throw-away model first) instead of the recipe's, and records the number chosen.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import timm
import torch

from common.config import ConfigError
from common.files import check_output_file
from vit_quant.data import FASHION_MNIST_BACKGROUND, LabeledImages, check_fashion_mnist, load_fashion_mnist
from vit_quant.embedded_model import (
    TRAINING_CODE_VERSION,
    EmbeddedRecipe,
    augment,
    default_device,
    evaluate_top1,
    train,
)
from vit_quant.embedded_weights import SHIPPED_WEIGHTS, fashion_mnist_identity, record_path, write_embedded
from vit_quant.weight_tolerance import depth_profile, linear_probe, noise_profile, patch_embedding_features

DEIT_TINY = {"embed_dim": 192, "depth": 12, "num_heads": 3, "mlp_ratio": 4.0}
"""DeiT-Tiny's shape (Touvron et al., 2021): 12 blocks of width 192, 3 heads, MLP 4x."""

_LONG = {"batch_size": 256, "lr": 1e-3, "min_lr": 1e-5, "warmup_epochs": 1.0, "crop_padding": 2}

CANDIDATES: dict[str, EmbeddedRecipe] = {
    "cluttered56-p7-deit-tiny": EmbeddedRecipe(img_size=56, patch_size=7, clutter_pieces=6, clutter_piece=9,
                                               epochs=2, **DEIT_TINY, **_LONG),
    "cluttered42-p7-deit-tiny": EmbeddedRecipe(img_size=42, patch_size=7, clutter_pieces=4, clutter_piece=9,
                                               epochs=16, **DEIT_TINY, **_LONG),
    "fmnist28-p7-deit-tiny": EmbeddedRecipe(img_size=28, patch_size=7, epochs=4, **DEIT_TINY, **_LONG),
    "fmnist28-p7-small-long": EmbeddedRecipe(epochs=20, **_LONG),
}
"""Recipes compared for the embedded model (task x shape x training length); docs/vit_quant.md has their
numbers."""

DEFAULT_CANDIDATE = "cluttered42-p7-deit-tiny"
"""The recipe of the shipped weights."""


def fit_epochs(recipe: EmbeddedRecipe, items: LabeledImages, seconds: float, device: torch.device,
               steps: int = 30) -> int:
    """Epochs of ``recipe`` that fit in ``seconds`` here: the time of ``steps`` training steps on a throw-away
    model (after 5 warm-up steps) times the steps per epoch, with 10 % to spare; at least 1."""
    model = recipe.build_model().to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr)
    x = recipe.task_images(items, clutter_seed=0).images[: recipe.batch_size].to(device)
    y = items.labels[: recipe.batch_size].to(device)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        batch = augment(x, padding=recipe.crop_padding, hflip=recipe.hflip, fill=FASHION_MNIST_BACKGROUND,
                        generator=generator)
        loss = torch.nn.functional.cross_entropy(model(batch), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_epoch = (time.perf_counter() - began) / steps * math.ceil(len(items.labels) / recipe.batch_size)
    return max(1, int(0.9 * seconds / per_epoch))


def probes(model: torch.nn.Module, recipe: EmbeddedRecipe, data_path: str | None) -> dict:
    """The record's probes of ``model`` on the recipe's test images (see the module's docstring)."""
    train_view, test = (recipe.split_images(load_fashion_mnist(split, data_path), split) for split in ("train", "test"))

    def top1(candidate: torch.nn.Module) -> float:
        return evaluate_top1(candidate, test, batch_size=1000, progress=False)

    depth = depth_profile(model, top1)
    probe = linear_probe(patch_embedding_features(model, train_view.images), train_view.labels,
                         patch_embedding_features(model, test.images), test.labels)
    return {"test_top1": depth[-1][1], "no_blocks_top1": depth[0][1], "first_blocks_top1": [v for _, v in depth],
            "weight_noise_top1": dict(noise_profile(model, top1)), "linear_probe_top1": probe, "chance_top1": 10.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", default=DEFAULT_CANDIDATE, choices=sorted(CANDIDATES),
                        help=f"recipe to train (default {DEFAULT_CANDIDATE}, the shipped one)")
    parser.add_argument("--output", type=Path, default=SHIPPED_WEIGHTS,
                        help=f"weights file to write, its record beside it (default {SHIPPED_WEIGHTS})")
    parser.add_argument("--data_path", default=None, help="Fashion-MNIST IDX folder (default: the Debian package's)")
    parser.add_argument("--epochs", type=int, default=None, help="train this many epochs instead of the recipe's")
    parser.add_argument("--fit_seconds", type=float, default=None,
                        help="train as many epochs as fit in this many seconds here (recorded)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per epoch")
    args = parser.parse_args(argv)
    if args.output.suffix != ".safetensors":
        parser.error(f"--output: {args.output} must end in .safetensors (its record is written beside it as .json)")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.fit_seconds is not None and not args.fit_seconds > 0:
        parser.error(f"--fit_seconds must be > 0, got {args.fit_seconds}")
    try:  # before hours of training: where the files go, and the data
        check_output_file(args.output, "--output")
        check_output_file(record_path(args.output), "--output")
        check_fashion_mnist(args.data_path)
    except (ConfigError, FileNotFoundError) as error:
        parser.error(str(error))
    items = load_fashion_mnist("train", args.data_path)
    device = default_device()
    recipe = CANDIDATES[args.candidate]
    if args.epochs is not None:
        recipe = dataclasses.replace(recipe, epochs=args.epochs)
    if args.fit_seconds is not None:
        recipe = dataclasses.replace(recipe, epochs=fit_epochs(recipe, items, args.fit_seconds, device))
    print(f"{args.candidate}: {recipe.epochs} epochs on {device}", flush=True)

    def report(epoch: int, loss: float, accuracy: float, seconds: float) -> None:
        print(f"{args.candidate} epoch {epoch + 1}/{recipe.epochs}: loss {loss:.4f}, train top-1 {accuracy:.2f} %,"
              f" {seconds:.0f} s", flush=True)

    result = train(recipe, items, device=device, progress=args.progress, on_epoch=report)
    model = result.model.half().float()  # the record describes the float16 weights that are written
    record = {
        "candidate": args.candidate,
        "recipe": dataclasses.asdict(recipe),
        "training_code_version": TRAINING_CODE_VERSION,
        "data": fashion_mnist_identity(args.data_path),
        "train_seconds": round(result.seconds, 1),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "epoch_losses": [round(value, 5) for value in result.epoch_losses],
        "epoch_train_top1": [round(value, 3) for value in result.epoch_accuracies],
        **probes(model, recipe, args.data_path),
    }
    for earlier in write_embedded(model, record, args.output):
        print(f"the file that was there is now {earlier}", flush=True)
    print(f"{args.candidate}: test top-1 {record['test_top1']:.2f} %, no blocks {record['no_blocks_top1']:.2f} %,"
          f" linear probe {record['linear_probe_top1']:.2f} %; wrote {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
