"""Perplexity against its definition computed naively in float64."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from common.lm.perplexity import NLL_ROWS, perplexity, window_nlls
from common.tests.llama_fixtures import tiny_llama

pytestmark = pytest.mark.numerics


class BigramModel(nn.Module):
    """Logits of the next token from the current one alone (enough to give every position its own row)."""

    def __init__(self, vocab: int = 50) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table(input_ids) * 3.0)


def test_window_nlls_are_the_summed_next_token_nll():
    model = BigramModel()
    seqlen = NLL_ROWS * 2 + 37  # several softmax chunks and a partial one
    windows = torch.randint(0, 50, (3, seqlen), generator=torch.Generator().manual_seed(1))
    got = window_nlls(model, windows, batch_size=2, progress=False)
    expected = []
    for window in windows.detach():
        with torch.no_grad():
            log_probs = torch.log_softmax(model(window[None]).logits[0, :-1].double(), dim=-1)
        expected.append(float(-log_probs.gather(1, window[1:, None]).sum()))
    assert got == pytest.approx(expected, rel=1e-6)
    assert perplexity(model, windows, progress=False) == pytest.approx(
        math.exp(sum(expected) / (3 * (seqlen - 1))), rel=1e-6)


class Whole(nn.Module):
    """Any causal LM that is not a LlamaForCausalLM: its logits are computed whole."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, use_cache=False):
        return self.inner(input_ids=input_ids, use_cache=use_cache)


def test_llama_head_by_slices_gives_the_whole_logits_nll():
    model = tiny_llama()
    windows = torch.randint(0, 256, (2, NLL_ROWS + 20), generator=torch.Generator().manual_seed(2))
    sliced = window_nlls(model, windows, batch_size=2, progress=False)
    whole = window_nlls(Whole(model), windows, batch_size=2, progress=False)
    assert sliced == pytest.approx(whole, rel=1e-6)
