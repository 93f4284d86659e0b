"""The whole-model walk: every block calibrated in order, the two streams carried from one to the next.

:func:`quantize_model` (a model in memory) and :func:`quantize_blocks` (blocks loaded one at a time from a
:class:`BlockSource`, e.g. a checkpoint read block by block) are the engine's entry points. For a calibrated
method the model runs up to its first block on the calibration batches (the adapter's prologue), both
streams start there and the blocks are calibrated one after another
(:class:`common.engine.block.BlockCalibration`), each handed back to its source once quantized; for RTN every
linear is rounded without data. With :class:`Checkpoints`, the state after each block is kept and a killed
calibration resumes from the last finished block (:mod:`common.engine.resume`).

Memory (what is resident while block ``b`` is calibrated; ``h`` hidden size, ``i`` MLP size, ``k`` key/value
width, ``N`` calibration tokens of this process, ``s`` bytes per value of the calibration's dtype, ``n`` the
widest linear input):

* for the whole block: both streams, ``2·s·N·h``, the full-precision inputs kept per group, ``s·N·(3h + i)``,
  and the recorded outputs replayed by later passes, ``s·N·(2h + 2k + 2i)``, on ``offload_device`` (the CPU
  with ``--offload``, so large models fit one GPU);
* one phase after another, never together:

  - reading: the block, ``s·(2h² + 2hk + 3hi)`` for a Llama block (a source loads one at a time, a model in
    memory parks the others in files on the CPU, :func:`common.weight_files.parked`), and the float64
    temporaries of its rotation (a slice of one weight at a time);
  - a group's statistics pass: the float64 sums of ``H`` and ``D``, ``2·8n²`` (a large batch
    product computed and added a slice of rows at a time; on the CPU large sums live in mapped files and
    only the slice being added is resident);
  - each solve: ``D`` handed over in float32, the Cholesky factor and its inverse, GPTAQ's ``P`` over ``D``
    (``3¼·4n²`` at most), and the linear's weight; forming ``H`` and ``D`` and the output error read one
    sum at a time, ``8n²`` (:meth:`common.solvers.statistics.CalibrationStatistics.sums_in_files`).

  On the CPU a step holds only the weights it reads (:class:`common.weight_files.ResidentOnly`: for
  down_proj, the MLP's two other weights during its pass and its own during its solve); on a GPU the block
  stays there.

The parameters outside the blocks (embedding, head) are not read after the first block's inputs are computed:
a model in memory parks them in a file, a source never loads them. :mod:`common.llama.memory` computes these
terms; docs/engine.md and the README set them beside measured peaks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from common import distributed
from common.batch_store import BatchStore
from common.engine.adapter import ModelAdapter, block_linears
from common.engine.block import BlockCalibration
from common.engine.settings import CalibrationReport, CalibrationSettings, LayerRecord
from common.engine.wiring import inputs_of
from common.memory import release_freed_memory
from common.quant.quantizers import WeightGrid, rtn_quantize
from common.solvers.column_loop import SolverConfig
from common.weight_files import parked


class BlockSource(Protocol):
    """Where the engine takes the blocks from, one at a time, and where each calibrated one goes."""

    def __len__(self) -> int:
        """The number of blocks."""

    def load(self, index: int) -> nn.Module:
        """Block ``index``, with its weights (on any device; the engine moves it to ``settings.device``)."""

    def finish(self, index: int, block: nn.Module) -> None:
        """Block ``index`` is calibrated (its weights quantized in place): keep what is needed of it."""


@dataclass
class CalibrationState:
    """Where a calibration stands after a block: the next block, both streams entering it, the report so far."""

    next_block: int
    quant_stream: BatchStore | None
    full_stream: BatchStore | None
    report: CalibrationReport


class Checkpoints(Protocol):
    """Keeps a :class:`CalibrationState` after every block, so that a killed calibration resumes
    (:class:`common.engine.resume.CalibrationCheckpoint`)."""

    def resume(self, device: torch.device) -> CalibrationState | None:
        """The last state kept (its streams on ``device``), or ``None`` to start from the first block."""

    def save(self, state: CalibrationState) -> None:
        """Keep ``state`` (replacing the previous one only once it is complete)."""


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
    blocks = adapter.blocks(model)
    park = settings.device.type == "cpu" and settings.spec.calibrated
    with _ResidentBlocks(blocks, park=park) as source:
        if not settings.spec.calibrated:
            return quantize_blocks(source, lambda: nullcontext(model), adapter, settings, progress=progress)
        with torch.no_grad():
            first = _first_block_inputs(model, adapter, blocks[0], calibration_batches, settings)
        with parked(_outside_blocks(model, blocks)):
            return quantize_blocks(source, lambda: nullcontext(model), adapter, settings, calibration_batches,
                                   progress=progress, first_inputs=first)


def quantize_blocks(
    source: BlockSource,
    prologue_model: Callable[[], AbstractContextManager[nn.Module]],
    adapter: ModelAdapter,
    settings: CalibrationSettings,
    calibration_batches: Sequence[Any] = (),
    *,
    checkpoints: Checkpoints | None = None,
    progress: bool = True,
    first_inputs: tuple[list[torch.Tensor], list[dict[str, Any]]] | None = None,
) -> CalibrationReport:
    """Quantize every block of ``source`` in order, each handed back to it once calibrated.

    Args:
        source: the blocks (:class:`BlockSource`).
        prologue_model: a context manager holding the model ``adapter.run_prologue`` runs up to its first block
            (entered once, for calibrated methods; its blocks need no weights: the run stops before the first one),
            e.g. :meth:`common.llama.blockwise.BlockwiseLlama.embedded`, whose embedding is released on exit.
        adapter, settings, calibration_batches: as :func:`quantize_model`'s.
        checkpoints: keeps the state after each block and resumes from the last one kept.
        progress: show a progress bar over blocks.
        first_inputs: the first block's inputs and keyword arguments, when the caller computed them.
    """
    began = time.perf_counter()
    resumed = checkpoints.resume(settings.offload_device or settings.device) if checkpoints is not None else None
    report = resumed.report if resumed is not None else CalibrationReport(settings.method)
    start = resumed.next_block if resumed is not None else 0
    earlier_seconds = report.seconds
    block_kwargs: list[dict[str, Any]] = []
    quant_stream = full_stream = None
    if settings.spec.calibrated:
        if not calibration_batches:
            raise ValueError(f"calibration_batches must not be empty for method {settings.method!r}")
        if first_inputs is None:
            with prologue_model() as model, torch.no_grad():
                first_inputs = _first_block_inputs(model, adapter, adapter.blocks(model)[0], calibration_batches,
                                                   settings)
        hidden, block_kwargs = first_inputs
        first_inputs = None
        if resumed is not None:
            quant_stream, full_stream = resumed.quant_stream, resumed.full_stream
        else:
            quant_stream = BatchStore.of(hidden, settings.offload_device or settings.device)
            if settings.spec.needs_full_precision_stream:
                full_stream = quant_stream.clone()
        del hidden

    with torch.no_grad():
        bar = tqdm(range(start, len(source)), desc=settings.method, initial=start, total=len(source),
                   disable=not (progress and distributed.progress_bars()))
        for index in bar:
            block = source.load(index)
            if settings.spec.calibrated:
                records = _calibrate_block(index, block, adapter, settings, quant_stream, full_stream,
                                           block_kwargs, report)
                bar.set_postfix(err=f"{sum(r.output_error for r in records) / len(records):.2e}")
            else:
                records = _round_block(index, block, adapter, settings)
            report.layers.extend(records)
            source.finish(index, block)
            del block
            report.seconds = earlier_seconds + time.perf_counter() - began
            if checkpoints is not None:
                checkpoints.save(CalibrationState(index + 1, quant_stream, full_stream, report))
    del quant_stream, full_stream
    release_freed_memory()
    report.seconds = earlier_seconds + time.perf_counter() - began
    return report


def _round_block(index: int, block: nn.Module, adapter: ModelAdapter, settings: CalibrationSettings
                 ) -> list[LayerRecord]:
    """RTN: every linear of ``block`` rounded to its grid, no data."""
    records = []
    for name, linear in block_linears(adapter, block).items():
        began = time.perf_counter()
        original_shape = linear.weight.shape
        quantized, linear.weight_grid = _rtn(linear.weight, settings.solver_for(name))
        linear.weight.copy_(quantized)
        records.append(LayerRecord(index, name, settings.method, *original_shape, float("nan"), float("nan"), 0.0,
                                   time.perf_counter() - began))
    return records


def _calibrate_block(index: int, block: nn.Module, adapter: ModelAdapter, settings: CalibrationSettings,
                     quant_stream: BatchStore, full_stream: BatchStore | None, block_kwargs: list[dict[str, Any]],
                     report: CalibrationReport) -> list[LayerRecord]:
    """Calibrate ``block`` on ``settings.device``; both streams advance to its outputs."""
    home = _module_device(block)
    block.to(settings.device)
    records = BlockCalibration(index, block, adapter, block_kwargs, settings, report).run(quant_stream, full_stream)
    block.to(home)
    return records


class _ResidentBlocks:
    """A model's own blocks as a :class:`BlockSource`. With ``park`` (on the CPU), the blocks not being
    calibrated wait in a file (:func:`common.weight_files.parked`): the blocks still to come on a stack, the
    next one on top; the calibrated ones until the walk ends."""

    def __init__(self, blocks: Sequence[nn.Module], *, park: bool) -> None:
        self.blocks, self.park = blocks, park
        self._calibrated = ExitStack()
        self._waiting = ContextStack()

    def __len__(self) -> int:
        return len(self.blocks)

    def __enter__(self) -> _ResidentBlocks:
        if self.park:
            for block in reversed(self.blocks[1:]):
                self._waiting.push(parked(dict(block.named_parameters())))
        return self

    def __exit__(self, *exc: object) -> None:
        self._waiting.__exit__(*exc)
        self._calibrated.__exit__(*exc)

    def load(self, index: int) -> nn.Module:
        if self.park and index > 0:
            self._waiting.pop()
        return self.blocks[index]

    def finish(self, index: int, block: nn.Module) -> None:
        if self.park:
            self._calibrated.enter_context(parked(dict(block.named_parameters())))


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
    runs = [lambda batch=batch: adapter.run_prologue(model, batch, settings.device)
            for batch in distributed.shard(_rebatch(batches, settings.batch_size))]
    return inputs_of(first_block, runs)


def _rebatch(batches: Sequence[Any], batch_size: int) -> list[Any]:
    """Concatenate tensor batches and split them into ``batch_size`` samples; other inputs pass as given."""
    if batches and all(isinstance(b, torch.Tensor) for b in batches):
        return list(torch.cat(list(batches)).split(batch_size))
    return list(batches)
