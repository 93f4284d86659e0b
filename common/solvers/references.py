"""Every method's definition in float64, slow and literal: the math of the papers, for reading and for tests.

Each function takes the statistics of :mod:`common.solvers.statistics` (Qronos: the inputs themselves) and
returns the fake-quantized weight [m, n] in float64. None of them blocks, reorders work for speed or reuses
memory: inverses are textbook inverses, each column is updated as the formula says. The fast solvers
(:mod:`common.solvers.gptq`, :mod:`~common.solvers.gptaq`, :mod:`~common.solvers.qep`,
:mod:`~common.solvers.qronos`, :mod:`~common.solvers.foem`, :mod:`~common.solvers.rescomp`) must agree with them
to float rounding; the tests check that they do.

Notation of :mod:`common.solvers.column_loop`: ``W`` [m, n], ``H``, ``D`` [n, n], ``λ = percdamp ·
mean(diag H)``, ``U = chol(H_λ⁻¹)`` upper triangular. Grids: one per row, or per ``groupsize`` columns from
the values the group holds when its first column is quantized (``static_groups``: from the starting weight).
"""

from __future__ import annotations

import torch

from common.quant.quantizers import WeightQuantizer


def statistics(x_full: torch.Tensor, x_quant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``H = 2/N · X̃ᵀX̃`` and ``D = 2/N · (X − X̃)ᵀX̃`` [n, n] from ``x_full`` (``X``) and ``x_quant`` (``X̃``),
    each [N, n]."""
    tokens = x_quant.shape[0]
    return 2 / tokens * x_quant.T @ x_quant, 2 / tokens * (x_full - x_quant).T @ x_quant


def gptq(weight: torch.Tensor, hessian: torch.Tensor, **options) -> torch.Tensor:
    """GPTQ: ``e_j = (w_j − Q(w_j)) / U[j, j]``, ``W[:, k] −= e_j U[j, k]`` for ``k > j``.

    ``options``: ``bits`` (required), ``sym``, ``groupsize``, ``act_order``, ``static_groups``, ``percdamp``,
    ``mse``, ``grid_format`` as in :class:`~common.solvers.column_loop.SolverConfig`.
    """
    return _column_by_column(weight, hessian, None, **options)


def gptaq(weight: torch.Tensor, hessian: torch.Tensor, drift: torch.Tensor, *, alpha: float = 0.25,
          **options) -> torch.Tensor:
    """GPTAQ: GPTQ's update plus ``+ w_j P[j, k]`` with ``P = α · triu(D Uᵀ, 1) · U`` (``w_j`` the column
    before it is quantized)."""
    return _column_by_column(weight, hessian, drift, alpha=alpha, **options)


def foem(weight: torch.Tensor, hessian: torch.Tensor, *, beta: float = 0.2, **options) -> torch.Tensor:
    """FOEM: before column ``j`` is quantized ``w_j ← w_j − β (w_j − w₀_j)``; then ``e_j = ((w_j − q_j) −
    β (w_j − w₀_j)) / U[j, j]`` and GPTQ's update (``w₀`` the starting weight, after ``act_order``)."""
    return _column_by_column(weight, hessian, None, beta=beta, **options)


def rescomp(weight: torch.Tensor, hessian: torch.Tensor, drift: torch.Tensor, *, alpha: float = 0.25,
            alpha2: float = 0.25, **options) -> torch.Tensor:
    """ResComp: GPTAQ's update plus ``+ (w₀_j − w_j) R[j, k]`` with ``R = α₂ · triu((H + D) Uᵀ, 1) · U`` formed as
    written (``H`` undamped)."""
    return _column_by_column(weight, hessian, drift, alpha=alpha, alpha2=alpha2, **options)


def gptaq_official(weight: torch.Tensor, hessian: torch.Tensor, drift: torch.Tensor, *, bits: int, blocksize: int,
                   percdamp: float = 0.01, alpha: float = 0.25, groupsize: int = -1) -> torch.Tensor:
    """The official GPTAQ code's block loop: inside a block GPTAQ's update; across blocks the ``P`` term
    multiplies the *quantized* block (``W[:, later] −= E U[block, later] − W_block P[block, later]`` with the
    block's values after its in-block updates); groups take their grid from the values at the block's start."""
    return _authors_block_loop(weight, hessian, drift, bits=bits, blocksize=blocksize, percdamp=percdamp,
                               alpha=alpha, groupsize=groupsize)


def foem_official(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, blocksize: int, beta: float = 0.2,
                  percdamp: float = 0.01, groupsize: int = -1) -> torch.Tensor:
    """FOEM's authors' code (GPTQModel's ``FOEMConfig`` with ``alpha = 0``), block by block: FOEM's shifted error
    inside and across blocks, the pull ``w_j ← w_j − β (w_j − w₀_j)`` on every column but each block's first,
    groups' grids from the values at the block's start."""
    return _authors_block_loop(weight, hessian, None, bits=bits, blocksize=blocksize, percdamp=percdamp,
                               beta=beta, groupsize=groupsize)


def _authors_block_loop(weight: torch.Tensor, hessian: torch.Tensor, drift: torch.Tensor | None, *, bits: int,
                        blocksize: int, percdamp: float, groupsize: int, alpha: float = 0.0,
                        beta: float = 0.0) -> torch.Tensor:
    """The block loop of the official GPTAQ code and of FOEM's authors' code (GPTQModel), which share it: per
    column, the pull ``w_j ← w_j − β (w_j − w₀_j)`` (not on a block's first column), the error
    ``((w_j − q_j) − β (w_j − w₀_j)) / U[j, j]`` and GPTAQ's ``P`` term (``drift`` given) inside the block; across
    blocks the errors, and ``P`` times the block's values after its in-block updates; group grids from the
    values at the block's start."""
    w = weight.clone().double()
    n = w.shape[1]
    h = hessian.double() + percdamp * torch.diagonal(hessian).mean() * torch.eye(n, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    p = None if drift is None else alpha * torch.triu(drift.double() @ u.T, diagonal=1) @ u
    w0 = w.clone()
    quantizer = WeightQuantizer(bits)
    scale, zero = quantizer.params(w)
    q_all = torch.zeros_like(w)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            j = i1 + i
            if groupsize > 0 and j % groupsize == 0:
                scale, zero = quantizer.params(w[:, j:j + groupsize])
            if beta and i > 0:
                w1[:, i] -= beta * (w1[:, i] - w0[:, j])
            col = w1[:, i].clone()
            q = quantizer.quantize(col[:, None], scale, zero)[:, 0]
            q_all[:, j] = q
            err = ((col - q) - beta * (col - w0[:, j])) / u[j, j]
            w1[:, i:] -= torch.outer(err, u[j, i1:i2][i:])
            if p is not None:
                w1[:, i:] += torch.outer(col, p[j, i1:i2][i:])
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
        if p is not None:
            w[:, i2:] += w1 @ p[i1:i2, i2:]
    return q_all


def qep(weight: torch.Tensor, hessian: torch.Tensor, drift: torch.Tensor, *, qep_alpha: float = 0.5,
        percdamp: float = 0.01, **options) -> torch.Tensor:
    """QEP: ``W* = W + α_qep · W D (H + λI)⁻¹``, then GPTQ on ``W*`` (``options`` as :func:`gptq`'s)."""
    n = hessian.shape[0]
    damped = hessian + percdamp * torch.diagonal(hessian).mean() * torch.eye(n, dtype=hessian.dtype)
    corrected = weight + qep_alpha * weight @ drift @ torch.linalg.inv(damped)
    return gptq(corrected, hessian, percdamp=percdamp, **options)


def qronos(weight: torch.Tensor, x_full: torch.Tensor, x_quant: torch.Tensor, *, bits: int, sym: bool = False,
           groupsize: int = -1, act_order: bool = False, static_groups: bool = False, percdamp: float = 0.01,
           mse: bool = False, trace: list | None = None) -> torch.Tensor:
    """Qronos as defined: per row ``w``, on ``F(v) = ‖X̃v − Xw‖² + λ'‖v − w‖²`` over the columns in solve
    order, ``c_t = argmin_c F(q_<t, c, v_>t)``, ``q_t = Q(c_t)``, ``v_>t = argmin F(q_≤t, ·)``, each a
    least-squares problem with the ridge rows ``√λ' I`` (``λ' = N/2 · λ``, GPTQ's damping ``λ``).

    Grids: a group's (or the row's) grid from the iterate's values when its first column is quantized, with
    that column at ``c_t``; static groups from the unconstrained minimiser ``v*``. ``trace`` (a list)
    receives ``(t, c_t, v_t)`` for every column after the first.
    """
    tokens, n = x_quant.shape
    hessian = 2 / tokens * x_quant.T @ x_quant
    perm = torch.argsort(torch.diagonal(hessian), descending=True) if act_order else torch.arange(n)
    ridge = tokens / 2 * percdamp * torch.diagonal(hessian).mean()
    a = torch.cat([x_quant[:, perm], ridge.sqrt() * torch.eye(n, dtype=x_quant.dtype)])
    quantizer = WeightQuantizer(bits, sym=sym, mse=mse)
    size = groupsize if groupsize > 0 else n
    result = torch.empty_like(weight)
    for row in range(weight.shape[0]):
        w = weight[row, perm]
        y = torch.cat([x_full[:, perm] @ w, ridge.sqrt() * w])
        v, q = w.clone(), torch.zeros_like(w)
        optimum = _least_squares(a, y)
        static = None
        if static_groups and groupsize > 0:
            unpermuted = torch.empty_like(optimum)
            unpermuted[perm] = optimum
            static = [quantizer.params(unpermuted[None, g:g + groupsize]) for g in range(0, n, groupsize)]
        for t in range(n):
            others = torch.cat([q[:t], v[t + 1:]])
            rest = y - torch.cat([a[:, :t], a[:, t + 1:]], dim=1) @ others
            c = torch.dot(a[:, t], rest) / torch.dot(a[:, t], a[:, t])
            if trace is not None and t > 0:
                trace.append((t, float(c), float(v[t])))
            if static is not None:
                scale, zero = static[int(perm[t]) // groupsize]
            elif t % size == 0:
                values = v.clone()
                values[t] = c
                scale, zero = quantizer.params(values[None, t:t + size])
            q[t] = quantizer.quantize(c.reshape(1, 1), scale, zero)[0, 0]
            if t + 1 < n:
                v[t + 1:] = _least_squares(a[:, t + 1:], y - a[:, :t + 1] @ q[:t + 1])
        result[row, perm] = q
    return result


def _column_by_column(weight: torch.Tensor, hessian: torch.Tensor, drift: torch.Tensor | None, *, bits: int,
                      sym: bool = False, groupsize: int = -1, act_order: bool = False, static_groups: bool = False,
                      percdamp: float = 0.01, alpha: float = 0.25, mse: bool = False,
                      grid_format: str = "float", beta: float = 0.0, alpha2: float = 0.0) -> torch.Tensor:
    """The column loop of GPTQ (``drift is None``), GPTAQ, FOEM (``beta``) or ResComp (``alpha2``), one
    column at a time, no blocks."""
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
    undamped = h
    h = h + percdamp * torch.diagonal(h).mean() * torch.eye(n, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    p = r = None
    if d is not None:
        d = d[perm][:, perm]
        p = alpha * torch.triu(d @ u.T, diagonal=1) @ u
        r = alpha2 * torch.triu((undamped + d) @ u.T, diagonal=1) @ u
    w0 = w.clone()
    q_all = torch.zeros_like(w)
    scale, zero = quantizer.params(w) if groupsize <= 0 else (None, None)
    for j in range(n):
        w[:, j] -= beta * (w[:, j] - w0[:, j])
        if static is not None:
            scale, zero = static[int(perm[j]) // groupsize]
        elif groupsize > 0 and j % groupsize == 0:
            scale, zero = quantizer.params(w[:, j:j + groupsize])
        col = w[:, j].clone()
        q = quantizer.quantize(col[:, None], scale, zero)[:, 0]
        q_all[:, j] = q
        err = ((col - q) - beta * (col - w0[:, j])) / u[j, j]
        w[:, j + 1:] -= torch.outer(err, u[j, j + 1:])
        if p is not None:
            w[:, j + 1:] += torch.outer(col, p[j, j + 1:]) + torch.outer(w0[:, j] - col, r[j, j + 1:])
    return q_all[:, torch.argsort(perm)]


def _least_squares(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
