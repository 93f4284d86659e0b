"""Rank processes for the data-parallel tests: each joins a gloo process group and runs calibration or a tree.

Launched by :func:`launch` with the ``spawn`` start method (a fresh interpreter per rank, as ``torchrun``
gives), one CPU thread each. Workers write what the test checks to files in ``out`` (rank 0's quantized
weights, every rank's exit code and error output).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from common import distributed
from common.engine.model import quantize_model
from common.engine.settings import CalibrationSettings
from common.solvers.column_loop import SolverConfig


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def as_torchrun_rank(rank: int, world: int, port: int) -> None:
    """Set the variables ``torchrun`` sets for ``rank`` (a local rendezvous, 60-s collectives), one thread."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GPTAQ_DIST_TIMEOUT_S="60")
    torch.set_num_threads(1)


def tiny_family(family: str):
    """``(model with quantizers added, adapter, calibration batches)`` for ``llama`` or ``vit``, seeded."""
    if family == "llama":
        from common.llama.adapter import LlamaAdapter, add_activation_quantizers
        from common.tests.llama_fixtures import tiny_llama

        model = tiny_llama()
        add_activation_quantizers(model, bits=4, sym=False, clip_ratio=1.0, groupsize=-1)
        tokens = torch.randint(1, 256, (12, 32), generator=torch.Generator().manual_seed(0))
        return model, LlamaAdapter(), [tokens]
    from timm.models.vision_transformer import VisionTransformer

    from vit_quant.adapter import prepare_vit

    torch.manual_seed(0)
    model = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2,
                              num_heads=2, mlp_ratio=2.0).eval()
    images = torch.randn(12, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    adapter = prepare_vit(model, images[:2], bits=4, sym=False, clip_ratio=1.0, groupsize=-1)
    return model, adapter, [images]


def quantized_state(family: str, method: str, options: dict, stats_dtype: torch.dtype = torch.float32
                    ) -> dict[str, torch.Tensor]:
    """Quantize the tiny model of ``family`` with ``method`` (batches of 3 samples) and return its state dict."""
    model, adapter, batches = tiny_family(family)
    settings = CalibrationSettings(method=method, solver=SolverConfig.of(bits=4, blocksize=8, **options), batch_size=3,
                                   stats_dtype=stats_dtype)
    quantize_model(model, adapter, settings, batches, progress=False)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def engine_worker(rank: int, world: int, port: int, family: str, method: str, options: dict, out: str,
                  stats_dtype: torch.dtype = torch.float32) -> None:
    as_torchrun_rank(rank, world, port)
    distributed.initialize("cpu")
    state = quantized_state(family, method, options, stats_dtype)
    if distributed.is_main():
        torch.save(state, Path(out) / "weights.pt")
    distributed.finalize()


def cli_worker(rank: int, world: int, port: int, argvs: list[list[str]], fail_rank: int | None, out: str,
               fail_block: int = 0) -> None:
    """``fake_quant.main.main(argvs[rank])`` (which joins the group) on the tiny Llama and corpus (read one block
    at a time from ``<out>/tiny-model``, which :func:`save_tiny_model` wrote); ``fail_rank`` raises in its
    calibration of block ``fail_block``."""
    as_torchrun_rank(rank, world, port)
    from common.engine import block
    from common.tests.llama_fixtures import install_tiny_corpus, install_tiny_model
    from fake_quant import main as fq_main

    patches = pytest.MonkeyPatch()
    install_tiny_corpus(patches)
    install_tiny_model(patches, folder=Path(out) / "tiny-model")
    if rank == fail_rank:
        quantized_pass = block.BlockCalibration._quantized_pass

        def fail(self, *args, **kwargs):
            if self.index == fail_block:
                raise ValueError(f"planted failure on rank {rank}")
            return quantized_pass(self, *args, **kwargs)

        patches.setattr(block.BlockCalibration, "_quantized_pass", fail)
    errors = io.StringIO()
    began = time.perf_counter()
    with contextlib.redirect_stderr(errors):
        try:
            code = fq_main.main(argvs[rank])
        except BaseException as error:  # what escaped run_cli: recorded for the test
            errors.write(f"{type(error).__name__}: {error}")
            code = -1
    result = {"code": code, "stderr": errors.getvalue(), "seconds": time.perf_counter() - began}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


def save_tiny_model(out: Path) -> None:
    """The tiny Llama every rank of :func:`cli_worker` reads, saved once before they start."""
    from common.tests.llama_fixtures import tiny_llama

    tiny_llama().save_pretrained(Path(out) / "tiny-model")


def launch(target, world: int, *args, timeout: float = 300) -> float:
    """Run ``target(rank, world, port, *args)`` in ``world`` spawned processes; wait for all; return seconds.

    ``AssertionError`` if a process is still running after ``timeout`` seconds (it is killed).
    """
    context = torch.multiprocessing.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=target, args=(rank, world, port, *args)) for rank in range(world)]
    began = time.perf_counter()
    for process in processes:
        process.start()
    for process in processes:
        process.join(max(1.0, timeout - (time.perf_counter() - began)))
    hung = [index for index, process in enumerate(processes) if process.is_alive()]
    for index in hung:
        processes[index].kill()
    assert not hung, f"ranks {hung} still running after {timeout} s"
    return time.perf_counter() - began
