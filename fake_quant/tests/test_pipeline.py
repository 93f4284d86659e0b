"""The fake_quant entry point end to end on a tiny random Llama (fast, offline)."""

from __future__ import annotations

import csv
import json
import math

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import common.lm.corpora as corpora
from common.config import make_config
from common.lm.perplexity import perplexity
from common.methods import METHOD_NAMES, METHODS
from common.tests.llama_fixtures import (
    SENTENCES,
    CharTokenizer,
    install_tiny_model,
    tiny_llama,
)
from fake_quant import main as fq_main
from fake_quant.settings import LlamaRunConfig


def _config(results_dir, **overrides) -> LlamaRunConfig:
    settings = {
        "name": "tiny", "calib_dataset": "tiny_text", "eval_datasets": ["tiny_text"], "nsamples": 8, "seqlen": 32,
        "eval_max_windows": 6, "calib_batch_size": 3, "device": "cpu", "results_dir": str(results_dir),
        "w_clip": False,
    }
    return LlamaRunConfig(**{**settings, **overrides})


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_run_writes_every_column(tiny_setup):
    csv_path, json_path = fq_main.run(_config(tiny_setup))
    rows = {row["metric"]: row for row in _read_csv(csv_path)}
    assert set(rows) == {"tiny_text_ppl", "tiny_text_ppl_vs_gptq_low", "tiny_text_ppl_vs_gptq_high"}
    row = rows["tiny_text_ppl"]
    low, high = rows["tiny_text_ppl_vs_gptq_low"], rows["tiny_text_ppl_vs_gptq_high"]
    for method in ("fp", "rtn", "gptaq"):  # the interval of the ratio to GPTQ holds the measured ratio
        ratio = float(row[method]) / float(row["gptq"])
        assert float(low[method]) <= ratio * (1 + 1e-5) and ratio <= float(high[method]) * (1 + 1e-5)
    assert row["metric"] == "tiny_text_ppl" and row["setting"] == "W4A4" and row["higher_is_better"] == "False"
    values = {m: float(row[m]) for m in ("fp", "rtn", "gptq", "gptaq")}
    assert all(v > 1 for v in values.values())
    windows = corpora.evaluation_windows(CharTokenizer(), "tiny_text", seqlen=32, max_windows=6)
    unrotated = perplexity(tiny_llama(), windows, progress=False)
    assert values["fp"] == pytest.approx(unrotated, rel=1e-4)  # the rotation preserves the function
    meta = json.loads(json_path.read_text())
    assert meta["tree"] == "fake_quant" and meta["seed"] == 0 and meta["rotation"]["mode"] == "hadamard"
    assert {len(meta["layers"][m]) for m in ("gptq", "gptaq")} == {14}
    assert all(record["output_error"] >= 0 for record in meta["layers"]["gptaq"])
    assert {"load and rotate", "quantize gptaq", "evaluate gptaq"} <= meta["seconds"].keys()


def test_every_method_of_the_registry_runs_through_the_tree(tiny_setup):
    csv_path, json_path = fq_main.run(_config(tiny_setup, methods=list(METHOD_NAMES), qep_exclude=["mlp.down_proj"]))
    row = next(row for row in _read_csv(csv_path) if row["metric"] == "tiny_text_ppl")
    header = next(csv.reader(csv_path.open()))
    assert header[4:4 + len(METHOD_NAMES)] == list(METHOD_NAMES)
    values = {m: float(row[m]) for m in METHOD_NAMES}
    assert all(v > 1 for v in values.values()) and len({values[m] for m in ("gptq", "gptaq", "qep", "qronos")}) == 4
    layers = json.loads(json_path.read_text())["layers"]
    assert {m for m in METHOD_NAMES if METHODS[m].quantized} == layers.keys()


def test_rerun_keeps_earlier_results(tiny_setup):
    config = _config(tiny_setup, methods=["fp", "rtn"])
    fq_main.run(config)
    fq_main.run(config)
    history = sorted(p.suffix for p in (tiny_setup / "history").iterdir())
    assert history == [".csv", ".json"]
    assert (tiny_setup / "tiny.csv").exists()


def test_saved_model_evaluates_identically(tiny_setup):
    saved = tiny_setup / "qmodel"
    csv_path, _ = fq_main.run(_config(tiny_setup, methods=["gptaq"], model_loading="whole",
                                      save_qmodel_path=str(saved)))
    first = _read_csv(csv_path)[0]["gptaq"]
    assert json.loads((saved / "settings.json").read_text())["settings"]["seed"] == 0
    csv_path, json_path = fq_main.run(_config(tiny_setup, name="reloaded", model_loading="whole",
                                                      load_qmodel_path=str(saved)))
    assert _read_csv(csv_path)[0]["gptaq"] == first
    assert json.loads(json_path.read_text())["layers"] == {}  # evaluated without calibrating


@pytest.mark.parametrize("path", sorted(fq_main.CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = make_config(LlamaRunConfig, yaml_path=path)
    assert config.run_name.startswith("fake_quant-")


def test_same_config_and_seed_give_byte_identical_csv(tiny_setup):
    first, _ = fq_main.run(_config(tiny_setup / "a", methods=["rtn", "gptaq"]))
    second, _ = fq_main.run(_config(tiny_setup / "b", methods=["rtn", "gptaq"]))
    assert first.read_bytes().replace(b"/a,", b"/b,") == second.read_bytes()


TASK_ITEMS = [
    {"question": "the river flows", "choices": ["north", "loud"], "label": 0},
    {"question": "the town grew around", "choices": ["years", "them"], "label": 1},
    {"question": "in winter the water", "choices": ["freezes", "built"], "label": 0},
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
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
metadata:
  version: 1.0
"""


def _word_tokenizer() -> PreTrainedTokenizerFast:
    words = {w.strip(".,") for text in SENTENCES for w in text.split()}
    words |= {w for item in TASK_ITEMS for w in [*item["question"].split(), *item["choices"]]}
    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(sorted(words))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[UNK]",
                                   eos_token="[UNK]")


@pytest.fixture
def local_tasks(tiny_setup, monkeypatch):
    folder = tiny_setup / "tasks"
    folder.mkdir()
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in TASK_ITEMS))
    (folder / "river_mc.yaml").write_text(TASK_YAML.format(name="river_mc", data=data))
    (folder / "river_missing.yaml").write_text(TASK_YAML.format(name="river_missing", data=folder / "absent.jsonl"))
    install_tiny_model(monkeypatch, _word_tokenizer())
    return folder


def test_zero_shot_rows_through_lm_eval_offline(local_tasks):
    config = _config(local_tasks.parent / "results", methods=["fp", "gptaq"], model_loading="whole",
                     tasks=["river_mc"],
                     tasks_include_path=str(local_tasks))
    csv_path, json_path = fq_main.run(config)
    rows = {row["metric"]: row for row in _read_csv(csv_path)}
    assert set(rows) == {"tiny_text_ppl", "river_mc_acc", "river_mc_acc_stderr"}
    per_example = json.loads(json_path.read_text())["per_example"][config.setting]
    for method in ("fp", "gptaq"):  # the data behind each number, kept for paired comparisons
        outcomes = per_example[method]["river_mc_acc"]
        assert len(outcomes) == 3 and set(outcomes) <= {"0", "1"}
        assert float(rows["river_mc_acc"][method]) == pytest.approx(100 * outcomes.count("1") / 3, rel=1e-5)
        nlls = per_example[method]["tiny_text_ppl"]  # nats per token, per window
        assert float(rows["tiny_text_ppl"][method]) == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    assert rows["river_mc_acc"]["higher_is_better"] == "True"
    assert rows["river_mc_acc_stderr"]["higher_is_better"] == "False"
    for method in ("fp", "gptaq"):  # three items: the accuracy is a multiple of a third
        assert round(float(rows["river_mc_acc"][method]) * 3 / 100, 4) in (0, 1, 2, 3)


def test_unloadable_task_fails_before_calibrating(local_tasks, capsys):
    results = local_tasks.parent / "results"
    code = fq_main.main(["--results_dir", str(results), "--calib_dataset", "tiny_text", "--eval_datasets",
                         "tiny_text", "--seqlen", "32", "--model_loading", "whole",
                         "--tasks", "river_missing", "--tasks_include_path",
                         str(local_tasks)])
    assert code == 2
    assert "cannot load zero-shot task 'river_missing'" in capsys.readouterr().err
    assert not results.exists()
