"""The revision benchmark: a revision's solver imported beside ours, compared bitwise; bad revisions refused."""

import subprocess

import pytest
import torch

from common import bench_revision
from common.results.provenance import REPO_ROOT


def _has_git_history() -> bool:
    probe = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, check=False)
    return probe.returncode == 0


needs_git = pytest.mark.skipif(not _has_git_history(), reason="not a git checkout (the benchmark reads git history)")


@needs_git
def test_head_against_itself_is_bitwise_equal_when_the_solver_is_unchanged():
    changed = subprocess.run(["git", "-C", str(REPO_ROOT), "diff", "--quiet", "HEAD", "--",
                              *bench_revision.SOLVER_PATHS], check=False).returncode
    rows = bench_revision.run([(24, 40)], "HEAD", 1, torch.device("cpu"))
    assert [row["method"] for row in rows] == ["gptq", "gptaq"]
    assert all(row["revision_seconds"] > 0 and row["ours_seconds"] > 0 for row in rows)
    if changed == 0:
        assert all(row["bitwise_equal"] for row in rows)


@needs_git
def test_a_revision_solver_that_differs_is_reported_unequal(monkeypatch):
    module = bench_revision.load_revision_solver("HEAD")
    original = module.quantize_weight
    monkeypatch.setattr(module, "quantize_weight", lambda *args, **kwargs: original(*args, **kwargs) + 1)
    monkeypatch.setattr(bench_revision, "load_revision_solver", lambda revision: module)
    rows = bench_revision.run([(8, 16)], "HEAD", 1, torch.device("cpu"))
    assert not any(row["bitwise_equal"] for row in rows)


@needs_git
def test_an_unknown_revision_is_refused_by_name():
    with pytest.raises(ValueError, match="revision must be a git revision"):
        bench_revision.load_revision_solver("no-such-revision-0123")


def test_repeats_must_be_positive():
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        bench_revision.run([(8, 16)], "HEAD", 0, torch.device("cpu"))
