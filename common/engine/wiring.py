"""How a pass over a block is wired into its modules: observers, recorded outputs, tail submodules computed
from one linear.

The engine never edits a model's code. It talks to :class:`common.quant.qlinear.QuantLinear` through its
hook slots (``observer``: the input the weight multiplies; ``recorder``: the output; ``replay``: an output that
stands in for computing it) and computes a tail submodule by replacing its ``forward`` for the duration of
one batch. Everything installed here is removed when the ``with`` block ends, also on an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from common.batch_store import BatchStore
from common.engine.adapter import Tail
from common.engine.plan import Pass
from common.quant.qlinear import QuantLinear


class StopForward(Exception):
    """Raised by an observer to end a forward pass once everything needed has been seen."""


def inputs_of(block: nn.Module, runs: Iterable[Callable[[], object]]) -> tuple[list[torch.Tensor],
                                                                             list[dict[str, Any]]]:
    """The hidden states entering ``block`` and the keyword arguments it is called with, once per call in
    ``runs`` (each runs the model, which is stopped as it reaches ``block``: nothing from ``block`` on runs,
    so its weights may be on the ``meta`` device). ``RuntimeError`` if a run never reaches ``block``."""
    hidden: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def catch(_module, args, kwargs):
        hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        kwargs_list.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise StopForward

    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for run in runs:
            try:
                run()
            except StopForward:
                continue
            raise RuntimeError("the model ran to its end without calling the block whose inputs were wanted")
    finally:
        handle.remove()
    return hidden, kwargs_list


@contextmanager
def observing(linears: Mapping[str, QuantLinear], sink: dict[str, list[torch.Tensor]], *,
              stop_when_complete: bool) -> Iterator[None]:
    """Append each linear's input (transformed and quantized: what its weight multiplies) to ``sink[name]``;
    with ``stop_when_complete``, end the forward (:class:`StopForward`) once every one of them has been seen."""
    seen: set[str] = set()

    def observer(name: str):
        def observe(x: torch.Tensor) -> None:
            sink[name].append(x)
            seen.add(name)
            if stop_when_complete and seen == linears.keys():
                seen.clear()
                raise StopForward

        return observe

    for name, linear in linears.items():
        linear.observer = observer(name)
    try:
        yield
    finally:
        for linear in linears.values():
            linear.observer = None


@contextmanager
def recording_outputs(linears: Mapping[str, QuantLinear],
                      record: Mapping[str, Callable[[torch.Tensor], None]]) -> Iterator[None]:
    """Call ``record[name](output)`` with each named linear's output."""
    for name, recorder in record.items():
        linears[name].recorder = recorder
    try:
        yield
    finally:
        for name in record:
            linears[name].recorder = None


@contextmanager
def wired_batch(block: nn.Module, linears: Mapping[str, QuantLinear], tails: Mapping[str, Tail], step: Pass,
                batch: int, outputs: Mapping[str, BatchStore], tail_inputs: Mapping[str, BatchStore],
                device: torch.device) -> Iterator[None]:
    """``step``'s replays, recordings and tail computations installed for ``batch`` of the quantized stream.

    Replayed linears return ``outputs[name][batch]``; recorded ones write theirs to ``outputs[name][batch]``;
    a submodule of ``step.from_tail_linear`` returns its tail linear applied to ``tail_inputs[linear][batch]``
    (or that linear's replayed output).
    """

    def replayed(name: str):
        return lambda: outputs[name][batch].to(device)

    def recorder(name: str):
        def record(output: torch.Tensor) -> None:
            outputs[name][batch] = output

        return record

    def from_tail_linear(tail: Tail):
        linear = linears[tail.linear]

        def forward(*_args, **_kwargs):
            inputs = tail_inputs.get(tail.linear)
            x = None if inputs is None else inputs[batch].to(device)
            output = linear(x, prepared=True)
            return (output, *[None] * (tail.tuple_length - 1)) if tail.tuple_length else output

        return forward

    for name in step.replay:
        linears[name].replay = replayed(name)
    for module in step.from_tail_linear:
        block.get_submodule(module).forward = from_tail_linear(tails[module])
    try:
        with recording_outputs(linears, {name: recorder(name) for name in step.record}):
            yield
    finally:
        for name in step.replay:
            linears[name].replay = None
        for module in step.from_tail_linear:
            del block.get_submodule(module).forward
