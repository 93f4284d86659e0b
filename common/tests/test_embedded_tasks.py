"""The offline zero-shot tasks of common.lm.embedded_tasks: deterministic files, well-formed examples from
test documents only, rebuilt when damaged, scored by lm-eval offline as their definition says."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from common.lm import embedded_tasks
from common.lm.corpora import load_corpus
from common.lm.embedded_tasks import EMBEDDED_TASKS, EXAMPLES, MANIFEST, embedded_task_folder, embedded_task_identity

LAST_WORD, CLOZE = "last_word_embedded", "cloze_embedded"
SCORED = 8
"""Examples per task scored by the tiny model."""


def _examples(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return embedded_task_folder(tmp_path_factory.mktemp("cache"))


def test_generation_is_deterministic(folder: Path, tmp_path: Path) -> None:
    again = embedded_task_folder(tmp_path)
    assert again != folder and again.name == folder.name  # the key depends on the recipe, not the cache
    for name in EMBEDDED_TASKS:
        assert (again / f"{name}.jsonl").read_bytes() == (folder / f"{name}.jsonl").read_bytes()
    assert json.loads((again / MANIFEST).read_text()) == json.loads((folder / MANIFEST).read_text())


def test_tasks_have_their_size_and_are_not_trivial(folder: Path) -> None:
    for name in EMBEDDED_TASKS:
        examples = _examples(folder, name)
        assert len(examples) == EXAMPLES
        assert len({json.dumps(e, sort_keys=True) for e in examples}) == EXAMPLES
        assert {e["corpus"] for e in examples} == set(embedded_tasks.SOURCES)
    labels = [e["label"] for e in _examples(folder, CLOZE)]
    assert all(labels.count(k) > EXAMPLES / 8 for k in range(embedded_tasks.CHOICES))  # no position favoured


def _normalized(text: str) -> str:
    """The text without heading lines, its whitespace runs made single spaces (passages may span a heading)."""
    return " ".join(" ".join(line for line in text.split("\n") if not line.strip().startswith("=")).split())


def test_examples_come_from_test_documents_only(folder: Path) -> None:
    """Every example is test text; Wikipedia repeats a few sentences across articles, so 5 (last word) and 4
    (cloze) of the 1000 examples also occur in a calibration article (counted exactly: nothing here is random)."""
    test = {corpus: _normalized(load_corpus(corpus, "test")) for corpus in embedded_tasks.SOURCES}
    train = {corpus: _normalized(load_corpus(corpus, "train")) for corpus in embedded_tasks.SOURCES}
    also_in_train = {LAST_WORD: 0, CLOZE: 0}
    for example in _examples(folder, LAST_WORD):
        assert re.fullmatch(r"[A-Za-z]{4,}", example["target"])
        passage = f"{example['context']} {example['target']}"
        assert passage in test[example["corpus"]]
        also_in_train[LAST_WORD] += " ".join(passage.split()[-7:]) in train[example["corpus"]]
        if example["in_context"]:  # the word occurs in the sentences before the target's
            words = {w.strip(embedded_tasks._TRAILING_PUNCTUATION + "(").lower() for w in example["context"].split()}
            assert example["target"].lower() in words
    for example in _examples(folder, CLOZE):
        choices, label = example["choices"], example["label"]
        assert len(choices) == len(set(choices)) == embedded_tasks.CHOICES and 0 <= label < len(choices)
        sentence = f"{example['context']} {choices[label]}"
        assert sentence in test[example["corpus"]]
        also_in_train[CLOZE] += sentence in train[example["corpus"]]
        lengths = [len(choice.split()) for choice in choices]
        assert max(lengths) - min(lengths) <= 2 * embedded_tasks.LENGTH_SLACK_WORDS
    assert also_in_train == {LAST_WORD: 5, CLOZE: 4}


def test_identity_names_the_data(folder: Path) -> None:
    identity = embedded_task_identity([LAST_WORD, "piqa"], folder.parent.parent)
    assert list(identity) == [LAST_WORD]
    entry = identity[LAST_WORD]
    assert entry["examples"] == EXAMPLES and entry["seed"] == embedded_tasks.SEED
    assert entry["sha256"] == hashlib.sha256((folder / f"{LAST_WORD}.jsonl").read_bytes()).hexdigest()
    assert set(entry["sources"]) == set(embedded_tasks.SOURCES)


@pytest.mark.parametrize("damage", ["truncate", "edit", "delete data", "delete yaml", "delete manifest"])
def test_damaged_folder_is_rebuilt(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    folder = embedded_task_folder(tmp_path)
    data, original = folder / f"{CLOZE}.jsonl", (folder / f"{CLOZE}.jsonl").read_bytes()
    if damage == "truncate":
        data.write_bytes(original[: len(original) // 2])
    elif damage == "edit":
        data.write_bytes(original.replace(b'"label": 0', b'"label": 1', 1))
    elif damage == "delete data":
        data.unlink()
    elif damage == "delete yaml":
        (folder / f"{CLOZE}.yaml").unlink()
    else:
        (folder / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger=embedded_tasks.__name__):
        assert embedded_task_folder(tmp_path) == folder
    assert "rebuilding" in caplog.text
    assert data.read_bytes() == original and (folder / f"{CLOZE}.yaml").is_file()


# ---------------------------------------------------------------------------------------------------------
# Scored by lm-eval, offline, as defined
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def word_model(folder: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A random tiny Llama with a word-level tokenizer that knows every word of the scored examples."""
    words: set[str] = set()
    for example in _examples(folder, LAST_WORD)[:SCORED]:
        words |= {*example["context"].split(), example["target"]}
    for example in _examples(folder, CLOZE)[:SCORED]:
        words |= {*example["context"].split(), *(w for c in example["choices"] for w in c.split())}
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(words))}},
                                         unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[UNK]",
                                        eos_token="[UNK]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words) + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=0, bos_token_id=None, initializer_range=0.5)
    return LlamaForCausalLM(config).eval(), tokenizer


def _log_likelihoods(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """(sum of the continuation's log-probabilities, whether each of its tokens is the argmax)."""
    n_context = len(tokenizer(context).input_ids)
    ids = tokenizer(f"{context} {continuation}").input_ids
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    positions = range(n_context, len(ids))
    return (sum(logp[p - 1, ids[p]].item() for p in positions),
            all(logp[p - 1].argmax().item() == ids[p] for p in positions))


def _hand_scores(model, tokenizer, folder: Path) -> dict[str, float]:
    greedy = [_log_likelihoods(model, tokenizer, e["context"], e["target"])[1]
              for e in _examples(folder, LAST_WORD)[:SCORED]]
    hits = hits_norm = 0
    for example in _examples(folder, CLOZE)[:SCORED]:
        scores = [_log_likelihoods(model, tokenizer, example["context"], c)[0] for c in example["choices"]]
        normed = [s / len(c) for s, c in zip(scores, example["choices"], strict=True)]  # lm-eval: characters
        hits += max(range(len(scores)), key=scores.__getitem__) == example["label"]
        hits_norm += max(range(len(normed)), key=normed.__getitem__) == example["label"]
    return {f"{LAST_WORD}_acc": 100 * sum(greedy) / SCORED, f"{CLOZE}_acc": 100 * hits / SCORED,
            f"{CLOZE}_acc_norm": 100 * hits_norm / SCORED}


def test_lm_eval_scores_them_offline_as_defined(word_model, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from common.lm import zeroshot

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: pytest.fail(f"network use: {address}"))
    monkeypatch.setattr(zeroshot, "embedded_task_folder", lambda: folder)
    model, tokenizer = word_model
    scores = zeroshot.zero_shot_metrics(model, tokenizer, list(EMBEDDED_TASKS), limit=SCORED, batch_size=3,
                                        progress=False)
    expected = _hand_scores(model, tokenizer, folder)
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value), key
        assert f"{key}_stderr" in scores
    assert len({scores[f"{CLOZE}_acc"], scores[f"{CLOZE}_acc_norm"], 0.0, 100.0}) >= 2  # not all degenerate


@pytest.mark.slow
def test_embedded_model_scores_far_above_chance(margin) -> None:
    """The full-precision SmolLM2 on the first 40 examples of each task (the whole tasks: README)."""
    from common.llama.loading import load_llama
    from common.lm.zeroshot import zero_shot_metrics

    model, tokenizer = load_llama("embedded")
    scores = zero_shot_metrics(model.eval(), tokenizer, list(EMBEDDED_TASKS), limit=40, progress=False)
    # chance: 25 % for 4 choices; a greedy match of a whole word by chance is ~0
    margin("cloze_embedded acc_norm % (40 examples, chance 25)", scores[f"{CLOZE}_acc_norm"], above=45.0)
    margin("last_word_embedded acc % (40 examples, chance ~0)", scores[f"{LAST_WORD}_acc"], above=10.0)
