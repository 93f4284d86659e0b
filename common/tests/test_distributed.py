"""Data-parallel calibration (torch.distributed, gloo on the CPU): two ranks compute what one process does.

Each test spawns two fresh processes with one thread each (as ``torchrun --nproc_per_node 2`` would) and
compares them with one process running on one thread too: float32 kernels may round differently with another
thread count, and 4-bit rounding would turn that last bit into other weights. With the same thread count the
only difference left is the order in which the per-batch statistics are summed, which their float64 sum
makes invisible: the quantized weights are bitwise the single process's.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from common import distributed
from common.tests.distributed_workers import cli_worker, engine_worker, launch, quantized_state, save_tiny_model
from fake_quant import main as fq_main

CASES = [("gptq", {"groupsize": 16, "act_order": True}), ("gptaq", {"groupsize": 16, "act_order": True}),
         ("gptaq", {})]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", ["llama", "vit"])
@pytest.mark.parametrize(("method", "options"), CASES, ids=["gptq-g16-act_order", "gptaq-g16-act_order", "gptaq"])
def test_two_ranks_quantize_like_one_process(tmp_path, family, method, options, one_thread):
    single = quantized_state(family, method, options)
    launch(engine_worker, 2, family, method, options, str(tmp_path), timeout=240)
    shared = torch.load(tmp_path / "weights.pt")
    assert shared.keys() == single.keys()
    quantized = [name for name, tensor in single.items() if name.endswith("weight") and tensor.dim() == 2
                 and "embed" not in name and "head" not in name]
    assert len(quantized) == {"llama": 14, "vit": 8}[family]
    for name, tensor in single.items():
        assert torch.equal(tensor, shared[name]), name


def _argv(results: str, **overrides: str) -> list[str]:
    settings = {"name": "tiny", "calib_dataset": "tiny_text", "eval_datasets": "tiny_text", "nsamples": "8",
                "seqlen": "32", "eval_max_windows": "6", "calib_batch_size": "2", "device": "cpu",
                "results_dir": results, "methods": "fp,gptq,gptaq", **overrides}
    return [part for key, value in settings.items() for part in (f"--{key}", value)] + ["--no-w_clip"]


def _ranks(out) -> list[dict]:
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def _ppl(path) -> dict[str, float]:
    with open(path, newline="") as handle:
        row = next(row for row in csv.DictReader(handle) if row["metric"] == "tiny_text_ppl")
    return {m: float(row[m]) for m in ("fp", "gptq", "gptaq")}


def _records(path) -> dict[str, list[dict]]:
    """The per-layer calibration records of a run, without their timings."""
    layers = json.loads(path.read_text())["layers"]
    return {method: [{k: v for k, v in record.items() if k != "seconds"} for record in records]
            for method, records in layers.items()}


def test_two_ranks_write_the_single_process_csv(tiny_setup, one_thread):
    assert fq_main.main(_argv(str(tiny_setup / "single"))) == 0
    out = tiny_setup / "ranks"
    save_tiny_model(out)
    launch(cli_worker, 2, [_argv(str(out / "results"))] * 2, None, str(out), timeout=240)
    assert [rank["code"] for rank in _ranks(out)] == [0, 0]
    assert sorted(p.name for p in (out / "results").iterdir()) == ["tiny.csv", "tiny.json"]  # rank 0 only
    assert _ppl(out / "results" / "tiny.csv") == _ppl(tiny_setup / "single" / "tiny.csv")
    shared, single = _records(out / "results" / "tiny.json"), _records(tiny_setup / "single" / "tiny.json")
    assert shared.keys() == single.keys()
    for method in single:  # the output errors' reference norms are float64 sums in another order
        for ours, theirs in zip(shared[method], single[method], strict=True):
            assert ours == theirs | {"output_error": pytest.approx(theirs["output_error"], rel=1e-9)}


def test_a_failing_rank_ends_every_rank_with_its_message(tmp_path, margin):
    save_tiny_model(tmp_path)
    seconds = launch(cli_worker, 2, [_argv(str(tmp_path / "results"))] * 2, 1, str(tmp_path), timeout=120)
    zero, one = _ranks(tmp_path)
    assert one["code"] == 2 and "planted failure on rank 1" in one["stderr"]
    assert zero["code"] == 2 and "rank 1: ValueError: planted failure on rank 1" in zero["stderr"], zero
    margin("seconds until both ranks exited after rank 1 failed (incl. start-up)", seconds, below=90)
    assert not (tmp_path / "results" / "tiny.csv").exists()


def test_ranks_resume_a_failed_run_to_the_single_process_results(tiny_setup, one_thread):
    """Rank 1 fails in block 1 of GPTQ: both ranks stop; launched again, both resume from block 1 and write what
    one process writes."""
    assert fq_main.main(_argv(str(tiny_setup / "single"))) == 0
    out = tiny_setup / "ranks"
    save_tiny_model(out)
    argvs = [_argv(str(out / "results"))] * 2
    launch(cli_worker, 2, argvs, 1, str(out), 1, timeout=240)
    assert [rank["code"] for rank in _ranks(out)] == [2, 2]
    progress = json.loads((out / "results" / "tiny.checkpoint" / "gptq" / "progress.json").read_text())
    assert progress["next_block"] == 1
    launch(cli_worker, 2, argvs, None, str(out), timeout=240)
    ranks = _ranks(out)
    assert [rank["code"] for rank in ranks] == [0, 0] and "resuming from checkpoint" in ranks[0]["stderr"]
    assert _ppl(out / "results" / "tiny.csv") == _ppl(tiny_setup / "single" / "tiny.csv")
    assert not (out / "results" / "tiny.checkpoint").exists()


def test_ranks_with_different_settings_are_refused_before_any_work(tmp_path):
    argvs = [_argv(str(tmp_path / "results")), _argv(str(tmp_path / "results"), w_bits="3")]
    launch(cli_worker, 2, argvs, None, str(tmp_path), timeout=120)
    for rank in _ranks(tmp_path):
        assert rank["code"] == 2 and "ranks [1] were started with other settings than rank 0" in rank["stderr"]


def test_balanced_assignment_is_deterministic(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    owners = distributed.assign_by_cost({"q": 4.0, "k": 1.0, "v": 1.0, "o": 2.0})
    assert owners == {"q": 0, "o": 1, "k": 1, "v": 1}  # 4 against 2 + 1 + 1
    assert distributed.assign_by_cost({"a": 1.0}) == {"a": 0}


TORCHRUN_ENVIRONMENTS = [  # (variables, what the message must name)
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE must be a positive integer (set by torchrun), got 'two'"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE must be a positive integer"),
    ({"WORLD_SIZE": "2", "GPTAQ_DIST_TIMEOUT_S": "soon"}, "GPTAQ_DIST_TIMEOUT_S must be a number of seconds"),
    ({"WORLD_SIZE": "2", "GPTAQ_DIST_TIMEOUT_S": "inf"}, "GPTAQ_DIST_TIMEOUT_S must be a number of seconds"),
    ({"WORLD_SIZE": "2", "GPTAQ_DIST_TIMEOUT_S": "0"}, "GPTAQ_DIST_TIMEOUT_S must be a number of seconds"),
]


@pytest.mark.parametrize(("variables", "message"), TORCHRUN_ENVIRONMENTS, ids=lambda v: str(v)[:40])
def test_a_bad_torchrun_environment_is_an_error_naming_the_variable(variables, message, monkeypatch, capsys):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert fq_main.main(["--methods", "fp", "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err
    assert not distributed.active()


def test_a_bad_local_rank_is_an_error_naming_it(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "-1")
    with pytest.raises(ValueError, match="LOCAL_RANK must be a non-negative integer"):
        distributed._local_rank()
