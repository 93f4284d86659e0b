"""This checkout's layer solver beside another git revision's, in one process: ``python -m
common.bench_revision --revision REV`` (``make bench-revision REV=...``).

A change to the solver is measured against the code it replaces on the same machine at the same moment: the
revision's solver is imported with its own ``common`` package (:func:`load_revision_solver`), both solve the
same seeded problem in turn, round after round, and the best time of each is reported with their ratio and
whether the two weights are bitwise equal. Prints a table and writes ``results/bench_revision.csv``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

from common.bench_solver import parse_shape, seeded_problem
from common.device import device_description, pick_device
from common.files import atomic_write_csv
from common.profile import synchronize
from common.results.provenance import BENCH_REVISION_CSV, REPO_ROOT
from common.solvers.gptaq import quantize_weight

SOLVER_MODULES = ("common.solvers.gptaq", "common.gptaq")
"""Where a revision's ``quantize_weight`` lives (this layout first, then the single-file solver of older ones)."""
SOLVER_PATHS = ("common/solvers", "common/gptaq.py")
"""The files those modules are read from (what ``git diff`` checks to expect bitwise equality)."""
DEFAULT_SHAPES = ((576, 576), (1536, 576), (576, 1536), (4096, 4096))
FIELDS = ["device", "revision", "rows", "columns", "method", "mse", "revision_seconds", "ours_seconds",
          "ours_over_revision", "bitwise_equal"]


def load_revision_solver(revision: str, repo: Path = REPO_ROOT) -> types.ModuleType:
    """The solver module of ``revision`` (any name ``git show`` accepts), imported with that revision's
    ``common`` package beside this checkout's.

    The revision's ``common/`` tree is read with ``git archive``, imported under the usual module names while
    this checkout's ``common`` modules are set aside, and this checkout's are put back afterwards: the returned
    module and everything it imported keep the revision's code.

    Raises:
        ValueError: ``revision`` is not a revision of ``repo``, or it has no solver at :data:`SOLVER_MODULES`,
            or its solver cannot be imported.
    """
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", revision, "common"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise ValueError(f"revision must be a git revision of {repo} with a common/ folder, got {revision!r}: "
                         f"{archive.stderr.decode(errors='replace').strip()}")
    with tempfile.TemporaryDirectory(prefix="bench-revision-") as folder:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(folder, filter="data")
        ours = _set_aside_common()
        sys.path.insert(0, folder)
        try:
            module = _import_first(SOLVER_MODULES, revision)
        finally:
            sys.path.remove(folder)
            _set_aside_common()
            sys.modules.update(ours)
    if not hasattr(module, "quantize_weight"):
        raise ValueError(f"revision {revision!r}: its {module.__name__} has no quantize_weight")
    return module


def _set_aside_common() -> dict[str, types.ModuleType]:
    """Remove the ``common`` package and its submodules from ``sys.modules``; returns them."""
    names = [name for name in sys.modules if name == "common" or name.startswith("common.")]
    return {name: sys.modules.pop(name) for name in names}


def _import_first(names: tuple[str, ...], revision: str) -> types.ModuleType:
    for name in names:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name is None or not name.startswith(error.name):
                raise ValueError(f"revision {revision!r}: its solver cannot be imported: {error}") from None
        except ImportError as error:
            raise ValueError(f"revision {revision!r}: its solver cannot be imported: {error}") from None
    raise ValueError(f"revision {revision!r} has no solver module (looked for {', '.join(names)})")


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
