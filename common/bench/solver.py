"""Benchmark of the layer solvers: ``python -m common.bench.solver`` (``make bench-solver``).

Times (best of ``--repeats``) the solve function of every calibrated method of :mod:`common.methods` on layer
shapes ``m × n`` (weight rows × columns) on the current device, reports each as a ratio to GPTQ's time in the
same run, and compares each with its FLOP floor: the method's floating-point operations (its registry entry's
FLOP model) divided by the ``torch.matmul`` rate measured in the same run. Prints a table and writes
``results/bench_solver.csv``.

GPTQ's FLOP model (``b`` = blocksize): inverse Cholesky factor ``U`` (Cholesky ``n³/3`` + triangular
inverse ``n³/3``) and error propagation (``m·n·(n − b)`` across blocks plus ``m·n·b`` inside them; fused
multiply-adds count 2). GPTAQ also forms ``P`` and propagates ``w·P`` (twice GPTQ's); QEP and Qronos add
the correction ``W D (H + λI)⁻¹``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common.bench.table import SHAPE, column, format_table
from common.bench.timing import best_seconds, parse_shape, seeded_problem
from common.device import device_description, pick_device
from common.files import atomic_write_csv
from common.methods import BASELINE, GPTAQ_OFFICIAL, METHODS, Method
from common.profile import matmul_rate
from common.results.provenance import BENCH_SOLVER_CSV, REPO_ROOT
from common.solvers.column_loop import SolverConfig

DEFAULT_SHAPES = ((576, 576), (576, 1536), (4096, 4096), (11008, 4096))
FIELDS = [
    "device", "dtype", "rows", "columns", "method", "seconds", "over_gptq", "gflop", "gflops_achieved",
    "floor_seconds", "times_floor", "matmul_gflops",
]
WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BENCHED = tuple(name for name, method in METHODS.items() if method.calibrated and name != GPTAQ_OFFICIAL.name)
"""The solvers timed (the official lazy update is GPTAQ's cost)."""


def time_solve(method: Method, weight, hessian, drift, repeats: int, config: SolverConfig) -> float:
    """Best wall time in seconds of ``method``'s solve (:func:`common.bench.timing.best_seconds`)."""
    config = method.solver_config(config)
    return best_seconds(lambda: method.solve(weight, hessian, drift, config), weight.device, repeats)[0]


def run(shapes, repeats: int, device: torch.device, bits: int = 4, blocksize: int = 128,
        methods: tuple[str, ...] = BENCHED, dtype: torch.dtype = torch.float32) -> list[dict]:
    """Time ``methods`` on every shape (weights in ``dtype``; ``H`` and ``D`` in float32); a row per
    (shape, method)."""
    rate = matmul_rate(device, size=4096, repeats=3)
    name = device_description(device)
    config = SolverConfig(bits=bits, blocksize=blocksize)
    rows_out = []
    for rows, columns in shapes:
        weight, hessian, drift = seeded_problem(rows, columns, device)
        weight = weight.to(dtype)
        seconds = {m: time_solve(METHODS[m], weight, hessian, drift, repeats, config) for m in methods}
        for method in methods:
            flops = METHODS[method].flops(rows, columns, blocksize)
            floor = flops / rate
            rows_out.append({
                "device": name,
                "dtype": str(dtype).removeprefix("torch."),
                "rows": rows,
                "columns": columns,
                "method": method,
                "seconds": round(seconds[method], 4),
                "over_gptq": round(seconds[method] / seconds[BASELINE], 3),
                "gflop": round(flops / 1e9, 2),
                "gflops_achieved": round(flops / seconds[method] / 1e9, 1),
                "floor_seconds": round(floor, 4),
                "times_floor": round(seconds[method] / floor, 2),
                "matmul_gflops": round(rate / 1e9, 1),
            })
    return rows_out


COLUMNS = [SHAPE, column("method", 7, "method"), column("seconds", 9, "seconds", ".3f"),
           column("/gptq", 6, "over_gptq", ".2f"), column("GFLOP/s", 8, "gflops_achieved", ".1f"),
           column("floor s", 8, "floor_seconds", ".3f"), column("x floor", 8, "times_floor", ".2f")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=list(DEFAULT_SHAPES), help="ROWSxCOLUMNS")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=sorted(WEIGHT_DTYPES),
                        help="the weights' dtype (H and D stay float32)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "results" / BENCH_SOLVER_CSV)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    rows = run(args.shapes, args.repeats, device, dtype=WEIGHT_DTYPES[args.dtype])
    print(f"device: {rows[0]['device']}; weights {args.dtype}; float32 matmul: {rows[0]['matmul_gflops']} GFLOP/s")
    print(format_table(rows, COLUMNS))
    atomic_write_csv(args.output, rows, FIELDS)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
