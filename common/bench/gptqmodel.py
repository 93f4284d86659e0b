"""Weight-only calibration, this repo against GPTQModel at equal settings, side by side on one machine.

Run ``.venv-export/bin/python -m common.bench.gptqmodel`` (``make bench-gptqmodel``); it needs the
export environment (``envs/export.txt``: GPTQModel beside this repo). For GPTQ, GPTAQ and FOEM in its
authors' form (ours: ``foem_official``; GPTQModel: ``FOEMConfig(alpha=0, beta)``, its authors' code), each
implementation quantizes the embedded SmolLM2-135M with the settings of
``fake_quant/configs/embedded_w4_weight_only.yaml`` (bits, group size, symmetric grid, act_order, damping,
GPTAQ's alpha, FOEM's beta; no MSE clip search) on the very same calibration windows (32 × 512 tokens of the embedded
Wikipedia text, seed 0), in float32 on the CPU. Each measurement is a fresh child process, run one after the
other (never two torch jobs at once), so each one's peak resident memory is its own.

Measured per (method, implementation): wall seconds of the quantization call (ours: the calibration;
GPTQModel: ``model.quantize``, which packs as it goes), seconds to write the checkpoint (ours: packing and
writing; GPTQModel: ``model.save``), peak RSS, and the perplexity of the written checkpoint on the run's 40
evaluation windows, both read by this repo's reader (:func:`common.export.checkpoint.read_checkpoint`).
Prints a table and writes ``results/bench_gptqmodel.csv`` with the ratio GPTQModel / ours.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common.config import make_config
from common.device import device_description
from common.files import atomic_write_csv
from common.results.provenance import BENCH_GPTQMODEL_CSV, REPO_ROOT

CONFIG = REPO_ROOT / "fake_quant" / "configs" / "embedded_w4_weight_only.yaml"
IMPLEMENTATIONS = ("gptqmodel", "ours")
METHODS = ("gptq", "gptaq", "foem_official")
FIELDS = ["method", "implementation", "quantize_seconds", "save_seconds", "peak_rss_mb", "wiki_embedded_ppl",
          "quantize_over_ours", "device", "threads", "versions"]


def _settings():
    from fake_quant.settings import LlamaRunConfig

    return make_config(LlamaRunConfig, yaml_path=CONFIG, overrides={"device": "cpu"})


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _perplexity(folder: Path, config) -> float:
    from common.export.checkpoint import read_checkpoint
    from common.llama.experiment import evaluate, load_data

    model, tokenizer = read_checkpoint(folder)
    _, eval_sets = load_data(tokenizer, config, calibrate=False)
    return evaluate(model, tokenizer, config, folder.name, eval_sets, torch.device("cpu"))["wiki_embedded_ppl"]


def measure_ours(method: str, out: Path) -> dict[str, float]:
    from common.export.runs import Exporter
    from common.llama.experiment import DTYPES, add_quantizers, load_data, load_model, load_tokenizer, quantizing

    config = _settings()
    model, tokenizer = load_model(config), load_tokenizer(config)
    add_quantizers(model, config)
    calibration, _ = load_data(tokenizer, config, calibrate=True)
    quantize = quantizing(model, config, calibration, torch.device("cpu"))
    start = time.perf_counter()
    quantize(method)
    quantized = time.perf_counter()
    folder = Exporter(out, "gptq", config, DTYPES[config.dtype], tokenizer).write_model(model, method)
    saved = time.perf_counter()
    peak = _peak_rss_mb()
    del model
    return {"quantize_seconds": quantized - start, "save_seconds": saved - quantized, "peak_rss_mb": peak,
            "wiki_embedded_ppl": _perplexity(folder, config)}


def measure_gptqmodel(method: str, out: Path) -> dict[str, float]:
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import FOEMConfig, GPTAQConfig
    from transformers import AutoTokenizer

    from common.llama.loading import embedded_cache_folder, load_llama
    from common.lm.corpora import calibration_windows

    config = _settings()
    load_llama(config.model)  # converts the embedded model into its cache folder if needed
    folder = embedded_cache_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    windows = calibration_windows(tokenizer, config.calib_dataset, nsamples=config.nsamples, seqlen=config.seqlen,
                                  seed=config.seed)
    quantize_config = QuantizeConfig(
        bits=config.w_bits, group_size=config.w_groupsize, sym=not config.w_asym, desc_act=config.act_order,
        static_groups=config.static_groups,
        act_group_aware=False, damp_percent=config.percdamp, damp_auto_increment=config.percdamp, mse=0.0,
        device="cpu", offload_to_disk=False, fallback=None, format="gptq",
        gptaq=GPTAQConfig(alpha=config.alpha, device="cpu") if method == "gptaq" else None,
        foem=FOEMConfig(alpha=0.0, beta=config.foem_beta, device="cpu") if method == "foem_official" else None,
    )
    model = GPTQModel.load(str(folder), quantize_config=quantize_config, dtype=torch.float32)
    start = time.perf_counter()
    model.quantize([window for window in windows], batch_size=config.calib_batch_size)
    quantized = time.perf_counter()
    target = out / method
    model.save(str(target))
    saved = time.perf_counter()
    peak = _peak_rss_mb()
    del model
    return {"quantize_seconds": quantized - start, "save_seconds": saved - quantized, "peak_rss_mb": peak,
            "wiki_embedded_ppl": _perplexity(target, config)}


def _child_environment() -> dict[str, str]:
    """GPTQModel sizes its CPU worker pool at half the cores and then asks 2 of them for its model loader,
    which fails on a 2-core machine; its own override gives the pool the machine's cores (2 here)."""
    workers = os.environ.get("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    return {**os.environ, "GPTQMODEL_CPU_WORKERS": workers}


def _child(implementation: str, method: str) -> dict[str, float]:
    """One measurement in a fresh process (its JSON on the last stdout line)."""
    command = [sys.executable, "-m", "common.bench.gptqmodel", "--child", implementation, method]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=_child_environment())
    if done.returncode != 0:
        raise RuntimeError(f"{implementation} {method} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("IMPLEMENTATION", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--results_dir", default="results")
    args = parser.parse_args(argv)
    if args.child:
        implementation, method = args.child
        measure = measure_ours if implementation == "ours" else measure_gptqmodel
        with tempfile.TemporaryDirectory() as out:
            print(json.dumps(measure(method, Path(out))))
        return 0
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods must name methods from {METHODS}, got {unknown}")
    from gptqmodel import __version__ as gptqmodel_version

    versions = f"torch {torch.__version__}, gptqmodel {gptqmodel_version}"
    rows = []
    for method in methods:
        found = {implementation: _child(implementation, method) for implementation in IMPLEMENTATIONS}
        for implementation, values in found.items():
            rows.append({"method": method, "implementation": implementation, **values,
                         "quantize_over_ours": values["quantize_seconds"] / found["ours"]["quantize_seconds"],
                         "device": device_description(torch.device("cpu")), "threads": torch.get_num_threads(),
                         "versions": versions})
            print(f"{method:6s} {implementation:10s} quantize {values['quantize_seconds']:7.1f} s  save "
                  f"{values['save_seconds']:5.1f} s  peak {values['peak_rss_mb']:6.0f} MB  ppl "
                  f"{values['wiki_embedded_ppl']:.3f}  × ours {rows[-1]['quantize_over_ours']:.2f}", flush=True)
    path = atomic_write_csv(Path(args.results_dir) / BENCH_GPTQMODEL_CSV, rows, FIELDS)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
