"""The embedded default model's architecture, task and training: a DeiT-style ViT trained from scratch on
(cluttered) Fashion-MNIST.

No pretrained ViT weights can be downloaded offline, so the quantization experiments fall back on this model:
a plain ``timm`` ``VisionTransformer`` (class token, pre-norm blocks, GELU MLP) trained with a fixed, seeded
recipe (:class:`EmbeddedRecipe`). :mod:`vit_quant.train_embedded` trains it and writes the weights the
repository ships (:mod:`vit_quant.embedded_weights`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vit_quant.cluttered import ITEM, ClutterRecipe, clutter
from vit_quant.data import FASHION_MNIST_BACKGROUND, LabeledImages
from vit_quant.predictions import predict

log = logging.getLogger(__name__)

TRAINING_CODE_VERSION = 2
"""Recorded with trained weights; bumped when training changes in a way the recipe fields do not capture."""

TEST_CLUTTER_SEED = 999_983
"""Seed of the clutter of the test images (the same for every recipe, so recipes compare on one test set)."""


@dataclass(frozen=True)
class EmbeddedRecipe:
    """Architecture, task and training of an embedded ViT (recorded with its weights). The defaults are a small
    plain model; the shipped recipe is ``vit_quant.train_embedded.CANDIDATES[DEFAULT_CANDIDATE]``.

    Architecture: ``img_size`` x ``img_size`` x 1 input, ``patch_size`` patches -> (img_size / patch_size)^2
    tokens + class token, ``depth`` blocks of width ``embed_dim`` with ``num_heads`` heads (head dim =
    embed_dim / num_heads) and an MLP of ``mlp_ratio * embed_dim`` hidden units.

    Training: AdamW (``lr`` for batch ``batch_size``, decoupled ``weight_decay`` on weight
    matrices only), linear warmup over ``warmup_epochs`` then cosine decay to ``min_lr``,
    per optimizer step; cross-entropy with ``label_smoothing``; gradient norm clipped to
    ``grad_clip``; augmentation = random crop after ``crop_padding`` pixels of background
    padding + horizontal flip with probability 0.5 when ``hflip``. ``seed`` fixes the
    initialization, the shuffling and the augmentation.

    Task: with ``img_size`` 28 plain Fashion-MNIST; with a larger ``img_size`` cluttered Fashion-MNIST
    (:mod:`vit_quant.cluttered`) on an ``img_size`` canvas with ``clutter_pieces`` crops of ``clutter_piece``
    pixels; the training images are cluttered afresh every epoch (seed :meth:`train_clutter_seed`), the test
    images once (:data:`TEST_CLUTTER_SEED`).

    Augmentation is kept light: a shift of ``crop_padding`` pixels and no flip (Fashion-MNIST footwear always
    points left). The test top-1 is recorded with the trained model and in every run's JSON (``model_source``).
    """

    img_size: int = 28
    in_chans: int = 1
    num_classes: int = 10
    patch_size: int = 7
    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 2.0
    epochs: int = 8
    batch_size: int = 256
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    crop_padding: int = 1
    hflip: bool = False
    clutter_pieces: int = 0
    clutter_piece: int = 9
    seed: int = 0

    @property
    def cluttered(self) -> bool:
        """Whether the task is cluttered Fashion-MNIST (a canvas larger than an item)."""
        return self.img_size != ITEM

    def train_clutter_seed(self, epoch: int) -> int:
        """Seed of the clutter of the training images in epoch ``epoch`` (0-based)."""
        return self.seed * 100_003 + epoch

    def task_images(self, split: LabeledImages, *, clutter_seed: int) -> LabeledImages:
        """``split`` (Fashion-MNIST items [N, 1, 28, 28]) as this recipe's task sees it: unchanged for plain
        Fashion-MNIST, else cluttered on an ``img_size`` canvas with ``clutter_seed``."""
        if not self.cluttered:
            return split
        return clutter(split, ClutterRecipe(canvas=self.img_size, pieces=self.clutter_pieces,
                                            piece=self.clutter_piece, seed=clutter_seed))

    def split_images(self, items: LabeledImages, split: str) -> LabeledImages:
        """The ``"train"`` or ``"test"`` split's ``items`` as the task shows them to a trained model: the training
        split as the first epoch saw it, the test split as the record's test top-1 was measured on."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        seed = self.train_clutter_seed(0) if split == "train" else TEST_CLUTTER_SEED
        return self.task_images(items, clutter_seed=seed)

    def build_model(self) -> VisionTransformer:
        """A freshly initialized model of this architecture (uses the global torch RNG)."""
        return VisionTransformer(
            img_size=self.img_size,
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            num_classes=self.num_classes,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            class_token=True,
            global_pool="token",
        )


@dataclass
class TrainResult:
    """Output of :func:`train`: the model (eval mode) and per-epoch training statistics."""

    model: VisionTransformer
    epoch_losses: list[float] = field(default_factory=list)  # mean smoothed CE per epoch
    epoch_accuracies: list[float] = field(default_factory=list)  # % on augmented train batches
    seconds: float = 0.0


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lr_at(step: int, total_steps: int, warmup_steps: int, recipe: EmbeddedRecipe) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr."""
    if step < warmup_steps:
        return recipe.lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1.0 + math.cos(math.pi * progress))


def augment(
    images: torch.Tensor, *, padding: int, hflip: bool, fill: float, generator: torch.Generator
) -> torch.Tensor:
    """Random crop (after ``padding`` pixels of ``fill`` on each side) + optional horizontal flip.

    images: [B, C, H, W] -> [B, C, H, W]; random draws come from the CPU ``generator``.
    """
    b, _, h, w = images.shape
    out = images
    if padding > 0:
        padded = F.pad(images, (padding,) * 4, value=fill)
        dy, dx = torch.randint(0, 2 * padding + 1, (2, b, 1), generator=generator).to(images.device)
        rows = dy + torch.arange(h, device=images.device)  # [B, H]
        cols = dx + torch.arange(w, device=images.device)  # [B, W]
        batch = torch.arange(b, device=images.device)[:, None, None]
        # Advanced indices around a slice: the result is [B, H, W, C].
        out = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
    if hflip:
        flip = (torch.rand(b, generator=generator) < 0.5).to(images.device)
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on biases, norms, position embedding or class token."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    recipe: EmbeddedRecipe,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One AdamW step at learning rate ``lr`` on images x [B, C, H, W], labels y [B].

    Returns (summed smoothed cross-entropy of the batch, number of correct predictions), as 0-d tensors on
    the model's device (no synchronization with the host).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    logits = model(x)
    loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
    optimizer.step()
    return loss.detach() * len(y), (logits.detach().argmax(1) == y).sum()


def train(
    recipe: EmbeddedRecipe,
    train_set: LabeledImages,
    *,
    device: torch.device | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, float, float, float], None] | None = None,
) -> TrainResult:
    """Train a fresh :meth:`EmbeddedRecipe.build_model` on ``train_set`` following ``recipe``.

    ``train_set`` holds Fashion-MNIST items [N, 1, 28, 28]; a cluttered recipe clutters them afresh every
    epoch (:meth:`EmbeddedRecipe.task_images`). Seeds the global torch RNG with ``recipe.seed``
    (initialization) and draws shuffling and augmentation from a CPU generator seeded the same way. Matrix
    products on CUDA use TF32. Shows one tqdm bar per epoch; ``on_epoch(epoch, mean loss, train top-1 %,
    seconds so far)`` is called after each. Returns the model in eval mode on ``device``.
    """
    device = device or default_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    model = recipe.build_model().to(device).train()
    optimizer = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr)
    labels = train_set.labels.to(device)
    steps_per_epoch = math.ceil(len(labels) / recipe.batch_size)
    total_steps = recipe.epochs * steps_per_epoch
    warmup_steps = max(1, round(recipe.warmup_epochs * steps_per_epoch))
    result = TrainResult(model)
    start, step = time.perf_counter(), 0
    for epoch in range(recipe.epochs):
        images = recipe.task_images(train_set, clutter_seed=recipe.train_clutter_seed(epoch)).images.to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        batches = torch.randperm(len(labels), generator=generator).split(recipe.batch_size)
        for idx in tqdm(batches, desc=f"epoch {epoch + 1}/{recipe.epochs}", disable=not progress):
            idx = idx.to(device)
            x = augment(
                images[idx],
                padding=recipe.crop_padding,
                hflip=recipe.hflip,
                fill=FASHION_MNIST_BACKGROUND,
                generator=generator,
            )
            loss, hits = _train_step(model, optimizer, x, labels[idx], lr_at(step, total_steps, warmup_steps,
                                                                                recipe), recipe)
            loss_sum += loss
            correct += hits
            step += 1
        result.epoch_losses.append(float(loss_sum) / len(labels))
        result.epoch_accuracies.append(100.0 * int(correct) / len(labels))
        if on_epoch is not None:
            on_epoch(epoch, result.epoch_losses[-1], result.epoch_accuracies[-1], time.perf_counter() - start)
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


def top1_outcomes(
    model: torch.nn.Module,
    data: Dataset | DataLoader,
    *,
    batch_size: int = 500,
    device: torch.device | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Whether ``model``'s top-1 prediction is right, per example of ``data`` in order (bool [n]); the
    arguments are :func:`vit_quant.predictions.predict`'s."""
    return predict(model, data, batch_size=batch_size, device=device, progress=progress).correct


def evaluate_top1(model: torch.nn.Module, data: Dataset | DataLoader, **options: object) -> float:
    """Top-1 accuracy in percent (0-100) of ``model`` on ``data`` (:func:`top1_outcomes`, same arguments)."""
    outcomes = top1_outcomes(model, data, **options)
    return 100.0 * int(outcomes.sum()) / len(outcomes)
