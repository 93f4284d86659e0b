"""The weight-tolerance probes change exactly what they say, restore the model, and are seeded."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vit_quant.weight_tolerance import (
    depth_profile,
    first_blocks_only,
    format_profiles,
    linear_probe,
    noise_profile,
    noisy_block_weights,
    patch_embedding_features,
)


def _tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=3,
                             num_heads=2, mlp_ratio=2.0).eval()


def _images() -> torch.Tensor:
    return torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _agreement(reference: torch.Tensor, images: torch.Tensor):
    """Top-1 in % against the reference model's own predictions (100 for the reference itself)."""
    def top1(model) -> float:
        with torch.no_grad():
            return 100.0 * float((model(images).argmax(1) == reference).float().mean())
    return top1


def test_noise_perturbs_only_block_linears_row_by_row_and_is_undone():
    model = _tiny_vit()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with noisy_block_weights(model, 0.4, seed=3):
        changed = {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
        qkv = model.blocks[1].attn.qkv.weight.detach().clone()
        relative = (qkv - before["blocks.1.attn.qkv.weight"]).std(dim=1) / before["blocks.1.attn.qkv.weight"].std(dim=1)
    assert changed == {f"blocks.{b}.{layer}.weight" for b in range(3)
                       for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert relative.mean() == pytest.approx(0.4, rel=0.15)  # 96 rows of 32 draws each
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    with noisy_block_weights(model, 0.4, seed=3):
        again = model.blocks[1].attn.qkv.weight.detach().clone()
    assert torch.equal(again, qkv)
    with noisy_block_weights(model, 0.0, seed=3):
        assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


def test_profiles_start_from_the_full_model_and_fall_with_large_noise():
    model, images = _tiny_vit(), _images()
    with torch.no_grad():
        reference = model(images).argmax(1)
    top1 = _agreement(reference, images)
    depth = depth_profile(model, top1)
    assert [count for count, _ in depth] == [0, 1, 2, 3] and depth[-1][1] == 100.0
    assert len(model.blocks) == 3
    noise = noise_profile(model, top1, levels=(0.0, 3.0), seed=0)
    assert noise[0] == (0.0, 100.0) and noise[1][1] < 90.0
    table = format_profiles(100.0, depth, noise)
    assert "blocks kept" in table and "weight noise" in table


def test_bad_arguments_are_named():
    model = _tiny_vit()
    with pytest.raises(ValueError, match=r"count must be in 0\.\.3"), first_blocks_only(model, 4):
        pass
    with pytest.raises(ValueError, match="level must be >= 0"), noisy_block_weights(model, -0.1, seed=0):
        pass
    assert len(model.blocks) == 3


def test_the_command_refuses_an_unknown_model_before_loading(capsys):
    from vit_quant.weight_tolerance import main

    assert main(["--model", "no_such_vit"]) == 2
    assert "unknown model 'no_such_vit'" in capsys.readouterr().err


def test_patch_embedding_features_are_the_mean_embedded_patch_with_its_position():
    model = _tiny_vit()
    images = _images()[:5]
    patches = images.unfold(2, 7, 7).unfold(3, 7, 7).permute(0, 2, 3, 1, 4, 5).reshape(5, 16, 49)
    expected = (patches @ model.patch_embed.proj.weight.reshape(32, 49).T + model.patch_embed.proj.bias
                + model.pos_embed[0, 1:]).mean(1)
    torch.testing.assert_close(patch_embedding_features(model, images, batch_size=2), expected, rtol=1e-5, atol=1e-5)


def test_the_linear_probe_reads_a_linearly_separable_task_and_not_a_random_one():
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(4, 8, generator=g)
    labels = torch.arange(400) % 4
    features = centers[labels] + torch.randn(400, 8, generator=g)
    assert linear_probe(features[:300], labels[:300], features[300:], labels[300:]) > 95
    noise = torch.randn(400, 8, generator=g)
    assert linear_probe(noise[:300], labels[:300], noise[300:], labels[300:]) < 50
