"""Per-image metrics of vit_quant.predictions against their textbook definitions (float64 references)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from vit_quant.predictions import Predictions, disagreements, predict, rounded


def _predictions(seed: int, n: int = 50, classes: int = 10) -> Predictions:
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, classes, generator=generator)
    labels = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(99))
    return Predictions(torch.log_softmax(logits, dim=1), labels)


def test_nll_is_the_cross_entropy_per_image() -> None:
    found = _predictions(0)
    expected = F.cross_entropy(found.log_probs.double(), found.labels, reduction="none")
    assert torch.allclose(found.nll(), expected, rtol=0, atol=1e-6)
    assert torch.equal(found.correct, found.log_probs.argmax(1) == found.labels)


def test_kl_from_the_reference_is_the_textbook_divergence() -> None:
    reference, other = _predictions(0), _predictions(1)
    p, q = reference.log_probs.double().exp(), other.log_probs.double().exp()
    expected = (p * (p.log() - q.log())).sum(dim=1)
    assert torch.allclose(other.kl_from(reference), expected, rtol=1e-9, atol=1e-9)
    assert torch.equal(reference.kl_from(reference), torch.zeros(50, dtype=torch.float64))
    assert (other.kl_from(reference) > 0).all()


def test_disagreements_count_differing_classes_right_or_wrong() -> None:
    assert disagreements(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 2, 1])) == 2


def test_predict_on_a_dataset_equals_predict_on_a_loader() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5))
    data = TensorDataset(torch.randn(23, 1, 4, 4), torch.randint(0, 5, (23,)))
    from_dataset = predict(model, data, batch_size=4, progress=False)
    from_loader = predict(model, DataLoader(data, batch_size=10), progress=False)
    assert torch.equal(from_dataset.log_probs, from_loader.log_probs) and from_dataset.log_probs.shape == (23, 5)
    assert torch.allclose(from_dataset.log_probs.exp().sum(1), torch.ones(23))


def test_rounded_keeps_six_significant_digits() -> None:
    assert rounded(torch.tensor([0.123456789, 1234.56789], dtype=torch.float64)) == [0.123457, 1234.57]
