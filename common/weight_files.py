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
        """Read the saved bytes of each of ``tensors`` (names saved here, the same shapes and dtypes) back into
        it, in place."""
        entries = {name: (offset, size) for name, offset, size in self.entries}
        with open(self.path, "rb") as handle, torch.no_grad():
            for name, target in tensors.items():
                offset, size = entries[name]
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
    with TensorFile({name: parameter.data for name, parameter in parameters.items()}, folder) as saved:
        held = {name: _give_back(parameter) for name, parameter in parameters.items()}
        try:
            yield
        finally:
            for name, parameter in parameters.items():
                _take_back(parameter, held[name], saved, name)


_Held = tuple[torch.Tensor | None, torch.Size, torch.dtype, torch.device]
"""A parameter's data given back: its tensor with the pages dropped (``None`` if released), shape, dtype, device."""


def _give_back(parameter: nn.Parameter) -> _Held:
    """Give ``parameter``'s memory back (its values are in a file); its data becomes an empty tensor."""
    original = parameter.data
    parameter.data = torch.empty(0, dtype=original.dtype, device=original.device)
    return (original if drop_pages(original) else None), original.shape, original.dtype, original.device


def _take_back(parameter: nn.Parameter, held: _Held, saved: TensorFile, name: str) -> None:
    """Undo :func:`_give_back`: ``parameter``'s values read back from ``saved`` (under ``name``)."""
    kept, shape, dtype, device = held
    value = kept if kept is not None else torch.empty(shape, dtype=dtype, device=device)
    saved.read_into({name: value})
    parameter.data = value


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage."""
    return memoryview(tensor.view(-1).view(torch.uint8).numpy())


class ResidentOnly:
    """Named parameters of which only those a step reads are in memory; the others wait in files (:func:`parked`).

    ``with ResidentOnly(weights) as resident: resident.keep(names); ...``: every parameter is resident at the
    start and again on exit (also on an error). Disabled (``enabled=False``), :meth:`keep` does nothing.
    With ``unchanged`` the caller promises not to modify the parameters while this lives: each is written to
    a file once, and parking it again only gives its memory back.
    """

    def __init__(self, parameters: Mapping[str, nn.Parameter], *, enabled: bool = True, unchanged: bool = False,
                 folder: Path | None = None) -> None:
        self.parameters, self.enabled, self.unchanged, self.folder = dict(parameters), enabled, unchanged, folder
        self._parked: dict[str, AbstractContextManager] = {}
        self._files: dict[str, TensorFile] = {}
        self._held: dict[str, _Held] = {}

    @property
    def parked_names(self) -> set[str]:
        return set(self._parked) | set(self._held)

    def keep(self, names: Collection[str]) -> None:
        """Make exactly ``names`` resident: the others are parked first, then parked ones named here come back."""
        if not self.enabled:
            return
        unknown = set(names) - self.parameters.keys()
        if unknown:
            raise KeyError(f"no parameters named {sorted(unknown)}")
        for name in sorted(self.parameters.keys() - names - self.parked_names):  # first out, then in
            self._park(name)
        for name in sorted(self.parked_names & set(names)):
            self._unpark(name)

    def _park(self, name: str) -> None:
        parameter = self.parameters[name]
        if not self.unchanged:
            context = parked({name: parameter}, self.folder)
            context.__enter__()
            self._parked[name] = context
            return
        if name not in self._files:
            self._files[name] = TensorFile({name: parameter.data}, self.folder)
        self._held[name] = _give_back(parameter)

    def _unpark(self, name: str) -> None:
        if name in self._parked:
            self._parked.pop(name).__exit__(None, None, None)
        else:
            _take_back(self.parameters[name], self._held.pop(name), self._files[name], name)

    def discard(self) -> None:
        """Forget the parked parameters' values (they stay empty; their files go on exit): for parameters that
        are not read again. Only with ``unchanged``."""
        if not self.unchanged:
            raise ValueError("discard needs unchanged=True (a parked parameter's file is its only copy)")
        self._held.clear()

    def __enter__(self) -> ResidentOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for name in sorted(self.parked_names):
                self._unpark(name)
        finally:
            for saved in self._files.values():
                saved.__exit__(None, None, None)
            self._files.clear()
