"""Exported checkpoints loaded by their real consumers: GPTQModel and transformers (``make test-export``).

Skipped unless GPTQModel is installed (the optional environment ``envs/export.txt``). The embedded SmolLM2-135M
is quantized with RTN (the same checkpoint layout as GPTQ's and GPTAQ's, without the calibration time) at 4
and at 3 bits (values straddling int32 words), exported, and loaded by GPTQModel on the CPU: every dequantized
weight must equal ours rounded to float16 (the kernels' dtype), and the logits on real text must agree.
"""

from __future__ import annotations

import pytest
import torch

from common.export.checkpoint import read_checkpoint
from common.lm.corpora import load_corpus
from fake_quant import main as fq_main
from fake_quant.settings import LlamaRunConfig

gptqmodel = pytest.importorskip("gptqmodel")
pytestmark = pytest.mark.slow


def _export(tmp_path, bits: int):
    config = LlamaRunConfig(model="embedded", rotate=False, a_bits=16, w_bits=bits, w_asym=False, w_groupsize=64,
                            w_clip=False, w_grid="gptq", methods=["rtn"], eval_max_windows=1, device="cpu",
                            results_dir=str(tmp_path / "results"), model_loading="whole",
                            export_gptq=str(tmp_path / "gptq"))
    fq_main.run(config)
    return tmp_path / "gptq" / "rtn"


def _text_ids(tokenizer, tokens: int = 128) -> torch.Tensor:
    return tokenizer(load_corpus("wiki_embedded", "test")[:4000], return_tensors="pt")["input_ids"][:, :tokens]


@pytest.mark.parametrize("bits", [4, 3])
def test_gptqmodel_reads_exactly_our_weights(tmp_path, bits, margin):
    folder = _export(tmp_path, bits)
    ours, tokenizer = read_checkpoint(folder)
    theirs = gptqmodel.GPTQModel.load(str(folder), device="cpu", dtype=torch.float16, backend="torch")
    reference = dict(ours.named_modules())
    checked = 0
    for name, module in theirs.model.named_modules():
        if hasattr(module, "qweight") and hasattr(module, "dequantize_weight"):
            with torch.no_grad():
                dequantized = module.dequantize_weight().T
            assert torch.equal(dequantized, reference[name].weight.half()), name
            checked += 1
    assert checked == 7 * ours.config.num_hidden_layers
    ids = _text_ids(tokenizer)
    with torch.no_grad():
        expected = ours(ids).logits.float()
        got = theirs.model(ids).logits.float()
    _agree(margin, got, expected, "GPTQModel")


def _agree(margin, got: torch.Tensor, expected: torch.Tensor, reader: str) -> None:
    """Float16 kernels against our float32 reader: the same next-token choices, logits close."""
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    relative = ((got - expected).norm() / expected.norm()).item()
    margin(f"{reader}: top-1 agreement with our reader on 128 tokens", agreement, above=0.9)
    margin(f"{reader}: relative logit difference ‖Δ‖/‖ours‖", relative, below=0.02)


def test_transformers_loads_the_checkpoint_through_gptqmodel(tmp_path, margin):
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM

    folder = _export(tmp_path, 4)
    ours, tokenizer = read_checkpoint(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu", dtype=torch.float16)
    ids = _text_ids(tokenizer)
    with torch.no_grad():
        expected = ours(ids).logits.float()
        got = model(ids).logits.float()
    _agree(margin, got, expected, "transformers")
