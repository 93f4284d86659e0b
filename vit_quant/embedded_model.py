"""The embedded default model: a small DeiT-style ViT trained here on Fashion-MNIST.

No pretrained ViT weights can be downloaded offline, so the quantization experiments fall
back on this model. It is a plain ``timm`` ``VisionTransformer`` (class token, pre-norm
blocks, GELU MLP) trained from scratch with a fixed, seeded recipe (:class:`EmbeddedRecipe`),
then cached under ``<repo>/.cache/vit/`` (root overridable with ``GPTAQ_CACHE_DIR``):

* ``embedded_vit-<key>.safetensors``: the weights,
* ``embedded_vit-<key>.json``: the recipe, test accuracy, training time and versions,

where ``<key>`` hashes the recipe, so changing any recipe field trains a new model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from common.cache import cache_root
from common.files import atomic_write, atomic_write_json
from vit_quant.data import FASHION_MNIST_BACKGROUND, LabeledImages, load_fashion_mnist

log = logging.getLogger(__name__)

# Bump when the training code changes in a way the recipe fields do not capture.
_TRAINING_CODE_VERSION = 1


@dataclass(frozen=True)
class EmbeddedRecipe:
    """Architecture and training recipe of the embedded ViT (every field enters the cache key).

    Architecture: 28x28x1 input, ``patch_size`` patches -> (28 / patch_size)^2 tokens + class
    token, ``depth`` blocks of width ``embed_dim`` with ``num_heads`` heads (head dim =
    embed_dim / num_heads) and an MLP of ``mlp_ratio * embed_dim`` hidden units.

    Training: AdamW (``lr`` for batch ``batch_size``, decoupled ``weight_decay`` on weight
    matrices only), linear warmup over ``warmup_epochs`` then cosine decay to ``min_lr``,
    per optimizer step; cross-entropy with ``label_smoothing``; gradient norm clipped to
    ``grad_clip``; augmentation = random crop after ``crop_padding`` pixels of background
    padding + horizontal flip with probability 0.5 when ``hflip``. ``seed`` fixes the
    initialization, the shuffling and the augmentation.

    The model underfits in so few epochs, so augmentation is kept light: a 1-pixel shift and no flip
    (Fashion-MNIST footwear always points left). Its test top-1 is recorded with the cached model and in
    every run's JSON (``model_source``).
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
    seed: int = 0

    def cache_key(self) -> str:
        """16 hex digits of the SHA-256 of the recipe (and training-code version)."""
        payload = json.dumps({"recipe": asdict(self), "code": _TRAINING_CODE_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

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


def default_cache_dir() -> Path:
    """``$GPTAQ_CACHE_DIR/vit`` when the variable is set, else ``<repo>/.cache/vit``."""
    return cache_root() / "vit"


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
) -> tuple[float, int]:
    """One AdamW step at learning rate ``lr`` on images x [B, C, H, W], labels y [B].

    Returns (mean smoothed cross-entropy of the batch, number of correct predictions).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    logits = model(x)
    loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
    optimizer.step()
    return loss.item(), int((logits.argmax(1) == y).sum())


def train(
    recipe: EmbeddedRecipe,
    train_set: LabeledImages,
    *,
    device: torch.device | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a fresh :meth:`EmbeddedRecipe.build_model` on ``train_set`` following ``recipe``.

    Seeds the global torch RNG with ``recipe.seed`` (initialization) and draws shuffling and
    augmentation from a CPU generator seeded the same way. Shows one tqdm bar per epoch with
    the running loss and train accuracy. Returns the model in eval mode on ``device``.
    """
    device = device or default_device()
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    model = recipe.build_model().to(device).train()
    optimizer = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr)
    images, labels = train_set.images.to(device), train_set.labels.to(device)
    steps_per_epoch = math.ceil(len(labels) / recipe.batch_size)
    total_steps = recipe.epochs * steps_per_epoch
    warmup_steps = max(1, round(recipe.warmup_epochs * steps_per_epoch))
    result = TrainResult(model)
    start, step = time.perf_counter(), 0
    for epoch in range(recipe.epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        batches = torch.randperm(len(labels), generator=generator).split(recipe.batch_size)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{recipe.epochs}", disable=not progress)
        for idx in bar:
            idx = idx.to(device)
            x = augment(
                images[idx],
                padding=recipe.crop_padding,
                hflip=recipe.hflip,
                fill=FASHION_MNIST_BACKGROUND,
                generator=generator,
            )
            lr = lr_at(step, total_steps, warmup_steps, recipe)
            loss, hits = _train_step(model, optimizer, x, labels[idx], lr, recipe)
            step += 1
            loss_sum, correct, seen = loss_sum + loss * len(idx), correct + hits, seen + len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100 * correct / seen:.2f}%")
        result.epoch_losses.append(loss_sum / seen)
        result.epoch_accuracies.append(100.0 * correct / seen)
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


@torch.no_grad()
def top1_outcomes(
    model: torch.nn.Module,
    data: Dataset | DataLoader,
    *,
    batch_size: int = 500,
    device: torch.device | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Whether ``model``'s top-1 prediction is right, per example of ``data`` in order (bool [n]).

    ``data`` is a dataset of ``(image [C, H, W], label)`` pairs (batched here with
    ``batch_size``) or a DataLoader of ``(images [B, C, H, W], labels [B])``. ``device``
    defaults to the model's; otherwise the model is moved there. The model's train/eval mode
    is restored afterwards. Raises ``ValueError`` on empty data.
    """
    device = device or next(model.parameters()).device
    model.to(device)
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    was_training = model.training
    model.eval()
    outcomes, correct, seen = [], 0, 0
    bar = tqdm(loader, desc="top-1", disable=not progress, leave=False)
    for images, labels in bar:
        hits = (model(images.to(device)).argmax(1) == labels.to(device)).cpu()
        outcomes.append(hits)
        correct, seen = correct + int(hits.sum()), seen + len(labels)
        bar.set_postfix(acc=f"{100 * correct / seen:.2f}%")
    model.train(was_training)
    if seen == 0:
        raise ValueError("top1_outcomes: empty dataset")
    return torch.cat(outcomes)


def evaluate_top1(model: torch.nn.Module, data: Dataset | DataLoader, **options: object) -> float:
    """Top-1 accuracy in percent (0-100) of ``model`` on ``data`` (:func:`top1_outcomes`, same arguments)."""
    outcomes = top1_outcomes(model, data, **options)
    return 100.0 * int(outcomes.sum()) / len(outcomes)


def cache_paths(recipe: EmbeddedRecipe, cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(weights .safetensors, info .json) paths of ``recipe`` in ``cache_dir`` (default: :func:`default_cache_dir`)."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = f"embedded_vit-{recipe.cache_key()}"
    return folder / f"{stem}.safetensors", folder / f"{stem}.json"


def is_cached(recipe: EmbeddedRecipe | None = None, cache_dir: str | Path | None = None) -> bool:
    """Whether a trained model of ``recipe`` is in the cache (so loading it writes nothing)."""
    weights_path, info_path = cache_paths(recipe or EmbeddedRecipe(), cache_dir)
    return weights_path.is_file() and info_path.is_file()


def save_checkpoint(model: torch.nn.Module, info: dict[str, Any], weights_path: Path, info_path: Path) -> None:
    """Write weights then info JSON, each atomically (the JSON, written last, marks completeness)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(weights_path, lambda tmp: safetensors.torch.save_file(tensors, tmp))
    atomic_write_json(info_path, info)


def load_checkpoint(
    recipe: EmbeddedRecipe, weights_path: Path, info_path: Path, device: torch.device
) -> tuple[VisionTransformer, dict[str, Any]]:
    """Model (eval mode, on ``device``) and info dict from a checkpoint written by :func:`save_checkpoint`."""
    info = json.loads(info_path.read_text())
    if info.get("recipe") != asdict(recipe):
        raise ValueError(f"{info_path} was written for another recipe")
    model = recipe.build_model()
    model.load_state_dict(safetensors.torch.load_file(str(weights_path)), strict=True)
    return model.to(device).eval(), info


def load_or_train_embedded_vit(
    data_path: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    recipe: EmbeddedRecipe | None = None,
) -> tuple[VisionTransformer, dict[str, Any]]:
    """The embedded Fashion-MNIST ViT: loaded from the cache, else trained, evaluated and cached.

    Args:
        data_path: Fashion-MNIST IDX folder (default: the Debian package's folder).
        cache_dir: checkpoint folder (default ``<repo>/.cache/vit`` or ``$GPTAQ_CACHE_DIR/vit``).
        progress: show tqdm bars while training/evaluating.
        recipe: training recipe; default :class:`EmbeddedRecipe()`.

    Returns:
        (model in eval mode on :func:`default_device`, info) where info holds the recipe,
        ``test_top1`` (% on the test split), ``train_seconds``, versions, ``cache_hit``,
        ``weights_path``.
    """
    recipe = recipe or EmbeddedRecipe()
    device = default_device()
    weights_path, info_path = cache_paths(recipe, cache_dir)
    if weights_path.is_file() and info_path.is_file():
        try:
            model, info = load_checkpoint(recipe, weights_path, info_path, device)
            log.info("loaded embedded ViT from %s", weights_path)
            return model, {**info, "cache_hit": True, "weights_path": str(weights_path)}
        except (OSError, ValueError, RuntimeError, SafetensorError) as err:
            log.warning("ignoring unreadable cached checkpoint %s (%s); retraining", weights_path, err)
    log.info("training the embedded ViT (recipe %s) on %s", recipe.cache_key(), device)
    result = train(recipe, load_fashion_mnist("train", data_path), device=device, progress=progress)
    test_top1 = evaluate_top1(result.model, load_fashion_mnist("test", data_path), progress=progress)
    info = {
        "recipe": asdict(recipe),
        "cache_key": recipe.cache_key(),
        "dataset": "fashion-mnist",
        "test_top1": test_top1,
        "train_seconds": result.seconds,
        "epoch_losses": result.epoch_losses,
        "epoch_train_accuracies": result.epoch_accuracies,
        "device": str(device),
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
    }
    save_checkpoint(result.model, info, weights_path, info_path)
    log.info("embedded ViT: test top-1 %.2f%% after %.0f s; cached at %s", test_top1, result.seconds, weights_path)
    return result.model, {**info, "cache_hit": False, "weights_path": str(weights_path)}
