"""Peak memory of GPTAQ + QuaRot on synthetic checkpoints: ``python -m common.bench.memory`` (``make bench-memory``).

For each shape (:data:`common.bench.synthetic_llama.SHAPES`) the benchmark writes the synthetic float16
checkpoint (once, into ``<cache root>/bench-models/``), then runs ``fake_quant.main`` on it in a process of its
own (the embedded W4A4 settings without the MSE clip search, which takes most of the solve time and is not
what is measured here; GPTAQ only, ``--nsamples`` windows of ``--seqlen`` tokens, perplexity on two windows)
and samples that process's resident memory every 0.1 s from ``/proc``: anonymous pages (the tensors) and
file-backed pages (mapped checkpoint files), and their sum. Prints a table and writes
``results/bench_memory.csv``. A benchmark, not a test: minutes to an hour per shape on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common.bench.synthetic_llama import SHAPES, write_checkpoint
from common.bench.table import column, format_table
from common.cache import cache_root
from common.device import device_description, pick_device
from common.files import atomic_write_csv
from common.results.provenance import REPO_ROOT

BENCH_MEMORY_CSV = "bench_memory.csv"
FIELDS = ["device", "shape", "layers", "model_loading", "tokens", "checkpoint_gib", "peak_rss_gib", "peak_anon_gib",
          "peak_file_gib", "seconds", "wiki_embedded_ppl"]
NSAMPLES, SEQLEN = 4, 128
"""The default calibration: 4 windows of 128 tokens (float32, as the embedded W4A4 config)."""
KIB_PER_GIB = 2**20
COLUMNS = [column("shape", 15, "shape"), column("layers", 7, "layers"), column("loading", 10, "model_loading"),
           column("ckpt GiB", 9, "checkpoint_gib"), column("peak RSS", 9, "peak_rss_gib"),
           column("anon", 6, "peak_anon_gib"), column("file", 6, "peak_file_gib"), column("seconds", 8, "seconds"),
           column("ppl", 10, "wiki_embedded_ppl", ".4g")]


def _status_kib(pid: int) -> dict[str, int]:
    """``VmRSS``, ``RssAnon`` and ``RssFile`` of a process, in KiB (empty once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


def measure(argv: list[str]) -> tuple[dict[str, int], float, int]:
    """Run ``argv``, sampling its memory; returns the peak of each field (KiB), the seconds and the exit code."""
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    began = time.perf_counter()
    process = subprocess.Popen(argv, cwd=REPO_ROOT)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key, value in _status_kib(process.pid).items():
                peaks[key] = max(peaks[key], value)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    done.set()
    sampler.join()
    return peaks, time.perf_counter() - began, code


def bench_shape(shape: str, *, loading: str, nsamples: int, seqlen: int, keep: bool,
                layers: int | None = None) -> dict[str, object]:
    """Write ``shape``'s checkpoint (its first ``layers`` layers, if given) if needed, run GPTAQ + QuaRot on it
    and return the measured row."""
    folder = cache_root() / "bench-models" / (f"{shape}-{layers}-layers" if layers else shape)
    if not (folder / "model.safetensors.index.json").is_file():
        write_checkpoint(shape, folder, layers=layers)
    size = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    with tempfile.TemporaryDirectory() as results:
        argv = [sys.executable, "-m", "fake_quant.main", "--config", "fake_quant/configs/embedded_w4a4.yaml",
                "--model", str(folder), "--methods", "gptaq", "--nsamples", str(nsamples), "--seqlen", str(seqlen),
                "--eval_max_windows", "2", "--no-w_clip", "--model_loading", loading, "--name", "bench-memory",
                "--results_dir", results]
        peaks, seconds, code = measure(argv)
        if code != 0:
            raise RuntimeError(f"{shape}: the run failed with exit code {code}")
        row = next(line for line in (Path(results) / "bench-memory.csv").read_text().splitlines()
                   if ",wiki_embedded_ppl," in line)
    if not keep:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    header_ppl = float(row.split(",")[4])
    return {
        "device": device_description(pick_device("auto")), "shape": shape,
        "layers": layers or SHAPES[shape]["num_hidden_layers"], "model_loading": loading,
        "tokens": nsamples * seqlen,
        "checkpoint_gib": round(size / 2**30, 2), "peak_rss_gib": round(peaks["VmRSS"] / KIB_PER_GIB, 2),
        "peak_anon_gib": round(peaks["RssAnon"] / KIB_PER_GIB, 2),
        "peak_file_gib": round(peaks["RssFile"] / KIB_PER_GIB, 2), "seconds": round(seconds, 1),
        "wiki_embedded_ppl": header_ppl,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tinyllama-1.1b,llama-2-7b,llama-2-13b",
                        help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--model-loading", default="blockwise",
                        help="comma-separated, of blockwise and whole (each shape is run with each)")
    parser.add_argument("--nsamples", type=int, default=NSAMPLES)
    parser.add_argument("--seqlen", type=int, default=SEQLEN)
    parser.add_argument("--layers", type=int, help="only the first LAYERS decoder layers of each shape (the same "
                        "peak per block in less time and disk; the row says how many)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints (GBs) for a rerun")
    parser.add_argument("--results-dir", type=Path, default=REPO_ROOT / "results")
    parser.add_argument("--append", action="store_true", help="add the rows to an existing bench_memory.csv")
    args = parser.parse_args(argv)
    shapes = [shape for shape in args.shapes.split(",") if shape]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; choose from {sorted(SHAPES)}")
    loadings = [loading for loading in args.model_loading.split(",") if loading]
    if not loadings or set(loadings) - {"blockwise", "whole"}:
        parser.error(f"--model-loading: give blockwise, whole or both, got {args.model_loading!r}")
    path = args.results_dir / BENCH_MEMORY_CSV
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers: give a positive number of layers, got {args.layers}")
    kept = list(csv.DictReader(path.open())) if args.append and path.is_file() else []
    measured: list[dict] = []
    for shape in shapes:
        for loading in loadings:
            measured.append(bench_shape(shape, loading=loading, nsamples=args.nsamples, seqlen=args.seqlen,
                                        keep=args.keep or loading != loadings[-1], layers=args.layers))
            atomic_write_csv(path, kept + measured, FIELDS)  # kept before anything else can fail
            print(format_table(measured, COLUMNS), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
