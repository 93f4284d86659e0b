"""Per-batch activations of the calibration engine, kept in one contiguous buffer per tensor kind.

The engine keeps, for every calibration batch, a block's input and output, a group's full-precision input
and some linears' outputs. Held as one tensor per batch (3–25 MB each in the embedded run), they are
scattered among the forward's temporaries in the allocator's heap: the freed temporaries between them
cannot be returned to the system, and the process's resident set grows far past its live tensors. A
:class:`BatchStore` holds all batches of one kind in a single buffer (large enough that the allocator maps
it on its own), so the heap holds only the forward's temporaries, which the next forward reuses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


class BatchStore:
    """Tensors ``[*leading_b, features]`` for batches ``b = 0..B-1``, in one buffer ``[Σ_b rows_b, features]``.

    ``rows_b`` (the number of rows of batch ``b``: the product of its leading dimensions, e.g. samples ×
    tokens) is fixed at construction, from the block input each batch belongs to; ``features``, the dtype
    and the device are those of the first tensor stored. ``store[b] = x`` copies ``x`` in (so a block's
    output may overwrite the input it was computed from); ``store[b]`` is a view, valid until overwritten.

    Args:
        leading: each batch's leading shape (everything but the last dimension).
        device: where the buffer lives (the engine's offload device).
    """

    def __init__(self, leading: Sequence[torch.Size], device: torch.device | str) -> None:
        self.leading = [torch.Size(shape) for shape in leading]
        self.device = torch.device(device)
        rows = [shape.numel() for shape in self.leading]
        self._starts = [sum(rows[:b]) for b in range(len(rows))]
        self._rows = rows
        self._buffer: torch.Tensor | None = None
        self._filled = [False] * len(rows)

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor], device: torch.device | str) -> BatchStore:
        """A store holding a copy of ``tensors`` (one per batch, each ``[*leading_b, features]``)."""
        store = cls([t.shape[:-1] for t in tensors], device)
        for batch, tensor in enumerate(tensors):
            store[batch] = tensor
        return store

    def like(self) -> BatchStore:
        """An empty store with the same batches (rows), for another kind of tensor."""
        return BatchStore(self.leading, self.device)

    def clone(self) -> BatchStore:
        """A filled copy (one buffer copy)."""
        copy = self.like()
        if self._buffer is not None:
            copy._buffer = self._buffer.clone()
        copy._filled = list(self._filled)
        return copy

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def complete(self) -> bool:
        """Whether every batch has been stored."""
        return all(self._filled)

    def __setitem__(self, batch: int, tensor: torch.Tensor) -> None:
        if tensor.shape[:-1] != self.leading[batch]:
            raise ValueError(
                f"batch {batch}: expected a tensor with leading shape {tuple(self.leading[batch])} (the block "
                f"input's), got {tuple(tensor.shape)}"
            )
        if self._buffer is None:
            self._buffer = torch.empty(sum(self._rows), tensor.shape[-1], dtype=tensor.dtype, device=self.device)
        elif tensor.shape[-1] != self._buffer.shape[1] or tensor.dtype != self._buffer.dtype:
            raise ValueError(
                f"batch {batch}: expected [..., {self._buffer.shape[1]}] {self._buffer.dtype} like the batches "
                f"stored before, got {tuple(tensor.shape)} {tensor.dtype}"
            )
        self._slot(batch).copy_(tensor.reshape(self._rows[batch], -1))
        self._filled[batch] = True

    def __getitem__(self, batch: int) -> torch.Tensor:
        if not self._filled[batch]:
            raise KeyError(f"batch {batch} has not been stored")
        return self._slot(batch).view(*self.leading[batch], self._buffer.shape[1])

    def get(self, batch: int) -> torch.Tensor | None:
        """``store[batch]``, or ``None`` if that batch has not been stored."""
        return self[batch] if self._filled[batch] else None

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[batch] for batch in range(len(self)))

    def _slot(self, batch: int) -> torch.Tensor:
        start = self._starts[batch]
        return self._buffer[start : start + self._rows[batch]]
