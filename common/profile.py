"""Where a run's time goes: per stage, its wall seconds, its floating-point operations, the FLOP floor at the
matmul rate measured at the start of the run, and its peak resident memory.
``python -m common.profile results/<run>.json`` prints the table a run recorded.

* FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` inside a stage (matrix products
  and attention), or handed in by the code that knows them (the calibration engine reports its forwards,
  statistics and solves separately: :meth:`StageProfile.add`). A stage's floor is its FLOPs divided by
  the matmul rate: the time it would take if every operation ran as fast as one large ``torch.matmul``.
* Peak memory: on Linux the process's peak resident set (``VmHWM``) is reset at each stage's start
  (``/proc/self/clear_refs``, after freed memory is handed back with ``malloc_trim``), so each stage reports
  its own peak; elsewhere the process-wide peak so far.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from common.memory import release_freed_memory

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def matmul_rate(device: torch.device, size: int = 1024, repeats: int = 5, min_seconds: float = 0.5) -> float:
    """Measured float32 ``torch.matmul`` rate in FLOP/s on ``size × size`` operands.

    The best of at least ``repeats`` products, timed for at least ``min_seconds`` in all: a few products at
    the start of a run (threads waking, clocks ramping) measured 100 GFLOP/s on a machine whose forwards
    then ran at 160.
    """
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.matmul(a, b)
    best, spent, count = float("inf"), 0.0, 0
    while count < repeats or spent < min_seconds:
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        elapsed = time.perf_counter() - start
        best, spent, count = min(best, elapsed), spent + elapsed, count + 1
    return 2 * size**3 / best


def start_profile(device: torch.device) -> StageProfile:
    """A run's profile, its floors against the matmul rate measured now on ``device`` (a fraction of a second)."""
    return StageProfile(matmul_rate(device))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM_FLOPS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM_FLOPS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops


@contextlib.contextmanager
def counting_flops() -> Iterator[FlopCounterMode]:
    """A :class:`FlopCounterMode` that also counts CPU attention (``get_total_flops()`` when done)."""
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as counter:
        yield counter


def forward_flops(forward: Callable[[], object]) -> float:
    """The FLOPs of one call of ``forward`` (no gradients), counted by :func:`counting_flops`.

    Counting every operation of a long stage slows it (Python runs for each operation), so stages that
    repeat one forward (an evaluation) count one and multiply.
    """
    with torch.no_grad(), counting_flops() as counter:
        forward()
    return float(counter.get_total_flops())


def evaluation_flops_of(forward_one: Callable[[], object], examples: int) -> float:
    """The FLOPs of an evaluation of ``examples`` examples: one example's forward (``forward_one``), counted
    by :func:`forward_flops`, times ``examples``."""
    return forward_flops(forward_one) * examples


def _peak_rss_bytes() -> int:
    if _STATUS.is_file():
        match = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
        if match:
            return int(match.group(1)) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")


@dataclass
class Stage:
    """One stage: wall seconds, counted FLOPs (``None`` when not counted) and peak RSS in bytes."""

    seconds: float = 0.0
    flops: float | None = None
    peak_rss: int = 0


class StageProfile:
    """Accumulates :class:`Stage` records by name: ``with profile("evaluate gptq"): ...``.

    Args:
        rate: the matmul rate (FLOP/s) the floors are measured against; ``None``: no floors.
        count_flops: count every stage's FLOPs with :func:`counting_flops` (each stage may choose).
    """

    def __init__(self, rate: float | None = None, *, count_flops: bool = False) -> None:
        self.rate = rate
        self.count_flops = count_flops
        self.stages: dict[str, Stage] = {}

    @property
    def seconds(self) -> dict[str, float]:
        """``{stage: seconds}`` (rounded to milliseconds)."""
        return {name: round(stage.seconds, 3) for name, stage in self.stages.items()}

    @contextlib.contextmanager
    def __call__(self, name: str, *, count_flops: bool | None = None) -> Iterator[None]:
        count = self.count_flops if count_flops is None else count_flops
        release_freed_memory()
        _reset_peak_rss()
        start = time.perf_counter()
        with counting_flops() if count else contextlib.nullcontext() as counter:
            yield
        self.add(name, time.perf_counter() - start, counter.get_total_flops() if counter is not None else None)

    def add(self, name: str, seconds: float, flops: float | None = None) -> None:
        """Add ``seconds`` (and ``flops``) to stage ``name``; its peak RSS becomes the current peak."""
        stage = self.stages.setdefault(name, Stage())
        stage.seconds += seconds
        if flops is not None:
            stage.flops = (stage.flops or 0.0) + flops
        stage.peak_rss = max(stage.peak_rss, _peak_rss_bytes())

    def rows(self) -> list[dict[str, float | str | None]]:
        """A row per stage: seconds, GFLOP, floor seconds, times the floor, peak RSS in MiB (``peak_rss_mb``)."""
        rows = []
        for name, stage in self.stages.items():
            floor = stage.flops / self.rate if stage.flops and self.rate else None
            rows.append({
                "stage": name,
                "seconds": round(stage.seconds, 3),
                "gflop": None if stage.flops is None else round(stage.flops / 1e9, 1),
                "floor_seconds": None if floor is None else round(floor, 3),
                "times_floor": None if floor is None else round(stage.seconds / floor, 2),
                "peak_rss_mb": round(stage.peak_rss / 2**20),
            })
        return rows

    def as_dict(self) -> dict[str, object]:
        """What the run's JSON records: the matmul rate and the rows."""
        return {"matmul_gflops": None if self.rate is None else round(self.rate / 1e9, 1), "stages": self.rows(),
                "raw": {name: asdict(stage) for name, stage in self.stages.items()}}

    def table(self) -> str:
        """The rows as a fixed-width text table, with the total."""
        return format_profile(self.as_dict())


def format_profile(profile: dict) -> str:
    """A recorded profile (:meth:`StageProfile.as_dict`) as a text table."""
    rows = profile["stages"]
    width = max([len("stage"), *(len(row["stage"]) for row in rows)])
    lines = [f"{'stage':<{width}} {'seconds':>9} {'GFLOP':>9} {'floor s':>9} {'× floor':>8} {'peak MiB':>8}"]
    for row in rows:
        cells = {key: format(row[key], spec) if row[key] is not None else "—"
                 for key, spec in (("gflop", ">9.1f"), ("floor_seconds", ">9.1f"), ("times_floor", ">8.2f"))}
        lines.append(f"{row['stage']:<{width}} {row['seconds']:>9.1f} {cells['gflop']:>9} "
                     f"{cells['floor_seconds']:>9} {cells['times_floor']:>8} {row['peak_rss_mb']:>8}")
    total = sum(row["seconds"] for row in rows if ": " not in row["stage"])
    peak = max((row["peak_rss_mb"] for row in rows), default=0)
    lines.append(f"{'total (stages)':<{width}} {total:>9.1f} {'':>9} {'':>9} {'':>8} {peak:>8}")
    rate = profile.get("matmul_gflops")
    if rate:
        lines.append(f"floors at the float32 matmul rate measured at the start of the run: {rate} GFLOP/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the profile recorded in one or more result JSON files."""
    parser = argparse.ArgumentParser(description="Print the stage profile of result JSON files.")
    parser.add_argument("files", nargs="+", type=Path, help="results/<run>.json")
    args = parser.parse_args(argv)
    for path in args.files:
        try:
            profile = json.loads(path.read_text(encoding="utf-8")).get("profile")
        except (OSError, json.JSONDecodeError) as error:
            print(f"error: {path}: {error}", file=sys.stderr)
            return 2
        if not profile:
            print(f"error: {path} records no profile (written by an older version?)", file=sys.stderr)
            return 2
        print(f"{path}:")
        print(format_profile(profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
