"""Tensors kept in a temporary file instead of memory: a model's starting weights between methods
(:class:`WeightSnapshot`), parameters a stage does not use while it runs (:func:`parked`), and the
parameters of a block not read by the current step of its calibration (:class:`ResidentOnly`).

The file holds the raw bytes of each tensor (tensors sharing storage once), in the cache root
(``$GPTAQ_CACHE_DIR``) under a name carrying the process id; it is removed on exit, and one a killed run left
is swept by the next (:func:`common.files.sweep_stale_temporaries`). Reading back goes straight into the
target tensors (from the page cache, as a rule).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Collection, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch
from torch import nn

from common.cache import cache_root
from common.files import sweep_stale_temporaries
from common.memory import drop_pages


class TensorFile:
    """Named tensors' bytes in a temporary file; ``with TensorFile(tensors) as saved: ... saved.read_into(t)``.

    Args:
        tensors: ``{name: tensor}`` on any device (written as contiguous CPU bytes).
        folder: where the file goes (default: ``<cache root>/snapshots``).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], folder: Path | None = None) -> None:
        folder = cache_root() / "snapshots" if folder is None else folder
        folder.mkdir(parents=True, exist_ok=True)
        sweep_stale_temporaries(folder)
        self.path = folder / f".weights.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        self.entries: list[tuple[str, int, int]] = []
        offsets: dict[tuple[int, int], int] = {}
        with open(self.path, "wb") as handle:
            for name, tensor in tensors.items():
                key = (tensor.data_ptr(), tensor.nbytes)
                if key not in offsets:
                    offsets[key] = handle.tell()
                    handle.write(_raw_bytes(tensor.detach().cpu().contiguous()))
                self.entries.append((name, offsets[key], tensor.nbytes))

    def read_into(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Read the saved bytes back into ``tensors`` (the same names, shapes and dtypes), in place."""
        with open(self.path, "rb") as handle, torch.no_grad():
            for name, offset, size in self.entries:
                target = tensors[name]
                direct = target.device.type == "cpu" and target.is_contiguous()
                buffer = target if direct else torch.empty_like(target, device="cpu").contiguous()
                handle.seek(offset)
                if handle.readinto(_raw_bytes(buffer)) != size:
                    raise OSError(f"tensor file {self.path} is truncated at {name}")
                if not direct:
                    target.copy_(buffer)

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


class WeightSnapshot(TensorFile):
    """A model's weights (its whole state dict, tied tensors once) kept in a file, not in memory.

    ``with WeightSnapshot(model) as start: ... start.restore(model)``: a run's resident memory holds one model,
    not two.
    """

    def __init__(self, model: nn.Module, folder: Path | None = None) -> None:
        super().__init__(model.state_dict(), folder)

    def restore(self, model: nn.Module) -> None:
        """Read the saved bytes back into ``model``'s parameters and buffers, in place."""
        self.read_into(model.state_dict())


@contextmanager
def parked(parameters: Mapping[str, nn.Parameter], folder: Path | None = None) -> Iterator[None]:
    """Keep ``parameters`` in a file for the duration of the ``with`` block, their memory given back.

    Each parameter keeps its identity (modules still hold it); inside the block its data is an empty tensor
    (so a stray read fails loudly), and on exit (also on an error) its values come back from the file with
    their shape, dtype and device. A CPU tensor keeps its memory, with its pages dropped
    (:func:`common.memory.drop_pages`: this also frees weights that live inside a memory-mapped checkpoint,
    which releasing the tensor would not); any other is released and allocated again. For a stage that never
    reads them: the calibration engine parks what lies outside the blocks (in a language model the
    embedding and the head: 0.23 GB of the embedded run's 0.65 GB).
    """
    originals = {name: parameter.data for name, parameter in parameters.items()}
    with TensorFile(originals, folder) as saved:
        for parameter in parameters.values():
            parameter.data = torch.empty(0, dtype=parameter.dtype, device=parameter.device)
        kept = {name: tensor for name, tensor in originals.items() if drop_pages(tensor)}
        released = {name: (t.shape, t.dtype, t.device) for name, t in originals.items() if name not in kept}
        del originals
        try:
            yield
        finally:
            values = {name: kept[name] if name in kept else torch.empty(released[name][0], dtype=released[name][1],
                                                                          device=released[name][2])
                      for name in parameters}
            saved.read_into(values)
            for name, parameter in parameters.items():
                parameter.data = values[name]


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage."""
    return memoryview(tensor.view(-1).view(torch.uint8).numpy())


class ResidentOnly:
    """Named parameters of which only those a step reads are in memory; the others wait in files (:func:`parked`).

    ``with ResidentOnly(weights) as resident: resident.keep(names); ...``: every parameter is resident at the
    start and again on exit (also on an error). Disabled (``enabled=False``), :meth:`keep` does nothing.
    """

    def __init__(self, parameters: Mapping[str, nn.Parameter], *, enabled: bool = True,
                 folder: Path | None = None) -> None:
        self.parameters, self.enabled, self.folder = dict(parameters), enabled, folder
        self._parked: dict[str, AbstractContextManager] = {}

    def keep(self, names: Collection[str]) -> None:
        """Make exactly ``names`` resident: the others are parked first, then parked ones named here come back."""
        if not self.enabled:
            return
        unknown = set(names) - self.parameters.keys()
        if unknown:
            raise KeyError(f"no parameters named {sorted(unknown)}")
        for name in sorted(self.parameters.keys() - names - self._parked.keys()):  # first out, then in
            context = parked({name: self.parameters[name]}, self.folder)
            context.__enter__()
            self._parked[name] = context
        for name in [name for name in self._parked if name in names]:
            self._parked.pop(name).__exit__(None, None, None)

    def __enter__(self) -> ResidentOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        while self._parked:
            self._parked.popitem()[1].__exit__(None, None, None)
