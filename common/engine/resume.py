"""A calibration that survives being killed: its quantized blocks and its state after each block, in a folder.

After block ``k`` is calibrated, the engine (:func:`common.engine.model.quantize_blocks`) hands the block to
its source, which keeps its quantized linears (:class:`BlockFiles`, ``block-<k>.safetensors``), and then its
state to a :class:`CalibrationCheckpoint`, which keeps

* each process's streams entering block ``k + 1`` and its random state (``streams-<k+1>.rank<r>.safetensors``),
* then, once every process has written its streams, the progress (``progress.json``: the next block, the
  per-layer records, the time and the profile parts so far), which is what makes the new state count,
* and only then removes the previous streams.

Every file is written to a temporary name, flushed and renamed (:func:`common.files.atomic_write`), so a
process killed in the middle of a write leaves the previous state whole; a temporary file it left behind is
removed by the next run (:func:`common.files.sweep_stale_temporaries`). A resumed calibration starts from the
block ``progress.json`` names, with the streams and random state kept for it, and so produces the same bits
as one never interrupted.

Disk: the quantized linears of every finished block (a byte per weight, plus the grids) plus two generations of
streams at most (the streams of a block: ``samples × tokens × hidden`` values, twice for the
methods with a full-precision stream).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from common import distributed
from common.batch_store import BatchStore
from common.engine.adapter import ModelAdapter, block_linears
from common.engine.model import CalibrationState
from common.engine.settings import CalibrationReport, LayerRecord
from common.files import atomic_write, atomic_write_json, sweep_stale_temporaries
from common.quant.quantizers import WeightGrid

PROGRESS = "progress.json"


class CheckpointError(RuntimeError):
    """A kept calibration state is unusable (a file it names is missing or damaged); the message says which."""


class BlockFiles:
    """Each calibrated block's quantized linears in ``<folder>/block-<index>.safetensors``: the grids and the
    integer codes of the weights on them (one byte per weight up to 8 bits: a quarter of a float32 model on
    disk), from which the weights are rebuilt bit for bit; a weight without a grid is kept as it is.

    Args:
        folder: where the files go.
        adapter: names each block's linears.
    """

    def __init__(self, folder: Path, adapter: ModelAdapter) -> None:
        self.folder, self.adapter = Path(folder), adapter

    def path(self, index: int) -> Path:
        return self.folder / f"block-{index:05d}.safetensors"

    def save(self, index: int, block: nn.Module) -> None:
        """Write block ``index``'s quantized linears (atomically; the main process only)."""
        if not distributed.is_main():
            return
        tensors: dict[str, torch.Tensor] = {}
        metadata: dict[str, str] = {}
        for name, linear in block_linears(self.adapter, block).items():
            grid = linear.weight_grid
            if grid is None:
                tensors[f"{name}.weight"] = linear.weight.detach().cpu().contiguous()
                continue
            codes = grid.codes(linear.weight)
            tensors[f"{name}.codes"] = codes.to(torch.uint8 if grid.maxq <= 255 else torch.int32).cpu().contiguous()
            for part in ("scales", "zeros", "g_idx"):
                tensors[f"{name}.grid.{part}"] = getattr(grid, part).detach().cpu().contiguous()
            metadata[f"{name}.grid.maxq"] = str(grid.maxq)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path(index), lambda tmp: save_file(tensors, tmp, metadata=metadata))

    def load_into(self, index: int, block: nn.Module) -> None:
        """Put block ``index``'s kept weights and grids into ``block`` (a fresh copy of the same block)."""
        path = self.path(index)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: block {index} was never calibrated into this folder")
        with safe_open(path, "pt") as handle, torch.no_grad():
            metadata = handle.metadata() or {}
            for name, linear in block_linears(self.adapter, block).items():
                maxq = metadata.get(f"{name}.grid.maxq")
                if maxq is None:
                    linear.weight.copy_(handle.get_tensor(f"{name}.weight"))
                    linear.weight_grid = None
                    continue
                grid = WeightGrid(*(handle.get_tensor(f"{name}.grid.{part}") for part in ("scales", "zeros", "g_idx")),
                                  int(maxq))
                linear.weight.copy_(grid.dequantize(handle.get_tensor(f"{name}.codes")).to(linear.weight.dtype))
                linear.weight_grid = grid.to(linear.weight.device)


class CalibrationCheckpoint:
    """A calibration's state after its last finished block, kept in ``folder`` (see the module docstring);
    a :class:`common.engine.model.Checkpoints`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _streams(self, next_block: int, rank: int | None = None) -> Path:
        rank = distributed.rank() if rank is None else rank
        return self.folder / f"streams-{next_block:05d}.rank{rank}.safetensors"

    def resume(self, device: torch.device) -> CalibrationState | None:
        progress = self.folder / PROGRESS
        if not progress.is_file():
            return None
        kept = json.loads(progress.read_text())
        report = CalibrationReport(kept["method"], [LayerRecord(**layer) for layer in kept["layers"]],
                                   kept["seconds"], {part: list(value) for part, value in kept["parts"].items()})
        path = self._streams(kept["next_block"])
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the calibration kept in {self.folder} cannot resume "
                                  f"(start over with --restart)")
        with safe_open(path, "pt") as handle:
            names = set(handle.keys())
            torch.set_rng_state(handle.get_tensor("rng_state"))
            quant = _read_stream(handle, names, "quant", device)
            full = _read_stream(handle, names, "full", device)
        return CalibrationState(kept["next_block"], quant, full, report)

    def save(self, state: CalibrationState) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        sweep_stale_temporaries(self.folder)
        tensors = {"rng_state": torch.get_rng_state()}
        for kind, stream in (("quant", state.quant_stream), ("full", state.full_stream)):
            if stream is not None:
                tensors.update({f"{kind}.{batch}": stream[batch].detach().cpu().contiguous()
                                for batch in range(len(stream))})
        atomic_write(self._streams(state.next_block), lambda tmp: save_file(tensors, tmp))
        distributed.barrier()
        if distributed.is_main():
            report = state.report
            atomic_write_json(self.folder / PROGRESS, {
                "method": report.method, "next_block": state.next_block, "seconds": report.seconds,
                "layers": [dataclasses.asdict(layer) for layer in report.layers], "parts": report.parts,
            })
        distributed.barrier()
        self._streams(state.next_block - 1).unlink(missing_ok=True)


def _read_stream(handle, names: set[str], kind: str, device: torch.device) -> BatchStore | None:
    """The stream ``kind`` (``quant`` or ``full``) kept in an open streams file, or ``None`` if it has none."""
    batches = sorted(int(name.split(".")[1]) for name in names if name.startswith(f"{kind}."))
    if not batches:
        return None
    return BatchStore.of([handle.get_tensor(f"{kind}.{batch}") for batch in batches], device)


def file_bytes(folder: Path) -> int:
    """The bytes of every file under ``folder`` (a checkpoint's disk use)."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


class SavingBlocks:
    """A :class:`common.engine.model.BlockSource` whose blocks are loaded on request (``load(index)``, e.g.
    :meth:`common.llama.blockwise.BlockwiseLlama.load`) and, once calibrated, kept in :class:`BlockFiles`
    and released."""

    def __init__(self, load: Callable[[int], nn.Module], count: int, files: BlockFiles) -> None:
        self._load, self._count, self.files = load, count, files

    def __len__(self) -> int:
        return self._count

    def load(self, index: int) -> nn.Module:
        return self._load(index)

    def finish(self, index: int, block: nn.Module) -> None:
        self.files.save(index, block)
