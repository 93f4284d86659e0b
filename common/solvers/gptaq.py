"""GPTAQ (Li et al., ICML 2025, "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric
Calibration") for one linear layer.

Notation of :mod:`common.solvers.column_loop`. GPTQ matches the quantized layer to the *quantized* model's
input; GPTAQ matches it to the *full-precision* model's output:

    min ‖Ŵ X̃ᵀ − W Xᵀ‖².

Writing ``X = X̃ + ΔX``, the column-wise solution keeps GPTQ's update and adds the drift of the inputs,
carried through the same inverse Cholesky factor: with ``D = 2/N · ΔXᵀX̃`` (the paper's ``ΔX X̃ᵀ``),

    P = α · triu(D Uᵀ, 1) · U,
    W[:, k] −= e_j · U[j, k] − w_j · P[j, k]   (k > j),

where ``w_j`` is column ``j``'s value just before it is quantized. ``α`` (:data:`ALPHA`) is 0.25 in the
official code; the paper does not state it. With ``D = 0`` (or ``α = 0``) ``P = 0`` and the solve is GPTQ, bitwise.
"""

from __future__ import annotations

import torch

from common.solvers import gptq
from common.solvers.column_loop import (
    STRUCTURE_BLOCK,
    Factorization,
    SolverConfig,
    SolveResult,
    StartingPoint,
    solve_layer,
)
from common.solvers.parameters import MethodParameter

ALPHA = MethodParameter("alpha", 0.25, "GPTAQ's drift-correction scale; official code: 0.25")


def drift_correction(drift: torch.Tensor, upper: torch.Tensor, alpha: float, *, in_place: bool = False
                     ) -> torch.Tensor:
    """GPTAQ's ``P = α · triu(D Uᵀ, 1) · U`` [n, n], strictly upper triangular.

    With ``in_place``, ``T`` and then ``P`` are written over ``drift``: besides ``D`` and ``U`` the product holds
    one ``n ×`` :data:`STRUCTURE_BLOCK` slice, not two more ``n × n`` matrices.

    Exploits the triangles: ``T = triu(D Uᵀ, 1)`` needs, for the columns ``[a, b)``, only rows ``< b``
    and only ``U``'s columns ``≥ a``; ``P = T U`` needs, for rows ``[a, b)``, only ``T``'s and ``U``'s rows
    ``≥ a`` and, for the columns ``[c, d)``, only ``U``'s rows ``< d``. This costs about ``2n³/3`` flops
    instead of ``4n³``. Columns of ``T`` are computed left to right, each from ``D``'s columns at or right of
    it, so each can replace ``D``'s once computed; rows of ``P`` each from the same rows of ``T``.
    """
    n = upper.shape[0]
    step = STRUCTURE_BLOCK
    t = drift if in_place else drift.clone()
    columns = torch.empty(n, min(step, n), dtype=t.dtype, device=t.device)
    for a in range(0, n, step):  # T's columns [a, b), over D's
        b = min(a + step, n)
        block = columns[:b, : b - a]
        torch.mm(t[:b, a:], upper[a:b, a:].T, out=block)
        t[:b, a:b] = block
        t[b:, a:b] = 0
    t.triu_(diagonal=1)
    rows = torch.empty(min(step, n), n, dtype=t.dtype, device=t.device)
    for a in range(0, n, step):  # P's rows [a, b), over T's
        b = min(a + step, n)
        block = rows[: b - a]
        for c in range(a, n, step):
            d = min(c + step, n)
            torch.mm(t[a:b, a:d], upper[a:d, c:d], out=block[:, c:d])
        t[a:b, a:] = block[:, a:]
    return t.mul_(alpha)


def start(work: torch.Tensor, drift: torch.Tensor, factorization: Factorization,
          config: SolverConfig) -> StartingPoint:
    """GPTAQ's start: the weight itself, and ``P`` from ``D`` and ``U`` (its ``alpha``), written over ``D``
    (the column loop's own copy)."""
    correction = drift_correction(drift, factorization.upper, ALPHA.value(config), in_place=True)
    return StartingPoint(work, correction=correction)


def solve(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor | None, config: SolverConfig, *,
          name: str = "layer", release_statistics: bool = False) -> SolveResult:
    """GPTAQ on one layer: ``W`` [m, n], ``H`` and ``D`` [n, n] (required; handed over with
    ``release_statistics``, see :func:`common.solvers.column_loop.solve_layer`)."""
    return solve_layer(W, H, D, config, name=name, start=start, release_statistics=release_statistics)


def quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    bits: int,
    sym: bool = False,
    groupsize: int = -1,
    act_order: bool = False,
    static_groups: bool = False,
    percdamp: float = 0.01,
    blocksize: int = 128,
    alpha: float = ALPHA.default,
    mse: bool = False,
    lazy_update: str = "exact",
) -> torch.Tensor:
    """Fake-quantize ``W`` [m, n] with GPTAQ (``D`` given) or GPTQ (``D is None``): keyword settings of
    :class:`~common.solvers.column_loop.SolverConfig`; returns the weight in ``W``'s shape, dtype and device."""
    config = SolverConfig(bits=bits, sym=sym, groupsize=groupsize, act_order=act_order, static_groups=static_groups,
                          percdamp=percdamp, blocksize=blocksize, mse=mse, lazy_update=lazy_update,
                          parameters={ALPHA.name: alpha})
    return (gptq.solve(W, H, None, config) if D is None else solve(W, H, D, config)).weight
