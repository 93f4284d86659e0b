"""QEP (Arai & Ichikawa, NeurIPS 2025, "Quantization Error Propagation") for one linear layer.

Notation of :mod:`common.solvers.column_loop`: ``W`` [m, n] (rows are outputs), ``H = 2/N · X̃ᵀX̃`` and
``D = 2/N · (X − X̃)ᵀX̃`` [n, n] from the quantized-stream inputs ``X̃`` and the full-precision inputs ``X``
([N, n]), ``λ = percdamp · mean(diag H)`` GPTQ's damping.

Derivation. Without the grid, the mismatched objective ``‖X̃Ŵᵀ − XWᵀ‖²`` is smallest where its gradient
``2 (ŴX̃ᵀ − WXᵀ) X̃`` vanishes, i.e. ``Ŵ X̃ᵀX̃ = W XᵀX̃``; scaled by ``2/N``, ``X̃ᵀX̃`` is ``H`` and
``XᵀX̃ = X̃ᵀX̃ + (X − X̃)ᵀX̃`` is ``H + D``, so ``Ŵ = W (H + D) H⁻¹ = W + W D H⁻¹``.

QEP moves the weight part of the way there, then quantizes it with GPTQ:

    W* = W + α_qep · W D (H + λI)⁻¹,        then GPTQ on W* with H.

``α_qep = 0`` is GPTQ; ``α_qep = 1`` starts GPTQ from the (damped) least-squares weight. The official
default (OneComp's ``perccorr``) is 0.5. With ``D = 0`` (no drift) the correction is exactly zero and the
result is GPTQ's, bitwise.

Cost: ``W D`` and ``· (H + λI)⁻¹`` by two triangular solves with the Cholesky root GPTQ computes anyway
(``4mn²`` flops), or, for layers with more rows than columns, ``D (H + λI)⁻¹`` first (``2n³``) and one
product (``2mn²``).
"""

from __future__ import annotations

import torch

from common.solvers.column_loop import Factorization, SolverConfig, SolveResult, StartingPoint, solve_layer
from common.solvers.parameters import MethodParameter

QEP_ALPHA = MethodParameter("qep_alpha", 0.5, "QEP's correction scale; 0 = GPTQ, OneComp's perccorr: 0.5")


def drift_corrected(work: torch.Tensor, drift: torch.Tensor, factorization: Factorization,
                    alpha: float) -> torch.Tensor:
    """``W + α · W D (H + λI)⁻¹`` for ``work`` [m, n] and ``drift`` [n, n] (both in solve order)."""
    if alpha == 0:
        return work
    rows, columns = work.shape
    if rows > columns:
        step = work @ factorization.solve_right(drift)
    else:
        step = factorization.solve_right(work @ drift)
    return work + alpha * step


def start(work: torch.Tensor, drift: torch.Tensor, factorization: Factorization,
          config: SolverConfig) -> StartingPoint:
    """QEP's start: GPTQ from ``W* = W + α_qep · W D (H + λI)⁻¹`` (its ``qep_alpha``)."""
    return StartingPoint(drift_corrected(work, drift, factorization, QEP_ALPHA.value(config)))


def solve(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor | None, config: SolverConfig, *,
          name: str = "layer", release_statistics: bool = False) -> SolveResult:
    """QEP on one layer (``qep_alpha`` scales the correction); ``D`` is required."""
    return solve_layer(W, H, D, config, name=name, start=start, release_statistics=release_statistics)
