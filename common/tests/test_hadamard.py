"""Tests for common.quant.hadamard: constructions, fast transform vs dense product, random rotations."""

import math

import pytest
import torch

from common.quant.hadamard import (
    _paley,
    hadamard_matrix,
    hadamard_transform,
    is_constructible,
    random_hadamard_matrix,
    random_orthogonal_matrix,
    random_signs,
)

pytestmark = pytest.mark.numerics  # float results against references: CI reruns them on other kernels

LIMIT = 16384
DENSE_LIMIT = 1024  # compare with the full dense matrix up to this size
SMALL_M_LIMIT = 512  # exhaustive transform check for every constructible n <= LIMIT with m <= this


# ----------------------------------------------------------------------------- independent references


def _primes(upto: int) -> list[int]:
    sieve = [True] * (upto + 1)
    sieve[:2] = [False, False]
    for i in range(2, math.isqrt(upto) + 1):
        if sieve[i]:
            sieve[i * i :: i] = [False] * len(sieve[i * i :: i])
    return [i for i, is_p in enumerate(sieve) if is_p]


def _paley_orders(upto: int) -> dict[int, list[tuple[int, int]]]:
    """Order -> [(kind, q)] for every Paley I / II matrix of order <= upto."""
    orders: dict[int, list[tuple[int, int]]] = {}
    for q in _primes(upto):
        if q % 4 == 3 and q + 1 <= upto:
            orders.setdefault(q + 1, []).append((1, q))
        if q % 4 == 1 and 2 * (q + 1) <= upto:
            orders.setdefault(2 * (q + 1), []).append((2, q))
    return orders


PALEY_ORDERS = _paley_orders(LIMIT)


def _smallest_factor(n: int) -> int | None:
    """Smallest m with n = m * 2**k and m = 1 or a Paley order (the spec's choice), or None."""
    m = n // (n & -n)
    while m <= n:
        if m == 1 or m in PALEY_ORDERS:
            return m
        m *= 2
    return None


CONSTRUCTIBLE = {n: m for n in range(1, LIMIT + 1) if (m := _smallest_factor(n)) is not None}


def _sylvester_signs(c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(-1) ** popcount(c & d), elementwise, as float64."""
    bits = torch.bitwise_and(c, d)
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return 1.0 - 2.0 * parity.to(torch.float64)


def _kron_columns(n: int, cols: torch.Tensor) -> torch.Tensor:
    """Columns ``cols`` of kron(H_m, H_p) computed entrywise, float64 [n, len(cols)]."""
    m = CONSTRUCTIBLE[n]
    p = n // m
    h_m = hadamard_matrix(m)  # m is minimal for n, so this is H_m itself (validated separately)
    i = torch.arange(n)[:, None]
    j = cols[None, :]
    return h_m[i // p, j // p] * _sylvester_signs(i % p, j % p)


def _dense_reference(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    return x @ hadamard_matrix(n).T / math.sqrt(n)


# ----------------------------------------------------------------------------- constructions


def test_paley_constructions_up_to_200():
    orders = _paley_orders(200)
    assert {12, 20, 28, 36} <= set(orders)
    checked = 0
    for m, constructions in orders.items():
        for kind, q in constructions:
            h = _paley(kind, q).to(torch.int64)
            assert h.shape == (m, m), (kind, q)
            assert bool((h.abs() == 1).all()), (kind, q)
            assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.int64)), (kind, q)
            if kind == 2:
                assert torch.equal(h, h.T), q
            else:  # skew-Hadamard: H + H^T = 2 I
                assert torch.equal(h + h.T, 2 * torch.eye(m, dtype=torch.int64)), q
            checked += 1
    assert checked == sum(len(c) for c in orders.values())


def test_sylvester_up_to_1024():
    for k in range(11):
        n = 2**k
        h = hadamard_matrix(n)
        idx = torch.arange(n)
        assert torch.equal(h, _sylvester_signs(idx[:, None], idx[None, :])), n
        assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64)), n


@pytest.mark.parametrize("n", [12, 20, 24, 36, 40, 44, 576, 1536])
def test_hadamard_matrix_is_kron_of_factors(n):
    h = hadamard_matrix(n)
    assert h.dtype == torch.float64 and h.shape == (n, n)
    assert bool((h.abs() == 1).all())
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    assert torch.equal(h, _kron_columns(n, torch.arange(n)))


@pytest.mark.parametrize("n", [64, 576, 1536, 4096])
def test_project_sizes_are_symmetric(n):
    h = hadamard_matrix(n)
    assert torch.equal(h, h.T)


def test_hadamard_matrix_dtype_and_device():
    h = hadamard_matrix(12, dtype=torch.float32, device="cpu")
    assert h.dtype == torch.float32 and h.device.type == "cpu"
    assert torch.equal(h.double(), hadamard_matrix(12))


def test_is_constructible_known_cases():
    # 11008 = 5504 * 2 with 5504 = 5503 + 1 a Paley I order (5503 is prime, ≡ 3 mod 4)
    for n in (1, 2, 4, 12, 20, 28, 36, 64, 576, 1536, 4096, 11008, 14336):
        assert is_constructible(n), n
    for n in (0, -4, 3, 6, 9, 10, 18, 2752, 13696, 4.0, True):
        assert not is_constructible(n), n


def test_is_constructible_matches_reference_up_to_limit():
    mine = [n for n in range(1, LIMIT + 1) if is_constructible(n)]
    assert mine == sorted(CONSTRUCTIBLE)


# ----------------------------------------------------------------------------- fast transform == dense


def test_transform_matches_dense_for_every_small_n():
    gen = torch.Generator().manual_seed(0)
    sizes = [n for n in CONSTRUCTIBLE if n <= DENSE_LIMIT]
    for n in sizes:
        x = torch.randn(3, n, generator=gen, dtype=torch.float64)
        expected = x @ hadamard_matrix(n).T
        y = hadamard_transform(x, normalize=False)
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-10, msg=str(n))
        y = hadamard_transform(x)
        torch.testing.assert_close(y, expected / math.sqrt(n), rtol=0, atol=1e-12, msg=str(n))


def _check_large(n: int, gen: torch.Generator) -> None:
    cols = torch.tensor(sorted({0, n - 1, *torch.randint(0, n, (2,), generator=gen).tolist()}))
    basis = torch.zeros(len(cols), n, dtype=torch.float64)
    basis[torch.arange(len(cols)), cols] = 1.0
    # transform(e_j) is column j of H_n; integer arithmetic, so exact
    assert torch.equal(hadamard_transform(basis, normalize=False).T, _kron_columns(n, cols)), n
    x = torch.randn(2, n, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)


def test_transform_columns_for_every_large_n_with_small_m():
    gen = torch.Generator().manual_seed(1)
    sizes = [n for n, m in CONSTRUCTIBLE.items() if n > DENSE_LIMIT and m <= SMALL_M_LIMIT]
    assert {1536, 4096, 14336} <= set(sizes)
    for n in sizes:
        _check_large(n, gen)


def test_transform_columns_for_large_m():
    gen = torch.Generator().manual_seed(2)
    big = [m for m in PALEY_ORDERS if SMALL_M_LIMIT < m <= 2100]
    paley_1_only = max(m for m in big if all(kind == 1 for kind, _ in PALEY_ORDERS[m]))
    paley_2 = max(m for m in big if any(kind == 2 for kind, _ in PALEY_ORDERS[m]))
    sizes = [m * 2 ** int(math.log2(LIMIT // m)) for m in (paley_1_only, paley_2, min(big))]
    assert CONSTRUCTIBLE[11008] == 5504
    for n in [*sizes, 11008]:
        _check_large(n, gen)


@pytest.mark.parametrize("n", [576, 1536, 14336])
def test_transform_of_symmetric_sizes_is_an_involution(n):
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x)), x, rtol=0, atol=1e-12)


def test_transform_inverse_for_paley_1_size():
    n = 20 * 8
    h = hadamard_matrix(n)
    assert not torch.equal(h, h.T)
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x) @ h / math.sqrt(n), x, rtol=0, atol=1e-12)


def test_transform_shapes_and_layouts():
    n = 96
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, n, generator=gen, dtype=torch.float64)
    y = hadamard_transform(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, _dense_reference(x), rtol=0, atol=1e-12)
    xt = torch.randn(n, 5, generator=gen, dtype=torch.float64).T  # non-contiguous
    torch.testing.assert_close(hadamard_transform(xt), _dense_reference(xt), rtol=0, atol=1e-12)
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(v), _dense_reference(v), rtol=0, atol=1e-12)
    assert hadamard_transform(torch.zeros(0, n)).shape == (0, n)


@pytest.mark.parametrize("n", [64, 160, 576, 1536, 14336])
def test_float32_stays_float32_and_matches_float64(n, margin):
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(6), dtype=torch.float32)
    y = hadamard_transform(x)
    assert y.dtype == torch.float32
    ref = hadamard_transform(x.double())
    margin(f"relative error of float32, n={n}", (y.double() - ref).norm() / ref.norm(), below=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_dtype(dtype, margin):
    x = torch.randn(2, 576, generator=torch.Generator().manual_seed(7)).to(dtype)
    y = hadamard_transform(x)
    assert y.dtype == dtype
    ref = hadamard_transform(x.double())
    margin(f"relative error of {dtype}", (y.double() - ref).norm() / ref.norm(), below=5e-2)


def test_transform_is_differentiable():
    x = torch.randn(3, 48, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(hadamard_transform, (x,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [64, 576, 1536, 14336])
def test_cuda_matches_cpu(n):
    x = torch.randn(8, n, generator=torch.Generator().manual_seed(8))
    y = hadamard_transform(x.cuda())
    assert y.is_cuda and y.dtype == torch.float32
    torch.testing.assert_close(y.cpu(), hadamard_transform(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- random rotations


def _assert_orthogonal(q: torch.Tensor) -> None:
    eye = torch.eye(q.shape[0], dtype=torch.float64)
    torch.testing.assert_close(q.T @ q, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(q @ q.T, eye, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 12, 64, 160, 576])
def test_random_hadamard_matrix(n):
    q = random_hadamard_matrix(n, seed=0)
    assert q.shape == (n, n) and q.dtype == torch.float64
    _assert_orthogonal(q)
    assert torch.equal(q.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))
    assert torch.equal(q, random_hadamard_matrix(n, seed=0))
    if n >= 12:
        assert not torch.equal(q, random_hadamard_matrix(n, seed=1))
    # online form: x @ Q^T == transform(x * s)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x * random_signs(n, seed=0)), x @ q.T, rtol=0, atol=1e-12)


def test_random_signs():
    s = random_signs(1000, seed=3)
    assert s.shape == (1000,) and s.dtype == torch.float64
    assert bool((s.abs() == 1).all()) and 0 < int((s > 0).sum()) < 1000
    assert torch.equal(s, random_signs(1000, seed=3))
    assert not torch.equal(s, random_signs(1000, seed=4))
    assert random_signs(4, seed=0, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("n", [1, 9, 100])
def test_random_orthogonal_matrix(n):
    q = random_orthogonal_matrix(n, seed=5)
    assert q.shape == (n, n) and q.dtype == torch.float64
    _assert_orthogonal(q)
    assert torch.equal(q, random_orthogonal_matrix(n, seed=5))
    # QR of the seeded Gaussian with diag(R) > 0
    gauss = torch.randn(n, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    r = q.T @ gauss
    torch.testing.assert_close(torch.tril(r, diagonal=-1), torch.zeros(n, n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert bool((torch.diagonal(r) > 0).all())
    if n > 1:
        assert not torch.equal(q, random_orthogonal_matrix(n, seed=6))


def test_random_matrices_dtype():
    assert random_orthogonal_matrix(8, seed=0, dtype=torch.float32).dtype == torch.float32
    q = random_hadamard_matrix(12, seed=0, dtype=torch.float32)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q.double(), random_hadamard_matrix(12, seed=0), rtol=1e-7, atol=0)


def test_random_hadamard_falls_back_with_warning():
    with pytest.warns(UserWarning, match=r"n=9 .*random orthogonal matrix"):
        q = random_hadamard_matrix(9, seed=7)
    assert torch.equal(q, random_orthogonal_matrix(9, seed=7))
    _assert_orthogonal(q)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("n", [0, -1, 2.0, True, "4"])
def test_hadamard_matrix_rejects_bad_n(n):
    with pytest.raises(ValueError, match="n must be a positive int"):
        hadamard_matrix(n)


@pytest.mark.parametrize("n", [3, 6, 9, 18, 2752])
def test_hadamard_matrix_rejects_unconstructible(n):
    with pytest.raises(ValueError, match=rf"n={n} has no constructible.*allowed sizes"):
        hadamard_matrix(n)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        ([1.0, 2.0], "x must be a torch.Tensor"),
        (torch.tensor(1.0), "floating-point tensor with >= 1 dim"),
        (torch.ones(2, 4, dtype=torch.int64), "floating-point"),
        (torch.ones(2, 9), r"x.shape\[-1\]=9 has no constructible"),
        (torch.ones(2, 0), r"x.shape\[-1\] must be a positive int"),
    ],
)
def test_transform_rejects_bad_input(x, match):
    with pytest.raises(ValueError, match=match):
        hadamard_transform(x)


def test_random_functions_reject_bad_arguments():
    for fn in (random_signs, random_orthogonal_matrix, random_hadamard_matrix):
        with pytest.raises(ValueError, match="n must be a positive int"):
            fn(0, seed=0)
        with pytest.raises(ValueError, match="seed must be an int"):
            fn(4, seed=1.5)
