"""Qronos (Zhang, Zhang, Colbert & Saab, ICLR 2026) for one linear layer: its fast form.

Notation of :mod:`common.solvers.column_loop` and :mod:`common.solvers.qep`. For one output row ``w`` (a row of
``W``), Qronos minimises the damped mismatched objective

    F(v) = ‖X̃ v − X w‖² + λ'‖v − w‖²,

which, scaled by ``2/N`` and with ``H_λ = H + λI`` (``λ = 2λ'/N``, GPTQ's damping), is
``f(v) = vᵀH_λv − 2vᵀ b + const`` with ``b = (H_λ + Dᵀ) w`` (because ``2/N · X̃ᵀX = (H + D)ᵀ``). With
``X = X̃`` it is GPTQ's ``(v − w)ᵀH_λ(v − w)``. Over the columns in solve order ``t = 1..n``, from
``v = w``:

1. error correction: ``c_t = argmin_c f(q_1..q_{t−1}, c, v_{t+1}..v_n)``, then ``q_t = Q(c_t)``;
2. error diffusion: ``v_{t+1..n} = argmin f(q_1..q_t, ·)``.

Why it collapses after the first column. Step 2 leaves ``v_{t+1..n}`` minimising ``f`` with
``q_1..q_t`` fixed, so ``∂f/∂v_{t+1} = 0`` there: at ``t + 1`` the coordinate minimum of step 1 is
``c_{t+1} = v_{t+1}``. Step 2 then re-solves the rest with one more coordinate fixed; for a quadratic,
fixing coordinate ``t`` at ``q_t`` instead of its optimum ``v_t`` moves the optimum of the rest by
``−H_λ[R,R]⁻¹ H_λ[R,t] (q_t − v_t)``, which (``H_λ⁻¹ = UᵀU``, ``U`` upper Cholesky) is GPTQ's update
``v_R −= (v_t − q_t) / U[t,t] · U[t,R]``. So from ``t = 2`` on Qronos *is* GPTQ with ``H_λ``.

The first column is different, in two ways:

* ``c_1 = w_1 + (wᵀD)_1 / H_λ[1,1]`` (step 1 with the others still at ``w``: the coordinate-wise
  drift correction);
* step 2 at ``t = 1`` minimises over all the rest at once: with ``v* = w + H_λ⁻¹Dᵀw`` the unconstrained
  minimiser of ``f`` (for the matrix: ``V* = W + W D H_λ⁻¹``, QEP with ``α_qep = 1``), the rest becomes
  ``v*_R − (v*_1 − q_1) / U[1,1] · U[1,R]``: GPTQ's update, but measured against ``v*_1``, not ``c_1``.

Fast form: start GPTQ's blocked column loop from ``V*`` (one ``W D``, two triangular solves with the
Cholesky root), quantize column 1 from ``c_1`` while its error is taken against ``V*[:, 1]``, and
continue as GPTQ. Grids: a group's grid (or, without groups, the row's) is computed when its first column
is about to be quantized, from the values the iterate holds then with that column's ``c_t``; for the first
group these are ``(c_1, w_2, …)`` (the iterate is still ``w``), for later ones the GPTQ iterate. Static
groups take their grids from ``V*``. With ``D = 0`` every correction vanishes and Qronos is GPTQ.
"""

from __future__ import annotations

import torch

from common.solvers.column_loop import Factorization, SolverConfig, SolveResult, StartingPoint, solve_layer
from common.solvers.qep import drift_corrected


def start(work: torch.Tensor, drift: torch.Tensor, factorization: Factorization,
          config: SolverConfig) -> StartingPoint:
    """Qronos's start: GPTQ from ``V* = W + W D H_λ⁻¹``, its first column quantized from
    ``c_1 = w_1 + (W D)[:, 1] / H_λ[1, 1]`` (the first grid too)."""
    first = work[:, 0] + (work @ drift[:, 0]) / factorization.diagonal[0]
    first_grid = work.clone()
    first_grid[:, 0] = first
    return StartingPoint(drift_corrected(work, drift, factorization, 1.0), first_column=first, first_grid=first_grid)


def solve(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor | None, config: SolverConfig, *,
          name: str = "layer", release_statistics: bool = False) -> SolveResult:
    """Qronos on one layer (see the module docstring); ``D`` is required."""
    return solve_layer(W, H, D, config, name=name, start=start, release_statistics=release_statistics)
