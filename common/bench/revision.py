"""This checkout's layer solvers beside another git revision's, in one process: ``python -m
common.bench.revision --revision REV`` (``make bench-revision REV=...``).

A change to the solvers is measured against the code it replaces on the same machine at the same moment: the
revision's method registry is imported with its own ``common`` package (:func:`load_revision_registry`), both
solve the same seeded problem in turn, round after round (:func:`common.bench.timing.best_alternating`), and
the best time of each is reported with their ratio and whether the two weights are bitwise equal. Prints a
table and writes ``results/bench_revision.csv``.
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
import types
from pathlib import Path

import torch

import common.methods
from common.bench.table import SHAPE, column, format_table
from common.bench.timing import best_alternating, parse_shape, seeded_problem
from common.device import device_description, pick_device
from common.files import atomic_write_csv
from common.results.provenance import BENCH_REVISION_CSV, REPO_ROOT
from common.rules import check_positive

SOLVER_PATHS = ("common/solvers", "common/methods.py", "common/quant/quantizers.py")
"""The files the solvers are read from (what ``git diff`` checks to expect bitwise equality)."""
DEFAULT_SHAPES = ((576, 576), (1536, 576), (576, 1536), (4096, 4096))
DEFAULT_METHODS = ("gptq", "gptaq")
FIELDS = ["device", "revision", "rows", "columns", "method", "mse", "revision_seconds", "ours_seconds",
          "ours_over_revision", "bitwise_equal"]


def load_revision_registry(revision: str, repo: Path = REPO_ROOT) -> types.ModuleType:
    """The module ``common.methods`` of ``revision`` (any name ``git show`` accepts), imported with that
    revision's ``common`` package beside this checkout's.

    The revision's ``common/`` tree is read with ``git archive`` and imported under the usual module names
    while this checkout's ``common`` modules are set aside; they are put back afterwards. The returned module
    and everything it imported keep the revision's code.

    Raises:
        ValueError: ``revision`` is not a revision of ``repo``, or its registry cannot be imported.
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
            return importlib.import_module("common.methods")
        except ImportError as error:
            raise ValueError(f"revision {revision!r}: its method registry cannot be imported: {error}") from None
        finally:
            sys.path.remove(folder)
            _set_aside_common()
            sys.modules.update(ours)


def _set_aside_common() -> dict[str, types.ModuleType]:
    """Remove the ``common`` package and its submodules from ``sys.modules``; returns them."""
    names = [name for name in sys.modules if name == "common" or name.startswith("common.")]
    return {name: sys.modules.pop(name) for name in names}


def solve_with(registry: types.ModuleType, method: str, problem: tuple[torch.Tensor, ...], *, bits: int,
               mse: bool) -> torch.Tensor:
    """``method``'s fake-quantized weight from ``registry`` (a ``common.methods`` module) on ``problem``
    (weight, ``H``, ``D``), with that registry's own solver settings (``bits``, ``mse``, the rest default)."""
    spec = registry.METHODS[method]
    config = spec.solver_config(registry.SolverConfig(bits=bits, mse=mse))
    return spec.solve(*problem, config, name="layer").weight


def run(shapes, revision: str, repeats: int, device: torch.device, *, mse: bool = False, bits: int = 4,
        methods: tuple[str, ...] = DEFAULT_METHODS) -> list[dict]:
    """For each shape and method, ``revision``'s solve and this checkout's, alternating; best of ``repeats``.

    Returns one row per shape and method (see :data:`FIELDS`; seconds are wall times of one solve).
    """
    check_positive("repeats", repeats)
    theirs = load_revision_registry(revision)
    for method in methods:
        for side, registry in (("this checkout", common.methods), (f"revision {revision!r}", theirs)):
            if method not in registry.METHODS or registry.METHODS[method].solve is None:
                raise ValueError(f"methods: {method!r} is not a calibrated method of {side}")
    rows_out = []
    for rows, columns in shapes:
        problem = seeded_problem(rows, columns, device)
        for method in methods:
            solves = {side: functools.partial(solve_with, registry, method, problem, bits=bits, mse=mse)
                      for side, registry in (("revision", theirs), ("ours", common.methods))}
            best, results = best_alternating(solves, device, repeats)
            rows_out.append({
                "device": device_description(device), "revision": revision, "rows": rows, "columns": columns,
                "method": method, "mse": mse, "revision_seconds": round(best["revision"], 4),
                "ours_seconds": round(best["ours"], 4),
                "ours_over_revision": round(best["ours"] / best["revision"], 3),
                "bitwise_equal": bool(torch.equal(results["revision"], results["ours"])),
            })
    return rows_out


COLUMNS = [SHAPE, column("method", 14, "method"), column("revision s", 11, "revision_seconds", ".4f"),
           column("ours s", 9, "ours_seconds", ".4f"), column("ours/rev", 9, "ours_over_revision", ".3f"),
           column("bitwise", 8, "bitwise_equal")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revision", required=True, help="git revision whose solvers are timed beside ours")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=list(DEFAULT_SHAPES), help="ROWSxCOLUMNS")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated calibrated methods of common/methods.py (default: gptq,gptaq)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mse", action="store_true", help="with the clip search (the embedded runs' setting)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "results" / BENCH_REVISION_CSV)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    methods = tuple(name.strip() for name in args.methods.split(",") if name.strip())
    try:
        rows = run(args.shapes, args.revision, args.repeats, device, mse=args.mse, methods=methods)
    except ValueError as error:
        parser.error(str(error))
    print(f"device: {rows[0]['device']}; revision {args.revision} against this checkout")
    print(format_table(rows, COLUMNS))
    atomic_write_csv(args.output, rows, FIELDS)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
