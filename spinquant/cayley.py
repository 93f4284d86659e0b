"""Cayley SGD: stochastic gradient descent with momentum on the orthogonal group.

Li, Li & Todorovic, "Efficient Riemannian Optimization on the Stiefel Manifold via the Cayley Transform"
(ICLR 2020), Algorithm 1, specialised to square orthogonal matrices ``X`` [n, n] (``XᵀX = I``), with an
exact Cayley retraction instead of the paper's fixed-point approximation. For each parameter, with its
Euclidean gradient ``G``:

1. momentum ``M <- β M + G``;
2. ``Ŵ = M Xᵀ − ½ X (Xᵀ M Xᵀ)`` and the skew-symmetric ``W = Ŵ − Ŵᵀ`` (for square ``X``, ``W = ½ (M Xᵀ − X Mᵀ)``,
   the Riemannian gradient carried to the identity);
3. the momentum is projected onto the tangent space: ``M <- W X``;
4. step size ``α = min(lr, 2q / (‖W‖_F + ε))`` (the bound keeps the Cayley step well inside its radius);
5. Cayley retraction ``X <- (I + α/2 W)⁻¹ (I − α/2 W) X``, a product of orthogonal matrices, so ``X`` stays
   orthogonal to rounding; its first-order term is ``X − α W X``, a descent direction.

Every update is computed in float64 from a float64 master copy kept in the optimizer state (the parameter
holds its rounding), so orthogonality does not drift however many steps are taken.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class CayleySGD(torch.optim.Optimizer):
    """SGD with momentum for square orthogonal parameters (see the module docstring).

    Args:
        params: square parameters [n, n], each orthogonal to start with.
        lr: the largest step ``l`` (SpinQuant uses 1.5).
        momentum: ``β`` in [0, 1).
        q: step bound ``2q / ‖W‖`` (0.5 as in Li et al.).
        eps: keeps the bound finite when ``W`` vanishes.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        lr: float,
        momentum: float = 0.0,
        q: float = 0.5,
        eps: float = 1e-8,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not q > 0:
            raise ValueError(f"q must be > 0, got {q}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "q": q, "eps": eps})
        for group in self.param_groups:
            for param in group["params"]:
                if param.ndim != 2 or param.shape[0] != param.shape[1]:
                    raise ValueError(f"CayleySGD needs square [n, n] parameters, got shape {tuple(param.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        state = self.state[param]
        if "master" not in state:
            state["master"] = param.detach().to(torch.float64, copy=True)
            state["momentum_buffer"] = torch.zeros_like(state["master"])
        x = state["master"]
        m = group["momentum"] * state["momentum_buffer"] + param.grad.to(torch.float64)
        w_hat = m @ x.T - 0.5 * x @ (x.T @ m @ x.T)
        w = w_hat - w_hat.T
        state["momentum_buffer"] = w @ x
        alpha = min(group["lr"], 2 * group["q"] / (torch.linalg.matrix_norm(w).item() + group["eps"]))
        identity = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
        x = torch.linalg.solve(identity + 0.5 * alpha * w, (identity - 0.5 * alpha * w) @ x)
        state["master"] = x
        param.copy_(x)
