"""Our GPTQ and GPTAQ solves beside the official code's, in one process: ``make bench-official``.

``python -m common.bench.official --gptq-repo DIR --gptaq-repo DIR`` where the folders are checkouts of
the official code (nothing of it is in this repository):

* GPTQ: ``git clone https://github.com/IST-DASLab/gptq`` (``gptq.py``: the ``GPTQ`` class and its
  ``Quantizer`` from ``quant.py``),
* GPTAQ: ``git clone https://github.com/Intelligent-Computing-Lab-Yale/GPTAQ`` (``fake_quant/gptaq_utils.py``:
  the ``GPTAQ`` class and QuaRot's ``WeightQuantizer``).

Each layer shape gets one seeded problem (weight, ``H``, ``D``, as in :mod:`common.bench.timing`); every
solver gets its own copy of it and is timed by its best over ``--repeats`` rounds after a warm-up, the two
alternating (:func:`common.bench.timing.best_alternating`): the
official ``fasterquant`` (statistics set directly, so its ``add_batch`` is not timed) against our solve
function with the same settings (4-bit per-channel asymmetric RTN grid, no clip search, columns in order,
block 128, damping 0.01, α 0.25). The quantized weights are compared too (the fraction that differ), so
the times are of the same computation: ours GPTQ against the official GPTQ, our ``lazy_update="official"``
GPTAQ against the official GPTAQ (our default, exact lazy update is the one timed; it differs from the
official form by design, see the README). Prints a table and writes ``results/bench_official.csv``.

Two shims, for CPU machines only: the official solvers end with ``torch.cuda.synchronize()``, which is
made a no-op when no GPU is present, and the official GPTAQ module imports the CUDA-only
``fast_hadamard_transform`` at load time (its solver never calls it), which is given an empty stand-in
module when it is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import sys
import types
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from torch import nn

from common.bench.table import SHAPE, column, format_table
from common.bench.timing import best_alternating, parse_shape, seeded_problem
from common.device import device_description, pick_device
from common.files import atomic_write_csv
from common.methods import GPTAQ, GPTAQ_OFFICIAL, GPTQ
from common.profile import matmul_rate
from common.results.provenance import BENCH_OFFICIAL_CSV, REPO_ROOT
from common.solvers.column_loop import SolverConfig

DEFAULT_SHAPES = ((576, 576), (4096, 4096), (11008, 4096))
FIELDS = [
    "device", "rows", "columns", "method", "official_seconds", "ours_seconds", "ours_over_official",
    "weights_differing", "floor_seconds", "ours_times_floor", "official_times_floor", "matmul_gflops",
]
BITS, BLOCKSIZE, PERCDAMP, ALPHA = 4, 128, 0.01, 0.25


class OfficialCodeError(ValueError):
    """A folder given for the official code does not hold it."""


@contextlib.contextmanager
def _cpu_shims() -> Iterator[None]:
    """``torch.cuda.synchronize`` as a no-op without a GPU; an empty ``fast_hadamard_transform`` if absent."""
    saved_sync = torch.cuda.synchronize
    added = None
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *args, **kwargs: None
    if importlib.util.find_spec("fast_hadamard_transform") is None:
        added = sys.modules.setdefault("fast_hadamard_transform", types.ModuleType("fast_hadamard_transform"))
    try:
        yield
    finally:
        torch.cuda.synchronize = saved_sync
        if added is not None:
            sys.modules.pop("fast_hadamard_transform", None)


def _import_from(folder: Path, module: str, marker: str) -> types.ModuleType:
    if not (folder / marker).is_file():
        raise OfficialCodeError(f"{folder} has no {marker}: pass a checkout of the official code")
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(folder))


def load_official(gptq_repo: Path, gptaq_repo: Path) -> tuple[Callable, Callable]:
    """Two functions ``(weight, H, D) -> quantized weight`` running the official solvers."""
    with _cpu_shims():
        gptq_module = _import_from(gptq_repo, "gptq", "gptq.py")
        gptaq_module = _import_from(gptaq_repo / "fake_quant", "gptaq_utils", "gptaq_utils.py")
        quant_utils = sys.modules["quant_utils"]

    def official_gptq(weight: torch.Tensor, hessian: torch.Tensor, drift: torch.Tensor) -> torch.Tensor:
        layer = _linear(weight)
        solver = gptq_module.GPTQ(layer)
        solver.H = hessian.clone()
        solver.quantizer = gptq_module.Quantizer()
        solver.quantizer.configure(BITS, perchannel=True, sym=False, mse=False)
        with _cpu_shims(), contextlib.redirect_stdout(io.StringIO()):
            solver.fasterquant(blocksize=BLOCKSIZE, percdamp=PERCDAMP, groupsize=-1, actorder=False)
        return layer.weight.data

    def official_gptaq(weight: torch.Tensor, hessian: torch.Tensor, drift: torch.Tensor) -> torch.Tensor:
        layer = _linear(weight)
        solver = gptaq_module.GPTAQ(layer)
        solver.H, solver.dXXT = hessian.clone(), drift.clone()
        solver.quantizer = quant_utils.WeightQuantizer()
        solver.quantizer.configure(BITS, perchannel=True, sym=False, mse=False)
        with _cpu_shims():
            solver.fasterquant(blocksize=BLOCKSIZE, percdamp=PERCDAMP, groupsize=-1, actorder=False, alpha=ALPHA)
        return layer.weight.data

    return official_gptq, official_gptaq


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
    layer.weight.data = weight.clone()
    return layer


def _ours(method) -> Callable:
    config = method.solver_config(SolverConfig.of(bits=BITS, blocksize=BLOCKSIZE, percdamp=PERCDAMP, alpha=ALPHA))

    def solve(weight: torch.Tensor, hessian: torch.Tensor, drift: torch.Tensor) -> torch.Tensor:
        return method.solve(weight, hessian, drift, config).weight

    return solve


def run(shapes, repeats: int, device: torch.device, gptq_repo: Path, gptaq_repo: Path) -> list[dict]:
    """A row per (shape, method): both times, their ratio, the floors and the fraction of weights that differ."""
    official = dict(zip(("gptq", "gptaq"), load_official(gptq_repo, gptaq_repo), strict=True))
    rate = matmul_rate(device, size=4096, repeats=3)
    rows_out = []
    for rows, columns in shapes:
        problem = seeded_problem(rows, columns, device)
        for method, same_form in ((GPTQ, GPTQ), (GPTAQ, GPTAQ_OFFICIAL)):
            seconds, weights = best_alternating({"official": partial(official[method.name], *problem),
                                                 "ours": partial(_ours(method), *problem)}, device, repeats)
            official_seconds, official_weight = seconds["official"], weights["official"]
            ours_seconds, ours_weight = seconds["ours"], weights["ours"]
            same_form_weight = ours_weight if same_form is method else _ours(same_form)(*problem)
            floor = method.flops(rows, columns, BLOCKSIZE) / rate
            rows_out.append({
                "device": device_description(device), "rows": rows, "columns": columns, "method": method.name,
                "official_seconds": round(official_seconds, 4), "ours_seconds": round(ours_seconds, 4),
                "ours_over_official": round(ours_seconds / official_seconds, 3),
                "weights_differing": float((same_form_weight != official_weight).double().mean()),
                "floor_seconds": round(floor, 4), "ours_times_floor": round(ours_seconds / floor, 2),
                "official_times_floor": round(official_seconds / floor, 2), "matmul_gflops": round(rate / 1e9, 1),
            })
    return rows_out


COLUMNS = [SHAPE, column("method", 6, "method"), column("official s", 10, "official_seconds", ".3f"),
           column("ours s", 8, "ours_seconds", ".3f"), column("ours/off", 8, "ours_over_official", ".3f"),
           ("x floor", 14, lambda row: f"{row['ours_times_floor']:.2f} / {row['official_times_floor']:.2f}"),
           column("differing", 9, "weights_differing", ".2e")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gptq-repo", type=Path, required=True, help="checkout of IST-DASLab/gptq")
    parser.add_argument("--gptaq-repo", type=Path, required=True,
                        help="checkout of Intelligent-Computing-Lab-Yale/GPTAQ")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=list(DEFAULT_SHAPES), help="ROWSxCOLUMNS")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "results" / BENCH_OFFICIAL_CSV)
    args = parser.parse_args(argv)
    try:
        rows = run(args.shapes, args.repeats, pick_device(args.device), args.gptq_repo, args.gptaq_repo)
    except OfficialCodeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"device: {rows[0]['device']}; float32 matmul: {rows[0]['matmul_gflops']} GFLOP/s")
    print("x floor: ours / official; differing: fraction of our same-form solve's weights unequal to the official's")
    print(format_table(rows, COLUMNS))
    atomic_write_csv(args.output, rows, FIELDS)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
