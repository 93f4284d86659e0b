"""Tests of vit_quant.embedded_model with tiny models and data (the full training never runs here)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from common.cache import CACHE_ENV_VAR
from vit_quant import embedded_model as em
from vit_quant.data import FASHION_MNIST_CLASSES, LabeledImages
from vit_quant.embedded_model import (
    EmbeddedRecipe,
    augment,
    evaluate_top1,
    load_or_train_embedded_vit,
    lr_at,
    train,
)
from vit_quant.tests.fake_data import write_fashion_folder

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


def test_default_recipe_matches_the_brief() -> None:
    r = EmbeddedRecipe()
    model = r.build_model()
    assert r.depth == 6 and r.embed_dim // r.num_heads == 32 and 128 <= r.embed_dim <= 192
    assert model.cls_token is not None and model.patch_embed.num_patches == (28 // r.patch_size) ** 2
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_cache_key_changes_with_any_field() -> None:
    base = EmbeddedRecipe()
    assert base.cache_key() == EmbeddedRecipe().cache_key()
    assert len(base.cache_key()) == 16
    for change in ({"epochs": base.epochs + 1}, {"lr": base.lr * 2}, {"hflip": not base.hflip}, {"seed": 1}):
        assert dataclasses.replace(base, **change).cache_key() != base.cache_key()


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


def test_cache_round_trip(tmp_path: Path) -> None:
    data_dir, cache = tmp_path / "fmnist", tmp_path / "cache"
    write_fashion_folder(data_dir, n_train=64, n_test=32)
    model, info = load_or_train_embedded_vit(data_dir, cache_dir=cache, progress=False, recipe=TINY)
    assert not info["cache_hit"] and 0.0 <= info["test_top1"] <= 100.0
    key = TINY.cache_key()
    assert sorted(p.name for p in cache.iterdir()) == [f"embedded_vit-{key}.json", f"embedded_vit-{key}.safetensors"]
    saved = json.loads((cache / f"embedded_vit-{key}.json").read_text())
    assert saved["recipe"] == dataclasses.asdict(TINY) and saved["test_top1"] == info["test_top1"]

    again, info2 = load_or_train_embedded_vit(data_dir, cache_dir=cache, progress=False, recipe=TINY)
    assert info2["cache_hit"] and info2["test_top1"] == info["test_top1"]
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)

    other = dataclasses.replace(TINY, seed=1)
    _, info3 = load_or_train_embedded_vit(data_dir, cache_dir=cache, progress=False, recipe=other)
    assert not info3["cache_hit"] and other.cache_key() != key
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_corrupt_cache_is_retrained(tmp_path: Path) -> None:
    data_dir = tmp_path / "fmnist"
    write_fashion_folder(data_dir, n_train=32, n_test=16)
    weights, info_path = em.cache_paths(TINY, tmp_path / "cache")
    weights.parent.mkdir()
    weights.write_bytes(b"garbage")
    info_path.write_text(json.dumps({"recipe": dataclasses.asdict(TINY)}))
    _, info = load_or_train_embedded_vit(data_dir, cache_dir=weights.parent, progress=False, recipe=TINY)
    assert not info["cache_hit"]
    _, info = load_or_train_embedded_vit(data_dir, cache_dir=weights.parent, progress=False, recipe=TINY)
    assert info["cache_hit"]


def test_cache_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path))
    assert em.default_cache_dir() == tmp_path / "vit"
    assert em.cache_paths(TINY)[0].parent == tmp_path / "vit"
    monkeypatch.delenv(CACHE_ENV_VAR)
    assert em.default_cache_dir() == Path(em.__file__).resolve().parents[1] / ".cache" / "vit"
