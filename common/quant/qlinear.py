"""A linear layer with an optional online input rotation and an activation fake quantizer.

``y = W · quant(R(x)) + b`` where ``R`` is an online transform of the input (e.g. a Hadamard fused into W's
columns, QuaRot's down_proj trick) and ``quant`` a dynamic activation quantizer. The weight itself is fake
quantized in place by the calibration engine (GPTQ / GPTAQ / RTN), so this module stores it in its full
precision dtype, already rounded onto its grid.

Four hooks serve calibration: ``quantize_input`` turns the activation quantizer off (GPTQ's protocol
quantizes weights before activations); ``observer``, when set, is called with the input the weight
multiplies (after ``R`` and ``quant``) on every forward, which is how the engine collects statistics;
``recorder``, when set, is called with the output; ``replay``, when set and returning a tensor, supplies
the output without computing anything (the engine replays outputs whose inputs and weight cannot have
changed since they were recorded); ``forward(x, prepared=True)`` multiplies an input an observer saw,
without transforming and quantizing it again. The engine also leaves ``weight_grid``, the grid it rounded the weight
onto (scales, zero points, each column's group), for export (:mod:`common.export`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from common.quant.quantizers import ActivationQuantizer, WeightGrid


class QuantLinear(nn.Module):
    """Wraps an ``nn.Linear``'s parameters (shared, not copied).

    Args:
        linear: the layer to wrap; its ``weight`` [out, in] and ``bias`` [out] become this module's.
        input_transform: optional module applied to the input before quantization (shape-preserving).
        act_quantizer: optional activation quantizer; ``None`` or 16 bits means full precision input.
    """

    def __init__(
        self,
        linear: nn.Linear,
        *,
        input_transform: nn.Module | None = None,
        act_quantizer: ActivationQuantizer | None = None,
    ) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_transform = input_transform
        self.act_quantizer = act_quantizer if act_quantizer is not None else ActivationQuantizer()
        self.quantize_input = True
        self.observer: Callable[[torch.Tensor], None] | None = None
        self.recorder: Callable[[torch.Tensor], None] | None = None
        self.replay: Callable[[], torch.Tensor | None] | None = None
        self.weight_grid: WeightGrid | None = None
        """The grid the calibration engine put ``weight`` on (what an exported checkpoint stores), if any."""

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input the weight multiplies: ``x`` [..., in] after the online transform and quantization."""
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.quantize_input:
            x = self.act_quantizer(x)
        return x

    def forward(self, x: torch.Tensor | None, *, prepared: bool = False) -> torch.Tensor:
        """``W · quant(R(x)) + b``; with ``prepared``, ``x`` is already ``quant(R(·))`` (what ``observer`` saw).

        ``x`` may be ``None`` only while ``replay`` supplies the output.
        """
        if self.replay is not None and (recorded := self.replay()) is not None:
            return recorded
        if x is None:
            raise ValueError("x is None and no recorded output replaces it")
        if not prepared:
            x = self.quantized_input(x)
        if self.observer is not None:
            self.observer(x)
        output = F.linear(x, self.weight, self.bias)
        if self.recorder is not None:
            self.recorder(output)
        return output

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def wrap_linears(module: nn.Module, names: list[str] | None = None) -> dict[str, QuantLinear]:
    """Replace ``nn.Linear`` children of ``module`` by :class:`QuantLinear` (in place).

    Args:
        module: the container to edit (e.g. one transformer block).
        names: dotted names relative to ``module`` to wrap; ``None`` wraps every ``nn.Linear`` found.
            Layers that already are ``QuantLinear`` are kept as they are.

    Returns:
        ``{name: QuantLinear}`` for every wrapped (or already wrapped) layer, in module order.
    """
    wanted = None if names is None else set(names)
    wrapped: dict[str, QuantLinear] = {}
    for name, child in list(module.named_modules()):
        if wanted is not None and name not in wanted:
            continue
        if isinstance(child, QuantLinear):
            wrapped[name] = child
        elif isinstance(child, nn.Linear):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            qlinear = QuantLinear(child)
            setattr(parent, attr, qlinear)
            wrapped[name] = qlinear
    if wanted is not None and wanted - wrapped.keys():
        missing = sorted(wanted - wrapped.keys())
        raise ValueError(f"names not found as nn.Linear in the module: {missing}")
    return wrapped


def set_input_quantization(model: nn.Module, enabled: bool) -> None:
    """Switch activation quantization on or off in every submodule that has a ``quantize_input`` flag.

    :class:`QuantLinear` has one; so may other online quantizers (e.g. a KV-cache quantizer), which keeps
    the full-precision stream free of every kind of quantization.
    """
    for module in model.modules():
        if hasattr(module, "quantize_input"):
            module.quantize_input = enabled


def clear_weight_grids(model: nn.Module) -> None:
    """Forget the recorded weight grids (the weights were restored to full precision)."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.weight_grid = None
