"""How much a ViT's accuracy depends on exact block weights: ``python -m vit_quant.weight_tolerance --config ...``.

Two probes on the run's evaluation data (full precision, no quantizer):

* **depth**: top-1 with only the first ``k`` blocks (the rest skipped, the final norm and head kept), for
  every ``k``: how much of the accuracy the blocks carry;
* **weight noise**: top-1 after adding Gaussian noise of ``level`` × each output row's standard deviation to
  the weight of every linear inside the blocks (the layers the runs quantize), for each of
  :data:`NOISE_LEVELS`, seeded by the config's ``seed``: how sharply accuracy falls with weight error;
* **linear probe** (the embedded model): top-1 of a linear classifier on the mean of the patch embeddings
  (position embeddings added), fitted on the training split: what the task asks beyond a linear read-out of
  the patches, i.e. what the blocks must add.

A model whose accuracy barely moves under 40 % weight noise cannot lose much to 4-bit (or even 2-bit)
weights either, whatever the quantizer; pretrained DeiTs are far less tolerant.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from vit_quant.adapter import vit_blocks

NOISE_LEVELS = (0.1, 0.2, 0.4)
"""Noise standard deviations, as fractions of each weight row's standard deviation."""

Top1 = Callable[[nn.Module], float]
"""Top-1 accuracy in percent of a model on fixed evaluation data."""


@contextmanager
def first_blocks_only(model: nn.Module, count: int) -> Iterator[nn.Module]:
    """``model`` with only its first ``count`` blocks (0 ≤ count ≤ depth); the blocks are restored on exit."""
    blocks = vit_blocks(model)
    if not 0 <= count <= len(blocks):
        raise ValueError(f"count must be in 0..{len(blocks)} (the model's depth), got {count}")
    kept = list(blocks)
    model.blocks = nn.Sequential(*kept[:count])
    try:
        yield model
    finally:
        model.blocks = blocks


@contextmanager
def noisy_block_weights(model: nn.Module, level: float, seed: int) -> Iterator[nn.Module]:
    """``model`` with ``W + level · std(W[r]) · N(0, 1)`` for every row ``r`` of every block linear's weight.

    The noise is drawn on the CPU from a generator seeded with ``seed`` (blocks and linears in order), so a
    level and seed give the same weights on every device; the original weights are restored on exit.
    """
    if not level >= 0:
        raise ValueError(f"level must be >= 0 (a fraction of each weight row's standard deviation), got {level}")
    generator = torch.Generator().manual_seed(seed)
    linears = [module for block in vit_blocks(model) for module in block.modules() if isinstance(module, nn.Linear)]
    originals = [linear.weight.detach().clone() for linear in linears]
    try:
        with torch.no_grad():
            for linear, weight in zip(linears, originals, strict=True):
                noise = torch.randn(weight.shape, generator=generator, dtype=weight.dtype).to(weight.device)
                linear.weight.add_(noise.mul_(weight.std(dim=1, keepdim=True)), alpha=level)
        yield model
    finally:
        with torch.no_grad():
            for linear, weight in zip(linears, originals, strict=True):
                linear.weight.copy_(weight)


def depth_profile(model: nn.Module, top1: Top1) -> list[tuple[int, float]]:
    """``(k, top-1 with the first k blocks)`` for k = 0 .. depth."""
    profile = []
    for count in range(len(vit_blocks(model)) + 1):
        with first_blocks_only(model, count):
            profile.append((count, top1(model)))
    return profile


def noise_profile(model: nn.Module, top1: Top1, levels: Sequence[float] = NOISE_LEVELS, seed: int = 0
                  ) -> list[tuple[float, float]]:
    """``(level, top-1 under that weight noise)`` for each level (the same seed for each)."""
    profile = []
    for level in levels:
        with noisy_block_weights(model, level, seed):
            profile.append((level, top1(model)))
    return profile


def patch_embedding_features(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The mean over tokens of ``patch_embed(x)`` plus the patches' position embeddings: [N, D] for images
    [N, C, H, W] (a timm ViT; no block, norm or head is used)."""
    prefix = getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0)
    position = model.pos_embed[:, prefix:] if getattr(model, "pos_embed", None) is not None else 0
    device = next(model.parameters()).device
    features = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            tokens = model.patch_embed(images[start:start + batch_size].to(device)) + position
            features.append(tokens.mean(dim=1).cpu())
    return torch.cat(features)


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, *, steps: int = 200) -> float:
    """Top-1 (%) on the test features of a multinomial logistic regression fitted on the training features
    ([N, D] each; standardized with the training statistics) by ``steps`` L-BFGS iterations from zero."""
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    train_x, test_x = (train_features - mean) / std, (test_features - mean) / std
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    head = nn.Linear(train_x.shape[1], classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = nn.functional.cross_entropy(head(train_x), train_labels)
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        return 100.0 * float((head(test_x).argmax(1) == test_labels).float().mean())


def format_profiles(full: float, depth: Sequence[tuple[int, float]], noise: Sequence[tuple[float, float]]) -> str:
    """The two probes as a table, with each top-1's difference to the full model's."""
    lines = [f"full model: top-1 {full:.2f} %", "", f"{'blocks kept':<22} {'top-1 %':>8} {'- full':>8}"]
    lines += [f"{count:<22} {value:>8.2f} {value - full:>+8.2f}" for count, value in depth]
    lines += ["", f"{'weight noise (× row std)':<26} {'top-1 %':>8} {'- full':>8}"]
    lines += [f"{level:<26g} {value:>8.2f} {value - full:>+8.2f}" for level, value in noise]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Load the config's model and evaluation data, print both probes."""
    from vit_quant.embedded_model import evaluate_top1
    from vit_quant.main import EMBEDDED, embedded_split, load_probe

    probe = load_probe(argv, __doc__.splitlines()[0])
    if probe is None:
        return 2

    def top1(candidate: nn.Module) -> float:
        return evaluate_top1(candidate, probe.evaluation, batch_size=probe.config.eval_batch_size)

    print(f"model: {probe.config.model} ({probe.source['source']})")
    model = probe.model
    depth = depth_profile(model, top1)
    full = depth[-1][1]  # every block kept: the full model
    print(format_profiles(full, depth, noise_profile(model, top1, seed=probe.config.seed)))
    if probe.config.model == EMBEDDED:
        train, test = embedded_split(probe.config, "train"), embedded_split(probe.config, "test")
        accuracy = linear_probe(patch_embedding_features(model, train.images), train.labels,
                                patch_embedding_features(model, test.images), test.labels)
        print(f"\nlinear probe on the mean patch embedding: top-1 {accuracy:.2f} % ({accuracy - full:+.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
