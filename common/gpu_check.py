"""Everything that must be checked on CUDA, in one command of a few minutes: ``python -m common.gpu_check``
(``make gpu-check``).

1. the tests that need CUDA (``pytest -k cuda``);
2. a tiny calibration in float16 on a synthetic checkpoint (:mod:`common.bench.synthetic_llama`, shape
   ``toy``), one block at a time with ``--offload``, and the same in memory: both must give the same CSV
   values;
3. a blockwise run killed after a block and rerun (it must resume);
4. the solver benchmark in float32 and float16;
5. whether ``fast-hadamard-transform`` is installed (the CUDA kernel of the online Hadamards).

Prints one table (check, status, seconds, detail) and exits non-zero if a check failed. On a machine without
CUDA it says so and exits with code 2.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from common.bench.synthetic_llama import write_checkpoint
from common.bench.table import column, format_table
from common.results.provenance import REPO_ROOT

RUN = [sys.executable, "-m", "fake_quant.main", "--config", "fake_quant/configs/embedded_w4a4.yaml",
       "--device", "cuda", "--dtype", "float16", "--nsamples", "8", "--seqlen", "128", "--eval_max_windows", "4",
       "--methods", "fp,rtn,gptq,gptaq,qep,qronos"]
COLUMNS = [column("check", 34, "check"), column("status", 7, "status"), column("seconds", 8, "seconds", ".1f"),
           column("detail", 60, "detail")]


def _command(argv: list[str], timeout: float = 300) -> str:
    """Run ``argv`` in the repository; its last output line, or ``RuntimeError`` with its tail if it failed."""
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}")
    lines = (done.stdout.strip() or done.stderr.strip()).splitlines()
    return lines[-1] if lines else ""


def _ppl_row(csv_path: Path) -> str:
    return next(line for line in csv_path.read_text().splitlines() if "_ppl," in line).split(",", 4)[4]


def _calibrations(work: Path) -> str:
    """Blockwise with --offload and in memory, float16 on CUDA: the same perplexities."""
    model = write_checkpoint("toy", work / "toy")
    rows = {}
    for loading in ("blockwise", "whole"):
        _command([*RUN, "--model", str(model), "--model_loading", loading, "--offload", "--name", loading,
                  "--results_dir", str(work / "results")])
        rows[loading] = _ppl_row(work / "results" / f"{loading}.csv")
    if rows["blockwise"].split(",")[:6] != rows["whole"].split(",")[:6]:
        raise RuntimeError(f"blockwise {rows['blockwise'][:80]} != whole {rows['whole'][:80]}")
    return "fp,rtn,gptq,gptaq,qep,qronos ppl " + ",".join(rows["whole"].split(",")[:6])


def _resume(work: Path) -> str:
    """A run killed after block 1 of GPTAQ resumes to the uninterrupted run's perplexities."""
    model = work / "toy"
    argv = [sys.executable, "-m", "fake_quant.tests.blockwise_worker", "--kill-after-block", "1", *RUN[3:],
            "--model", str(model), "--methods", "gptaq", "--name", "killed", "--results_dir", str(work / "killed")]
    killed = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    if killed.returncode != -9:
        raise RuntimeError(f"the run was not killed (exit {killed.returncode}): {killed.stderr.strip()[-300:]}")
    _command([*RUN, "--model", str(model), "--methods", "gptaq", "--name", "killed", "--results_dir",
              str(work / "killed")])
    _command([*RUN, "--model", str(model), "--methods", "gptaq", "--name", "straight", "--results_dir",
              str(work / "killed")])
    resumed, straight = (_ppl_row(work / "killed" / f"{name}.csv").split(",")[0] for name in ("killed", "straight"))
    if resumed != straight:
        raise RuntimeError(f"resumed gptaq ppl {resumed} != uninterrupted {straight}")
    return f"gptaq ppl {resumed} resumed = uninterrupted"


def _solver(dtype: str) -> Callable[[Path], str]:
    def check(work: Path) -> str:
        return _command([sys.executable, "-m", "common.bench.solver", "--device", "cuda", "--dtype", dtype,
                         "--shapes", "4096x4096", "11008x4096", "--output", str(work / f"solver-{dtype}.csv")])
    return check


def _fast_hadamard(_work: Path) -> str:
    try:
        import fast_hadamard_transform  # noqa: F401
    except ImportError as error:
        raise RuntimeError(f"not installed ({error}): pip install fast-hadamard-transform") from None
    return "installed"


CHECKS: list[tuple[str, Callable[[Path], str]]] = [
    ("tests that need CUDA", lambda work: _command([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "common",
                                                    "fake_quant", "spinquant", "vit_quant"])),
    ("float16 calibration, blockwise = whole", _calibrations),
    ("killed blockwise run resumes", _resume),
    ("solver benchmark float32", _solver("float32")),
    ("solver benchmark float16", _solver("float16")),
    ("fast-hadamard-transform", _fast_hadamard),
]


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, check in CHECKS:
            began = time.perf_counter()
            try:
                detail, status = check(Path(folder)), "ok"
            except Exception as error:  # every check reports; the table says which failed
                detail, status = f"{type(error).__name__}: {error}", "FAIL"
            rows.append({"check": name, "status": status, "seconds": time.perf_counter() - began,
                         "detail": detail.replace("\n", " ")[:200]})
            print(format_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()} · torch {torch.__version__}")
    print(format_table(rows, COLUMNS))
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
