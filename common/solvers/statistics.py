"""Calibration statistics of one linear layer, streamed from its inputs: GPTQ's ``H`` and GPTAQ's ``D``.

Notation (shapes in brackets; ``n`` input columns, ``N`` calibration tokens): ``X`` [N, n] is the layer's input
in the full-precision model, ``X̃`` [N, n] its input in the partially quantized model;

* ``H = 2/N · X̃ᵀX̃`` [n, n] (every method);
* ``D = 2/N · (X − X̃)ᵀX̃`` [n, n] (the asymmetric methods; row ``i`` holds the drift of input channel ``i``: the
  paper's ``ΔX X̃ᵀ`` with samples as columns).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from common.cache import cache_root
from common.memory import drop_pages
from common.weight_files import ResidentOnly

_ERROR_ROWS = 256
"""Weight rows per slice in :meth:`CalibrationStatistics.output_error` (four float64 ``256 × n`` temporaries)."""
SUM_ROWS = 256
"""Rows of a float64 sum added to (a large batch product is computed that many rows at a time) or read at once
(``256 × n`` values)."""
SLICED_PRODUCT_BYTES = 64 * 2**20
"""A batch's product ``X̃ᵀX̃`` at least this large is computed a slice of rows at a time (see ``_add_product``)."""
SET_ASIDE_BYTES = 64 * 2**20
"""A float64 sum at least this large lives in a file: on the CPU a mapped one from the start (see
:class:`CalibrationStatistics`), elsewhere during solves (:meth:`CalibrationStatistics.sums_in_files`)."""


class CalibrationError(RuntimeError):
    """Calibration statistics cannot be solved (no data, NaN/Inf, or an indefinite Hessian)."""


class CalibrationStatistics:
    """Streams calibration inputs of one linear layer into ``H`` (and ``D`` for GPTAQ).

    Inputs may have any leading shape ``[..., n]``; every row counts as one sample, so ``N`` is the
    number of rows seen and does not depend on how the data were split into batches. Each batch's products
    are computed in ``dtype`` (float32 by default, float64 for references) and summed across batches in
    float64, so the order of those sums (one process, or shards summed over processes: :meth:`reduce_`)
    changes ``H`` and ``D`` by ~1e-16 relative, invisible once read back in ``dtype`` (scaled by ``2/N``).

    Memory: on the CPU a sum of at least :data:`SET_ASIDE_BYTES` (``8n²`` bytes: 0.9 GiB for a 7B model's
    down_proj) lives in a memory-mapped temporary file (already unlinked, so nothing is left behind) and each
    slice of rows is given back to the page cache once added or read (:func:`common.memory.drop_pages`), so the
    process holds a few slices of the sums, not the sums. The values and their order of summation are those
    of sums in memory: the bits are the same.

    Args:
        columns: ``n``, the layer's input features.
        asymmetric: also accumulate ``D`` (GPTAQ); then :meth:`add` needs the full-precision input too.
        name: the layer's name, used in error messages.
        mapped: keep the sums in a memory-mapped file; ``None``: when they are on the CPU and at least
            :data:`SET_ASIDE_BYTES` each.
    """

    def __init__(
        self,
        columns: int,
        *,
        asymmetric: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        name: str = "layer",
        mapped: bool | None = None,
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.columns = columns
        self.name = name
        self.rows = 0
        self.dtype = dtype
        on_cpu = torch.device(device if device is not None else "cpu").type == "cpu"
        self.mapped = on_cpu and 8 * columns * columns >= SET_ASIDE_BYTES if mapped is None else mapped
        if self.mapped and not on_cpu:
            raise ValueError(f"{name}: sums in a mapped file must be on the CPU, got device {device}")
        self._xtx = self._zero_sum(device)
        self._dxtx = self._zero_sum(device) if asymmetric else None
        self._files: ResidentOnly | None = None
        self._discarded = False

    @property
    def asymmetric(self) -> bool:
        return self._dxtx is not None

    def _zero_sum(self, device: torch.device | str | None) -> torch.Tensor:
        """A float64 [n, n] of zeros: in memory, or in a memory-mapped temporary file (see the class docstring)."""
        n = self.columns
        if not self.mapped:
            return torch.zeros(n, n, dtype=torch.float64, device=device)
        return _mapped_zeros(n, cache_root() / "snapshots", self.name)

    def _given_back(self, total: torch.Tensor) -> None:
        """A mapped sum's pages (or a slice's) go back to the page cache once read or added to."""
        if self.mapped:
            drop_pages(total)

    @contextmanager
    def sums_in_files(self, *, last_use: bool = False) -> Iterator[None]:
        """For the ``with`` block, the float64 sums wait in files when they hold at least
        :data:`SET_ASIDE_BYTES` (``2 · 8n²`` bytes: 1.9 GiB for a 7B model's down_proj; mapped sums are in files
        already and are read a slice at a time), and :meth:`hessian`,
        :meth:`drift` and :meth:`output_error` bring back one sum at a time: a solve holds ``8n²`` of them at
        most, its ``H`` and ``D`` (``2 · 4n²``) computed one after the other. :meth:`add` is refused meanwhile.
        With ``last_use`` the statistics are not read after the block: large sums are not brought back
        (reading them afterwards fails).
        """
        if self.mapped:  # in files already
            yield
            if last_use:
                self._xtx = torch.empty(0, dtype=torch.float64)
                self._dxtx = None if self._dxtx is None else torch.empty(0, dtype=torch.float64)
                self._discarded = True
            return
        sums = self._sums()
        if self._files is not None or sum(tensor.nbytes for tensor in sums.values()) < SET_ASIDE_BYTES:
            yield
            return
        with ResidentOnly(sums, unchanged=True) as files:
            files.keep(())
            self._files = files
            try:
                yield
            finally:
                self._files = None
                if last_use:
                    files.discard()
                    self._discarded = True

    def _sums(self) -> dict[str, torch.Tensor]:
        return {"xtx": self._xtx, **({"dxtx": self._dxtx} if self._dxtx is not None else {})}

    @contextmanager
    def _reading(self, name: str) -> Iterator[torch.Tensor]:
        """The sum ``name`` (``"xtx"`` or ``"dxtx"``), in memory for the ``with`` block (see :meth:`sums_in_files`)."""
        if self._files is None:
            yield self._sums()[name]
            return
        self._files.keep({name})
        try:
            yield self._sums()[name]
        finally:
            self._files.keep(())

    def add(self, x_quant: torch.Tensor, x_full: torch.Tensor | None = None) -> None:
        """Add a batch: ``x_quant`` [..., n] from the quantized stream, ``x_full`` the matching FP input."""
        if x_quant.shape[-1] != self.columns:
            raise ValueError(
                f"{self.name}: expected inputs with last dimension {self.columns}, got {tuple(x_quant.shape)}"
            )
        if self._files is not None:
            raise RuntimeError(f"{self.name}: statistics cannot grow while their sums wait in files")
        xq = x_quant.reshape(-1, self.columns).to(device=self._xtx.device, dtype=self.dtype)
        _add_product(self._xtx, xq, xq, self._given_back)
        if self._dxtx is not None:
            if x_full is None or x_full.shape != x_quant.shape:
                raise ValueError(
                    f"{self.name}: GPTAQ statistics need x_full with the shape of x_quant {tuple(x_quant.shape)}"
                )
            xf = x_full.reshape(-1, self.columns).to(device=self._xtx.device, dtype=self.dtype)
            _add_product(self._dxtx, xf - xq, xq, self._given_back)
        self.rows += xq.shape[0]

    def reduce_(self, sum_: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the raw sums and the row count by ``sum_`` of each (e.g. summed over processes, each of
        which saw part of the rows)."""
        self._xtx = sum_(self._xtx)
        self._given_back(self._xtx)
        if self._dxtx is not None:
            self._dxtx = sum_(self._dxtx)
            self._given_back(self._dxtx)
        self.rows = int(sum_(torch.tensor([self.rows], dtype=torch.float64, device=self._xtx.device)).item())

    def hessian(self) -> torch.Tensor:
        """``H = 2/N Σ x̃ x̃ᵀ`` [n, n]."""
        self._check_rows()
        with self._reading("xtx") as xtx:
            return _scaled(xtx, 2.0 / self.rows, self.dtype, self._given_back)

    def drift(self) -> torch.Tensor | None:
        """``D = 2/N Σ (x − x̃) x̃ᵀ`` [n, n], or ``None`` for GPTQ statistics."""
        if self._dxtx is None:
            return None
        self._check_rows()
        with self._reading("dxtx") as dxtx:
            return _scaled(dxtx, 2.0 / self.rows, self.dtype, self._given_back)

    def output_error(self, weight: torch.Tensor, quantized: torch.Tensor, reference: float | None = None) -> float:
        """Relative output error over the calibration tokens, from the statistics (float64).

        Asymmetric statistics: ``‖x̃ Ŵᵀ − x Wᵀ‖² / ‖x Wᵀ‖²`` (GPTAQ's objective), where ``reference`` is
        ``‖x Wᵀ‖²`` summed over the same rows (the full-precision outputs' squared norm, bias excluded);
        otherwise ``‖x̃ (Ŵ − W)ᵀ‖² / ‖x̃ Wᵀ‖²`` (GPTQ's). ``weight``, ``quantized``: [m, n].
        """
        self._check_rows()
        if self._dxtx is not None and (reference is None or not reference > 0):
            raise ValueError(f"{self.name}: the asymmetric output error needs the reference ‖x Wᵀ‖² > 0, "
                             f"got {reference}")
        device = self._xtx.device

        def by_rows(term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
            """``Σ term(w, ŵ)`` over slices of rows (their float64 copies), in float64."""
            total = torch.zeros((), dtype=torch.float64, device=device)
            for rows in range(0, weight.shape[0], _ERROR_ROWS):
                w = weight[rows:rows + _ERROR_ROWS].detach().to(device, torch.float64)
                total += term(w, quantized[rows:rows + _ERROR_ROWS].detach().to(device, torch.float64))
            return total

        if self._dxtx is None:
            with self._reading("xtx") as xtx:
                numerator = by_rows(lambda w, w_hat: (((w_hat - w) @ xtx) * (w_hat - w)).sum())
                denominator = by_rows(lambda w, w_hat: ((w @ xtx) * w).sum())
                self._given_back(xtx)
            return float(numerator / denominator)
        # ‖x̃Ŵᵀ‖² − 2⟨x̃Ŵᵀ, xWᵀ⟩ + ‖xWᵀ‖², with xᵀx̃ = x̃ᵀx̃ + (x − x̃)ᵀx̃: one sum at a time
        with self._reading("xtx") as xtx:
            quantized_terms = by_rows(lambda w, w_hat: ((w_hat @ xtx) * (w_hat - 2 * w)).sum())
            self._given_back(xtx)
        with self._reading("dxtx") as dxtx:
            drift_term = by_rows(lambda w, w_hat: ((w_hat @ dxtx.T) * w).sum())
            self._given_back(dxtx)
        numerator = quantized_terms - 2 * drift_term
        return float((numerator + reference).clamp(min=0) / reference)

    def _check_rows(self) -> None:
        if self._discarded:
            raise RuntimeError(f"{self.name}: these statistics had their last use (sums_in_files(last_use=True))")
        if self.rows == 0:
            raise CalibrationError(f"{self.name}: no calibration data reached this layer")


def _add_product(total: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                 added: Callable[[torch.Tensor], None]) -> None:
    """``total += leftᵀ · right`` (float64 [n, n] += the product of ``left``, ``right`` [N, n] in their dtype);
    ``added`` is called with each part of ``total`` once it is added to.

    A product of at least :data:`SLICED_PRODUCT_BYTES` is computed a slice of rows at a time (the whole one
    would be ``4n²`` bytes more, its float64 copy ``8n²``); a smaller one at once, which is faster and, as the
    BLAS may block a long token dimension differently for a slice, keeps its bits independent of the slicing.
    """
    step = SUM_ROWS if total.shape[0] * total.shape[1] * left.element_size() >= SLICED_PRODUCT_BYTES else None
    if step is None:
        total += left.T @ right
        added(total)
        return
    for rows in range(0, total.shape[0], step):
        total[rows:rows + step] += left[:, rows:rows + step].T @ right
        added(total[rows:rows + step])


def _scaled(total: torch.Tensor, scale: float, dtype: torch.dtype, read: Callable[[torch.Tensor], None]
            ) -> torch.Tensor:
    """``(total · scale)`` in ``dtype`` (``total`` [n, n] float64), a slice of rows at a time: no float64
    temporary of the whole matrix besides the result; ``read`` is called with each slice once read."""
    result = torch.empty(total.shape, dtype=dtype, device=total.device)
    for rows in range(0, total.shape[0], SUM_ROWS):
        result[rows:rows + SUM_ROWS] = total[rows:rows + SUM_ROWS] * scale
        read(total[rows:rows + SUM_ROWS])
    return result


def _mapped_zeros(columns: int, folder: Path, name: str) -> torch.Tensor:
    """A float64 [n, n] of zeros in a temporary file in ``folder``, mapped into memory and unlinked at once (the
    mapping keeps it until the tensor is freed). Its disk space is reserved first: a full disk is a clear
    error here, not a crash when a page is written later."""
    size = columns * columns
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".sums.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(path, "wb") as handle:
            try:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(handle.fileno(), 0, 8 * size)
                else:  # macOS: a sparse file
                    handle.truncate(8 * size)
            except OSError as error:
                raise CalibrationError(
                    f"{name}: no room in {folder} for its float64 sums ({8 * size / 2**30:.2f} GiB each): free "
                    f"disk space there or point GPTAQ_CACHE_DIR to a larger disk ({error.strerror})") from error
        return torch.from_file(str(path), shared=True, size=size, dtype=torch.float64).view(columns, columns)
    finally:
        path.unlink(missing_ok=True)
