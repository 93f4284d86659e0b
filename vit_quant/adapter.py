"""How the calibration engine walks a timm vision transformer, and how its linears get quantizers.

Every ``nn.Linear`` inside the blocks is quantized (qkv, proj, fc1, fc2; EVA's split q/k/v projections and
SwiGLU ``fc1_g``/``fc1_x`` too); the patch embedding and the head stay full precision. The true-sequential
groups are discovered from the block itself: one forward pass records which linears read the very same
input tensor (they share a Hessian) and in which order they run, so any timm ViT variant works without a
hand-written table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from common.engine.adapter import Tail, find_tails
from common.quant.qlinear import QuantLinear, wrap_linears
from common.quant.quantizers import ActivationQuantizer


def vit_blocks(model: nn.Module) -> Sequence[nn.Module]:
    """The transformer blocks of a timm ViT (``model.blocks``); a clear error for other models."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"{type(model).__name__} has no `blocks` container; supported: timm vision transformers "
                         "(VisionTransformer, Eva, DeiT and relatives)")
    return blocks


def block_linear_input_sizes(model: nn.Module) -> dict[str, int]:
    """``{name: in_features}`` of the linears in the first block (the ones that are quantized)."""
    return {name: module.in_features for name, module in vit_blocks(model)[0].named_modules()
            if isinstance(module, nn.Linear | QuantLinear)}


def discover_linear_groups(block: nn.Module, hidden: torch.Tensor) -> list[list[str]]:
    """Linears of ``block`` grouped by shared input, in execution order, from one forward on ``hidden``."""
    # The inputs themselves are kept (not their ids): a freed tensor's id can be reused by a later input.
    order: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear | QuantLinear):
            def record(_module, args, name=name):
                order.append((name, args[0]))
            handles.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            block(hidden)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, tensor in order:
        group = next((names for seen, names in groups if seen is tensor), None)
        if group is None:
            groups.append((tensor, [name]))
        elif name not in group:
            group.append(name)
    return [names for _, names in groups]


class VitAdapter:
    """:class:`common.engine.adapter.ModelAdapter` for timm ViTs; ``groups`` from :func:`discover_linear_groups`,
    ``tails`` from :func:`common.engine.adapter.find_tails` (both found on the first block, the same in every block).
    """

    def __init__(self, groups: list[list[str]], tails: dict[str, Tail] | None = None) -> None:
        self.groups = groups
        self.tails = dict(tails or {})

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return vit_blocks(model)

    def linear_groups(self, block: nn.Module) -> list[list[str]]:
        return [list(group) for group in self.groups]

    def run_prologue(self, model: nn.Module, batch: torch.Tensor, device: torch.device) -> None:
        model.to(device)
        model.forward_features(batch.to(device))

    def run_block(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        return block(hidden, **kwargs)

    def tail_linears(self, block: nn.Module) -> dict[str, Tail]:
        return dict(self.tails)


def prepare_vit(
    model: nn.Module, sample: torch.Tensor, *, bits: int, sym: bool, clip_ratio: float, groupsize: int
) -> VitAdapter:
    """Wrap every linear in the blocks as :class:`QuantLinear` with an activation quantizer; return the adapter.

    ``sample`` [batch, channels, height, width] is one input batch, used to discover the groups.
    """
    blocks = vit_blocks(model)
    hidden: list[torch.Tensor] = []

    def catch(_module, args):
        hidden.append(args[0])
        raise _Caught

    handle = blocks[0].register_forward_pre_hook(catch)
    try:
        with torch.no_grad():
            model.forward_features(sample)
    except _Caught:
        pass
    finally:
        handle.remove()
    groups = discover_linear_groups(blocks[0], hidden[0])
    if not groups:
        raise ValueError(f"found no nn.Linear inside the blocks of {type(model).__name__}")
    names = [name for group in groups for name in group]
    for block in blocks:
        for linear in wrap_linears(block, names).values():
            linear.act_quantizer = ActivationQuantizer(bits, sym=sym, clip_ratio=clip_ratio, groupsize=groupsize)
    return VitAdapter(groups, find_tails(blocks[0], lambda: blocks[0](hidden[0])))


class _Caught(Exception):
    """Stops the forward pass once the first block's input is seen."""
