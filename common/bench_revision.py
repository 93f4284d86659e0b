"""This checkout's layer solver beside another git revision's, in one process: ``python -m
common.bench_revision --revision REV`` (``make bench-revision REV=...``).

A change to the solver is measured against the code it replaces on the same machine at the same moment: the
revision's ``common/gptaq.py`` is read with ``git show`` and imported as a module of its own (it uses this
checkout's quantizers and the rest of ``common``), both solve the same seeded problem in turn, round after
round, and the best time of each is reported with their ratio and whether the two weights are bitwise equal.
Prints a table and writes ``results/bench_revision.csv``.
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

from common.bench_solver import parse_shape, seeded_problem
from common.device import device_description, pick_device
from common.files import atomic_write_csv
from common.gptaq import quantize_weight
from common.profile import synchronize
from common.results.provenance import BENCH_REVISION_CSV, REPO_ROOT

SOLVER_PATH = "common/gptaq.py"
DEFAULT_SHAPES = ((576, 576), (1536, 576), (576, 1536), (4096, 4096))
FIELDS = ["device", "revision", "rows", "columns", "method", "mse", "revision_seconds", "ours_seconds",
          "ours_over_revision", "bitwise_equal"]


def load_revision_solver(revision: str, repo: Path = REPO_ROOT) -> types.ModuleType:
    """The module ``common/gptaq.py`` of ``revision`` (any name ``git show`` accepts), imported on its own.

    Raises:
        ValueError: ``revision`` is not a revision of ``repo`` holding that file, or its solver cannot be
            imported beside this checkout (it needs names this checkout's modules no longer have).
    """
    shown = subprocess.run(["git", "-C", str(repo), "show", f"{revision}:{SOLVER_PATH}"],
                           capture_output=True, text=True, check=False)
    if shown.returncode != 0:
        raise ValueError(f"revision must be a git revision of {repo} with {SOLVER_PATH}, got {revision!r}: "
                         f"{shown.stderr.strip()}")
    name = f"_revision_gptaq_{abs(hash((revision, shown.stdout)))}"
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up by name
    try:
        exec(compile(shown.stdout, f"{revision}:{SOLVER_PATH}", "exec"), module.__dict__)
    except ImportError as error:
        del sys.modules[name]
        raise ValueError(f"revision {revision!r}: its solver cannot be imported beside this checkout: {error}"
                         ) from None
    if not hasattr(module, "quantize_weight"):
        raise ValueError(f"revision {revision!r}: its {SOLVER_PATH} has no quantize_weight")
    return module


def _timed(call: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    synchronize(device)
    began = time.perf_counter()
    result = call()
    synchronize(device)
    return time.perf_counter() - began, result


def run(shapes, revision: str, repeats: int, device: torch.device, *, mse: bool = False,
        bits: int = 4) -> list[dict]:
    """For each shape, GPTQ and GPTAQ of ``revision`` and of this checkout, alternating; best of ``repeats``.

    Returns one row per shape and method (see :data:`FIELDS`; seconds are wall times of one solve).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    theirs = load_revision_solver(revision)
    rows_out = []
    for rows, columns in shapes:
        weight, hessian, drift = seeded_problem(rows, columns, device)
        for method, d in (("gptq", None), ("gptaq", drift)):
            solves = {
                "revision": functools.partial(theirs.quantize_weight, weight, hessian, d, bits=bits, mse=mse),
                "ours": functools.partial(quantize_weight, weight, hessian, d, bits=bits, mse=mse),
            }
            results = {side: solve() for side, solve in solves.items()}  # warm-up
            best = dict.fromkeys(solves, float("inf"))
            for _ in range(repeats):
                for side, solve in solves.items():
                    seconds, results[side] = _timed(solve, device)
                    best[side] = min(best[side], seconds)
            rows_out.append({
                "device": device_description(device), "revision": revision, "rows": rows, "columns": columns,
                "method": method, "mse": mse, "revision_seconds": round(best["revision"], 4),
                "ours_seconds": round(best["ours"], 4),
                "ours_over_revision": round(best["ours"] / best["revision"], 3),
                "bitwise_equal": bool(torch.equal(results["revision"], results["ours"])),
            })
    return rows_out


def format_table(rows: list[dict]) -> str:
    header = f"{'shape':>12} {'method':>7} {'revision s':>11} {'ours s':>9} {'ours/rev':>9} {'bitwise':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['rows']:>5}x{row['columns']:<6} {row['method']:>7} {row['revision_seconds']:>11.4f} "
            f"{row['ours_seconds']:>9.4f} {row['ours_over_revision']:>9.3f} {row['bitwise_equal']!s:>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revision", required=True, help="git revision whose solver is timed beside ours")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=list(DEFAULT_SHAPES), help="ROWSxCOLUMNS")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mse", action="store_true", help="with the clip search (the embedded runs' setting)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "results" / BENCH_REVISION_CSV)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    try:
        rows = run(args.shapes, args.revision, args.repeats, device, mse=args.mse)
    except ValueError as error:
        parser.error(str(error))
    print(f"device: {rows[0]['device']}; revision {args.revision} against this checkout")
    print(format_table(rows))
    atomic_write_csv(args.output, rows, FIELDS)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
