"""What the engine needs to know about a model family, and the tail submodules it can compute from one linear.

The engine knows nothing of Llama or ViT. A model family supplies a :class:`ModelAdapter`: which modules
are the blocks, which linears of a block share an input (true-sequential groups, e.g. q,k,v → o →
gate,up → down), how to run the model up to its first block, how to run one block, and which of a block's
submodules are :class:`Tail` submodules (declared, or found by :func:`find_tails`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from common.quant.qlinear import QuantLinear


@dataclass(frozen=True)
class Tail:
    """A submodule of a block whose output is one of its linears' output (an attention's output projection,
    an MLP's down projection): once the submodule's other linears are solved, that linear's input is final,
    and the engine computes the submodule as the linear applied to its input recorded earlier.

    Attributes:
        linear: the linear's name relative to the block.
        tuple_length: 0 if the submodule returns the linear's output itself; else it returns a tuple of this
            length, the output first and ``None`` after it (a Hugging Face attention's ``(output, weights)``).
    """

    linear: str
    tuple_length: int = 0


class ModelAdapter(Protocol):
    """What the engine needs to know about a model family."""

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The blocks to calibrate, in forward order."""

    def linear_groups(self, block: nn.Module) -> list[list[str]]:
        """Names (relative to ``block``) of its linears, grouped by shared input, in true-sequential order."""

    def run_prologue(self, model: nn.Module, batch: Any, device: torch.device) -> None:
        """Run ``model`` on ``batch`` far enough that its first block is called (the engine stops it there)."""

    def run_block(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """Run one block on ``hidden`` with the keyword arguments the model passed it; return its output."""

    def tail_linears(self, block: nn.Module) -> dict[str, Tail]:
        """``{submodule name: Tail}`` for the submodules of ``block`` whose output is a linear's output (may be
        empty: the engine then runs every submodule in every pass)."""


def find_tails(block: nn.Module, forward: Callable[[], object]) -> dict[str, Tail]:
    """The submodules of ``block`` that are a :class:`Tail`, seen in one call of ``forward`` (which runs it).

    A submodule qualifies when it holds at least two :class:`QuantLinear` and returns the very tensor one of
    them returned (alone, or first in a tuple whose other items are ``None``); of nested ones, the outermost.
    """
    outputs: dict[str, object] = {}
    handles = [module.register_forward_hook(lambda _m, _a, out, name=name: outputs.setdefault(name, out))
               for name, module in block.named_modules() if name]
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    linears = [name for name, module in block.named_modules() if isinstance(module, QuantLinear)]
    tails: dict[str, Tail] = {}
    for name, output in outputs.items():
        held = [linear for linear in linears if linear.startswith(f"{name}.")]
        packed = isinstance(output, tuple) and len(output) > 1 and all(item is None for item in output[1:])
        result = output[0] if packed else output
        tail = next((linear for linear in held if outputs.get(linear) is result), None)
        if len(held) >= 2 and tail is not None:
            tails[name] = Tail(tail, len(output) if packed else 0)
    return {name: tail for name, tail in tails.items() if not any(name.startswith(f"{other}.") for other in tails)}


def quant_linear(block: nn.Module, name: str) -> QuantLinear:
    """The linear ``name`` of ``block``; ``TypeError`` if it is not a :class:`QuantLinear`."""
    module = block.get_submodule(name)
    if not isinstance(module, QuantLinear):
        raise TypeError(f"{name} must be a QuantLinear (common.quant.qlinear) to be calibrated, got "
                        f"{type(module).__name__}")
    return module


def block_linears(adapter: ModelAdapter, block: nn.Module) -> dict[str, QuantLinear]:
    """``{name: linear}`` for every linear the adapter groups in ``block``, in group order."""
    return {name: quant_linear(block, name) for group in adapter.linear_groups(block) for name in group}
