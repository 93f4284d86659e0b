"""The whole-model walk: every block calibrated in order, the two streams carried from one to the next.

:func:`quantize_model` is the engine's entry point. For a calibrated method it runs the model up to its
first block on the calibration batches (the adapter's prologue), starts both streams there and calibrates
the blocks one after another (:class:`common.engine.block.BlockCalibration`); for RTN it rounds every
linear without data.

Memory: blocks are moved to ``device`` one at a time; the streams and the full-precision inputs live on
``offload_device`` so large models fit one GPU. Once the first block's inputs are computed, the parameters
outside the blocks (embedding, head) wait in a file (:func:`common.weight_files.parked`): calibration does
not read them. On the CPU the blocks not being calibrated wait in files too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from common import distributed
from common.batch_store import BatchStore
from common.engine.adapter import ModelAdapter, block_linears
from common.engine.block import BlockCalibration
from common.engine.settings import CalibrationReport, CalibrationSettings, LayerRecord
from common.engine.wiring import StopForward
from common.memory import release_freed_memory
from common.quant.quantizers import WeightGrid, rtn_quantize
from common.solvers.column_loop import SolverConfig
from common.weight_files import parked


def quantize_model(
    model: nn.Module,
    adapter: ModelAdapter,
    settings: CalibrationSettings,
    calibration_batches: Sequence[Any] = (),
    *,
    progress: bool = True,
) -> CalibrationReport:
    """Fake-quantize the weights of every linear the adapter names, in place.

    Args:
        model: the model (its linears already :class:`~common.quant.qlinear.QuantLinear`).
        adapter: the model family's adapter.
        settings: method and solver settings.
        calibration_batches: inputs for ``adapter.run_prologue`` (unused by RTN).
        progress: show a progress bar over blocks.
    """
    began = time.perf_counter()
    report = CalibrationReport(settings.method)
    blocks = adapter.blocks(model)
    progress = progress and distributed.progress_bars()
    if not settings.spec.calibrated:
        _round_to_nearest(blocks, adapter, settings, report, progress)
    else:
        if not calibration_batches:
            raise ValueError(f"calibration_batches must not be empty for method {settings.method!r}")
        with torch.no_grad():
            first_inputs, block_kwargs = _first_block_inputs(model, adapter, blocks[0], calibration_batches,
                                                             settings)
            quant_stream = BatchStore.of(first_inputs, settings.offload_device or settings.device)
            del first_inputs
            with parked(_outside_blocks(model, blocks)):
                _calibrate_blocks(blocks, adapter, settings, quant_stream, block_kwargs, report, progress)
                del quant_stream
                release_freed_memory()  # before the parked parameters come back
    report.seconds = time.perf_counter() - began
    return report


def _round_to_nearest(blocks: Sequence[nn.Module], adapter: ModelAdapter, settings: CalibrationSettings,
                      report: CalibrationReport, progress: bool) -> None:
    """RTN: every linear rounded to its grid, no data."""
    for index, block in enumerate(tqdm(blocks, desc=settings.method, disable=not progress)):
        for name, linear in block_linears(adapter, block).items():
            began = time.perf_counter()
            with torch.no_grad():
                original = linear.weight.detach().clone()
                quantized, linear.weight_grid = _rtn(linear.weight, settings.solver_for(name))
                linear.weight.copy_(quantized)
            report.layers.append(
                LayerRecord(index, name, settings.method, *original.shape, float("nan"), float("nan"), 0.0,
                            time.perf_counter() - began)
            )


def _calibrate_blocks(blocks: Sequence[nn.Module], adapter: ModelAdapter, settings: CalibrationSettings,
                      quant_stream: BatchStore, block_kwargs: list[dict[str, Any]], report: CalibrationReport,
                      progress: bool) -> None:
    """Calibrate every block in order, both streams starting from ``quant_stream`` (the first block's inputs).

    On the CPU, the blocks not being calibrated wait in a file (:func:`common.weight_files.parked`): the
    blocks still to come on a stack, the next one on top; the calibrated ones until the walk ends.
    """
    full_stream = quant_stream.clone() if settings.spec.needs_full_precision_stream else None
    park = settings.device.type == "cpu"
    bar = tqdm(list(enumerate(blocks)), desc=settings.method, disable=not progress)
    with ExitStack() as calibrated, ContextStack() as waiting:
        if park:
            for block in reversed(blocks[1:]):
                waiting.push(parked(dict(block.named_parameters())))
        for index, block in bar:
            if park and index > 0:
                waiting.pop()
            home = _module_device(block)
            block.to(settings.device)
            records = BlockCalibration(index, block, adapter, block_kwargs, settings, report).run(quant_stream,
                                                                                               full_stream)
            block.to(home)
            if park:
                calibrated.enter_context(parked(dict(block.named_parameters())))
            report.layers.extend(records)
            bar.set_postfix(err=f"{sum(r.output_error for r in records) / len(records):.2e}")


class ContextStack:
    """Context managers entered one by one and exited from the top (:meth:`pop`), the rest on exit (last
    entered first), also on an error."""

    def __init__(self) -> None:
        self._entered: list[AbstractContextManager] = []

    def push(self, context: AbstractContextManager) -> None:
        """Enter ``context`` and put it on top."""
        context.__enter__()
        self._entered.append(context)

    def pop(self) -> None:
        """Exit the context on top."""
        self._entered.pop().__exit__(None, None, None)

    def __enter__(self) -> ContextStack:
        return self

    def __exit__(self, *exc: object) -> None:
        while self._entered:
            self.pop()


def _outside_blocks(model: nn.Module, blocks: Sequence[nn.Module]) -> dict[str, nn.Parameter]:
    """The model's parameters that no block holds or shares memory with (a language model's embedding and
    head): once the first block's inputs are computed, calibration never reads them."""
    inside = [parameter for block in blocks for parameter in block.parameters()]
    held = {id(parameter) for parameter in inside}
    spans = [_span(parameter) for parameter in inside]
    return {
        name: parameter for name, parameter in model.named_parameters()
        if id(parameter) not in held and not any(_overlap(_span(parameter), span) for span in spans)
    }


def _span(tensor: torch.Tensor) -> tuple[torch.device, int, int]:
    """Where the memory behind a tensor lies (its whole storage): device, first byte address, one past the last."""
    storage = tensor.untyped_storage()
    return tensor.device, storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _overlap(a: tuple[torch.device, int, int], b: tuple[torch.device, int, int]) -> bool:
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def _rtn(weight: torch.Tensor, solver: SolverConfig) -> tuple[torch.Tensor, WeightGrid | None]:
    return rtn_quantize(weight, bits=solver.bits, sym=solver.sym, groupsize=solver.groupsize, mse=solver.mse,
                        grid_format=solver.grid)


def _module_device(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _first_block_inputs(
    model: nn.Module,
    adapter: ModelAdapter,
    first_block: nn.Module,
    batches: Sequence[Any],
    settings: CalibrationSettings,
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Hidden states [batch, ...] entering the first block for each batch, and the keyword arguments."""
    hidden: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def catch(_module, args, kwargs):
        hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        kwargs_list.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise StopForward

    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in distributed.shard(_rebatch(batches, settings.batch_size)):
            try:
                adapter.run_prologue(model, batch, settings.device)
            except StopForward:
                continue
            raise RuntimeError("adapter.run_prologue returned without calling the first block")
    finally:
        handle.remove()
    return hidden, kwargs_list


def _rebatch(batches: Sequence[Any], batch_size: int) -> list[Any]:
    """Concatenate tensor batches and split them into ``batch_size`` samples; other inputs pass as given."""
    if batches and all(isinstance(b, torch.Tensor) for b in batches):
        return list(torch.cat(list(batches)).split(batch_size))
    return list(batches)
