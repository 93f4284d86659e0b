"""Cluttered Fashion-MNIST: each item at a random place on a larger canvas, among pieces cut from other items.

The construction of "cluttered MNIST" (Mnih et al., 2014, "Recurrent Models of Visual Attention"; Jaderberg
et al., 2015, "Spatial Transformer Networks"), applied to Fashion-MNIST: a ``canvas × canvas`` image of the
background value, ``pieces`` square crops of ``piece × piece`` pixels from other items of the same split pasted at
random places, then the 28 × 28 item itself at a random place. Pixels combine by their maximum (the background
is the smallest value, so an item is never hidden by the background around a piece). The label is the item's.

A model must find the item among distractors of its own texture, which a patch embedding and a linear head
cannot do alone: a candidate task for an embedded ViT whose blocks matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vit_quant.data import FASHION_MNIST_BACKGROUND, LabeledImages

ITEM = 28
"""Side of a Fashion-MNIST item (pixels)."""


@dataclass(frozen=True)
class ClutterRecipe:
    """How a split is cluttered (every field changes the images).

    Attributes:
        canvas: side of the output images (pixels), at least :data:`ITEM`.
        pieces: distractor crops per image (0 = the item alone at a random place).
        piece: side of each crop (pixels), 1 .. :data:`ITEM`.
        seed: seed of every random choice (places, crops, their source items).
    """

    canvas: int = 56
    pieces: int = 6
    piece: int = 9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.canvas < ITEM:
            raise ValueError(f"canvas must be at least {ITEM} (an item's side), got {self.canvas}")
        if self.pieces < 0:
            raise ValueError(f"pieces must be >= 0, got {self.pieces}")
        if not 1 <= self.piece <= ITEM:
            raise ValueError(f"piece must be in 1..{ITEM}, got {self.piece}")


def _paste_max(canvas: torch.Tensor, patches: torch.Tensor, top: torch.Tensor, left: torch.Tensor) -> None:
    """``canvas[i, :, top_i + r, left_i + c] = max(canvas[...], patches[i, :, r, c])`` for every image ``i``.

    canvas: [N, C, S, S]; patches: [N, C, h, w]; top, left: [N] int64 (each patch fits on the canvas).
    """
    n, _, h, w = patches.shape
    rows = (top[:, None] + torch.arange(h))[:, :, None]  # [N, h, 1]
    cols = (left[:, None] + torch.arange(w))[:, None, :]  # [N, 1, w]
    images = torch.arange(n)[:, None, None]
    region = canvas[images, :, rows, cols]  # [N, h, w, C]
    canvas[images, :, rows, cols] = torch.maximum(region, patches.permute(0, 2, 3, 1))


def clutter(split: LabeledImages, recipe: ClutterRecipe, *, chunk: int = 4096) -> LabeledImages:
    """``split`` (items [N, C, 28, 28]) cluttered as ``recipe`` says: images [N, C, canvas, canvas], same labels.

    Each image's pieces come from other items of ``split`` (drawn uniformly, never the item itself); the
    result depends only on ``split`` and ``recipe`` (the draws use a CPU generator seeded with
    ``recipe.seed``), and is built ``chunk`` images at a time.
    """
    items = split.images
    n, channels, height, width = items.shape
    if (height, width) != (ITEM, ITEM):
        raise ValueError(f"expected {ITEM}x{ITEM} items, got {height}x{width}")
    if n < 2 and recipe.pieces:
        raise ValueError("pieces are cut from other items: the split needs at least 2 images")
    generator = torch.Generator().manual_seed(recipe.seed)
    span, piece_span, crop_span = recipe.canvas - ITEM + 1, recipe.canvas - recipe.piece + 1, ITEM - recipe.piece + 1
    item_top, item_left = torch.randint(0, span, (2, n), generator=generator)
    sources = torch.randint(0, max(n - 1, 1), (recipe.pieces, n), generator=generator)
    sources += (sources >= torch.arange(n)).long()  # skip the item itself
    piece_top, piece_left = torch.randint(0, piece_span, (2, recipe.pieces, n), generator=generator)
    crop_top, crop_left = torch.randint(0, crop_span, (2, recipe.pieces, n), generator=generator)
    out = torch.full((n, channels, recipe.canvas, recipe.canvas), FASHION_MNIST_BACKGROUND, dtype=items.dtype)
    offsets = torch.arange(recipe.piece)
    for start in range(0, n, chunk):
        part = slice(start, min(start + chunk, n))
        canvas = out[part]
        for k in range(recipe.pieces):
            source = items[sources[k, part]]  # [b, C, 28, 28]
            rows = (crop_top[k, part][:, None] + offsets)[:, :, None]
            cols = (crop_left[k, part][:, None] + offsets)[:, None, :]
            crops = source[torch.arange(source.shape[0])[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
            _paste_max(canvas, crops, piece_top[k, part], piece_left[k, part])
        _paste_max(canvas, items[part], item_top[part], item_left[part])
    return LabeledImages(out, split.labels.clone(), split.classes)
