"""The revision benchmark: a revision's registry imported beside ours, compared bitwise; bad input refused."""

import dataclasses
import subprocess
import types

import pytest
import torch

import common.methods
from common.bench import revision as bench_revision
from common.results.provenance import REPO_ROOT


def _has_git_history() -> bool:
    probe = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, check=False)
    return probe.returncode == 0


needs_git = pytest.mark.skipif(not _has_git_history(), reason="not a git checkout (the benchmark reads git history)")


@needs_git
def test_head_against_itself_is_bitwise_equal_when_the_solvers_are_unchanged():
    changed = subprocess.run(["git", "-C", str(REPO_ROOT), "diff", "--quiet", "HEAD", "--",
                              *bench_revision.SOLVER_PATHS], check=False).returncode
    rows = bench_revision.run([(24, 40)], "HEAD", 1, torch.device("cpu"), methods=("gptq", "gptaq", "qronos"))
    assert [row["method"] for row in rows] == ["gptq", "gptaq", "qronos"]
    assert all(row["revision_seconds"] > 0 and row["ours_seconds"] > 0 for row in rows)
    if changed == 0:
        assert all(row["bitwise_equal"] for row in rows)


@needs_git
def test_the_revision_keeps_its_own_modules_and_ours_come_back():
    theirs = bench_revision.load_revision_registry("HEAD")
    assert theirs is not common.methods
    import common.methods as after

    assert after is common.methods


def test_a_revision_solver_that_differs_is_reported_unequal(monkeypatch):
    ours = common.methods.METHODS

    def shifted(solve):
        return lambda *args, **kwargs: dataclasses.replace(result := solve(*args, **kwargs), weight=result.weight + 1)

    theirs = types.SimpleNamespace(
        METHODS={name: dataclasses.replace(ours[name], solve=shifted(ours[name].solve)) for name in ("gptq", "gptaq")},
        SolverConfig=common.methods.SolverConfig,
    )
    monkeypatch.setattr(bench_revision, "load_revision_registry", lambda revision: theirs)
    rows = bench_revision.run([(8, 16)], "HEAD", 1, torch.device("cpu"))
    assert rows and not any(row["bitwise_equal"] for row in rows)


def test_a_method_the_revision_lacks_is_refused_by_name(monkeypatch):
    theirs = types.SimpleNamespace(METHODS={"gptq": common.methods.METHODS["gptq"]},
                                   SolverConfig=common.methods.SolverConfig)
    monkeypatch.setattr(bench_revision, "load_revision_registry", lambda revision: theirs)
    with pytest.raises(ValueError, match="methods: 'gptaq' is not a calibrated method of revision 'HEAD'"):
        bench_revision.run([(8, 16)], "HEAD", 1, torch.device("cpu"))


@needs_git
def test_an_unknown_revision_is_refused_by_name():
    with pytest.raises(ValueError, match="revision must be a git revision"):
        bench_revision.load_revision_registry("no-such-revision-0123")


def test_repeats_must_be_positive():
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        bench_revision.run([(8, 16)], "HEAD", 0, torch.device("cpu"))
