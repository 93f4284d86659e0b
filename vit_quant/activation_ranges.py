"""How hard a ViT's activations are to quantize per token: ``python -m vit_quant.activation_ranges --config ...``.

Per-token activation quantization (``a_bits`` with one range per token) suffers when a few channels of a
linear's input are far larger than the rest: the token's range is set by them and the other channels get a
few grid levels. This reports, for the input of every linear the runs quantize (the calibration images of
the run's config, full precision), each channel's largest magnitude over all tokens, summarized as the
largest, the median, their ratio and the largest channels, plus the largest LayerNorm scale before each
block's attention and MLP. Pretrained DeiTs show such channels after their LayerNorms (RepQ-ViT, Li et al.,
ICCV 2023; DopQ-ViT, Yang et al., 2024); the embedded Fashion-MNIST ViT, trained for minutes, does not (see
the README).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vit_quant.adapter import vit_blocks


@dataclass(frozen=True)
class ChannelRanges:
    """One linear input's per-channel largest magnitudes, summarized."""

    name: str
    channels: int
    largest: float
    median: float
    top_channels: tuple[int, ...]

    @property
    def ratio(self) -> float:
        """Largest over median channel range (1 when every channel spans the same range)."""
        return self.largest / self.median if self.median > 0 else float("inf")


@torch.no_grad()
def channel_ranges(model: nn.Module, images: torch.Tensor, *, batch_size: int = 32, top: int = 3
                   ) -> list[ChannelRanges]:
    """Per-channel ``max |x|`` of every block linear's input over ``images`` [n, C, H, W], in execution order."""
    peaks: dict[str, torch.Tensor] = {}
    handles = []
    for index, block in enumerate(vit_blocks(model)):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                def record(_module, args, key=f"blocks.{index}.{name}"):
                    x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0)
                    peaks[key] = torch.maximum(peaks[key], x) if key in peaks else x
                handles.append(module.register_forward_pre_hook(record))
    try:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    summaries = []
    for name, peak in peaks.items():
        order = peak.argsort(descending=True)
        summaries.append(ChannelRanges(name, peak.numel(), float(peak.max()), float(peak.median()),
                                       tuple(int(c) for c in order[:top])))
    return summaries


def layer_norm_scales(model: nn.Module) -> list[tuple[str, float]]:
    """``(name, max |γ|)`` of every LayerNorm inside the blocks, in order."""
    return [(f"blocks.{index}.{name}", float(module.weight.detach().abs().max()))
            for index, block in enumerate(vit_blocks(model))
            for name, module in block.named_modules()
            if isinstance(module, nn.LayerNorm) and module.weight is not None]


def format_ranges(ranges: Sequence[ChannelRanges], scales: Sequence[tuple[str, float]]) -> str:
    """A table of :func:`channel_ranges` and :func:`layer_norm_scales`."""
    lines = [f"{'linear input':<22} {'channels':>8} {'max':>9} {'median':>8} {'max/median':>10}  largest channels",
             "-" * 78]
    for r in ranges:
        lines.append(f"{r.name:<22} {r.channels:>8} {r.largest:>9.3g} {r.median:>8.3g} {r.ratio:>10.1f}  "
                     f"{', '.join(map(str, r.top_channels))}")
    lines.append("")
    lines.append("LayerNorm max |scale|: " + ", ".join(f"{name} {value:.2f}" for name, value in scales))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Load the config's model and calibration images, print the table."""
    from vit_quant.main import load_probe

    probe = load_probe(argv, __doc__.splitlines()[0])
    if probe is None:
        return 2
    print(f"model: {probe.config.model} ({probe.source['source']}); {len(probe.calibration)} calibration images")
    print(format_ranges(channel_ranges(probe.model, probe.calibration, batch_size=probe.config.calib_batch_size),
                        layer_norm_scales(probe.model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
