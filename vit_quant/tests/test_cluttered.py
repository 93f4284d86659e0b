"""Cluttered Fashion-MNIST: where the item and the pieces go, and that the result is a function of its inputs."""

from __future__ import annotations

import pytest
import torch

from vit_quant.cluttered import ITEM, ClutterRecipe, clutter
from vit_quant.data import FASHION_MNIST_BACKGROUND, LabeledImages


def _items(n: int = 12, seed: int = 0) -> LabeledImages:
    g = torch.Generator().manual_seed(seed)
    images = FASHION_MNIST_BACKGROUND + 3 * torch.rand(n, 1, ITEM, ITEM, generator=g)
    return LabeledImages(images, torch.arange(n) % 10, [str(k) for k in range(10)])


def _item_place(canvas: torch.Tensor, item: torch.Tensor) -> list[tuple[int, int]]:
    """Every place where the canvas holds at least the item's pixels (the max-composite keeps them)."""
    side = canvas.shape[-1]
    return [(top, left) for top in range(side - ITEM + 1) for left in range(side - ITEM + 1)
            if bool((canvas[:, top:top + ITEM, left:left + ITEM] >= item).all())]


def test_each_item_is_whole_on_its_canvas_and_the_labels_are_kept():
    split = _items()
    out = clutter(split, ClutterRecipe(canvas=40, pieces=3, piece=7, seed=1))
    assert out.images.shape == (12, 1, 40, 40) and torch.equal(out.labels, split.labels)
    for canvas, item in zip(out.images, split.images, strict=True):
        assert _item_place(canvas, item)


def test_without_pieces_the_canvas_is_the_item_on_background():
    split = _items()
    out = clutter(split, ClutterRecipe(canvas=36, pieces=0, seed=2))
    for canvas, item in zip(out.images, split.images, strict=True):
        (top, left), *_ = _item_place(canvas, item)
        inside = canvas[:, top:top + ITEM, left:left + ITEM]
        assert torch.equal(inside, item)
        assert float(canvas.sum() - inside.sum()) == pytest.approx(
            FASHION_MNIST_BACKGROUND * (36 * 36 - ITEM * ITEM), rel=1e-6)


def test_pieces_add_pixels_from_other_items():
    split = _items()
    bare = clutter(split, ClutterRecipe(canvas=56, pieces=0, seed=3))
    busy = clutter(split, ClutterRecipe(canvas=56, pieces=6, piece=9, seed=3))
    above = (busy.images > FASHION_MNIST_BACKGROUND).sum(dim=(1, 2, 3))
    assert bool((above > (bare.images > FASHION_MNIST_BACKGROUND).sum(dim=(1, 2, 3))).all())


def test_the_same_recipe_gives_the_same_images_in_any_chunking_and_another_seed_others():
    split = _items(n=20)
    recipe = ClutterRecipe(canvas=48, pieces=4, piece=8, seed=5)
    assert torch.equal(clutter(split, recipe).images, clutter(split, recipe, chunk=3).images)
    assert not torch.equal(clutter(split, recipe).images, clutter(split, ClutterRecipe(48, 4, 8, seed=6)).images)


@pytest.mark.parametrize(("fields", "message"), [
    ({"canvas": 27}, "canvas must be at least 28"),
    ({"pieces": -1}, "pieces must be >= 0"),
    ({"piece": 0}, "piece must be in 1..28"),
    ({"piece": 29}, "piece must be in 1..28"),
])
def test_a_recipe_that_cannot_be_drawn_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        ClutterRecipe(**fields)


def test_items_of_another_size_or_a_single_item_with_pieces_are_refused():
    with pytest.raises(ValueError, match="expected 28x28 items"):
        clutter(LabeledImages(torch.zeros(2, 1, 20, 20), torch.zeros(2, dtype=torch.long), ["a"]), ClutterRecipe())
    with pytest.raises(ValueError, match="at least 2 images"):
        clutter(_items(n=1), ClutterRecipe())
