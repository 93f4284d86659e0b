"""FOEM (Zheng et al., AAAI 2026, "First-Order Error Matters") for one linear layer.

Notation of :mod:`common.solvers.column_loop`: ``W`` [m, n], ``H = 2/N · X̃ᵀX̃``, ``H_λ = H + λI``, ``U`` upper
with ``H_λ⁻¹ = UᵀU``; ``w₀ = W`` the starting weight and ``w`` the weight as the loop updates it.

Objective. GPTQ's, ``L(w) = ‖(w − w₀) X̃ᵀ‖²`` per row, whose gradient at the loop's current point is
``g = 2 (w − w₀) H`` (up to the ``2/N``). GPTQ's optimal-brain-surgeon step quantizes column ``j`` as if the
gradient were zero; FOEM keeps the first-order term. Minimising ``g δᵀ + ½ δ H δᵀ`` subject to
``δ_j = q_j − w_j`` gives, over the columns ``S`` not yet quantized,

    δ_S = −[(w_j − q_j) − (g H_S⁻¹)_j] / [H_S⁻¹]_jj · [H_S⁻¹]_{j,:} − g H_S⁻¹.

FOEM approximates ``g H_S⁻¹`` to first order by ``β (w − w₀)`` (``β < 1`` damps the step; the Hessian
cancels, so ``β`` is scale-free), and in the Cholesky form (``[H_S⁻¹]_{j,:} / [H_S⁻¹]_jj = U[j, :] / U[j, j]``)
the update of column ``j`` becomes

    w_j ← w_j − β (w_j − w₀_j)                                 (the Newton part, on the column itself)
    ẽ_j = ((w_j − q_j) − β (w_j − w₀_j)) / U[j, j]
    W[:, k] −= ẽ_j · U[j, k]                                    for every later column k > j,

with ``q_j = Q(w_j)`` of the pulled ``w_j``: the error pushed onto later columns is the rounding error less
the first-order step already taken. ``β = 0`` is GPTQ, bit for bit. Column 0 is GPTQ's (``w = w₀`` there).
The column loop applies both terms through :class:`~common.solvers.column_loop.AnchorTerms` (``pull = shift =
β``): the lazy block updates carry ``ẽ_j``, so the result does not depend on ``blocksize``, and it costs GPTQ's
solve plus one copy of ``W`` and ``O(mn)`` element-wise work. A group's grid is computed when its first
column is quantized, after that column's pull.

Where the authors' code (GPTQModel's ``FOEMConfig``, by the first author; the older ``Xingyu-Zheng/FOEM``
repository is the paper's first version) departs from this definition: the pull of a column is applied after
the previous column's in-block update, but not to the first column of each lazy-update block (the
cross-block pull never runs), so its results depend on ``blocksize``; with GPTAQ's correction (``α > 0``) its
cross-block ``P`` term multiplies ``q_j + β (w_j − w₀_j)`` instead of ``w_j``; and its default damping is
0.05. GPTQModel's documentation gives ``β ∈ [0.1, 0.25]`` and the default 0.2. The registry's ``foem_official``
runs that code's form (``lazy_update="official"``: no pull on a block's first column, group grids from the
block's starting values; :func:`common.solvers.references.foem_official`). FOEM reads ``H`` alone: no
full-precision stream.

This is not a descent step for the layer objective: GPTQ's point is already stationary on the columns not
yet quantized (``[(w − w₀) H_λ]_S = 0`` after every exact step), and the approximation drops the term that
cancels ``β (w − w₀)``; the paper's gains are end-to-end. The tests check agreement with the float64
definition (:func:`common.solvers.references.foem`), not a lower layer loss.
"""

from __future__ import annotations

import torch

from common.solvers.column_loop import (
    AnchorTerms,
    Factorization,
    SolverConfig,
    SolveResult,
    StartingPoint,
    solve_layer,
)
from common.solvers.parameters import MethodParameter

FOEM_BETA = MethodParameter("foem_beta", 0.2, "FOEM's first-order scale β; 0 = GPTQ, GPTQModel's default: 0.2")


def start(work: torch.Tensor, drift: torch.Tensor | None, factorization: Factorization,
          config: SolverConfig) -> StartingPoint:
    """FOEM's start: the weight itself, every column pulled toward and its error shifted by its starting value
    (``foem_beta``); no ``P``."""
    beta = FOEM_BETA.value(config)
    return StartingPoint(work, anchored=AnchorTerms(shift=beta, pull=beta) if beta else None)


def solve(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor | None, config: SolverConfig, *,
          name: str = "layer", release_statistics: bool = False) -> SolveResult:
    """FOEM on one layer: ``W`` [m, n], ``H`` [n, n] (``D`` is not read)."""
    return solve_layer(W, H, None, config, name=name, start=start, reads_drift=False,
                       release_statistics=release_statistics)
