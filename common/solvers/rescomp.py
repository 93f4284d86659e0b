"""ResComp (Li et al., 2026, "Rethinking Residual Errors in Compensation-based LLM Quantization", arXiv
2604.07955) for one linear layer: GPTAQ plus a compensation-aware term.

Notation of :mod:`common.solvers.column_loop`: ``W`` [m, n], ``H = 2/N · X̃ᵀX̃`` and ``D = 2/N · (X − X̃)ᵀX̃``
from the quantized-stream inputs ``X̃`` and the full-precision inputs ``X``, ``H_λ = H + λI``, ``U`` upper with
``H_λ⁻¹ = UᵀU``, GPTAQ's ``P = α · triu(D Uᵀ, 1) · U``; ``w₀ = W`` the starting weight, ``w`` the weight as the
loop updates it. (The paper writes GPTAQ's letters, in which ``X`` is the quantized input and ``X̃`` the
full-precision one; its ``X̃Xᵀ`` is ``H + D`` here, not ``H + Dᵀ``.)

Objective. GPTAQ aligns each column step with the output of the *compensated* weights; ResComp anchors it to
the original output: ``min ‖X̃ (w + δ)ᵀ − X w₀ᵀ‖²`` with ``δ_{<j} = 0`` and ``δ_j = q_j − w_j``. The residual
splits into GPTAQ's input drift ``w (X − X̃)ᵀ`` and the compensation-aware error ``(w₀ − w) Xᵀ``; with GPTAQ's
neuron decomposition each channel's residual enters once, when its column is quantized, which adds to
GPTAQ's update

    W[:, k] −= e_j U[j, k] − w_j P[j, k] − (w₀_j − w_j) R[j, k],     R = α₂ · triu((H + D) Uᵀ, 1) · U.

Derivation of the form the loop runs (exact algebra): ``H_λ Uᵀ = U⁻¹`` and ``λ Uᵀ`` is lower triangular, so
``triu(H Uᵀ, 1) U = triu(U⁻¹, 1) U``, whose entries ``k > j`` are ``−U[j, k] / U[j, j]``; hence ``R[j, k] =
(α₂/α) P[j, k] − α₂ U[j, k] / U[j, j]`` and the update is GPTAQ's with the pair ``(e_j, w_j)`` replaced by

    ẽ_j = ((w_j − q_j) − α₂ (w_j − w₀_j)) / U[j, j],     v_j = w_j − (α₂/α) (w_j − w₀_j),
    W[:, k] −= ẽ_j U[j, k] − v_j P[j, k]

(:class:`~common.solvers.column_loop.AnchorTerms` with ``shift = α₂``, ``mix = α₂/α``; with ``α = 0``, GPTQ's
update plus the compensation-aware term, ``P`` is ``α₂ · triu(D Uᵀ, 1) · U`` and ``v_j = w₀_j − w_j``). No
``R`` and no ``H + D`` are formed: the solve costs GPTAQ's, plus one copy of ``W`` and ``O(mn)`` element-wise
work, and does not depend on ``blocksize``. ``α₂ = 0`` is GPTAQ, bit for bit; ``D = 0`` is *not* GPTQ (the
shift is FOEM's with ``β = α₂``, without its pull); ``α₂ = α`` makes the ``P`` term multiply ``w₀_j``.

Where the authors' code (``list0830/ResComp``) departs from this: it forms ``R`` literally (two more
``n × n`` matrices and a third term in every update), scales it by ``α₂ = 0.25`` (the paper names no
hyperparameter, as GPTAQ's paper names no ``α``), and across lazy-update blocks it multiplies ``P`` and ``R``
by a different value than inside a block, chosen by bit width: at 2 bits the quantized ``q_j`` (the official
GPTAQ form), otherwise ``w_j`` clamped to the grid's range at the block's last column; so its results depend
on ``blocksize``. Neither the paper nor the code bounds the layer objective; the tests check agreement with
the float64 definition (:func:`common.solvers.references.rescomp`, which forms ``R`` literally).
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
from common.solvers.gptaq import ALPHA, drift_correction
from common.solvers.parameters import MethodParameter

RESCOMP_ALPHA = MethodParameter("rescomp_alpha", 0.25,
                                "ResComp's compensation-aware scale α₂; 0 = GPTAQ, official code: 0.25")


def start(work: torch.Tensor, drift: torch.Tensor, factorization: Factorization,
          config: SolverConfig) -> StartingPoint:
    """ResComp's start: GPTAQ's (``P`` written over ``D``), each column's pair shifted by its starting value
    (``rescomp_alpha``)."""
    alpha, alpha2 = ALPHA.value(config), RESCOMP_ALPHA.value(config)
    if alpha2 == 0:  # GPTAQ
        anchored = None
    elif alpha > 0:
        anchored = AnchorTerms(shift=alpha2, mix=alpha2 / alpha)
    else:  # no GPTAQ term: P is α₂ triu(D Uᵀ, 1) U and multiplies w₀_j − w_j alone
        anchored = AnchorTerms(shift=alpha2, mix=1.0, keep=0.0)
    scale = alpha if alpha > 0 or alpha2 == 0 else alpha2
    correction = drift_correction(drift, factorization.upper, scale, in_place=True)
    return StartingPoint(work, correction=correction, anchored=anchored)


def solve(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor | None, config: SolverConfig, *,
          name: str = "layer", release_statistics: bool = False) -> SolveResult:
    """ResComp on one layer: ``W`` [m, n], ``H`` and ``D`` [n, n] (required)."""
    return solve_layer(W, H, D, config, name=name, start=start, release_statistics=release_statistics)
