"""The activation-range report finds a channel that a LayerNorm scale makes large, and only that one."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from vit_quant.activation_ranges import channel_ranges, format_ranges, layer_norm_scales


def _tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2,
                             num_heads=2, mlp_ratio=2.0).eval()


def test_a_scaled_layer_norm_channel_is_reported_as_the_outlier():
    model = _tiny_vit()
    images = torch.randn(12, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    plain = {r.name: r for r in channel_ranges(model, images, batch_size=5)}
    with torch.no_grad():
        model.blocks[1].norm1.weight[7] *= 40.0
    scaled = {r.name: r for r in channel_ranges(model, images, batch_size=5)}
    assert list(scaled) == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2",
                            "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    qkv = scaled["blocks.1.attn.qkv"]
    assert qkv.top_channels[0] == 7 and qkv.channels == 32
    assert qkv.ratio > 10 * plain["blocks.1.attn.qkv"].ratio
    assert scaled["blocks.0.attn.qkv"] == plain["blocks.0.attn.qkv"]  # upstream of the change: untouched
    inputs = []
    handle = model.blocks[1].attn.qkv.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    with torch.no_grad():
        model(images)
    handle.remove()
    assert qkv.largest == float(inputs[0].abs().amax())
    scales = dict(layer_norm_scales(model))
    assert scales["blocks.1.norm1"] == float(model.blocks[1].norm1.weight.detach().abs().max())
    assert "blocks.1.attn.qkv" in format_ranges(list(scaled.values()), list(scales.items()))
