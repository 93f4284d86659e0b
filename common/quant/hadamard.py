"""Hadamard matrices, fast Hadamard transforms and random orthogonal rotations.

A size ``n`` is *constructible* when ``n = m * 2**k`` with ``m = 1`` or ``m`` a Paley order:

* Sylvester: ``H_1 = [1]``, ``H_2p = [[H_p, H_p], [H_p, -H_p]]`` (so ``H_p[c, d] = (-1)**popcount(c & d)``);
* Paley I: ``m = q + 1`` for a prime ``q ≡ 3 (mod 4)``;
* Paley II: ``m = 2 (q + 1)`` for a prime ``q ≡ 1 (mod 4)``.

The smallest such ``m`` is used, and ``H_n = kron(H_m, H_{2**k})``: index ``i = a * 2**k + c`` with ``a`` in
``[0, m)`` and ``c`` in ``[0, 2**k)``. Sylvester and Paley II matrices are symmetric, Paley I ones are not
(``H_m = I + S`` with ``S`` antisymmetric), so Paley II is preferred when ``m`` is both (e.g. ``m = 12``):
``H_n`` is symmetric unless ``m`` is a Paley I order (e.g. 20, 44). Transforms act on the last dim of row
vectors: ``hadamard_transform(x) == x @ H_n.T / sqrt(n)``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import torch

_ALLOWED = (
    "allowed sizes are n = m * 2**k with m = 1, m = q + 1 (q prime, q ≡ 3 mod 4) "
    "or m = 2 * (q + 1) (q prime, q ≡ 1 mod 4)"
)
_FAST_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FAST_KERNEL_MAX_DIM = 32768


def _check_size(n: object, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    return n


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley_prime(m: int) -> tuple[int, int] | None:
    """``(2, q)`` / ``(1, q)`` if ``m`` is a Paley II / I order with prime ``q`` (II first), else ``None``."""
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return 2, m // 2 - 1
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return 1, m - 1
    return None


@functools.lru_cache(maxsize=1024)
def _split(n: int) -> tuple[int, int] | None:
    """``(m, p)``: ``n = m * p``, ``p`` a power of two, ``m`` the smallest valid factor; ``None`` if none."""
    p = n & -n  # largest power of two dividing n
    m = n // p
    while True:
        if m == 1 or _paley_prime(m) is not None:
            return m, n // m
        if m == n:
            return None
        m *= 2


def _split_or_raise(n: int, name: str) -> tuple[int, int]:
    split = _split(n)
    if split is None:
        raise ValueError(f"{name}={n} has no constructible Hadamard matrix: {_ALLOWED}")
    return split


def _sylvester(p: int) -> torch.Tensor:
    """``H_p`` for ``p`` a power of two, int8 ``[p, p]``."""
    h2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    h = torch.ones(1, 1, dtype=torch.int8)
    while h.shape[0] < p:
        h = torch.kron(h2, h)  # [[H, H], [H, -H]]
    return h


def _paley(kind: int, q: int) -> torch.Tensor:
    """Paley I (order ``q + 1``, ``q ≡ 3 mod 4``) or II (order ``2 (q + 1)``, ``q ≡ 1 mod 4``), int8."""
    chi = torch.full((q,), -1, dtype=torch.int8)  # quadratic character mod q
    chi[0] = 0
    chi[torch.arange(1, q) ** 2 % q] = 1
    jacobsthal = torch.stack([chi.roll(b) for b in range(q)], dim=1)  # Q[a, b] = chi(a - b)
    ones = torch.ones(q, dtype=torch.int8)
    border = ones if kind == 2 else -ones  # Paley II: symmetric C; Paley I: antisymmetric S
    core = torch.zeros(q + 1, q + 1, dtype=torch.int8)
    core[0, 1:] = ones
    core[1:, 0] = border
    core[1:, 1:] = jacobsthal
    if kind == 1:  # H = I + S with S Sᵀ = q I, Sᵀ = -S
        return core + torch.eye(q + 1, dtype=torch.int8)
    # H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]] with C Cᵀ = q I, Cᵀ = C
    a = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    b = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int8)
    return torch.kron(core, a) + torch.kron(torch.eye(q + 1, dtype=torch.int8), b)


@functools.lru_cache(maxsize=32)
def _small_factor(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Cached ``H_m`` (the non-power-of-two factor); treat as read-only."""
    h = torch.ones(1, 1, dtype=torch.int8) if m == 1 else _paley(*_paley_prime(m))
    return h.to(dtype=dtype, device=device)


def is_constructible(n: int) -> bool:
    """Whether ``hadamard_matrix(n)`` exists under this module's constructions (``False`` for ``n < 1``)."""
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and _split(n) is not None


def hadamard_matrix(
    n: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """Unnormalized ±1 Hadamard matrix ``[n, n]`` with ``H @ H.T == n * I``, equal to ``kron(H_m, H_{2**k})``.

    Raises ``ValueError`` if ``n`` is not a positive constructible size.
    """
    m, p = _split_or_raise(_check_size(n), "n")
    h = torch.kron(_small_factor(m, torch.int8, torch.device("cpu")), _sylvester(p))
    return h.to(dtype=dtype, device=device)


_WIDE_ENOUGH = 16
"""``H_b`` widths from which ``H_a`` is applied to each row's ``[a, b]`` slab as a batched product; below it
(``n = m·2**k`` with ``2**k < 16``, e.g. ``11008 = 5504·2``) as one ``[rows·b, a]`` product, ten times faster."""


@functools.lru_cache(maxsize=1)
def _load_fast_kernel() -> Callable[[torch.Tensor, float], torch.Tensor] | None:
    try:
        from fast_hadamard_transform import hadamard_transform as kernel
    except ImportError:
        return None
    return kernel


@functools.lru_cache(maxsize=1024)
def _two_factors(n: int) -> tuple[int, int]:
    """``(a, b)`` with ``H_n = kron(H_a, H_b)``, ``a = m·2**i`` and ``b = 2**j``, sizes balanced (least ``a + b``,
    i.e. fewest multiply-adds per element) with ``b ≥ 16`` where possible (small trailing factors make the
    first product a slow batch of tiny ones)."""
    m, p = _split_or_raise(n, "n")
    options = [(m * 2**i, p // 2**i) for i in range(p.bit_length())]
    wide = [(a, b) for a, b in options if b >= min(16, p)]
    return min(wide, key=lambda ab: (ab[0] + ab[1], ab[0]))


@functools.lru_cache(maxsize=64)
def _factor_signs(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached ``(H_a, H_b)`` of :func:`_two_factors` as int8 ±1 on ``device`` (treat as read-only): a byte per
    entry, so a large factor (``H_5504`` for ``n = 11008``: 30 MB) costs an eighth of its float64 copy."""
    a, b = _two_factors(n)
    m, _ = _split(n)
    left = torch.kron(_small_factor(m, torch.int8, torch.device("cpu")), _sylvester(a // m))
    return left.to(device), _sylvester(b).to(device)


def _factor_matrices(n: int, dtype: torch.dtype, device: torch.device,
                     normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H_a, H_b)`` of :func:`_two_factors` in ``dtype``, ``H_b`` divided by ``sqrt(n)`` when ``normalize``.

    Built for each call from the cached signs (:func:`_factor_signs`): the float copies live as long as the
    transform that reads them, not as long as the process.
    """
    left, right = _factor_signs(n, torch.device(device))
    scaled = right.to("cpu", torch.float64) / (math.sqrt(n) if normalize else 1.0)
    return left.to(dtype), scaled.to(dtype=dtype, device=device)


def hadamard_transform(x: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """Apply ``H_n`` along the last dim of ``x`` ``[..., n]``: ``y[..., i] = sum_j H[i, j] x[..., j]``.

    Divided by ``sqrt(n)`` when ``normalize`` (then orthogonal; an involution iff ``H_n`` is symmetric).
    Equals ``x @ hadamard_matrix(n).T / sqrt(n)`` up to rounding; keeps ``x``'s shape, dtype and device.
    As ``H_n = kron(H_a, H_b)`` with ``a ≈ b ≈ √n`` (:func:`_two_factors`), it is two matrix products,
    ``(a + b)`` multiply-adds per element; on CUDA with ``fast_hadamard_transform`` installed, the ``2**k``
    factor runs in that kernel instead.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 0 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor with >= 1 dim, got {x.dtype} {tuple(x.shape)}")
    n = x.shape[-1]
    m, p = _split_or_raise(_check_size(n, "x.shape[-1]"), "x.shape[-1]")
    rows = x.numel() // n
    kernel = _load_fast_kernel() if x.is_cuda and x.dtype in _FAST_KERNEL_DTYPES else None
    if p > 1 and kernel is not None and p <= _FAST_KERNEL_MAX_DIM:
        scale = 1.0 / math.sqrt(n) if normalize else 1.0
        y = kernel(x.reshape(rows * m, p).contiguous(), scale)
        if m > 1:
            y = _left_factor(_small_factor(m, x.dtype, x.device), y.reshape(rows, m, p))
        return y.reshape(x.shape)
    if n == 1:
        return x.clone()
    left, right = _factor_matrices(n, x.dtype, x.device, normalize)
    a, b = left.shape[0], right.shape[0]
    y = (x.reshape(rows * a, b) @ right.T).reshape(rows, a, b)
    return _left_factor(left, y).reshape(x.shape)


def _left_factor(left: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``left @ y`` for ``left`` [a, a] and ``y`` [rows, a, b]: a batched product, or for a thin ``b`` (a batch of
    matrix-vector products) one ``[rows·b, a]`` product."""
    rows, a, b = y.shape
    if b >= _WIDE_ENOUGH:
        return left @ y
    return (y.transpose(1, 2).reshape(rows * b, a) @ left.T).reshape(rows, b, a).transpose(1, 2)


def random_signs(
    n: int, *, seed: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """Seeded random ±1 vector ``[n]`` (CPU generator, then moved to ``device``)."""
    generator = _generator(seed)
    signs = torch.randint(0, 2, (_check_size(n),), generator=generator) * 2 - 1
    return signs.to(dtype=dtype, device=device)


def random_orthogonal_matrix(
    n: int, *, seed: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """Haar-random orthogonal ``[n, n]``: QR of a seeded float64 Gaussian, columns sign-fixed by diag(R)."""
    generator = _generator(seed)
    gauss = torch.randn(_check_size(n), n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    return q.to(dtype=dtype, device=device)


def random_hadamard_matrix(
    n: int, *, seed: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """Orthogonal ``Q = H_n @ diag(s) / sqrt(n)`` ``[n, n]`` with ``s = random_signs(n, seed=seed)``.

    So ``x @ Q.T == hadamard_transform(x * s)``. If ``n`` is not constructible, warns and returns
    ``random_orthogonal_matrix(n, seed=seed)`` instead.
    """
    _check_size(n)
    if not is_constructible(n):
        warnings.warn(
            f"random_hadamard_matrix: n={n} has no constructible Hadamard matrix ({_ALLOWED}); "
            "using a random orthogonal matrix instead",
            stacklevel=2,
        )
        return random_orthogonal_matrix(n, seed=seed, dtype=dtype, device=device)
    scaled_signs = random_signs(n, seed=seed) / math.sqrt(n)
    return hadamard_matrix(n, dtype=dtype, device=device) * scaled_signs.to(dtype=dtype, device=device)


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return torch.Generator().manual_seed(seed)
