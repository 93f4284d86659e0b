"""Cayley SGD: the iterates stay orthogonal, descend, and match the algorithm's first-order step."""

from __future__ import annotations

import pytest
import torch

from common.quant.hadamard import random_orthogonal_matrix
from spinquant.cayley import CayleySGD

pytestmark = pytest.mark.numerics  # float results against references: CI reruns them on other kernels


def _orthogonality_error(x: torch.Tensor) -> float:
    x = x.double()
    return (x.T @ x - torch.eye(x.shape[0], dtype=torch.float64)).abs().max().item()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_iterates_stay_orthogonal_to_float_precision(momentum: float, margin) -> None:
    generator = torch.Generator().manual_seed(0)
    start = random_orthogonal_matrix(48, seed=1, dtype=torch.float32)
    param = torch.nn.Parameter(start.clone())
    optimizer = CayleySGD([param], lr=1.5, momentum=momentum)
    for _ in range(300):
        param.grad = torch.randn(48, 48, generator=generator) * 10
        optimizer.step()
    # The float64 master starts from the float32 matrix and keeps its (float32-sized) deviation: no drift.
    drift = abs(_orthogonality_error(optimizer.state[param]["master"]) - _orthogonality_error(start))
    margin("change of the float64 master's |XᵀX − I|", drift, below=1e-12)
    margin("|XᵀX − I| of the float32 parameter", _orthogonality_error(param), below=1e-6)
    torch.testing.assert_close(param.double(), optimizer.state[param]["master"], rtol=0, atol=1e-7)
    margin("max change of X (it moved far)", (param.detach() - start).abs().max(), above=0.1)


def test_float64_iterates_are_orthogonal_to_rounding(margin) -> None:
    generator = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(random_orthogonal_matrix(48, seed=1))
    optimizer = CayleySGD([param], lr=1.5, momentum=0.9)
    for _ in range(300):
        param.grad = torch.randn(48, 48, generator=generator, dtype=torch.float64)
        optimizer.step()
    margin("|XᵀX − I| after 300 steps", _orthogonality_error(param), below=1e-12)


def test_minimizes_a_procrustes_objective(margin) -> None:
    """``f(X) = ‖X − A‖²`` over orthogonal ``X`` is minimised at ``X = A`` (``A`` orthogonal).

    The Cayley transform stays in ``X``'s connected component, so ``A`` is given ``X``'s determinant.
    """
    start = random_orthogonal_matrix(16, seed=3)
    target = random_orthogonal_matrix(16, seed=2)
    target[:, 0] *= torch.sign(torch.linalg.det(start) * torch.linalg.det(target))
    param = torch.nn.Parameter(start)
    optimizer = CayleySGD([param], lr=0.2, momentum=0.5)
    losses = []
    for _ in range(200):
        optimizer.zero_grad()
        loss = (param - target).pow(2).sum()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    margin("last / first loss", losses[-1] / losses[0], below=1e-8)
    torch.testing.assert_close(param.detach(), target, rtol=0, atol=1e-5)


def test_small_step_is_minus_alpha_w_x(margin) -> None:
    """The Cayley retraction's first-order term: ``X − α W X`` with ``W = ½ (G Xᵀ − X Gᵀ)`` (square ``X``)."""
    x = random_orthogonal_matrix(12, seed=4)
    grad = torch.randn(12, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    lr = 1e-5
    param = torch.nn.Parameter(x.clone())
    param.grad = grad.clone()
    CayleySGD([param], lr=lr).step()
    w = 0.5 * (grad @ x.T - x @ grad.T)
    expected = x - lr * w @ x
    moved = (param.detach() - x).abs().max().item()
    margin("max change of X (O(lr))", moved, above=1e-6)
    margin("distance to X − αWX / change (O(lr))", (param.detach() - expected).abs().max() / moved, below=1e-3)


def test_step_is_bounded_by_q(margin) -> None:
    """``α = min(lr, 2q / ‖W‖)``: a huge gradient still moves ``X`` by a bounded amount."""
    x = random_orthogonal_matrix(8, seed=6)
    param = torch.nn.Parameter(x.clone())
    param.grad = 1e6 * torch.randn(8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    CayleySGD([param], lr=100.0, q=0.5).step()
    margin("|XᵀX − I|", _orthogonality_error(param), below=1e-12)
    margin("‖X' − X‖_F", torch.linalg.matrix_norm(param.detach() - x), below=2 * (8**0.5))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lr": 0.0}, "lr must be > 0"), ({"lr": 1.0, "momentum": 1.0}, r"momentum must be in \[0, 1\)"),
     ({"lr": 1.0, "q": 0.0}, "q must be > 0")],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CayleySGD([torch.nn.Parameter(torch.eye(4))], **kwargs)


def test_non_square_parameter_is_refused() -> None:
    with pytest.raises(ValueError, match=r"square \[n, n\] parameters, got shape \(4, 3\)"):
        CayleySGD([torch.nn.Parameter(torch.zeros(4, 3))], lr=1.0)
