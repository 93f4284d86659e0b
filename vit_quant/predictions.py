"""A classifier's predictions on evaluation data and the per-image metrics drawn from them.

Top-1 ties whenever two models are right on the same images; these metrics resolve smaller differences, each
per image so that two methods compare with a paired interval (:mod:`common.results.intervals`):

* ``test_nll``: the cross-entropy ``−log p(label | image)`` (nats);
* ``fp_kl``: the KL divergence ``Σ_c p_fp(c) (log p_fp(c) − log p(c))`` of the model's class distribution from
  the full-precision model's (nats);
* disagreements: the images on which two models' top-1 classes differ (right or wrong).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Predictions:
    """Log-probabilities [N, C] (float32, CPU) of a model on N images, with their labels [N] (int64)."""

    log_probs: torch.Tensor
    labels: torch.Tensor

    @property
    def predicted(self) -> torch.Tensor:
        """Top-1 class per image, int64 [N]."""
        return self.log_probs.argmax(dim=1)

    @property
    def correct(self) -> torch.Tensor:
        """Whether the top-1 class is the label, bool [N]."""
        return self.predicted == self.labels

    def nll(self) -> torch.Tensor:
        """Cross-entropy per image, ``−log p(label)``, float64 [N] (nats)."""
        return -self.log_probs.gather(1, self.labels[:, None])[:, 0].double()

    def kl_from(self, reference: Predictions) -> torch.Tensor:
        """``KL(p_reference ‖ p_self)`` per image, float64 [N] (nats); the same images in the same order."""
        if reference.log_probs.shape != self.log_probs.shape:
            raise ValueError(f"predictions of different data: {tuple(reference.log_probs.shape)} and "
                             f"{tuple(self.log_probs.shape)}")
        ref, own = reference.log_probs.double(), self.log_probs.double()
        return (ref.exp() * (ref - own)).sum(dim=1).clamp_min(0.0)


def disagreements(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of images whose top-1 classes ``a`` and ``b`` (int64 [N] each) differ."""
    return int((a != b).sum())


@torch.no_grad()
def predict(model: torch.nn.Module, data: Dataset | DataLoader, *, batch_size: int = 500,
            device: torch.device | None = None, progress: bool = True) -> Predictions:
    """``model``'s log-softmax over the classes for every example of ``data``, in order.

    ``data`` is a dataset of ``(image [C, H, W], label)`` pairs (batched here with ``batch_size``) or a
    DataLoader of ``(images [B, C, H, W], labels [B])``. ``device`` defaults to the model's; the model's
    train/eval mode is restored afterwards. Raises ``ValueError`` on empty data.
    """
    device = device or next(model.parameters()).device
    model.to(device)
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    was_training = model.training
    model.eval()
    log_probs, labels = [], []
    for images, batch_labels in tqdm(loader, desc="predict", disable=not progress, leave=False):
        logits = model(images.to(device)).float()
        log_probs.append(torch.log_softmax(logits, dim=1).cpu())
        labels.append(batch_labels.cpu().long())
    model.train(was_training)
    if not labels:
        raise ValueError("predict: empty dataset")
    return Predictions(torch.cat(log_probs), torch.cat(labels))


def rounded(values: torch.Tensor) -> list[float]:
    """Per-image values as JSON stores them: 6 significant digits (their mean is the CSV's value)."""
    return [float(f"{value:.6g}") for value in values.tolist()]
