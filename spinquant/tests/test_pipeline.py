"""The spinquant entry point end to end on a tiny random Llama (fast, offline)."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from common.config import make_config
from common.lm.corpora import evaluation_windows
from common.lm.perplexity import perplexity
from common.tests.llama_fixtures import (
    TINY_CORPUS,
    CharTokenizer,
    tiny_llama,
)
from spinquant import main as sq_main
from spinquant.settings import SpinQuantConfig


def _config(folder, **overrides) -> SpinQuantConfig:
    settings = {
        "name": "tiny", "calib_dataset": TINY_CORPUS, "eval_datasets": [TINY_CORPUS], "nsamples": 4, "seqlen": 32,
        "eval_max_windows": 4, "calib_batch_size": 2, "device": "cpu", "results_dir": str(folder / "results"),
        "w_clip": False, "rotation_path": str(folder / "R.safetensors"), "rotation_steps": 3,
        "rotation_nsamples": 4, "rotation_seqlen": 16, "rotation_batch_size": 2, "rotation_micro_batch_size": 1,
    }
    return SpinQuantConfig(**{**settings, **overrides})


def _rows(path) -> dict[str, dict[str, str]]:
    """The result rows by setting (the paired-interval rows beside them left out)."""
    with open(path, newline="") as handle:
        return {row["setting"]: row for row in csv.DictReader(handle) if "_vs_" not in row["metric"]}


def test_run_writes_learned_and_baseline_rows(tiny_setup):
    config = _config(tiny_setup)
    csv_path, json_path = sq_main.run(config)
    rows = _rows(csv_path)
    assert set(rows) == {"W4A4 SpinQuant", "W4A4 QuaRot"}
    unrotated = perplexity(tiny_llama(), evaluation_windows(CharTokenizer(), TINY_CORPUS, seqlen=32, max_windows=4),
                           progress=False)
    for row in rows.values():
        assert row["metric"] == f"{TINY_CORPUS}_ppl" and row["higher_is_better"] == "False"
        assert float(row["fp"]) == pytest.approx(unrotated, rel=1e-4)  # both rotations preserve the function
        assert all(float(row[m]) > 1 for m in ("rtn", "gptq", "gptaq"))
    assert rows["W4A4 SpinQuant"]["gptaq"] != rows["W4A4 QuaRot"]["gptaq"]
    meta = json.loads(json_path.read_text())
    assert meta["tree"] == "spinquant"
    assert meta["rotation"]["steps"] == 3 and len(meta["rotation"]["losses"]) == 3
    assert meta["rotation"]["trained_with"]["rotation_steps"] == 3
    assert set(meta["rotation"]["monitor_loss"]) == {"SpinQuant", "QuaRot"}
    assert {"SpinQuant/gptq", "SpinQuant/gptaq", "QuaRot/gptq", "QuaRot/gptaq"} <= meta["layers"].keys()
    assert {"rotation training", "SpinQuant quantize gptaq", "QuaRot evaluate fp"} <= meta["seconds"].keys()
    # the data behind each number, per rotation's rows, and the paired intervals computed from them
    assert set(meta["per_example"]) == {f"{config.setting} SpinQuant", f"{config.setting} QuaRot"}
    assert {"fp", "gptq", "gptaq"} <= meta["per_example"][f"{config.setting} SpinQuant"].keys()
    assert any("_vs_gptq_low" in line for line in csv_path.read_text().splitlines())
    assert (tiny_setup / "R.safetensors").is_file()


def test_new_methods_run_under_both_rotations(tiny_setup):
    csv_path, _ = sq_main.run(_config(tiny_setup, methods=["qep", "qronos"]))
    rows = _rows(csv_path)
    assert set(rows) == {"W4A4 SpinQuant", "W4A4 QuaRot"}
    assert all(float(row[m]) > 1 for row in rows.values() for m in ("qep", "qronos"))


def test_complete_rotation_file_is_reused(tiny_setup):
    sq_main.run(_config(tiny_setup, methods=["fp"], quarot_baseline=False))
    mtime = (tiny_setup / "R.safetensors").stat().st_mtime_ns
    _, json_path = sq_main.run(_config(tiny_setup, methods=["fp", "rtn"], quarot_baseline=False))
    assert (tiny_setup / "R.safetensors").stat().st_mtime_ns == mtime  # not retrained
    assert set(_rows(json_path.with_suffix(".csv"))) == {"W4A4 SpinQuant"}


def test_partial_rotation_from_other_settings_is_refused(tiny_setup, capsys):
    sq_main.run(_config(tiny_setup, methods=["fp"], quarot_baseline=False))
    code = sq_main.main(["--config", str(_write_yaml(tiny_setup)), "--rotation_steps", "5", "--rotation_lr", "0.5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "holds 3 of 5 steps trained with other settings" in err and "'rotation_lr': 1.5" in err


def _write_yaml(folder):
    config = _config(folder)
    path = folder / "tiny.yaml"
    fields = ("name", "calib_dataset", "eval_datasets", "nsamples", "seqlen", "eval_max_windows", "calib_batch_size",
              "device", "results_dir", "w_clip", "rotation_path", "rotation_steps", "rotation_nsamples",
              "rotation_seqlen", "rotation_batch_size", "rotation_micro_batch_size")
    path.write_text(yaml.safe_dump({name: getattr(config, name) for name in fields} | {"methods": ["fp"]}))
    return path


@pytest.mark.parametrize("path", sorted(sq_main.CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = make_config(SpinQuantConfig, yaml_path=path)
    assert config.methods[:4] == ["fp", "rtn", "gptq", "gptaq"]
    assert config.quarot_baseline == ("zeroshot" not in path.name)  # the zero-shot run leaves it out (time)
