"""Tiny offline stand-ins shared by the Llama trees' tests: a random Llama, a byte tokenizer, a small corpus.

A pytest plugin (see the repository's ``conftest.py``): the fixture :func:`tiny_setup` is available to every test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import common.lm.corpora as corpora
from common.llama import experiment

SENTENCES = [
    "The river flows north through the valley and reaches the sea after many miles.",
    "Early settlers built mills along its banks, and the town grew around them.",
    "In winter the water freezes near the shore, while the centre keeps moving.",
    "Scientists measured the temperature of the water every hour for ten years.",
]
TINY_CORPUS = "tiny_text"


class CharTokenizer:
    """One id per byte, plus a BOS id 0 at the start of each call (like Llama's tokenizer)."""

    def __call__(self, text: str, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        ids = [0] + [min(b, 254) + 1 for b in text.encode("utf-8")]
        return {"input_ids": torch.tensor([ids], dtype=torch.long)}


def tiny_llama(layers: int = 2) -> LlamaForCausalLM:
    """A seeded random Llama (vocab 256, hidden 64, 4 heads / 2 KV heads, tied embeddings, non-unit norms)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def install_tiny_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the corpus ``tiny_text`` (train and test splits made of :data:`SENTENCES`)."""
    texts = {"train": " ".join(SENTENCES * 40), "test": " ".join(reversed(SENTENCES * 10))}
    monkeypatch.setitem(corpora.CORPORA, TINY_CORPUS, lambda split: texts[split])


def install_tiny_model(monkeypatch: pytest.MonkeyPatch, tokenizer: object | None = None,
                       folder: Path | None = None) -> None:
    """Make every Llama run load :func:`tiny_llama` with ``tokenizer`` (default :class:`CharTokenizer`); with
    ``folder``, the model is saved there (safetensors) and every run reads it from there (in memory with
    ``from_pretrained``, or one block at a time)."""
    tokenizer = tokenizer if tokenizer is not None else CharTokenizer()
    monkeypatch.setattr(experiment, "load_llama_model", lambda model, dtype: tiny_llama().to(dtype))
    monkeypatch.setattr(experiment, "load_llama_config", lambda model: tiny_llama().config)
    monkeypatch.setattr(experiment, "load_llama_tokenizer", lambda model: tokenizer)
    if folder is not None:  # both paths read the saved model, as they read a real checkpoint folder
        if not (folder / "config.json").is_file():
            tiny_llama().save_pretrained(folder)
        monkeypatch.setattr(experiment, "checkpoint_folder", lambda model: folder)
        monkeypatch.setattr(experiment, "load_llama_model",
                            lambda model, dtype: LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval())


@pytest.fixture
def tiny_setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A temporary folder, with :data:`TINY_CORPUS` registered and every Llama run loading :func:`tiny_llama`."""
    install_tiny_corpus(monkeypatch)
    install_tiny_model(monkeypatch, folder=tmp_path / "tiny-model")
    return tmp_path
