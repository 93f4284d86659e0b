"""Layers, statistics and float64 references shared by the solver tests (GPTQ, GPTAQ, QEP, Qronos)."""

from __future__ import annotations

import torch

from common.quant.quantizers import WeightQuantizer


def layer(m: int = 24, n: int = 40, tokens: int = 300, drift: float = 0.2, seed: int = 0):
    """A random layer with correlated inputs ``x`` [tokens, n] and a drifted copy ``x̃``."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(m, n, generator=g, dtype=torch.float64)
    mixing = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    x_full = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mixing
    x_quant = x_full + drift * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    return weight, x_full, x_quant


def structured_drift_layer(seed: int, m: int = 48, n: int = 64, tokens: int = 512, scale: float = 0.3):
    """A layer whose quantized-stream input drifts by a linear function of the input: ``x̃ = x (I + s·E) + noise``."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(m, n, generator=g, dtype=torch.float64)
    mixing = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    x_full = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mixing
    upstream_error = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    x_quant = x_full + scale * x_full @ upstream_error + 0.02 * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    return weight, x_full, x_quant


def statistics(x_full: torch.Tensor, x_quant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = x_quant.shape[0]
    return 2 / tokens * x_quant.T @ x_quant, 2 / tokens * (x_full - x_quant).T @ x_quant


def naive_gptq(weight, hessian, drift=None, *, bits, sym=False, groupsize=-1, act_order=False, static_groups=False,
                 percdamp=0.01, alpha=0.25, mse=False, grid_format="float"):
    """Float64 column-by-column GPTQ (``drift`` given: GPTAQ) reference: no blocks, grids from the current values,
    textbook inverse."""
    w = weight.clone().double()
    h = hessian.clone().double()
    d = None if drift is None else drift.clone().double()
    n = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    if d is not None:
        d[:, dead] = 0
    quantizer = WeightQuantizer(bits, sym=sym, mse=mse, grid_format=grid_format)
    static = None
    if groupsize > 0 and static_groups:
        static = [quantizer.params(w[:, g:g + groupsize]) for g in range(0, n, groupsize)]
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    h = h + percdamp * torch.diagonal(h).mean() * torch.eye(n, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    p = None
    if d is not None:
        d = d[perm][:, perm]
        p = alpha * torch.triu(d @ u.T, diagonal=1) @ u
    q_all = torch.zeros_like(w)
    scale, zero = quantizer.params(w) if groupsize <= 0 else (None, None)
    for j in range(n):
        if static is not None:
            scale, zero = static[int(perm[j]) // groupsize]
        elif groupsize > 0 and j % groupsize == 0:
            scale, zero = quantizer.params(w[:, j:j + groupsize])
        col = w[:, j].clone()
        q = quantizer.quantize(col[:, None], scale, zero)[:, 0]
        q_all[:, j] = q
        err = (col - q) / u[j, j]
        w[:, j + 1:] -= torch.outer(err, u[j, j + 1:])
        if p is not None:
            w[:, j + 1:] += torch.outer(col, p[j, j + 1:])
    return q_all[:, torch.argsort(perm)]


def output_error(q_weight, weight, x_full, x_quant) -> float:
    return float(torch.linalg.norm(x_quant @ q_weight.T - x_full @ weight.T))


OPTIONS = [
    {},
    {"act_order": True},
    {"groupsize": 8},
    {"groupsize": 8, "act_order": True},
    {"groupsize": 8, "act_order": True, "static_groups": True},
    {"sym": True},
    {"mse": True, "groupsize": 20},
]
