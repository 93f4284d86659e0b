"""Uniform fake quantizers for weights and activations.

Weights use GPTQ's reference grid: an unsigned integer grid ``0..maxq`` (``maxq = 2**bits - 1``) with a
per-row scale and zero point, ``dequant(q) = scale * (q - zero)``.

* asymmetric: the range ``[min(x, 0), max(x, 0)]`` is mapped onto the grid (the range always holds 0),
  ``zero = round(-xmin / scale)``;
* symmetric: signed, no zero point to store: ``zero`` is fixed at the grid's midpoint ``(maxq + 1) / 2`` and
  ``scale = 2 * max|x| / maxq``, i.e. the values are ``scale * {-2**(bits-1), ..., 2**(bits-1) - 1}``.

``grid="gptq"`` restricts the grid to what a ``gptq`` checkpoint stores exactly (:mod:`common.export`):
scales rounded to float16 before any value is rounded onto them, and zero points in ``1..maxq`` (the format
stores ``zero - 1`` in ``bits`` unsigned bits). ``scale * (q - zero)`` is then exact in float32, so a packed
checkpoint dequantizes to the very weights the solver produced. ``grid="float"`` (the default) keeps the
reference code's float32 grid.

The optional MSE clip search shrinks the range by ``1 - i / grid`` for ``i < maxshrink * grid`` and keeps,
per row, the shrink with the smallest ``sum |x - dequant(quant(x))| ** norm`` (``norm = 2.4``), as GPTQ's
reference code does. On the CPU, where it is dearest, the search's result is remembered by the exact bytes
of the weight (:class:`_SearchMemo`): the methods of one run quantize the same starting weights, and each
would otherwise search them again.

Activations are quantized dynamically per token (per row of the last dimension, optionally per group of
``groupsize`` channels) with QuaRot's grids: asymmetric ``0..2**bits - 1`` with a zero point, or symmetric
signed ``-2**(bits-1)..2**(bits-1) - 1``; the range is shrunk by ``clip_ratio`` before the scale is set.
``bits = 16`` means "not quantized" everywhere.
"""

from __future__ import annotations

import ctypes
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

FULL_PRECISION_BITS = 16
"""Bit width that disables quantization (the tensor passes through unchanged)."""

GRIDS = ("float", "gptq")
"""Allowed weight grids: the reference float32 grid, or the one a ``gptq`` checkpoint stores exactly."""

_FLOAT16 = torch.finfo(torch.float16)

_MSE_CHUNK_ELEMENTS = 1 << 18
"""Candidate errors computed at once by the MSE clip search (1 MB in float32: cache-resident)."""

_MEMO_BYTES = 64 << 20
"""Most bytes of grid parameters the clip-search memo keeps (about 8 million rows' scale and zero)."""


def check_bits(bits: int, name: str = "bits") -> int:
    """Return ``bits`` if it is an int in 1..16, else raise ``ValueError`` naming the parameter."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= FULL_PRECISION_BITS:
        raise ValueError(f"{name} must be an integer in 1..{FULL_PRECISION_BITS} (16 = no quantization), got {bits!r}")
    return bits


def check_grid_bits(bits: int, sym: bool, name: str = "bits", sym_setting: str = "sym=True") -> int:
    """``bits`` if its grid has levels on both sides of zero, else ``ValueError`` naming ``name``: an asymmetric
    grid of any width in 1..16, a symmetric one from 2 bits (at 1 bit its levels are ``{−s, 0}``, every
    positive value would become 0). ``sym_setting`` says how the caller chose the symmetric grid."""
    check_bits(bits, name)
    if sym and bits < 2:
        raise ValueError(f"{name} must be at least 2 for a symmetric grid ({sym_setting}): a 1-bit symmetric grid "
                         f"has the levels {{-s, 0}} and rounds every positive value to 0; got {bits}")
    return bits


def check_groupsize(groupsize: int, columns: int, name: str = "groupsize") -> int:
    """Return ``groupsize`` if it is -1 (one group per row) or a positive divisor of ``columns``."""
    if isinstance(groupsize, bool) or not isinstance(groupsize, int):
        raise ValueError(f"{name} must be -1 or a positive divisor of {columns}, got {groupsize!r}")
    if groupsize == -1:
        return groupsize
    if groupsize <= 0 or columns % groupsize != 0:
        raise ValueError(f"{name} must be -1 or a positive divisor of {columns}, got {groupsize}")
    return groupsize


def check_clip_ratio(clip_ratio: float, name: str = "clip_ratio") -> float:
    """Return ``clip_ratio`` if it lies in (0, 1], else raise ``ValueError``."""
    if not 0.0 < float(clip_ratio) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {clip_ratio!r}")
    return float(clip_ratio)


def check_grid(grid: str, name: str = "grid") -> str:
    """Return ``grid`` if it is one of :data:`GRIDS`, else raise ``ValueError`` naming the parameter."""
    if grid not in GRIDS:
        raise ValueError(f"{name} must be one of {GRIDS}, got {grid!r}")
    return grid


def working_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype quantization math runs in: float64 for float64 tensors, float32 otherwise."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round ``x`` onto the grid ``scale * (q - zero)``, ``q`` in ``0..maxq`` (shapes broadcast).

    Outside autograd the steps run in place on one output tensor (the same numbers, one allocation).
    """
    tensors = [t for t in (x, scale, zero) if isinstance(t, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
        return scale * (q - zero)
    out = torch.div(x, scale)
    if isinstance(zero, torch.Tensor) and torch.broadcast_shapes(out.shape, zero.shape) != out.shape:
        out = out.expand(torch.broadcast_shapes(out.shape, zero.shape)).clone()
    return _onto_grid_(out, scale, zero, maxq)


def _onto_grid_(scaled: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``scale * (clamp(round(scaled) + zero, 0, maxq) − zero)`` in place on ``scaled`` (= ``x / scale``)."""
    return scaled.round_().add_(zero).clamp_(0, maxq).sub_(zero).mul_(scale)


@dataclass(frozen=True)
class WeightGrid:
    """The grid a quantized weight [m, n] lies on: ``W[r, c] = scales[g, r] · (q[r, c] − zeros[g, r])`` with
    ``g = g_idx[c]`` and integer codes ``q`` in ``0..maxq``.

    Attributes:
        scales: [groups, m], the weight's dtype (float16-representable values for ``grid="gptq"``).
        zeros: [groups, m], integers held in the scales' dtype.
        g_idx: [n] int64, the group of each input column (in the weight's own column order).
        maxq: ``2**bits − 1``.
    """

    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    maxq: int

    @property
    def bits(self) -> int:
        return self.maxq.bit_length()

    def to(self, device: torch.device | str) -> WeightGrid:
        """The same grid with its tensors on ``device``."""
        return WeightGrid(self.scales.to(device), self.zeros.to(device), self.g_idx.to(device), self.maxq)

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer codes [m, n] (int32) of ``weight`` on this grid; ``ValueError`` if it is not on it.

        ``weight`` may be in a narrower dtype than the grid (a float16 model): it must then equal the grid's
        values rounded to that dtype.
        """
        scales, zeros = self._per_column()
        codes = torch.round(weight.detach().to(scales.dtype) / scales) + zeros
        on_grid = torch.equal((scales * (codes - zeros)).to(weight.dtype), weight.detach())
        if codes.min() < 0 or codes.max() > self.maxq or not on_grid:
            raise ValueError("the weight does not lie on its recorded grid (was it changed after quantization?)")
        return codes.to(torch.int32)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """``scales · (codes − zeros)`` [m, n] in the scales' dtype."""
        scales, zeros = self._per_column()
        return scales * (codes.to(scales.dtype) - zeros)

    def _per_column(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.g_idx.to(self.scales.device)
        return self.scales[index].T, self.zeros[index].T

    @staticmethod
    def from_groups(params: list[tuple[torch.Tensor, torch.Tensor]], g_idx: torch.Tensor, maxq: int) -> WeightGrid:
        """From one ``(scale, zero)`` pair of [m, 1] tensors per group (see :meth:`WeightQuantizer.params`)."""
        scales = torch.stack([scale[:, 0] for scale, _ in params])
        zeros = torch.stack([zero[:, 0] for _, zero in params]).to(scales.dtype)
        return WeightGrid(scales, zeros, g_idx.to(torch.int64), maxq)


class WeightQuantizer:
    """Per-row grid parameters and rounding for weights on GPTQ's reference grid.

    Args:
        bits: bit width in 1..16 (from 2 with ``sym``: :func:`check_grid_bits`).
        sym: symmetric (signed, zero point fixed at the grid's midpoint) instead of asymmetric.
        mse: search a per-row clipping of the range minimising the ``norm``-error (GPTQ's reference search).
        grid, maxshrink, norm: the MSE search's resolution, deepest shrink and error exponent.
        grid_format: one of :data:`GRIDS` (see the module docstring).
    """

    def __init__(
        self,
        bits: int,
        *,
        sym: bool = False,
        mse: bool = False,
        grid: int = 100,
        maxshrink: float = 0.8,
        norm: float = 2.4,
        grid_format: str = "float",
    ) -> None:
        self.bits = check_grid_bits(bits, bool(sym))
        self.grid_format = check_grid(grid_format, "grid_format")
        self.sym = bool(sym)
        self.mse = bool(mse)
        self.grid = grid
        self.maxshrink = maxshrink
        self.norm = norm
        self.maxq = 2**self.bits - 1

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid parameters for each row of ``w`` [rows, cols]: ``(scale, zero)``, each [rows, 1]."""
        xmin = torch.clamp(w.amin(dim=1), max=0)
        xmax = torch.clamp(w.amax(dim=1), min=0)
        if self.sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        empty = (xmin == 0) & (xmax == 0)
        xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
        xmax = torch.where(empty, torch.ones_like(xmax), xmax)
        scale, zero = self._grid(xmin, xmax)
        if self.mse:
            key = _SEARCHES.key(w, (self.maxq, self.sym, self.grid, self.maxshrink, self.norm, self.grid_format))
            found = _SEARCHES.get(key)
            if found is None:
                found = self._mse_search(w, xmin, xmax, scale, zero)
                _SEARCHES.put(key, found)
            scale, zero = found
        return scale.unsqueeze(1), zero.unsqueeze(1)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``w`` with parameters from :meth:`params` (broadcast over columns)."""
        return fake_quantize(w, scale, zero, self.maxq)

    def quantize_column_(self, column: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                         out: torch.Tensor) -> torch.Tensor:
        """Fake-quantize one weight column [m] into ``out`` [m] (``scale``, ``zero``: [m]); returns ``out``.

        The solver's per-column step: :func:`fake_quantize`'s operations (the same numbers), without its
        checks and without allocating.
        """
        return _onto_grid_(torch.div(column, scale, out=out), scale, zero, self.maxq)

    def _grid(self, xmin: torch.Tensor, xmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (xmax - xmin) / self.maxq
        checkpoint = self.grid_format == "gptq"
        if checkpoint:
            scale = scale.clamp(_FLOAT16.smallest_normal, _FLOAT16.max).to(torch.float16).to(scale.dtype)
        if self.sym:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        else:
            zero = torch.round(-xmin / scale)
            if checkpoint:
                zero = zero.clamp(1, self.maxq)
        return scale, zero

    def _mse_search(
        self,
        w: torch.Tensor,
        xmin: torch.Tensor,
        xmax: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the shrink with the least ``norm``-error (the first such on a tie), all shrinks at once.

        Rows are taken in chunks sized so that one chunk's candidates (``shrinks × rows × cols``) stay in the
        cache: the search is memory-bound, and a chunk's ten passes then never leave it.
        """
        steps = int(self.maxshrink * self.grid)
        shrinks = (1 - torch.arange(steps, dtype=torch.float64) / self.grid).to(w.dtype).to(w.device)
        rows, cols = w.shape
        chunk = max(1, _MSE_CHUNK_ELEMENTS // (steps * cols))
        scale, zero = scale.clone(), zero.clone()
        for start in range(0, rows, chunk):
            part = slice(start, min(start + chunk, rows))
            grid_scale, grid_zero = self._grid(shrinks[:, None] * xmin[None, part], shrinks[:, None] * xmax[None, part])
            values = w[None, part]
            err = fake_quantize(values, grid_scale[..., None], grid_zero[..., None], self.maxq).sub_(values)
            best = err.abs_().pow_(self.norm).sum(dim=-1).argmin(dim=0, keepdim=True)
            scale[part] = grid_scale.gather(0, best)[0]
            zero[part] = grid_zero.gather(0, best)[0]
        return scale, zero


class _SearchMemo:
    """Clip-search results ``(scale, zero)`` (each [rows]) by settings and the exact bytes of the weight.

    The search is a pure function of the weight and the quantizer's settings, so a remembered result is the
    one a new search would return, bit for bit. Only CPU weights are remembered (hashing a GPU weight would
    cost more than its search there); the least recently used results go first past :data:`_MEMO_BYTES`.
    Results are handed out as copies, so a caller's in-place change never reaches the memo.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = 0

    @staticmethod
    def key(w: torch.Tensor, settings: tuple) -> tuple | None:
        """The memo key of weight ``w`` searched with ``settings``, or ``None`` for a weight not on the CPU."""
        if w.device.type != "cpu":
            return None
        values = w.detach().contiguous()
        # the bytes read in place through ctypes: lending the storage to numpy would pin its size for good
        data = (ctypes.c_char * values.nbytes).from_address(values.data_ptr()) if values.nbytes else b""
        return settings, w.dtype, tuple(w.shape), hashlib.blake2b(data, digest_size=32).digest()

    def get(self, key: tuple | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        if key is None or key not in self.entries:
            return None
        self.entries.move_to_end(key)
        scale, zero = self.entries[key]
        return scale.clone(), zero.clone()

    def put(self, key: tuple | None, result: tuple[torch.Tensor, torch.Tensor]) -> None:
        if key is None or key in self.entries:
            return
        scale, zero = (t.clone() for t in result)
        self.entries[key] = scale, zero
        self.bytes += scale.nbytes + zero.nbytes
        while self.bytes > self.max_bytes and self.entries:
            old_scale, old_zero = self.entries.popitem(last=False)[1]
            self.bytes -= old_scale.nbytes + old_zero.nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


_SEARCHES = _SearchMemo(_MEMO_BYTES)
"""The process's clip-search memo."""


def rtn_quantize_weight(
    weight: torch.Tensor,
    *,
    bits: int,
    sym: bool = False,
    groupsize: int = -1,
    mse: bool = False,
    grid_format: str = "float",
) -> torch.Tensor:
    """Round-to-nearest baseline: fake-quantize ``weight`` [out, in] per row (or per group of columns).

    Returns a tensor with ``weight``'s shape and dtype.
    """
    return rtn_quantize(weight, bits=bits, sym=sym, groupsize=groupsize, mse=mse, grid_format=grid_format)[0]


def rtn_quantize(
    weight: torch.Tensor,
    *,
    bits: int,
    sym: bool = False,
    groupsize: int = -1,
    mse: bool = False,
    grid_format: str = "float",
) -> tuple[torch.Tensor, WeightGrid | None]:
    """:func:`rtn_quantize_weight` and the grid the result lies on (``None`` at 16 bits)."""
    rows, cols = weight.shape
    groupsize = check_groupsize(groupsize, cols)
    quantizer = WeightQuantizer(bits, sym=sym, mse=mse, grid_format=grid_format)
    if bits >= FULL_PRECISION_BITS:
        return weight.clone(), None
    w = weight.to(working_dtype(weight))
    width = cols if groupsize < 0 else groupsize
    w = w.reshape(rows * cols // width, width)
    scale, zero = quantizer.params(w)
    quantized = quantizer.quantize(w, scale, zero).reshape(rows, cols).to(weight.dtype)
    groups = cols // width
    g_idx = torch.arange(cols, device=weight.device) // width
    grid = WeightGrid(scale.reshape(rows, groups).T.contiguous(), zero.reshape(rows, groups).T.contiguous(), g_idx,
                      quantizer.maxq)
    return quantized, grid


class ActivationQuantizer(nn.Module):
    """Dynamic per-token fake quantizer for activations ``x`` [..., channels].

    Args:
        bits: 1..16; 16 disables quantization.
        sym: symmetric signed grid instead of asymmetric with a zero point.
        clip_ratio: the per-token range is multiplied by this factor in (0, 1] before rounding.
        groupsize: -1 for one scale per token, else one per group of ``groupsize`` channels.
        straight_through: pass gradients straight through the rounding (for rotation training).
    """

    def __init__(
        self,
        bits: int = FULL_PRECISION_BITS,
        *,
        sym: bool = False,
        clip_ratio: float = 1.0,
        groupsize: int = -1,
        straight_through: bool = False,
    ) -> None:
        super().__init__()
        self.bits = check_grid_bits(bits, bool(sym))
        self.sym = bool(sym)
        self.clip_ratio = check_clip_ratio(clip_ratio)
        if isinstance(groupsize, bool) or not isinstance(groupsize, int) or (groupsize <= 0 and groupsize != -1):
            raise ValueError(f"groupsize must be -1 or a positive integer, got {groupsize!r}")
        self.groupsize = groupsize
        self.straight_through = bool(straight_through)

    @property
    def enabled(self) -> bool:
        return self.bits < FULL_PRECISION_BITS

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, sym={self.sym}, clip_ratio={self.clip_ratio}, groupsize={self.groupsize}, "
            f"straight_through={self.straight_through}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        quantized = self._fake_quantize(x.detach() if self.straight_through else x)
        if self.straight_through:
            return x + (quantized - x).detach()
        return quantized

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        channels = shape[-1]
        xf = x.to(working_dtype(x))
        if self.groupsize > 0:
            if channels % self.groupsize != 0:
                raise ValueError(
                    f"groupsize must divide the activation's last dimension {channels}, got {self.groupsize}"
                )
            xf = xf.reshape(*shape[:-1], channels // self.groupsize, self.groupsize)
        xmin = torch.clamp(xf.amin(dim=-1, keepdim=True), max=0) * self.clip_ratio
        xmax = torch.clamp(xf.amax(dim=-1, keepdim=True), min=0) * self.clip_ratio
        if self.sym:
            half = 2 ** (self.bits - 1)
            amax = torch.maximum(xmin.abs(), xmax)
            scale = torch.where(amax == 0, torch.ones_like(amax), amax / max(half - 1, 1))
            q = torch.clamp(torch.round(xf / scale), -half, half - 1) * scale
        else:
            maxq = 2**self.bits - 1
            empty = (xmin == 0) & (xmax == 0)
            xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
            xmax = torch.where(empty, torch.ones_like(xmax), xmax)
            scale = (xmax - xmin) / maxq
            q = fake_quantize(xf, scale, torch.round(-xmin / scale), maxq)
        return q.reshape(shape).to(x.dtype)
