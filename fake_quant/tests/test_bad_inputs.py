"""Every bad input of ``python -m fake_quant.main`` is one clear line naming the setting, before any long work.

Each case runs the entry point on the tiny model (``tiny_setup``). Cases in :data:`BEFORE_LOAD` must fail
before the model's weights are read; :data:`BEFORE_EVALUATION` cases (which need the model's tensors to be
checked) before anything is evaluated or calibrated. Nothing is left in the results folder.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from common.llama import experiment
from common.tests.bad_inputs import BadInput, expect_refusal
from common.tests.llama_fixtures import tiny_llama
from fake_quant import main as fq_main

BASE = ["--calib_dataset", "tiny_text", "--eval_datasets", "tiny_text", "--seqlen", "32", "--nsamples", "4",
        "--eval_max_windows", "2", "--device", "cpu", "--model_loading", "whole"]


def _config_file(text: str | bytes):
    def setup(folder: Path) -> list[str]:
        path = folder / "config.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["--config", str(path)]

    return setup


def _file_in_the_way(flag: str):
    def setup(folder: Path) -> list[str]:
        (folder / "a_file").write_text("")
        return [flag, str(folder / "a_file" / "sub")]

    return setup


def _folder(flag: str, name: str = "empty"):
    def setup(folder: Path) -> list[str]:
        (folder / name).mkdir()
        return [flag, str(folder / name)]

    return setup


def _model_without_weights(folder: Path) -> list[str]:
    """A model folder with a Llama config.json and no safetensors checkpoint."""
    tiny_llama().config.save_pretrained(folder / "model")
    return ["--model", str(folder / "model")]


def _users_folder(flag: str):
    """A folder of the user's (one file in it) given as ``flag``."""
    def setup(folder: Path) -> list[str]:
        (folder / "mine").mkdir()
        (folder / "mine" / "notes.txt").write_text("the user's")
        return [flag, str(folder / "mine")]

    return setup


BEFORE_LOAD = [
    BadInput("model folder without safetensors", ["--model_loading", "blockwise"], "holds no safetensors checkpoint",
             _model_without_weights),
    BadInput("weight bits too high", ["--w_bits", "17"], "w_bits must be an integer in 1..16"),
    BadInput("weight bits zero", ["--w_bits", "0"], "w_bits"),
    BadInput("1-bit symmetric weights", ["--w_bits", "1", "--no-w_asym"],
             "w_bits must be at least 2 for a symmetric grid (w_asym: false)"),
    BadInput("activation bits not an integer", ["--a_bits", "2.5"], "a_bits must be of type int"),
    BadInput("clip ratio above 1", ["--a_clip_ratio", "1.5"], "a_clip_ratio must be in (0, 1]"),
    BadInput("clip ratio NaN", ["--a_clip_ratio", "nan"], "a_clip_ratio"),
    BadInput("KV clip ratio zero", ["--kv_clip_ratio", "0"], "kv_clip_ratio"),
    BadInput("K bits too high", ["--k_bits", "20"], "k_bits"),
    BadInput("weight group not dividing the model", ["--w_groupsize", "48"], "w_groupsize must be -1 or a positive "
             "divisor"),
    BadInput("weight group zero", ["--w_groupsize", "0"], "w_groupsize"),
    BadInput("activation group not dividing", ["--a_groupsize", "48"], "a_groupsize"),
    BadInput("unknown rotation", ["--rotate_mode", "learned"], "rotate_mode must be one of"),
    BadInput("unknown method", ["--methods", "fp,awq"], "methods must be one of"),
    BadInput("no method", ["--methods", ""], "methods must name at least one"),
    BadInput("a method twice", ["--methods", "gptq,gptq"], "methods must name each method once"),
    BadInput("unknown calibration corpus", ["--calib_dataset", "nope"], "calib_dataset must be one of"),
    BadInput("unknown evaluation corpus", ["--eval_datasets", "tiny_text,nope"], "eval_datasets must be one of"),
    BadInput("nothing to evaluate", ["--eval_datasets", ""], "eval_datasets and tasks are both empty"),
    BadInput("samples not a number", ["--nsamples", "many"], "nsamples must be of type int"),
    BadInput("no samples", ["--nsamples", "0"], "nsamples must be a positive integer"),
    BadInput("window of one token", ["--seqlen", "1"], "seqlen must be at least 2"),
    BadInput("window beyond the model's positions", ["--seqlen", "129"], "seqlen=129 is longer than the model's "
             "max_position_embeddings (128)"),
    BadInput("zero evaluation windows", ["--eval_max_windows", "0"], "eval_max_windows must be a positive integer"),
    BadInput("zero evaluation batch", ["--eval_batch_size", "0"], "eval_batch_size"),
    BadInput("zero calibration batch", ["--calib_batch_size", "0"], "calib_batch_size"),
    BadInput("zero block size", ["--blocksize", "0"], "blocksize"),
    BadInput("negative damping", ["--percdamp", "-1"], "percdamp must be >= 0"),
    BadInput("NaN damping", ["--percdamp", "nan"], "percdamp must be a finite number"),
    BadInput("infinite alpha", ["--alpha", "inf"], "alpha must be a finite number"),
    BadInput("negative alpha", ["--alpha", "-0.5"], "alpha must be >= 0"),
    BadInput("unknown lazy update", ["--lazy_update", "fast"], "lazy_update must be one of"),
    BadInput("QEP scale NaN", ["--qep_alpha", "nan"], "qep_alpha must be a finite number"),
    BadInput("negative QEP scale", ["--qep_alpha", "-1"], "qep_alpha must be >= 0"),
    BadInput("QEP exclusion of a linear that does not exist", ["--methods", "qep", "--qep_exclude", "mlp.dwn_proj"],
             "qep_exclude names ['mlp.dwn_proj'], which are not quantized linears of this model; allowed: "),
    BadInput("unknown dtype", ["--dtype", "float8"], "dtype must be one of"),
    BadInput("device name", ["--device", "gpu0"], "device must be one of auto, cpu, cuda, cuda:<index>"),
    BadInput("negative seed", ["--seed", "-1"], "seed must be a non-negative integer"),
    BadInput("zero task limit", ["--tasks_limit", "0"], "tasks_limit must be a positive integer or None"),
    BadInput("name with a folder", ["--name", "../x"], "name must be a plain file name"),
    BadInput("hidden name", ["--name", ".x"], "name must be a plain file name"),
    BadInput("name too long for its temporaries", ["--name", "x" * 200], "is 200 bytes; the files named after it"),
    BadInput("results folder under a file", [], "results_dir: ", _file_in_the_way("--results_dir")),
    BadInput("save and load at once", ["--save_qmodel_path", "a", "--load_qmodel_path", "b"],
             "save_qmodel_path and load_qmodel_path exclude each other"),
    BadInput("zero-shot tasks one block at a time", ["--tasks", "x", "--model_loading", "blockwise"],
             "tasks cannot run with model_loading: blockwise (one block in memory at a time)"),
    BadInput("saved models one block at a time", ["--save_qmodel_path", "out", "--model_loading", "blockwise"],
             "save_qmodel_path cannot run with model_loading: blockwise"),
    BadInput("unknown model loading", ["--model_loading", "lazy"], "model_loading must be one of"),
    BadInput("save folder under a file", [], "save_qmodel_path: ", _file_in_the_way("--save_qmodel_path")),
    BadInput("export of an activation-quantized model", ["--export_gptq", "out", "--w_grid", "gptq"],
             "export_gptq writes weight-only gptq checkpoints: a_bits must be 16"),
    BadInput("export from the float grid", ["--export_gptq", "out", "--a_bits", "16", "--no-rotate"],
             "w_grid must be 'gptq'"),
    BadInput("unknown weight grid", ["--w_grid", "fp16"], "w_grid must be one of ('float', 'gptq')"),
    BadInput("checkpoints to read that are not there", ["--load_gptq", "nowhere"],
             "load_gptq: nowhere holds no checkpoint of"),
    BadInput("unknown export format", ["--export_format", "awq"], "export_format must be one of"),
    BadInput("compressed-tensors with act_order's dynamic groups",
             ["--export_gptq", "out", "--a_bits", "16", "--no-rotate", "--export_format", "compressed-tensors",
              "--w_groupsize", "64", "--act_order"],
             "export_gptq writes weight-only compressed-tensors checkpoints: static_groups must be true"),
    BadInput("load folder without settings", [], "load_qmodel_path: ", _folder("--load_qmodel_path")),
    BadInput("task folder missing", ["--tasks", "x", "--tasks_include_path", "/nonexistent/tasks"],
             "tasks_include_path: /nonexistent/tasks is not a folder"),
    BadInput("config file missing", ["--config", "/nonexistent.yaml"], "--config: config file /nonexistent.yaml does "
             "not exist"),
    BadInput("config is a folder", [], "--config: ", _folder("--config")),
    BadInput("config not YAML", [], "config.yaml:2:", _config_file("w_bits: 4\nseed: 1: 2\n")),
    BadInput("config not UTF-8", [], "--config: ", _config_file(b"name: caf\xe9\n")),
    BadInput("config a list", [], "must hold a mapping of settings", _config_file("- w_bits\n")),
    BadInput("config unknown key", [], "unknown setting(s) ['w_bitz'] ('w_bitz': did you mean 'w_bits'?)",
             _config_file("w_bitz: 4\n")),
    BadInput("config wrong type", [], "w_bits must be of type int", _config_file("w_bits: four\n")),
    BadInput("config boolean for a count", [], "eval_batch_size must be of type int",
             _config_file("eval_batch_size: true\n")),
    BadInput("unknown flag", ["--w_bitz", "4"], "--w_bitz"),
    BadInput("checkpoint folder of the user's", ["--model_loading", "blockwise"],
             "checkpoint_dir: ", _users_folder("--checkpoint_dir")),
    BadInput("checkpoint folder of the user's, restarted", ["--model_loading", "blockwise", "--restart"],
             "holds files this tool did not write", _users_folder("--checkpoint_dir")),
]


def _saved_models(folder: Path) -> Path:
    """A folder saved by a real tiny run (RTN only, fast)."""
    saved = folder / "saved"
    config = fq_main.LlamaRunConfig(name="save", calib_dataset="tiny_text", eval_datasets=["tiny_text"], seqlen=32,
                                    nsamples=4, eval_max_windows=1, device="cpu", methods=["rtn"],
                                    results_dir=str(folder / "save-results"), model_loading="whole",
                                    save_qmodel_path=str(saved))
    fq_main.run(config)
    return saved


def _truncated(folder: Path) -> list[str]:
    saved = _saved_models(folder)
    data = (saved / "rtn.safetensors").read_bytes()
    (saved / "rtn.safetensors").write_bytes(data[: len(data) // 2])
    return ["--load_qmodel_path", str(saved)]


def _foreign(folder: Path) -> list[str]:
    saved = _saved_models(folder)
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(saved / "rtn.safetensors"))
    return ["--load_qmodel_path", str(saved)]


def _broken_settings(folder: Path) -> list[str]:
    saved = _saved_models(folder)
    (saved / "settings.json").write_text('{"settings": {"w_bits": 99}}')
    return ["--load_qmodel_path", str(saved)]


def _load_saved(folder: Path) -> list[str]:
    return ["--load_qmodel_path", str(_saved_models(folder))]


def _load_saved_with_config(text: str):
    def setup(folder: Path) -> list[str]:
        return [*_config_file(text)(folder), *_load_saved(folder)]

    return setup


BEFORE_EVALUATION = [
    BadInput("truncated saved model", [], "rtn.safetensors is not a readable safetensors file", _truncated),
    BadInput("another model's weights", [], "rtn.safetensors does not hold this model's weights", _foreign),
    BadInput("saved settings of another version", [], "settings.json is not a settings file", _broken_settings),
    BadInput("saved W4 models evaluated as W2", ["--w_bits", "2"],
             "w_bits: the models in load_qmodel_path", _load_saved),
    BadInput("a config file the saved models were not quantized with", [],
             "seed: the models in load_qmodel_path", _load_saved_with_config("seed: 3\n")),
    BadInput("two settings the saved models differ in", ["--w_bits", "3", "--no-w_asym"],
             "w_asym, w_bits: the models in load_qmodel_path", _load_saved),
    BadInput("a method the folder holds no saved model of", ["--methods", "fp,gptq"],
             "methods: load_qmodel_path", _load_saved),
]


def _run_case(case: BadInput, folder: Path, capsys) -> str:
    results = folder / "results"
    extra = case.setup(folder) if case.setup else []
    capsys.readouterr()
    return expect_refusal(fq_main.main, ["--results_dir", str(results), *BASE, *case.argv, *extra], capsys)


@pytest.mark.parametrize("case", BEFORE_LOAD, ids=lambda c: c.case)
def test_refused_before_the_model_loads(case: BadInput, watched_llama, capsys) -> None:
    folder, events = watched_llama
    line = _run_case(case, folder, capsys)
    assert case.names in line
    assert events == [], "the model was loaded before the bad input was refused"
    assert not (folder / "results").exists()
    if (folder / "mine").exists():
        assert [p.name for p in (folder / "mine").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("case", BEFORE_EVALUATION, ids=lambda c: c.case)
def test_refused_before_evaluating(case: BadInput, tiny_setup, capsys, monkeypatch) -> None:
    folder = tiny_setup
    extra = case.setup(folder)  # a real run saves the models first; then evaluating or calibrating fails the test
    monkeypatch.setattr(experiment, "window_nlls", lambda *a, **k: pytest.fail("evaluation started"))
    monkeypatch.setattr(experiment, "quantize", lambda *a, **k: pytest.fail("calibration started"))
    capsys.readouterr()
    line = expect_refusal(fq_main.main, ["--results_dir", str(folder / "results"), *BASE, *case.argv, *extra], capsys)
    assert case.names in line
    assert not (folder / "results").exists()


def test_unwritable_results_folder_is_refused_first(watched_llama, unwritable_dir, capsys) -> None:
    _, events = watched_llama
    line = expect_refusal(fq_main.main, ["--results_dir", str(unwritable_dir / "results"), *BASE], capsys)
    assert "results_dir: cannot write to folder" in line and events == []


def test_unwritable_save_folder_is_refused_first(watched_llama, unwritable_dir, capsys) -> None:
    folder, events = watched_llama
    argv = ["--results_dir", str(folder / "results"), *BASE, "--save_qmodel_path", str(unwritable_dir / "q")]
    line = expect_refusal(fq_main.main, argv, capsys)
    assert "save_qmodel_path: cannot write to folder" in line and events == []


def test_saved_models_take_their_own_settings_and_the_methods_named(tiny_setup, capsys) -> None:
    """Settings equal to the saved ones and evaluation settings may be given; ``methods`` picks saved models."""
    folder = tiny_setup
    extra = _load_saved(folder)
    argv = ["--results_dir", str(folder / "results"), *BASE, *extra, "--w_bits", "4", "--methods", "rtn",
            "--name", "again"]
    assert fq_main.main(argv) == 0
    header = (folder / "results" / "again.csv").read_text().splitlines()[0]
    assert "rtn" in header and ",fp," not in header


def test_a_save_folder_of_the_users_moves_to_history_and_is_not_overwritten(tiny_setup) -> None:
    folder = tiny_setup
    saved = folder / "saved"
    saved.mkdir()
    (saved / "rtn.safetensors").write_text("the user's own file")
    config = fq_main.LlamaRunConfig(name="save", calib_dataset="tiny_text", eval_datasets=["tiny_text"], seqlen=32,
                                    nsamples=4, eval_max_windows=1, device="cpu", methods=["rtn"],
                                    results_dir=str(folder / "results"), model_loading="whole",
                                    save_qmodel_path=str(saved))
    fq_main.run(config)
    assert sorted(p.name for p in saved.iterdir()) == ["rtn.safetensors", "settings.json"]
    (kept,) = (folder / "history").iterdir()
    assert (kept / "rtn.safetensors").read_text() == "the user's own file"


def test_cases_are_distinct() -> None:
    names = [case.case for case in BEFORE_LOAD + BEFORE_EVALUATION]
    assert len(names) == len(set(names))


def test_diverging_solve_names_the_first_layer_it_breaks(tiny_setup, capsys) -> None:
    """A huge α makes GPTAQ's update overflow: the first linear solved (q_proj of block 0) is named, no result."""
    argv = ["--results_dir", str(tiny_setup / "results"), *BASE, "--methods", "gptaq", "--alpha", "1e30"]
    line = expect_refusal(fq_main.main, argv, capsys)
    assert "block 0: self_attn.q_proj: the solve produced NaN or Inf weights from finite inputs (alpha=1e+30" in line
    assert not (tiny_setup / "results").exists() or not any((tiny_setup / "results").iterdir())


def test_unrotated_tied_model_saves_and_reloads(tiny_setup) -> None:
    """``--no-rotate`` keeps the tiny model's tied embeddings: saved once, reloaded as the same numbers."""
    saved = tiny_setup / "saved"
    config = fq_main.LlamaRunConfig(name="tied", calib_dataset="tiny_text", eval_datasets=["tiny_text"], seqlen=32,
                                    nsamples=4, eval_max_windows=2, device="cpu", methods=["fp", "rtn"],
                                    rotate=False, results_dir=str(tiny_setup / "results"),
                                    model_loading="whole", save_qmodel_path=str(saved))
    first, _ = fq_main.run(config)
    again = fq_main.LlamaRunConfig(name="tied-again", calib_dataset="tiny_text", eval_datasets=["tiny_text"],
                                   seqlen=32, eval_max_windows=2, device="cpu", results_dir=str(tiny_setup / "results"),
                                   model_loading="whole", load_qmodel_path=str(saved))
    second, _ = fq_main.run(again)
    rows = [line.split(",")[4:6] for path in (first, second) for line in path.read_text().splitlines()[1:]]
    assert rows[0] == rows[1]  # fp too: the reloaded run's fp column has activation quantization off


def test_unwritable_model_cache_is_refused_before_converting(watched_llama, unwritable_dir, capsys,
                                                               monkeypatch) -> None:
    """The embedded model is converted into the cache on first use: a cache that cannot take it is refused first."""
    _, events = watched_llama
    monkeypatch.setenv("GPTAQ_CACHE_DIR", str(unwritable_dir / "cache"))
    line = expect_refusal(fq_main.main, ["--results_dir", str(watched_llama[0] / "results"), *BASE], capsys)
    assert "GPTAQ_CACHE_DIR (the model cache): cannot write to folder" in line and events == []


@pytest.mark.parametrize("tree", ["fake_quant", "spinquant", "vit_quant"])
def test_help_shows_every_default(tree: str, capsys) -> None:
    module = __import__(f"{tree}.main", fromlist=["main"])
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "_MISSING_TYPE" not in text and "object at 0x" not in text
    assert "(default: ['fp', 'rtn', 'gptq', 'gptaq'])" in " ".join(text.split())


def test_a_full_disk_during_the_run_is_one_error_line_with_exit_status_1(tiny_setup, monkeypatch, capsys) -> None:
    def full(config):
        raise OSError(errno.ENOSPC, "No space left on device", str(tiny_setup / "results" / "x.csv"))

    monkeypatch.setattr(fq_main, "run", full)
    assert fq_main.main(["--results_dir", str(tiny_setup / "results"), *BASE]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: No space left on device: {tiny_setup / 'results' / 'x.csv'}; the run stopped")
    assert "Traceback" not in err and err.count("\n") == 1
