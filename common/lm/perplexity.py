"""Perplexity of a causal language model over fixed-length token windows."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    device: torch.device | None = None,
    desc: str = "perplexity",
    progress: bool = True,
) -> float:
    """``exp`` of the mean next-token negative log-likelihood over ``windows`` [n_windows, seqlen].

    Every window is scored independently; its first token is context only, so ``n_windows · (seqlen − 1)``
    tokens are predicted. ``model(input_ids).logits`` must be [batch, seqlen, vocab] (Hugging Face causal
    LMs); logits are upcast to float32 before the softmax.
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n_windows, seqlen >= 2], got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    device = device or next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    for batch in tqdm(windows.split(batch_size), desc=desc, disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        for logit_row, target_row in zip(logits, batch, strict=True):
            total_nll += F.cross_entropy(logit_row[:-1].float(), target_row[1:], reduction="sum").item()
            total_tokens += target_row.numel() - 1
    mean_nll = total_nll / total_tokens
    if not math.isfinite(mean_nll):
        raise FloatingPointError(f"{desc}: the model produced non-finite log-likelihoods")
    return math.exp(mean_nll)
