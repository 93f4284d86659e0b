"""Tests of vit_quant.embedded_model with tiny models and data (the full training never runs here)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from vit_quant import embedded_model as em
from vit_quant.data import FASHION_MNIST_CLASSES, LabeledImages
from vit_quant.embedded_model import (
    EmbeddedRecipe,
    augment,
    evaluate_top1,
    lr_at,
    train,
)
from vit_quant.train_embedded import CANDIDATES, DEFAULT_CANDIDATE

TINY = EmbeddedRecipe(embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, epochs=1, batch_size=32, warmup_epochs=0.5)


def learnable_images(n: int, seed: int = 0) -> LabeledImages:
    """Images [n, 1, 28, 28] = per-class template + noise, learnable despite crop/flip augmentation.

    The 10 templates are the same for every seed: smooth (4x4 upsampled) and left-right symmetric.
    """
    coarse = torch.randn(10, 1, 4, 4, generator=torch.Generator().manual_seed(1234))
    templates = F.interpolate(coarse + coarse.flip(-1), size=(28, 28), mode="bilinear")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = templates[labels] + 0.5 * torch.randn(n, 1, 28, 28, generator=g)
    return LabeledImages(images, labels, FASHION_MNIST_CLASSES)


def test_candidates_have_the_shapes_they_name() -> None:
    for name, recipe in CANDIDATES.items():
        model = recipe.build_model()
        tokens = (recipe.img_size // recipe.patch_size) ** 2
        assert model.patch_embed.num_patches == tokens and recipe.img_size % recipe.patch_size == 0, name
        assert ("deit-tiny" in name) == ((recipe.embed_dim, recipe.depth, recipe.num_heads) == (192, 12, 3)), name
        assert recipe.cluttered == name.startswith("cluttered"), name
    assert DEFAULT_CANDIDATE in CANDIDATES


def test_task_images_clutter_a_split_by_seed() -> None:
    items = learnable_images(12)
    plain = EmbeddedRecipe()
    assert plain.task_images(items, clutter_seed=3) is items
    recipe = EmbeddedRecipe(img_size=42, patch_size=7, clutter_pieces=2)
    first = recipe.task_images(items, clutter_seed=recipe.train_clutter_seed(0))
    again = recipe.task_images(items, clutter_seed=recipe.train_clutter_seed(0))
    second = recipe.task_images(items, clutter_seed=recipe.train_clutter_seed(1))
    assert first.images.shape == (12, 1, 42, 42) and torch.equal(first.labels, items.labels)
    assert torch.equal(first.images, again.images) and not torch.equal(first.images, second.images)
    assert recipe.train_clutter_seed(0) != em.TEST_CLUTTER_SEED
    assert torch.equal(recipe.split_images(items, "train").images, first.images)
    test = recipe.split_images(items, "test").images
    assert torch.equal(test, recipe.task_images(items, clutter_seed=em.TEST_CLUTTER_SEED).images)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        recipe.split_images(items, "val")


def test_lr_schedule_warmup_then_cosine() -> None:
    r = EmbeddedRecipe(lr=1e-3, min_lr=1e-5)
    lrs = [lr_at(s, 100, 10, r) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in itertools.pairwise(lrs[:10]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05)


def test_augment_crops_and_flips() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    assert torch.equal(augment(x, padding=0, hflip=False, fill=-1.0, generator=g), x)
    flipped = augment(x, padding=0, hflip=True, fill=-1.0, generator=torch.Generator().manual_seed(0))
    for img, out in zip(x, flipped, strict=True):
        assert torch.equal(out, img) or torch.equal(out, img.flip(2))
    big = torch.randn(64, 1, 6, 6)
    crops = augment(big, padding=1, hflip=False, fill=-9.0, generator=g)
    padded = torch.nn.functional.pad(big, (1, 1, 1, 1), value=-9.0)
    for img, crop in zip(padded, crops, strict=True):  # every crop is a 6x6 window of the padded image
        windows = [img[:, i : i + 6, j : j + 6] for i in range(3) for j in range(3)]
        assert any(torch.equal(crop, w) for w in windows)
    assert not torch.equal(crops, big)


def test_brief_training_reduces_loss_and_learns(margin) -> None:
    data = learnable_images(320)
    recipe = dataclasses.replace(TINY, epochs=4, lr=3e-3, batch_size=16)
    result = train(recipe, data, device=torch.device("cpu"), progress=False)
    assert len(result.epoch_losses) == 4
    margin("last / first epoch loss", result.epoch_losses[-1] / result.epoch_losses[0], below=0.8)
    assert not result.model.training
    test = learnable_images(200, seed=1)
    top1 = evaluate_top1(result.model, test, batch_size=64, progress=False)
    margin("top-1 % on 200 held-out images of 10 classes", top1, above=30.0)
    loader = DataLoader(test, batch_size=50)
    assert evaluate_top1(result.model, loader, progress=False) == pytest.approx(top1)


def test_training_is_seeded() -> None:
    data = learnable_images(64)
    a = train(TINY, data, device=torch.device("cpu"), progress=False)
    b = train(TINY, data, device=torch.device("cpu"), progress=False)
    assert a.epoch_losses == b.epoch_losses
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
