"""Exported compressed-tensors checkpoints read by their own library and by transformers (``make test-export``).

Skipped unless ``compressed-tensors`` is installed (the optional environment ``envs/export.txt``). The embedded
SmolLM2-135M (float32) is quantized with RTN at 4 bits symmetric by groups and at 3 bits asymmetric by channel
(values straddling int32 words, packed zero points), exported, and decompressed by the library's own
``pack-quantized`` compressor: every weight must equal ours bit for bit (float32 scales, so the library's
``(q − zero) · scale`` in the scale's dtype is exact). transformers then loads the folder through its
compressed-tensors integration; its logits must be ours.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from common.export.checkpoint import read_checkpoint
from common.lm.corpora import load_corpus
from fake_quant import main as fq_main
from fake_quant.settings import LlamaRunConfig

compressed_tensors = pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.slow

SETTINGS = {"w4-sym-g64": {"w_bits": 4, "w_asym": False, "w_groupsize": 64},
            "w3-asym-channel": {"w_bits": 3, "w_asym": True, "w_groupsize": -1}}


def _export(tmp_path, settings: dict) -> object:
    config = LlamaRunConfig(model="embedded", rotate=False, a_bits=16, w_clip=False, methods=["rtn"],
                            eval_max_windows=1, device="cpu", results_dir=str(tmp_path / "results"),
                            model_loading="blockwise", export_gptq=str(tmp_path / "ct"),
                            export_format="compressed-tensors", **settings)
    fq_main.run(config)
    return tmp_path / "ct" / "rtn"


def _module_tensors(folder) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {name within the module: tensor}}`` of every packed linear in the folder."""
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, file in weight_map.items():
        module, _, part = key.rpartition(".")
        if part.startswith("weight_"):
            with safe_open(str(folder / file), "pt") as handle:
                modules.setdefault(module, {})[part] = handle.get_tensor(key)
    return modules


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_the_library_decompresses_exactly_our_weights(tmp_path, settings):
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    folder = _export(tmp_path, settings)
    ours, _ = read_checkpoint(folder)
    quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(quantization["config_groups"]["group_0"])
    reference = dict(ours.named_modules())
    modules = _module_tensors(folder)
    assert len(modules) == 7 * ours.config.num_hidden_layers
    for module, tensors in modules.items():
        weight = PackedQuantizationCompressor.decompress(tensors, scheme)["weight"]
        assert weight.dtype == torch.float32 and torch.equal(weight, reference[module].weight), module


def test_transformers_loads_the_checkpoint(tmp_path, margin):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    folder = _export(tmp_path, SETTINGS["w4-sym-g64"])
    ours, tokenizer = read_checkpoint(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu", dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    theirs = dict(model.named_modules())
    for name, module in ours.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            assert torch.equal(theirs[name].weight.float(), module.weight), name
    ids = tokenizer(load_corpus("wiki_embedded", "test")[:4000], return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        expected = ours(ids).logits
        got = model(ids).logits.float()
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    relative = ((got - expected).norm() / expected.norm()).item()
    margin("transformers (compressed-tensors): top-1 agreement with our reader on 128 tokens", agreement,
           above=0.99)
    margin("transformers (compressed-tensors): relative logit difference ‖Δ‖/‖ours‖", relative, below=1e-4)
