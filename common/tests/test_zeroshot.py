"""zero_shot_metrics on a tiny random Llama and small local lm-eval tasks (offline)."""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from common.lm.zeroshot import ZeroShotUnavailableError, zero_shot_metrics

# Single-word answers, distinct across items; label = index of the gold choice.
ITEMS = [
    {"question": "the sky is", "choices": ["blue", "green", "loud"], "label": 0},
    {"question": "fire is", "choices": ["cold", "hot"], "label": 1},
    {"question": "a cat says", "choices": ["woof", "moo", "meow"], "label": 2},
    {"question": "snow is", "choices": ["white", "black"], "label": 0},
    {"question": "the sun rises in the", "choices": ["west", "east", "north"], "label": 1},
    {"question": "two plus two is", "choices": ["four", "seven"], "label": 0},
]

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
{metrics}
metadata:
  version: 1.0
"""


def _write_task(folder: Path, name: str, data: Path, metrics: list[str]) -> None:
    lines = "\n".join(f"  - {{metric: {metric}, aggregation: mean, higher_is_better: true}}" for metric in metrics)
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, metrics=lines))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tasks ``tiny_mc`` (acc, acc_norm), ``tiny_mc_acc`` (acc only), ``tiny_missing`` (no data file), ``tiny_hub``."""
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    _write_task(folder, "tiny_mc", data, ["acc", "acc_norm"])
    _write_task(folder, "tiny_mc_acc", data, ["acc"])
    _write_task(folder, "tiny_missing", folder / "absent.jsonl", ["acc"])
    # A Hub dataset that exists nowhere, so no datasets cache can hold it.
    (folder / "tiny_hub.yaml").write_text(
        "task: tiny_hub\ndataset_path: gptaq-repro-tests/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: question\ndoc_to_choice: choices\ndoc_to_target: label\n"
    )
    return folder


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the items' words: one token per word, no special tokens added."""
    words = sorted({w for item in ITEMS for text in [item["question"], *item["choices"]] for w in text.split()})
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<pad>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(2)  # with this seed acc (50 %) and acc_norm (33 %) differ, by clear log-likelihood margins
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def _hand_accuracies(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> tuple[float, float]:
    """(acc, acc_norm) in percent: argmax of the choices' summed log-likelihoods, raw and per character."""
    hits = hits_norm = 0
    for item in ITEMS:
        n_context = len(tokenizer(item["question"]).input_ids)
        scores = []
        for choice in item["choices"]:
            ids = tokenizer(f"{item['question']} {choice}").input_ids
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            ll = sum(logp[pos - 1, ids[pos]].item() for pos in range(n_context, len(ids)))
            scores.append((ll, ll / len(choice)))
        hits += max(range(len(scores)), key=lambda i: scores[i][0]) == item["label"]
        hits_norm += max(range(len(scores)), key=lambda i: scores[i][1]) == item["label"]
    return 100 * hits / len(ITEMS), 100 * hits_norm / len(ITEMS)


def test_matches_hand_computation_and_is_deterministic(model, tokenizer, task_dir):
    tasks = ["tiny_mc", "tiny_mc_acc"]
    scores = zero_shot_metrics(model, tokenizer, tasks, batch_size=4, include_path=task_dir, progress=False)
    acc, acc_norm = _hand_accuracies(model, tokenizer)
    assert acc != acc_norm  # so the metric choice is visible
    assert set(scores) == {"tiny_mc_acc", "tiny_mc_acc_stderr", "tiny_mc_acc_norm", "tiny_mc_acc_norm_stderr",
                           "tiny_mc_acc_acc", "tiny_mc_acc_acc_stderr", "average_acc"}
    assert scores["tiny_mc_acc"] == pytest.approx(acc)
    assert scores["tiny_mc_acc_norm"] == pytest.approx(acc_norm)
    assert scores["tiny_mc_acc_acc"] == pytest.approx(acc)
    assert scores["average_acc"] == pytest.approx((acc_norm + acc) / 2)  # acc_norm where a task reports it
    n = len(ITEMS)  # lm-eval's closed form for the standard error of a mean of 0/1 outcomes, in points
    for key, value in [("tiny_mc_acc", acc), ("tiny_mc_acc_norm", acc_norm)]:
        p = value / 100
        assert scores[f"{key}_stderr"] == pytest.approx(100 * (p * (1 - p) / (n - 1)) ** 0.5)
    assert all(0.0 <= value <= 100.0 for value in scores.values())
    again = zero_shot_metrics(model, tokenizer, tasks, batch_size=2, include_path=task_dir, progress=False)
    assert again == scores


def test_rigged_model_gets_expected_accuracy(model, tokenizer, task_dir):
    # Push the logits towards the gold word of items 0-3 and a wrong word of items 4-5: 4/6 correct.
    favoured = [item["choices"][item["label"]] for item in ITEMS[:4]] + ["north", "seven"]
    bias = torch.zeros(len(tokenizer))
    bias[tokenizer.convert_tokens_to_ids(favoured)] = 30.0
    handle = model.lm_head.register_forward_hook(lambda _module, _inputs, logits: logits + bias)
    try:
        scores = zero_shot_metrics(model, tokenizer, ["tiny_mc"], include_path=task_dir, progress=False)
    finally:
        handle.remove()
    assert scores["tiny_mc_acc"] == pytest.approx(100 * 4 / 6)


def test_limit_scores_first_documents(model, tokenizer, task_dir):
    scores = zero_shot_metrics(model, tokenizer, ["tiny_mc"], limit=2, include_path=task_dir, progress=False)
    assert scores["tiny_mc_acc"] in (0.0, 50.0, 100.0)


def test_unknown_task_raises_value_error(model, tokenizer, task_dir):
    with pytest.raises(ValueError, match="no_such_task_xyz"):
        zero_shot_metrics(model, tokenizer, ["tiny_mc", "no_such_task_xyz"], include_path=task_dir)


def test_untied_head_with_tied_config_is_refused(model, tokenizer, task_dir):
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = True
    tied = LlamaForCausalLM(config).eval()
    assert "tiny_mc_acc" in zero_shot_metrics(tied, tokenizer, ["tiny_mc"], include_path=task_dir, progress=False)
    tied.lm_head.weight = torch.nn.Parameter(tied.lm_head.weight.detach().clone())  # e.g. quantized head only
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        zero_shot_metrics(tied, tokenizer, ["tiny_mc"], include_path=task_dir)


def test_missing_local_data_raises_unavailable(model, tokenizer, task_dir):
    with pytest.raises(ZeroShotUnavailableError, match="tiny_missing") as info:
        zero_shot_metrics(model, tokenizer, ["tiny_missing"], include_path=task_dir)
    assert "\n" not in str(info.value)


def test_hub_task_offline_fails_fast(model, tokenizer, task_dir, monkeypatch):
    """Offline, a Hub task is refused at once: no connection is even attempted (nothing to wait for)."""
    # What HF_HUB_OFFLINE=1 does when set before import, patched here to avoid a second process (~25 s).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts = []

    def refuse(self, address):
        attempts.append(address)
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(ZeroShotUnavailableError, match=r"'tiny_hub'.*no-such-dataset"):
        zero_shot_metrics(model, tokenizer, ["tiny_hub"], include_path=task_dir)
    assert attempts == []
