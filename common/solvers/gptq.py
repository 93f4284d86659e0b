"""GPTQ (Frantar et al., ICLR 2023) for one linear layer.

Notation of :mod:`common.solvers.column_loop`. GPTQ minimises the layer's output error on the inputs it
will see in the quantized model, ``‖X̃ Ŵᵀ − X̃ Wᵀ‖²``, column by column: column ``j`` is rounded to the grid and
its error is pushed onto the columns not yet quantized through the damped inverse Hessian,

    e_j = (w_j − Q(w_j)) / U[j, j],        W[:, k] −= e_j · U[j, k]   (k > j),

which is the column loop with ``P = 0`` from the weight itself: GPTQ needs no start of its own, and reads
only ``H`` (``D`` is ignored).
"""

from __future__ import annotations

import torch

from common.solvers.column_loop import SolverConfig, SolveResult, solve_layer


def solve(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor | None, config: SolverConfig, *,
          name: str = "layer", release_statistics: bool = False) -> SolveResult:
    """GPTQ on one layer: ``W`` [m, n], ``H`` [n, n]; ``D`` is not read."""
    return solve_layer(W, H, None, config, name=name, release_statistics=release_statistics)
