"""The column loop every method shares: GPTQ's algorithm with lazy block updates, and GPTAQ's extra term.

Notation (shapes in brackets; ``m`` output rows, ``n`` input columns): ``W`` [m, n] the weight (rows are
outputs), ``H`` and ``D`` [n, n] the statistics of :mod:`common.solvers.statistics`, ``H_λ = H + λI`` with
``λ = percdamp · mean(diag H)``, and ``U`` [n, n] the upper Cholesky factor of ``H_λ⁻¹`` (``H_λ⁻¹ = UᵀU``).

The loop quantizes the columns one at a time, in solve order (``act_order``: decreasing ``diag H``). For
column ``j``, with ``w_j`` its current value and ``q_j = Q(w_j)`` its point on the grid:

    e_j = (w_j − q_j) / U[j, j]
    W[:, k] −= e_j · U[j, k] − w_j · P[j, k]        for every later column k > j.

With ``P = 0`` this is GPTQ (Frantar et al., 2023): each column's rounding error is pushed onto the columns
not yet quantized through ``H_λ⁻¹``. GPTAQ (Li et al., 2025) sets ``P = α · triu(D Uᵀ, 1) · U``
(:mod:`common.solvers.gptaq`). A method enters the loop through its *start*
(:data:`MethodStart`): the weight the columns are quantized from and the ``P`` of its update.

Lazy batch updates: columns are processed in blocks of ``blocksize``; updates inside a block are applied at
once, those to later blocks are accumulated and applied as one matrix product per block. In the default
``lazy_update="exact"`` form the result does not depend on ``blocksize`` (up to float rounding): the
cross-block GPTAQ term uses the pre-quantization values ``w_j``, as the in-block term does, and dynamic
group parameters are computed from the group's current (error-updated) values. ``lazy_update="official"``
reproduces the official GPTAQ code instead: its cross-block term multiplies ``P`` by the already quantized
block, and (like GPTQ's reference code) it computes a group's parameters from the values the group had at
the start of the block; FOEM's authors' code (GPTQModel) also skips its pull on each block's first column.
These make the result depend on ``blocksize``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from common.quant.quantizers import (
    FULL_PRECISION_BITS,
    WeightGrid,
    WeightQuantizer,
    check_grid,
    check_grid_bits,
    check_groupsize,
    working_dtype,
)
from common.rules import check_group_size, check_nonnegative, check_one_of, check_positive
from common.solvers.statistics import CalibrationError

LAZY_UPDATES = ("exact", "official")
_DAMP_RETRIES = 6
STRUCTURE_BLOCK = 512
"""Tile size of the triangular products and the symmetry check (columns)."""
_INNER_BLOCK = 16
"""Columns per sub-block of the in-block lazy update (see :meth:`_BlockSolver.run`)."""


@dataclass(frozen=True)
class SolverConfig:
    """Settings of one layer solve, shared by every method; each is checked here by its rule
    (:mod:`common.rules`), a method's own parameters by their declarations.

    Attributes:
        bits: weight bit width, 1..16 (16 returns ``W`` unchanged; from 2 with ``sym``).
        sym: symmetric grid (no zero point) instead of asymmetric.
        groupsize: -1 for one grid per output row, else one per ``groupsize`` consecutive input columns.
        act_order: quantize columns in order of decreasing ``H`` diagonal.
        static_groups: with groups, compute every group's grid from the starting weight up front.
        percdamp: damping added to ``H``'s diagonal, as a fraction of its mean.
        blocksize: columns per lazy-update block.
        mse: per-grid MSE clip search.
        lazy_update: ``"exact"`` (blocksize-independent) or ``"official"`` (the official GPTAQ code's form).
        grid: one of :data:`common.quant.quantizers.GRIDS` (``"gptq"``: what a ``gptq`` checkpoint stores
            exactly).
        parameters: the methods' own settings by name, e.g. ``{"alpha": 0.25}`` (GPTAQ's scale), each one of
            :data:`common.methods.METHOD_PARAMETERS` and checked by its declaration; one left out has its
            declared default (a method reads it with :meth:`~common.solvers.parameters.MethodParameter.value`).
    """

    bits: int
    sym: bool = False
    groupsize: int = -1
    act_order: bool = False
    static_groups: bool = False
    percdamp: float = 0.01
    blocksize: int = 128
    mse: bool = False
    lazy_update: str = "exact"
    grid: str = "float"
    parameters: Mapping[str, float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        from common.methods import METHOD_PARAMETERS  # the registry imports the solvers, which import this

        check_grid_bits(self.bits, self.sym)
        check_grid(self.grid)
        check_one_of("lazy_update", self.lazy_update, LAZY_UPDATES)
        check_positive("blocksize", self.blocksize)
        check_nonnegative("percdamp", self.percdamp, "a fraction of the mean Hessian diagonal")
        check_group_size("groupsize", self.groupsize)
        for name, value in self.parameters.items():
            check_one_of("a solver parameter", name, tuple(METHOD_PARAMETERS))
            METHOD_PARAMETERS[name].check(value)
        object.__setattr__(self, "parameters", MappingProxyType(dict(self.parameters)))

    @classmethod
    def of(cls, **settings: Any) -> SolverConfig:
        """A configuration from keyword settings, each a field (``bits=4``) or a method parameter by name
        (``alpha=0.5``), e.g. ``SolverConfig.of(bits=4, alpha=0.5)``."""
        names = {setting.name for setting in dataclasses.fields(cls)}
        fields = {name: value for name, value in settings.items() if name in names}
        parameters = {**fields.pop("parameters", {}),
                      **{name: value for name, value in settings.items() if name not in names}}
        return cls(**fields, parameters=parameters)

    def with_parameters(self, **values: float) -> SolverConfig:
        """This configuration with the method parameters ``values`` set (e.g. ``qep_alpha=0.0``)."""
        return dataclasses.replace(self, parameters={**self.parameters, **values})


@dataclass(frozen=True)
class Factorization:
    """The damped Hessian ``H_λ = H + λI`` [n, n] (solve order) in the two factored forms the solvers use.

    Attributes:
        upper: ``U``, upper triangular, ``H_λ⁻¹ = UᵀU`` (GPTQ's error propagation).
        root: ``R = U⁻¹``, upper triangular, ``H_λ = R Rᵀ`` (solves with ``H_λ`` by two triangular solves).
        damp: the damping used, as a fraction of the mean diagonal of ``H`` (grows on retries).
        diagonal: the diagonal of ``H_λ`` [n].
    """

    upper: torch.Tensor
    root: torch.Tensor
    damp: float
    diagonal: torch.Tensor

    def solve_right(self, rhs: torch.Tensor) -> torch.Tensor:
        """``rhs · H_λ⁻¹`` for ``rhs`` [m, n], by two triangular solves (``m·n²`` multiply-adds)."""
        half = torch.linalg.solve_triangular(self.root.T, rhs, upper=False, left=False)
        return torch.linalg.solve_triangular(self.root, half, upper=True, left=False)


@dataclass(frozen=True)
class StartingPoint:
    """Where the column loop starts, as a method's start computes it (solve order, columns permuted).

    Attributes:
        work: the weight [m, n] the columns are quantized from (GPTQ, GPTAQ: ``W``; QEP: the corrected
            ``W*``; Qronos: the least-squares target).
        correction: ``P`` [n, n], strictly upper triangular, of the update ``W[:, k] −= e_j U[j, k] −
            w_j P[j, k]`` (GPTAQ), or ``None`` for ``P = 0``.
        first_column: values [m] quantized for the first column instead of ``work[:, 0]`` (its error is
            still measured against ``work[:, 0]``), or ``None``.
        first_grid: values [m, k] the first group's grid (or, without groups, the row's grid) is computed
            from instead of the current values, or ``None``.
        anchored: terms of the update that read ``work``'s own columns (:class:`AnchorTerms`), or ``None``.
    """

    work: torch.Tensor
    correction: torch.Tensor | None = None
    first_column: torch.Tensor | None = None
    first_grid: torch.Tensor | None = None
    anchored: AnchorTerms | None = None


@dataclass(frozen=True)
class AnchorTerms:
    """Terms of the update that read each column's starting value ``w₀_j`` (``work[:, j]``): FOEM's and ResComp's.

    For column ``j``, before it is quantized, and in its update of the later columns ``k``:

        w_j ← w_j − pull · (w_j − w₀_j)
        ẽ_j = ((w_j − q_j) − shift · (w_j − w₀_j)) / U[j, j]
        v_j = keep · w_j − mix · (w_j − w₀_j)
        W[:, k] −= ẽ_j · U[j, k] − v_j · P[j, k]

    (with ``shift = pull = mix = 0`` and ``keep = 1`` this is the plain update). The proxy loss stays
    ``Σ_j ‖w_j − q_j‖² / U[j, j]² / 2``.
    """

    shift: float = 0.0
    pull: float = 0.0
    mix: float = 0.0
    keep: float = 1.0


MethodStart = Callable[[torch.Tensor, torch.Tensor, Factorization, SolverConfig], StartingPoint]
"""``start(W [m, n], D [n, n], factorization, config) -> StartingPoint``: how a method that reads the drift
``D`` enters the column loop (GPTAQ, QEP, Qronos; all in solve order)."""


@dataclass(frozen=True)
class SolveResult:
    """Outcome of one solve.

    Attributes:
        weight: fake-quantized weight [m, n], the input weight's dtype and device.
        loss: GPTQ's proxy loss ``Σ_j ‖w_j − q_j‖² / U[j, j]² / 2`` (units of ``H``-weighted squared weight).
        percdamp: the damping actually used, as a fraction of the mean Hessian diagonal (grows on retries).
        seconds: wall time of the solve.
        grid: the grid ``weight`` lies on (scales and zero points per group, each column's group), or
            ``None`` when nothing was quantized (16 bits).
    """

    weight: torch.Tensor
    loss: float
    percdamp: float
    seconds: float
    grid: WeightGrid | None = None


def solve_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    D: torch.Tensor | None,
    config: SolverConfig,
    *,
    name: str = "layer",
    start: MethodStart | None = None,
    reads_drift: bool | None = None,
    release_statistics: bool = False,
) -> SolveResult:
    """The column loop with its checks, damping, ``act_order`` and groups, from a method's ``start``.

    Without ``start`` the loop runs GPTQ on ``W`` and ``D`` is not read; with it the method's start turns ``W``
    into its starting point and ``P`` once ``H_λ`` is factored, from ``D`` (required) unless ``reads_drift`` is
    false (then the start gets ``None``). With
    ``release_statistics`` the caller hands ``H`` and ``D`` over: they are worked on in place and their memory
    is given back as soon as they are read (``H`` once factored, ``D`` once the start is computed), so a solve
    holds at most ``3¼`` float32 ``n × n`` matrices, ``D`` included, besides ``W`` (the calibration engine's
    large layers): the factorization's two and a quarter, then ``P`` and ``U`` with ``W``'s working copies. Static group
    grids are computed from the starting point's weights. Computation runs in float64 when ``W`` is
    float64, else in float32, on ``W``'s device.
    """
    began = time.perf_counter()
    _check_weight(W, name)
    columns = W.shape[1]
    needs_drift = start is not None if reads_drift is None else reads_drift
    if needs_drift and D is None:
        raise ValueError(f"{name}: this method needs the drift statistic D; got D=None")
    _check_statistics(H, D if needs_drift else None, columns, name)
    groupsize = check_groupsize(config.groupsize, columns)
    if config.bits >= FULL_PRECISION_BITS:
        return SolveResult(W.clone(), 0.0, 0.0, time.perf_counter() - began)

    dtype = working_dtype(W)
    hessian = H.detach().to(device=W.device, dtype=dtype, copy=not release_statistics)
    drift = D.detach().to(device=W.device, dtype=dtype, copy=not release_statistics) if needs_drift else None

    if not torch.any(hessian):
        raise CalibrationError(f"{name}: the Hessian is all zeros (no calibration data reached this layer)")
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1
    if drift is not None:
        drift[:, dead] = 0

    perm = None
    if config.act_order:
        perm = torch.argsort(torch.diagonal(hessian), descending=True)
        hessian = _permuted(hessian, perm)
        if drift is not None:
            drift = _permuted(drift, perm)
    if release_statistics:  # handed over: what the solve reads is in its own copies now (or is them)
        _release(*(given for given, own in ((H, hessian), (D if needs_drift else None, drift))
                   if given is not None and not _shares_memory(given, own)))

    factorization = factorize(hessian, config.percdamp, name, consume=True)  # the solve's own H: given back
    del hessian
    work = W.detach().to(dtype=dtype, copy=True)  # made after the factorization, the solve's largest step
    work[:, dead] = 0
    if perm is not None:
        work = work[:, perm]
    start_point = StartingPoint(work) if start is None else start(work, drift, factorization, config)
    _release(factorization.root)  # the column loop reads U alone
    if drift is not None and not _shares_memory(drift, start_point.correction):
        _release(drift, D if release_statistics else None)
    del drift

    quantizer = WeightQuantizer(config.bits, sym=config.sym, mse=config.mse, grid_format=config.grid)
    static_params = group_of_column = None
    if groupsize > 0 and config.static_groups:
        original_order = start_point.work if perm is None else start_point.work[:, torch.argsort(perm)]
        static_params = [quantizer.params(original_order[:, g : g + groupsize]) for g in range(0, columns, groupsize)]
        order = perm if perm is not None else torch.arange(columns, device=W.device)
        group_of_column = (order // groupsize).tolist()

    solver = _BlockSolver(
        start=start_point,
        upper=factorization.upper,
        quantizer=quantizer,
        groupsize=groupsize,
        static_params=static_params,
        group_of_column=group_of_column,
        official=config.lazy_update == "official",
    )
    if not any(_shares_memory(start_point.work, kept) for kept in (start_point.first_column, start_point.first_grid)):
        _release(start_point.work)  # the solver works on its transposed copies
    quantized, loss = solver.run(config.blocksize)
    grid = _solved_grid(solver, static_params, groupsize, perm, columns, quantizer.maxq)
    del solver, start_point
    if release_statistics:  # D's memory may have held P until now
        _release(H, D)
    if perm is not None:
        quantized = quantized[:, torch.argsort(perm)]
    result = quantized.to(W.dtype)
    if not _all_finite(result):
        scales = "".join(f"{name}={value:g}, " for name, value in config.parameters.items())
        hint = "lower the drift-correction scale or raise percdamp" if needs_drift else "raise percdamp"
        raise CalibrationError(
            f"{name}: the solve produced NaN or Inf weights from finite inputs ({scales}"
            f"percdamp={factorization.damp:g}): {hint}"
        )
    return SolveResult(result, loss, factorization.damp, time.perf_counter() - began, grid)


def _permuted(matrix: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``matrix[perm][:, perm]`` for a matrix the solve owns (its own copy, or one handed over), which is given
    back: two ``n × n`` matrices at a time, not three."""
    rows = matrix[perm]
    _release(matrix)
    return rows[:, perm]


def _release(*tensors: torch.Tensor | None) -> None:
    """Give back the memory of tensors the solver owns (its own copies, or statistics handed over with
    ``release_statistics``); they are empty afterwards. A storage that cannot be resized (e.g. one whose bytes
    were lent to numpy) is left to be freed with its tensor."""
    for tensor in tensors:
        if tensor is not None and tensor.untyped_storage().resizable():
            tensor.untyped_storage().resize_(0)


def _shares_memory(tensor: torch.Tensor, other: torch.Tensor | None) -> bool:
    return other is not None and tensor.untyped_storage().data_ptr() == other.untyped_storage().data_ptr()


def _check_weight(W: torch.Tensor, name: str) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"{name}: W must be a 2-D floating-point tensor [rows, columns], got {shape}")
    if W.numel() == 0:
        raise ValueError(f"{name}: W must not be empty, got shape {tuple(W.shape)}")
    bad = 0 if _all_finite(W) else int((~torch.isfinite(W)).sum())
    if bad:
        raise ValueError(f"{name}: W contains {bad} NaN or Inf entries; the layer's weights are broken")


_SCAN_ROWS = 256
"""Rows of a matrix reduced at once by :func:`_largest_magnitude` (``aminmax`` of a whole matrix allocates a
copy of it: ``4n²`` bytes beside the solve's largest matrices)."""


def _largest_magnitude(tensor: torch.Tensor) -> float:
    """``max |x|`` (NaN if any entry is NaN), a slice of :data:`_SCAN_ROWS` rows at a time; ``aminmax`` is
    vectorized, an ∞-norm is not."""
    values = tensor.detach()
    rows = values.reshape(-1, values.shape[-1]) if values.dim() > 1 else values.reshape(1, -1)
    largest = 0.0
    for part in rows.split(_SCAN_ROWS):
        smallest, biggest = torch.aminmax(part)
        magnitude = max(-float(smallest), float(biggest))
        if math.isnan(magnitude):
            return math.nan
        largest = max(largest, magnitude)
    return largest


def _largest_asymmetry(matrix: torch.Tensor) -> float:
    """``max |A − Aᵀ|`` for a square ``matrix``, tile by tile (each tile and its mirror stay in cache)."""
    n, tile, largest = matrix.shape[0], STRUCTURE_BLOCK, 0.0
    for a in range(0, n, tile):
        for c in range(a, n, tile):
            difference = matrix[a : a + tile, c : c + tile] - matrix[c : c + tile, a : a + tile].T
            largest = max(largest, _largest_magnitude(difference))
    return largest


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite, from one reduction (the largest magnitude)."""
    return math.isfinite(_largest_magnitude(tensor))


def _symmetry_tolerance(dtype: torch.dtype) -> float:
    """Largest ``max|H − Hᵀ| / max|H|`` accepted: float rounding of ``X̃ᵀX̃``, not a wrong matrix."""
    return 1e-10 if dtype == torch.float64 else 1e-4


def _check_statistics(H: torch.Tensor, D: torch.Tensor | None, columns: int, name: str) -> None:
    for label, stat in (("H", H), ("D", D)):
        if stat is None:
            continue
        if stat.shape != (columns, columns):
            raise ValueError(f"{name}: {label} must have shape ({columns}, {columns}), got {tuple(stat.shape)}")
        if not _all_finite(stat):
            raise CalibrationError(f"{name}: calibration statistic {label} contains NaN or Inf")
    scale = _largest_magnitude(H)
    asymmetry = _largest_asymmetry(H)
    if scale > 0 and asymmetry > _symmetry_tolerance(H.dtype) * scale:
        raise ValueError(
            f"{name}: H must be symmetric (2/N Σ x̃x̃ᵀ); max |H − Hᵀ| = {asymmetry:.3g} is {asymmetry / scale:.2g} "
            f"of max |H| (allowed: {_symmetry_tolerance(H.dtype):g})"
        )


def factorize(hessian: torch.Tensor, percdamp: float, name: str, *, consume: bool = False) -> Factorization:
    """``H_λ = H + λI`` with ``λ = percdamp · mean(diag H)``, factored (see :class:`Factorization`).

    Uses one Cholesky and one triangular inverse: with ``J`` the reversal permutation and
    ``J H_λ J = L Lᵀ``, ``R = J L J`` is upper triangular with ``H_λ = R Rᵀ``, so ``H_λ⁻¹ = R⁻ᵀ R⁻¹`` and
    ``U = R⁻¹``. If ``H_λ`` is not positive definite, ``percdamp`` grows tenfold (with a warning).

    Memory: two ``n × n`` matrices at a time besides ``hessian``, which ``consume`` gives back once it is copied
    (the caller owns it and does not read it again): ``J H J`` and ``L``, then ``L`` and ``R``, then ``R`` and ``U``.
    A retry after an inverse with NaN or Inf entries starts from ``H`` again, or, when it was consumed, from
    ``R Rᵀ`` (``H_λ`` to rounding) with its diagonal reset to ``H``'s.
    """
    mean_diag = torch.diagonal(hessian).mean()
    flipped = hessian.flip(0, 1)  # J H J, a copy: its diagonal is H's reversed
    if consume:
        _release(hessian)
    undamped = torch.diagonal(flipped).clone()
    damp = percdamp
    for attempt in range(_DAMP_RETRIES):
        torch.diagonal(flipped).copy_(undamped).add_(damp * mean_diag)  # J (H + λI) J
        lower, info = torch.linalg.cholesky_ex(flipped)
        if info.item() == 0:
            diagonal = torch.diagonal(flipped).flip(0)
            del flipped
            root = lower.flip(0, 1)
            del lower
            upper = _upper_triangular_inverse(root)
            if _all_finite(upper):
                return Factorization(upper, root, damp, diagonal)
            del upper
            again = root @ root.T if consume else hessian  # H_λ to rounding, or H itself; diagonal reset below
            flipped = again.flip(0, 1)
            del again
            del root
        else:
            del lower
        next_damp = max(damp * 10, 1e-6)
        if attempt + 1 < _DAMP_RETRIES:
            warnings.warn(
                f"{name}: Hessian not positive definite with percdamp={damp:g}; retrying with {next_damp:g}",
                RuntimeWarning,
                stacklevel=3,
            )
        damp = next_damp
    raise CalibrationError(f"{name}: Hessian is not positive definite even with percdamp={damp / 10:g}")


def _upper_triangular_inverse(r: torch.Tensor) -> torch.Tensor:
    """Inverse of the upper triangular ``r`` [n, n], by halves: ``[[A, B], [0, C]]⁻¹ = [[A⁻¹, −A⁻¹BC⁻¹], [0, C⁻¹]]``.

    About ``2n³/3`` flops in matrix products, against ``n³`` for a triangular solve with an identity
    right-hand side. The halves are written into the result in place: one ``n × n`` matrix and one
    ``n/2 × n/2`` product besides ``r``.
    """
    inverse = torch.zeros_like(r)
    _invert_upper_into(r, inverse)
    return inverse


def _invert_upper_into(r: torch.Tensor, out: torch.Tensor) -> None:
    """``out ← r⁻¹`` for the upper triangular ``r``; ``out`` (same shape) holds zeros below its diagonal."""
    n = r.shape[0]
    if n <= STRUCTURE_BLOCK:
        identity = torch.eye(n, dtype=r.dtype, device=r.device)
        out.copy_(torch.linalg.solve_triangular(r, identity, upper=True))
        return
    half = n // 2
    a_inv, c_inv = out[:half, :half], out[half:, half:]
    _invert_upper_into(r[:half, :half], a_inv)
    _invert_upper_into(r[half:, half:], c_inv)
    product = a_inv @ r[:half, half:]
    torch.mm(product, c_inv, out=out[:half, half:])
    out[:half, half:].neg_()  # −(A⁻¹B)C⁻¹: negating a product is exact


@dataclass
class _Block:
    """The lazy-update block of columns ``[start, end)`` (solve order) being quantized.

    Every tensor holds one row of ``m`` values per column (the solve's ``Wᵀ`` orientation).

    Attributes:
        start, end: the block's columns.
        values: [b, m] the block's columns as updated so far: the current sub-block's carry every update
            from the columns quantized before them; later sub-blocks of the block still lack the current
            sub-block's.
        pairs: [b, K, m] for each quantized column ``j``: ``e_j = (w_j − q_j) / U[j, j]``, ``w_j`` (its value
            just before quantization; zeros when ``P = 0`` and no anchor terms) and, with anchor terms
            (``K = 3``), ``w₀_j``, its starting value.
        coefficients: [b, K, b] such that the update of column ``k`` by column ``j`` inside the block is
            ``coefficients[j, :, k] · pairs[j]``: ``[−U[j, k]; P[j, k]]`` (``−e_j U[j, k] + w_j P[j, k]``), and
            with anchor terms the coefficients of ``e_j``, ``w_j`` and ``w₀_j`` in ``−ẽ_j U[j, k] + v_j P[j, k]``
            (:meth:`_BlockSolver._in_block_coefficients`).
        sub_start, sub_end: the sub-block of :data:`_INNER_BLOCK` columns being quantized (block-local).
    """

    start: int
    end: int
    values: torch.Tensor
    pairs: torch.Tensor
    coefficients: torch.Tensor
    sub_start: int = 0
    sub_end: int = 0

    @property
    def errors(self) -> torch.Tensor:
        """``e_j`` [b, m] of the block's columns (a view of ``pairs``)."""
        return self.pairs[:, 0]

    @property
    def originals(self) -> torch.Tensor:
        """``w_j`` [b, m] of the block's columns (a view of ``pairs``)."""
        return self.pairs[:, 1]


class _BlockSolver:
    """Column-by-column quantization with lazy block updates (the state of one solve).

    The solve runs on ``weight_t = Wᵀ`` [n, m] (one contiguous row per column of ``W``), so that the
    per-column work reads and writes contiguous memory; ``correction`` is the start's ``P`` or ``None``.
    """

    def __init__(
        self,
        *,
        start: StartingPoint,
        upper: torch.Tensor,
        quantizer: WeightQuantizer,
        groupsize: int,
        static_params: list[tuple[torch.Tensor, torch.Tensor]] | None,
        group_of_column: list[int] | None,
        official: bool,
    ) -> None:
        self.weight_t = start.work.T.contiguous()
        self.anchored = start.anchored
        self.anchor_t = self.weight_t.clone() if start.anchored is not None else None
        """``w₀ᵀ`` [n, m]: each column's starting value, for :class:`AnchorTerms`."""
        self.first_column = start.first_column
        self.first_grid = start.first_grid
        self.upper = upper
        self.correction = start.correction
        self.quantizer = quantizer
        self.groupsize = groupsize
        self.static_params = static_params
        self.group_of_column = group_of_column
        self.official = official
        self.group_params: list[tuple[torch.Tensor, torch.Tensor]] = []
        """Each dynamic group's ``(scale, zero)``, in solve order."""
        self.scale: torch.Tensor | None = None
        """The current grid's scales [m, 1] (``zero``: its zero points), as :meth:`WeightQuantizer.params`."""
        self.zero: torch.Tensor | None = None
        self.column_scale: torch.Tensor | None = None
        """``scale`` as [m] (``column_zero``: ``zero``), the shape one column is quantized with."""
        self.column_zero: torch.Tensor | None = None
        if groupsize <= 0:
            self._set_grid(*quantizer.params(start.work if start.first_grid is None else start.first_grid))

    def run(self, blocksize: int) -> tuple[torch.Tensor, float]:
        """Quantize every column; returns the quantized weight [m, n] and the proxy loss.

        Two levels of lazy updates: columns go in blocks of ``blocksize`` (updates to later blocks are one
        product per block), and inside a block in sub-blocks of :data:`_INNER_BLOCK` columns: a column
        updates only the rest of its sub-block, and each finished sub-block updates the rest of the block
        with one product. The per-column work (memory-bound) then touches ``16 × m`` values instead of the
        whole block.
        """
        weight_t, upper, correction = self.weight_t, self.upper, self.correction
        anchor, terms = self.anchor_t, self.anchored
        columns, rows = weight_t.shape
        diagonal = torch.diagonal(upper).tolist()
        quantized = torch.empty_like(weight_t)
        loss = torch.zeros((), dtype=weight_t.dtype, device=weight_t.device)
        keeps_originals = correction is not None or terms is not None
        for i1 in range(0, columns, blocksize):
            i2 = min(i1 + blocksize, columns)
            width = i2 - i1
            block = _Block(i1, i2, weight_t[i1:i2].clone(), weight_t.new_zeros(width, 2 if terms is None else 3, rows),
                           self._in_block_coefficients(i1, i2))
            values, pairs, coefficients = block.values, block.pairs, block.coefficients
            errors, originals = block.errors, block.originals
            if terms is not None:
                pairs[:, 2] = anchor[i1:i2]
            for j1 in range(0, width, _INNER_BLOCK):
                j2 = block.sub_end = min(j1 + _INNER_BLOCK, width)
                block.sub_start = j1
                for i in range(j1, j2):
                    column = i1 + i
                    if terms is not None and terms.pull and not (self.official and i == 0):
                        values[i].lerp_(pairs[i, 2], terms.pull)  # w_j ← w_j − pull (w_j − w₀_j)
                    if self.groupsize > 0:
                        self._start_group(column, block)
                    w = originals[i].copy_(values[i]) if keeps_originals else values[i]
                    target = self.first_column if column == 0 and self.first_column is not None else w
                    # q_j = Q(w_j), written into its row of the result
                    q = self.quantizer.quantize_column_(target, self.column_scale, self.column_zero,
                                                        out=quantized[column])
                    # e_j = (w_j − q_j) / U[j, j]
                    torch.sub(w, q, out=errors[i]).div_(diagonal[column])
                    if i + 1 < j2:
                        # rest of the sub-block: W[:, k] −= e_j U[j, k] − w_j P[j, k] (with anchor terms:
                        # −= ẽ_j U[j, k] − v_j P[j, k], linear in e_j, w_j, w₀_j)
                        values[i + 1 : j2].addmm_(coefficients[i, :, i + 1 : j2].T, pairs[i])
                if j2 < width:
                    # rest of the block, from the whole sub-block: W[:, k] −= Σ_j (e_j U[j, k] − w_j P[j, k])
                    values[j2:].addmm_(coefficients[j1:j2, :, j2:].reshape(-1, width - j2).T,
                                       pairs[j1:j2].reshape(-1, rows))
            loss += errors.square().sum()
            if i2 < columns:
                shifted, mixed = self._cross_block_pairs(block, width)
                # later blocks: W[:, k] −= Σ_j e_j U[j, k] ...
                weight_t[i2:].addmm_(upper[i1:i2, i2:].T, shifted, alpha=-1)
                if correction is not None:
                    # ... and += Σ_j w_j P[j, k] (the official code's form: q_j instead of w_j)
                    lhs = quantized[i1:i2] if self.official else mixed
                    weight_t[i2:].addmm_(correction[i1:i2, i2:].T, lhs)
        return quantized.T, float(loss) / 2

    def _cross_block_pairs(self, block: _Block, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ẽ_j, v_j)`` [count, m] each, of the block's first ``count`` quantized columns: what their update of
        the later blocks multiplies (``(e_j, w_j)`` without anchor terms; see :class:`AnchorTerms`)."""
        errors, originals = block.errors[:count], block.originals[:count]
        terms = self.anchored
        if terms is None:
            return errors, originals
        moved = originals - block.pairs[:count, 2]  # w_j − w₀_j
        scale = terms.shift / torch.diagonal(self.upper)[block.start : block.start + count]
        shifted = (moved * scale[:, None]).neg_().add_(errors)  # ẽ_j = e_j − shift (w_j − w₀_j) / U[j, j]
        if self.correction is None:  # no P term: v_j is not read
            return shifted, originals
        mixed = (originals * terms.keep).sub_(moved.mul_(terms.mix))  # v_j = keep w_j − mix (w_j − w₀_j)
        return shifted, mixed

    def _set_grid(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Make ``(scale, zero)`` [m, 1] the grid of the columns that follow."""
        self.scale, self.zero = scale, zero
        self.column_scale, self.column_zero = scale.reshape(-1), zero.reshape(-1)

    def _in_block_coefficients(self, i1: int, i2: int) -> torch.Tensor:
        """The coefficients [b, K, b] of the block's in-block updates (see :attr:`_Block.coefficients`).

        Without anchor terms ``[−U[j]; P[j]]``; GPTQ uses the same rank-2 products with a zero second row (no
        dearer than rank 1: the pass over the values dominates), so GPTAQ with ``P = 0`` computes bitwise the
        same numbers as GPTQ. With anchor terms (``c_j = shift / U[j, j]``), ``−ẽ_j U[j, k] + v_j P[j, k]`` is

            −e_j U[j, k] + w_j (c_j U[j, k] + (keep − mix) P[j, k]) + w₀_j (mix P[j, k] − c_j U[j, k]),

        so a column's update stays one product, with no per-column work for the terms.
        """
        u_block = self.upper[i1:i2, i1:i2]
        p_block = torch.zeros_like(u_block) if self.correction is None else self.correction[i1:i2, i1:i2]
        terms = self.anchored
        if terms is None:
            return torch.stack((-u_block, p_block), dim=1)
        scaled_u = u_block * (terms.shift / torch.diagonal(u_block))[:, None]  # c_j U[j, k]
        return torch.stack((-u_block, scaled_u + (terms.keep - terms.mix) * p_block,
                            terms.mix * p_block - scaled_u), dim=1)

    def _start_group(self, column: int, block: _Block) -> None:
        """Set the grid for ``column`` when a group starts there (or for every column, static groups).

        Only called with groups (``groupsize > 0``): without them the row's grid is set once, at the start.
        """
        if self.static_params is not None:
            self._set_grid(*self.static_params[self.group_of_column[column]])
            return
        if column % self.groupsize != 0:
            return
        end = column + self.groupsize
        if column == 0 and self.first_grid is not None:
            self._set_grid(*self.quantizer.params(self.first_grid[:, :end]))
        elif self.official:
            self._set_grid(*self.quantizer.params(self.weight_t[column:end].T.contiguous()))
        else:
            values = self._current_values(column, end, block)
            self._set_grid(*self.quantizer.params(values.T.contiguous()))
        self.group_params.append((self.scale, self.zero))

    def _current_values(self, first: int, end: int, block: _Block) -> torch.Tensor:
        """Values [k, m] of columns ``[first, end)`` with every update from the columns quantized so far.

        ``first`` is the column about to be quantized (in the block's current sub-block): the rest of the
        sub-block is current; later sub-blocks of the block still lack the sub-block's columns done so far;
        later blocks lack all of this block's columns done so far.
        """
        i1, i2, j1, j2 = block.start, block.end, block.sub_start, block.sub_end
        i = first - i1
        stop = min(end, i2) - i1
        parts = [block.values[i : min(stop, j2)]]
        if stop > j2:
            pending = block.pairs[j1:i].reshape(-1, block.pairs.shape[-1])
            parts.append(block.values[j2:stop] + block.coefficients[j1:i, :, j2:stop].reshape(-1, stop - j2).T
                         @ pending)
        if end > i2:
            shifted, mixed = self._cross_block_pairs(block, i)
            beyond = self.weight_t[i2:end] - self.upper[i1:first, i2:end].T @ shifted
            if self.correction is not None:
                beyond = beyond + self.correction[i1:first, i2:end].T @ mixed
            parts.append(beyond)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _solved_grid(solver: _BlockSolver, static_params: list[tuple[torch.Tensor, torch.Tensor]] | None,
                 groupsize: int, perm: torch.Tensor | None, columns: int, maxq: int) -> WeightGrid:
    """The grid of a finished solve, in the weight's own column order.

    Without groups every column is in group 0; static groups follow the original columns; dynamic groups
    are formed in solve order, so with ``act_order`` the column at solve position ``k`` (original column
    ``perm[k]``) is in group ``k // groupsize``.
    """
    device = solver.weight_t.device
    if groupsize <= 0:
        return WeightGrid.from_groups([(solver.scale, solver.zero)], torch.zeros(columns, dtype=torch.int64,
                                                                                 device=device), maxq)
    positions = torch.arange(columns, device=device)
    if static_params is not None:
        return WeightGrid.from_groups(static_params, positions // groupsize, maxq)
    g_idx = torch.empty_like(positions)
    g_idx[perm if perm is not None else positions] = positions // groupsize
    return WeightGrid.from_groups(solver.group_params, g_idx, maxq)
