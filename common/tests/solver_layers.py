"""Random layers and solver options shared by the solver tests (GPTQ, GPTAQ, QEP, Qronos, FOEM, ResComp); the float64
references they are checked against are :mod:`common.solvers.references`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


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


def assert_blocksize_free(solve: Callable[[int], torch.Tensor], blocksizes: Sequence[int] = (1, 7, 40)) -> None:
    """``solve(blocksize)`` gives the same weight, to 1e-9, for every one of ``blocksizes`` (an exact lazy update)."""
    results = [solve(blocksize) for blocksize in blocksizes]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=1e-9)
