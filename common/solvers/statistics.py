"""Calibration statistics of one linear layer, streamed from its inputs: GPTQ's ``H`` and GPTAQ's ``D``.

Notation (shapes in brackets; ``n`` input columns, ``N`` calibration tokens): ``X`` [N, n] is the layer's input
in the full-precision model, ``X̃`` [N, n] its input in the partially quantized model;

* ``H = 2/N · X̃ᵀX̃`` [n, n] (every method);
* ``D = 2/N · (X − X̃)ᵀX̃`` [n, n] (the asymmetric methods; row ``i`` holds the drift of input channel ``i``: the
  paper's ``ΔX X̃ᵀ`` with samples as columns).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from common.weight_files import parked

_ERROR_ROWS = 1024
"""Weight rows per slice in :meth:`CalibrationStatistics.output_error`."""
_SUM_ROWS = 1024
"""Rows of a batch's product added to the float64 sums at once (its float64 copy: ``1024 × n`` values)."""
SET_ASIDE_BYTES = 64 * 2**20
"""Sums smaller than this stay in memory during a solve (:meth:`CalibrationStatistics.set_aside`)."""


class CalibrationError(RuntimeError):
    """Calibration statistics cannot be solved (no data, NaN/Inf, or an indefinite Hessian)."""


class CalibrationStatistics:
    """Streams calibration inputs of one linear layer into ``H`` (and ``D`` for GPTAQ).

    Inputs may have any leading shape ``[..., n]``; every row counts as one sample, so ``N`` is the
    number of rows seen and does not depend on how the data were split into batches. Each batch's products
    are computed in ``dtype`` (float32 by default, float64 for references) and summed across batches in
    float64, so the order of those sums (one process, or shards summed over processes: :meth:`reduce_`)
    changes ``H`` and ``D`` by ~1e-16 relative, invisible once read back in ``dtype`` (scaled by ``2/N``).

    Args:
        columns: ``n``, the layer's input features.
        asymmetric: also accumulate ``D`` (GPTAQ); then :meth:`add` needs the full-precision input too.
        name: the layer's name, used in error messages.
    """

    def __init__(
        self,
        columns: int,
        *,
        asymmetric: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        name: str = "layer",
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.columns = columns
        self.name = name
        self.rows = 0
        self.dtype = dtype
        self._xtx = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self._dxtx = torch.zeros_like(self._xtx) if asymmetric else None

    @property
    def asymmetric(self) -> bool:
        return self._dxtx is not None

    @contextmanager
    def set_aside(self) -> Iterator[None]:
        """Keep the float64 sums in a file for the ``with`` block (their memory given back), when they hold at
        least :data:`SET_ASIDE_BYTES`: a solve needs only ``H`` and ``D`` in the solver's dtype, and the sums
        (``2 · 8n²`` bytes: 1.9 GiB for a 7B model's down_proj) are read again only by :meth:`output_error`."""
        sums = {"xtx": self._xtx, **({"dxtx": self._dxtx} if self._dxtx is not None else {})}
        if sum(tensor.nbytes for tensor in sums.values()) < SET_ASIDE_BYTES:
            yield
            return
        with parked(sums):
            yield

    def add(self, x_quant: torch.Tensor, x_full: torch.Tensor | None = None) -> None:
        """Add a batch: ``x_quant`` [..., n] from the quantized stream, ``x_full`` the matching FP input."""
        if x_quant.shape[-1] != self.columns:
            raise ValueError(
                f"{self.name}: expected inputs with last dimension {self.columns}, got {tuple(x_quant.shape)}"
            )
        xq = x_quant.reshape(-1, self.columns).to(device=self._xtx.device, dtype=self.dtype)
        _add_by_rows(self._xtx, xq.T @ xq)
        if self._dxtx is not None:
            if x_full is None or x_full.shape != x_quant.shape:
                raise ValueError(
                    f"{self.name}: GPTAQ statistics need x_full with the shape of x_quant {tuple(x_quant.shape)}"
                )
            xf = x_full.reshape(-1, self.columns).to(device=self._xtx.device, dtype=self.dtype)
            _add_by_rows(self._dxtx, (xf - xq).T @ xq)
        self.rows += xq.shape[0]

    def reduce_(self, sum_: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the raw sums and the row count by ``sum_`` of each (e.g. summed over processes, each of
        which saw part of the rows)."""
        self._xtx = sum_(self._xtx)
        if self._dxtx is not None:
            self._dxtx = sum_(self._dxtx)
        self.rows = int(sum_(torch.tensor([self.rows], dtype=torch.float64, device=self._xtx.device)).item())

    def hessian(self) -> torch.Tensor:
        """``H = 2/N Σ x̃ x̃ᵀ`` [n, n]."""
        self._check_rows()
        return (self._xtx * (2.0 / self.rows)).to(self.dtype)

    def drift(self) -> torch.Tensor | None:
        """``D = 2/N Σ (x − x̃) x̃ᵀ`` [n, n], or ``None`` for GPTQ statistics."""
        if self._dxtx is None:
            return None
        self._check_rows()
        return (self._dxtx * (2.0 / self.rows)).to(self.dtype)

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
        xtx, dxtx = self._xtx, self._dxtx
        numerator = torch.zeros((), dtype=torch.float64, device=xtx.device)
        denominator = torch.zeros_like(numerator)
        for rows in range(0, weight.shape[0], _ERROR_ROWS):  # float64 copies of a slice of rows at a time
            w = weight[rows:rows + _ERROR_ROWS].detach().to(xtx.device, torch.float64)
            w_hat = quantized[rows:rows + _ERROR_ROWS].detach().to(xtx.device, torch.float64)
            if dxtx is None:
                delta = w_hat - w
                numerator += ((delta @ xtx) * delta).sum()
                denominator += ((w @ xtx) * w).sum()
            else:  # ‖x̃Ŵᵀ‖² − 2⟨x̃Ŵᵀ, xWᵀ⟩ + ‖xWᵀ‖², with xᵀx̃ = x̃ᵀx̃ + (x − x̃)ᵀx̃
                projected = w_hat @ xtx
                numerator += (projected * w_hat).sum() - 2 * ((projected + w_hat @ dxtx.T) * w).sum()
        if dxtx is None:
            return float(numerator / denominator)
        return float((numerator + reference).clamp(min=0) / reference)

    def _check_rows(self) -> None:
        if self.rows == 0:
            raise CalibrationError(f"{self.name}: no calibration data reached this layer")


def _add_by_rows(total: torch.Tensor, product: torch.Tensor) -> None:
    """``total += product`` (float64 += float32, [n, n]) a slice of rows at a time: a whole float64 copy of
    ``product`` would be ``8n²`` bytes."""
    for rows in range(0, product.shape[0], _SUM_ROWS):
        total[rows:rows + _SUM_ROWS] += product[rows:rows + _SUM_ROWS]
