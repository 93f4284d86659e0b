"""Handing ``H`` and ``D`` over to a solve (``release_statistics``), setting the float64 sums aside and consuming
``H`` in the factorization change no bit of the result, and give the memory back."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
import torch

from common.bench.timing import seeded_problem
from common.memory import release_freed_memory
from common.methods import METHODS
from common.solvers import statistics
from common.solvers.column_loop import SolverConfig, factorize
from common.solvers.statistics import SET_ASIDE_BYTES, CalibrationError, CalibrationStatistics

CALIBRATED = [name for name, method in METHODS.items() if method.calibrated]


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act_order"])
@pytest.mark.parametrize("method", CALIBRATED)
def test_handed_over_statistics_give_the_same_bits_and_are_released(method, act_order) -> None:
    weight, hessian, drift = seeded_problem(48, 96, torch.device("cpu"))
    spec = METHODS[method]
    config = spec.solver_config(SolverConfig(bits=4, groupsize=32, act_order=act_order, blocksize=32))
    kept = spec.solve(weight, hessian, drift, config)
    handed_h, handed_d = hessian.clone(), drift.clone()
    handed = spec.solve(weight, handed_h, handed_d, config, release_statistics=True)
    assert torch.equal(kept.weight, handed.weight) and kept.loss == handed.loss
    assert handed_h.untyped_storage().nbytes() == 0
    assert handed_d.untyped_storage().nbytes() == (handed_d.nbytes if spec.statistics == ("H",) else 0)


def test_sums_wait_in_files_while_solving_and_come_back_whole(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GPTAQ_CACHE_DIR", str(tmp_path))
    columns = int((SET_ASIDE_BYTES / 16) ** 0.5) + 1  # two float64 sums just above the threshold
    stats = CalibrationStatistics(columns, asymmetric=True, mapped=False)  # as on a GPU
    generator = torch.Generator().manual_seed(0)
    x_quant = torch.randn(8, columns, generator=generator)
    stats.add(x_quant, x_quant + 0.1 * torch.randn(8, columns, generator=generator))
    weight = torch.randn(6, columns, generator=generator)
    before = stats.hessian(), stats.drift(), stats.output_error(weight, weight.round(), 3.0)
    with stats.sums_in_files():
        assert stats._xtx.numel() == 0 and stats._dxtx.numel() == 0  # in files, not in memory
        assert torch.equal(stats.hessian(), before[0]) and torch.equal(stats.drift(), before[1])
        assert stats.output_error(weight, weight.round(), 3.0) == before[2]
        assert stats._xtx.numel() == 0 and stats._dxtx.numel() == 0  # each read went back
        with pytest.raises(RuntimeError, match="cannot grow"):
            stats.add(x_quant, x_quant)
    assert torch.equal(stats.hessian(), before[0]) and torch.equal(stats.drift(), before[1])
    with stats.sums_in_files(last_use=True):
        assert torch.equal(stats.hessian(), before[0])
    assert list((tmp_path / "snapshots").iterdir()) == []
    with pytest.raises(RuntimeError, match="last use"):
        stats.hessian()


def test_a_consumed_hessian_is_released_and_factors_the_same() -> None:
    _, hessian, _ = seeded_problem(48, 1100, torch.device("cpu"))  # wider than a structure block
    kept = factorize(hessian, 0.01, "layer")
    consumed = hessian.clone()
    given = factorize(consumed, 0.01, "layer", consume=True)
    assert consumed.untyped_storage().nbytes() == 0
    for part in ("upper", "root", "diagonal"):
        assert torch.equal(getattr(kept, part), getattr(given, part)), part
    assert kept.damp == given.damp


def test_large_batch_products_are_added_by_row_slices_and_small_ones_whole(monkeypatch) -> None:
    generator = torch.Generator().manual_seed(1)
    x_quant = torch.randn(300, 600, generator=generator)
    x_full = x_quant + 0.1 * torch.randn(300, 600, generator=generator)
    whole = CalibrationStatistics(600, asymmetric=True)
    whole.add(x_quant, x_full)
    assert torch.equal(whole._xtx, (x_quant.T @ x_quant).double())  # one product: its exact bits
    monkeypatch.setattr(statistics, "SLICED_PRODUCT_BYTES", 1)  # every product sliced (256-row slices)
    sliced = CalibrationStatistics(600, asymmetric=True)
    sliced.add(x_quant, x_full)
    x64, f64 = x_quant.double(), x_full.double()
    torch.testing.assert_close(sliced._xtx, x64.T @ x64, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(sliced._dxtx, (f64 - x64).T @ x64, rtol=1e-5, atol=1e-4)


def _resident_mib() -> float:
    """This process's resident memory (anonymous and file-backed), MiB, once the allocator has handed back what
    it freed (the batch products' temporaries)."""
    release_freed_memory()
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return (int(fields["RssAnon"].split()[0]) + int(fields["RssFile"].split()[0])) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
@pytest.mark.parametrize("sliced", [False, True], ids=["whole-product", "sliced-product"])
def test_large_sums_live_in_a_mapped_file_with_the_same_bits(tmp_path, monkeypatch, sliced) -> None:
    monkeypatch.setenv("GPTAQ_CACHE_DIR", str(tmp_path))
    if sliced:
        monkeypatch.setattr(statistics, "SLICED_PRODUCT_BYTES", 1)
    columns = int((SET_ASIDE_BYTES / 8) ** 0.5) + 1  # each float64 sum just above the threshold: 64 MiB
    generator = torch.Generator().manual_seed(2)
    x_quant = torch.randn(2, 16, columns, generator=generator)
    x_full = x_quant + 0.1 * torch.randn(2, 16, columns, generator=generator)
    weight = torch.randn(6, columns, generator=generator)
    in_memory = CalibrationStatistics(columns, asymmetric=True, mapped=False)
    mapped = CalibrationStatistics(columns, asymmetric=True)
    assert mapped.mapped and not in_memory.mapped
    assert list((tmp_path / "snapshots").iterdir()) == []  # unlinked once mapped
    before = _resident_mib()
    for batch in range(2):
        in_memory.add(x_quant[batch], x_full[batch])
        mapped.add(x_quant[batch], x_full[batch])
    assert _resident_mib() - before < 2 * 64 / 4  # the two 64 MiB sums are not held (their pages went back)
    assert torch.equal(mapped.hessian(), in_memory.hessian()) and torch.equal(mapped.drift(), in_memory.drift())
    assert mapped.output_error(weight, weight.round(), 3.0) == in_memory.output_error(weight, weight.round(), 3.0)
    with mapped.sums_in_files(last_use=True):
        assert torch.equal(mapped.hessian(), in_memory.hessian())
    assert mapped._xtx.numel() == 0 and mapped._dxtx.numel() == 0  # the mapping is gone with its last use
    with pytest.raises(RuntimeError, match="last use"):
        mapped.hessian()


def test_a_full_disk_for_mapped_sums_is_a_clear_error_before_any_sum(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GPTAQ_CACHE_DIR", str(tmp_path))

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(CalibrationError, match=r"no room in .*snapshots.*GPTAQ_CACHE_DIR"):
        CalibrationStatistics(4, asymmetric=True, mapped=True, name="block 3: mlp.down_proj")
    assert list((tmp_path / "snapshots").iterdir()) == []
