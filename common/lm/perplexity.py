"""Perplexity of a causal language model over fixed-length token windows."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

from common.engine.wiring import inputs_of
from common.rules import check_positive

NLL_ROWS = 256
"""Positions per softmax in :func:`window_nlls`."""


@torch.no_grad()
def window_nlls(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    device: torch.device | None = None,
    desc: str = "perplexity",
    progress: bool = True,
) -> list[float]:
    """The summed next-token negative log-likelihood (nats) of each of ``windows`` [n_windows, seqlen].

    Every window is scored independently; its first token is context only, so each sum is over
    ``seqlen − 1`` predicted tokens. ``model(input_ids).logits`` must be [batch, seqlen, vocab] (Hugging Face
    causal LMs); logits are upcast to float32 before the softmax. Both run on :data:`NLL_ROWS` positions at a
    time: a whole window's logits and log-probabilities are 96 MiB each for 512 tokens of a 49k vocabulary.
    (A ``LlamaForCausalLM``'s head is applied to the decoder's output a slice of positions at a time, the
    same numbers as its whole logits; any other model's logits are computed whole.) Raises
    ``FloatingPointError`` naming ``desc`` if a sum is not finite.
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n_windows, seqlen >= 2], got shape {tuple(windows.shape)}")
    check_positive("batch_size", batch_size)
    device = device or next(model.parameters()).device
    sums = []
    for batch in tqdm(windows.split(batch_size), desc=desc, disable=not progress, leave=False):
        batch = batch.to(device)
        for logit_parts, target_row in zip(_logit_slices(model, batch), batch, strict=True):
            sums.append(sum(F.cross_entropy(part.float(), targets, reduction="sum").item()
                            for part, targets in zip(logit_parts, target_row[1:].split(NLL_ROWS), strict=True)))
    if not all(math.isfinite(value) for value in sums):
        raise FloatingPointError(f"{desc}: the model produced non-finite log-likelihoods")
    return sums


def _logit_slices(model: nn.Module, batch: torch.Tensor) -> Iterator[Iterator[torch.Tensor]]:
    """For each window of ``batch`` [b, seqlen], its logits of positions ``0..seqlen−2`` in slices of
    :data:`NLL_ROWS` (each ``[≤ NLL_ROWS, vocab]``)."""
    if isinstance(model, LlamaForCausalLM):
        hidden = model.get_decoder()(input_ids=batch, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        return ((head(part) for part in row[:-1].split(NLL_ROWS)) for row in hidden)
    logits = model(input_ids=batch, use_cache=False).logits
    return (iter(row[:-1].split(NLL_ROWS)) for row in logits)


@torch.no_grad()
def blockwise_window_nlls(
    embedded: Callable[[], AbstractContextManager[LlamaForCausalLM]],
    load_block: Callable[[int], nn.Module],
    final: Callable[[], tuple[nn.Module, nn.Linear]],
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    device: torch.device | None = None,
    desc: str = "perplexity",
    progress: bool = True,
) -> list[float]:
    """:func:`window_nlls` of a model held one block at a time: every window through block ``i`` before block
    ``i + 1`` (GPTQ's layer-by-layer evaluation), the same numbers as the whole model's.

    Args:
        embedded: a context manager holding the model with its embedding (and rotary buffers) materialised; its
            blocks may be on ``meta`` (:meth:`common.llama.blockwise.BlockwiseLlama.embedded`). It is entered
            once, to compute the first block's inputs.
        load_block: block ``i`` with its weights (moved to ``device`` here and released after use).
        final: the final norm and the head, with their weights.
        windows, batch_size, device, desc, progress: as :func:`window_nlls`.

    Memory: the hidden states of every window (``windows × seqlen × hidden`` values in the model's dtype) on
    ``device``, one block, then the head with :data:`NLL_ROWS` positions of logits.
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n_windows, seqlen >= 2], got shape {tuple(windows.shape)}")
    check_positive("batch_size", batch_size)
    device = device or torch.device("cpu")
    batches = windows.split(batch_size)
    with embedded() as model:
        decoder = model.get_decoder()
        decoder.embed_tokens.to(device)
        decoder.rotary_emb.to(device)
        runs = [lambda batch=batch: decoder(input_ids=batch.to(device), use_cache=False) for batch in batches]
        hidden, kwargs = inputs_of(decoder.layers[0], runs)
        blocks = len(decoder.layers)
    for index in tqdm(range(blocks), desc=desc, disable=not progress, leave=False):
        block = load_block(index).to(device)
        hidden = [_block_output(block(states, **arguments)) for states, arguments in zip(hidden, kwargs, strict=True)]
        del block
    norm, head = (module.to(device) for module in final())
    sums = []
    for states, batch in zip(hidden, batches, strict=True):
        for row, target_row in zip(norm(states), batch.to(device), strict=True):
            sums.append(sum(F.cross_entropy(head(part).float(), targets, reduction="sum").item()
                            for part, targets in zip(row[:-1].split(NLL_ROWS), target_row[1:].split(NLL_ROWS),
                                                     strict=True)))
    if not all(math.isfinite(value) for value in sums):
        raise FloatingPointError(f"{desc}: the model produced non-finite log-likelihoods")
    return sums


def _block_output(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def perplexity_of(nll_sums: list[float], seqlen: int) -> float:
    """``exp`` of the mean next-token NLL, from :func:`window_nlls`' sums of windows of ``seqlen`` tokens."""
    return math.exp(sum(nll_sums) / (len(nll_sums) * (seqlen - 1)))


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    device: torch.device | None = None,
    desc: str = "perplexity",
    progress: bool = True,
) -> float:
    """``exp`` of the mean next-token negative log-likelihood over ``windows`` [n_windows, seqlen]
    (:func:`window_nlls`, same arguments and errors)."""
    sums = window_nlls(model, windows, batch_size=batch_size, device=device, desc=desc, progress=progress)
    return perplexity_of(sums, windows.shape[1])
