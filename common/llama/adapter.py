"""How the calibration engine walks a Hugging Face Llama model, and how its linears get quantizers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import LlamaForCausalLM

from common.engine.adapter import Tail
from common.quant.qlinear import QuantLinear, wrap_linears
from common.quant.quantizers import ActivationQuantizer

LINEAR_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
"""True-sequential order; the linears of one group read the same input (one shared Hessian)."""

TAILS = {"self_attn": Tail("self_attn.o_proj", tuple_length=2), "mlp": Tail("mlp.down_proj")}
"""The attention returns ``(o_proj's output, attention weights: None)``, the MLP down_proj's output."""


class LlamaAdapter:
    """:class:`common.engine.adapter.ModelAdapter` for ``LlamaForCausalLM``."""

    def blocks(self, model: LlamaForCausalLM) -> Sequence[nn.Module]:
        return model.model.layers

    def linear_groups(self, block: nn.Module) -> list[list[str]]:
        return [list(group) for group in LINEAR_GROUPS]

    def run_prologue(self, model: LlamaForCausalLM, batch: torch.Tensor, device: torch.device) -> None:
        model.model.embed_tokens.to(device)
        model.model.rotary_emb.to(device)
        model.model(input_ids=batch.to(device), use_cache=False)

    def run_block(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        output = block(hidden, **kwargs)
        return output[0] if isinstance(output, tuple) else output

    def tail_linears(self, block: nn.Module) -> dict[str, Tail]:
        return dict(TAILS)


def add_activation_quantizers(
    model: LlamaForCausalLM, *, bits: int, sym: bool, clip_ratio: float, groupsize: int
) -> dict[str, QuantLinear]:
    """Wrap every linear of every decoder layer as :class:`QuantLinear` with its own activation quantizer.

    Returns ``{"model.layers.i.<name>": QuantLinear}``. Layers already wrapped (by the rotation, with an
    online transform) keep their transform and get a quantizer too; ``lm_head`` stays full precision.
    """
    wrapped = {}
    for index, layer in enumerate(model.model.layers):
        for name, linear in add_layer_quantizers(layer, bits=bits, sym=sym, clip_ratio=clip_ratio,
                                                 groupsize=groupsize).items():
            wrapped[f"model.layers.{index}.{name}"] = linear
    return wrapped


def add_layer_quantizers(layer: nn.Module, *, bits: int, sym: bool, clip_ratio: float, groupsize: int
                         ) -> dict[str, QuantLinear]:
    """:func:`add_activation_quantizers` for one decoder layer; returns ``{name within the layer: QuantLinear}``."""
    wrapped = wrap_linears(layer, [name for group in LINEAR_GROUPS for name in group])
    for linear in wrapped.values():
        linear.act_quantizer = ActivationQuantizer(bits, sym=sym, clip_ratio=clip_ratio, groupsize=groupsize)
    return wrapped
