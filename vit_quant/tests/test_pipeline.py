"""vit_quant end to end on a tiny randomly initialised ViT and fake Fashion-MNIST files (fast, offline)."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from common.config import make_config
from common.engine.adapter import Tail
from common.engine.model import quantize_model
from common.engine.settings import CalibrationSettings
from common.quant.qlinear import QuantLinear
from common.solvers.column_loop import SolverConfig
from vit_quant import main as vq_main
from vit_quant.adapter import discover_linear_groups, prepare_vit
from vit_quant.settings import VitRunConfig
from vit_quant.tests.fake_data import write_fashion_folder, write_tiny_embedded


def _tiny_vit(depth: int = 2) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=depth,
                             num_heads=2, mlp_ratio=2.0).eval()


@pytest.fixture
def fake_folder(tmp_path):
    folder = tmp_path / "fmnist"
    write_fashion_folder(folder, n_train=64, n_test=40)
    return folder


def _config(folder, results, **overrides) -> VitRunConfig:
    weights = write_tiny_embedded(folder.parent / "tiny.safetensors")
    settings = {"name": "tiny", "data_path": str(folder), "nsamples": 32, "calib_batch_size": 8, "device": "cpu",
                "results_dir": str(results), "w_clip": False, "checkpoint": str(weights)}
    return VitRunConfig(**{**settings, **overrides})


def test_run_writes_every_metric_with_its_interval(fake_folder, tmp_path):
    csv_path, json_path = vq_main.run(_config(fake_folder, tmp_path / "results"))
    with open(csv_path, newline="") as handle:
        rows = {row["metric"]: row for row in csv.DictReader(handle)}
    intervals = {f"{metric}_vs_gptq_{bound}" for metric in ("top1", "test_nll", "fp_kl") for bound in ("low", "high")}
    assert set(rows) == {"top1", "test_nll", "fp_kl", vq_main.DISAGREEMENTS, "top1_vs_gptq_p", *intervals}
    row = rows["top1"]
    assert row["higher_is_better"] == "True" and row["setting"] == "W4A4"
    assert rows["test_nll"]["higher_is_better"] == rows["fp_kl"]["higher_is_better"] == "False"
    assert all(0 <= float(row[m]) <= 100 for m in ("fp", "rtn", "gptq", "gptaq"))
    meta = json.loads(json_path.read_text())
    per_example = meta["per_example"]["W4A4"]
    for method in ("fp", "rtn", "gptq", "gptaq"):  # each image's numbers: the table's, recomputed
        outcomes, nll = per_example[method]["top1"], per_example[method]["test_nll"]
        assert float(row[method]) == pytest.approx(100 * outcomes.count("1") / len(outcomes), rel=1e-5)
        assert float(rows["test_nll"][method]) == pytest.approx(sum(nll) / len(nll), rel=1e-5) and len(nll) == 40
    assert "fp_kl" not in per_example["fp"] and rows["fp_kl"]["fp"] == ""
    assert min(per_example["rtn"]["fp_kl"]) >= 0 and float(rows["fp_kl"]["rtn"]) > 0
    disagreeing = rows[vq_main.DISAGREEMENTS]
    assert disagreeing["gptq"] == "0" and all(0 <= int(disagreeing[m]) <= 40 for m in ("fp", "rtn", "gptaq"))
    assert rows["top1_vs_gptq_low"]["gptq"] == "" and float(rows["top1_vs_gptq_p"]["gptaq"]) <= 1.0
    assert float(rows["test_nll_vs_gptq_low"]["rtn"]) <= float(rows["test_nll_vs_gptq_high"]["rtn"])
    assert meta["tree"] == "vit_quant"
    assert meta["linear_groups"] == [["attn.qkv"], ["attn.proj"], ["mlp.fc1"], ["mlp.fc2"]]
    assert len(meta["layers"]["gptaq"]) == 8


def test_new_methods_run_through_the_tree(fake_folder, tmp_path):
    config = _config(fake_folder, tmp_path / "results", methods=["gptq", "qep", "qronos"], qep_exclude=["mlp.fc2"])
    csv_path, _ = vq_main.run(config)
    with open(csv_path, newline="") as handle:
        row = next(row for row in csv.DictReader(handle) if row["metric"] == "top1")
    assert all(0 <= float(row[m]) <= 100 for m in ("gptq", "qep", "qronos"))


def test_every_block_linear_is_quantized_and_embeddings_are_not():
    model = _tiny_vit()
    prepare_vit(model, torch.randn(2, 1, 28, 28), bits=4, sym=False, clip_ratio=1.0, groupsize=-1)
    wrapped = {name for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    assert wrapped == {f"blocks.{b}.{n}" for b in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert isinstance(model.head, torch.nn.Linear) and not isinstance(model.head, QuantLinear)


def test_eva_split_projections_and_swiglu_groups():
    torch.manual_seed(0)
    eva = Eva(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2,
              qkv_fused=False, swiglu_mlp=True, scale_mlp=True, mlp_ratio=2.0).eval()
    hidden = eva.patch_embed(torch.randn(2, 1, 28, 28))
    hidden, _ = eva._pos_embed(hidden)
    groups = discover_linear_groups(eva.blocks[0], hidden)
    assert groups == [["attn.q_proj", "attn.k_proj", "attn.v_proj"], ["attn.proj"], ["mlp.fc1_g", "mlp.fc1_x"],
                      ["mlp.fc2"]]
    sample = torch.randn(2, 1, 28, 28)
    adapter = prepare_vit(eva, sample, bits=4, sym=False, clip_ratio=1.0, groupsize=-1)
    assert adapter.tail_linears(eva.blocks[0]) == {"attn": Tail("attn.proj"), "mlp": Tail("mlp.fc2")}


def test_attention_and_mlp_are_tails():
    adapter = prepare_vit(_tiny_vit(), torch.randn(2, 1, 28, 28), bits=4, sym=False, clip_ratio=1.0, groupsize=-1)
    assert adapter.tails == {"attn": Tail("attn.proj"), "mlp": Tail("mlp.fc2")}


def test_gptaq_with_identical_streams_equals_gptq():
    """One block, no activation quantization while calibrating: the first group sees X = X̃."""
    images = torch.randn(16, 1, 28, 28)
    models = {}
    for method in ("gptq", "gptaq"):
        model = _tiny_vit(depth=1)
        adapter = prepare_vit(model, images[:2], bits=4, sym=False, clip_ratio=1.0, groupsize=-1)
        settings = CalibrationSettings(method=method, solver=SolverConfig(bits=4),
                                       act_quant_during_calibration=False)
        quantize_model(model, adapter, settings, [images], progress=False)
        models[method] = model
    qkv = [m.blocks[0].attn.qkv.weight for m in models.values()]
    assert torch.equal(*qkv)
    proj = [m.blocks[0].attn.proj.weight for m in models.values()]
    assert not torch.equal(*proj)  # later groups see the drift of the quantized qkv and differ


def test_alpha_zero_gptaq_equals_gptq_through_the_whole_model():
    images = torch.randn(16, 1, 28, 28)
    base = _tiny_vit()
    adapter = prepare_vit(base, images[:2], bits=4, sym=False, clip_ratio=1.0, groupsize=-1)
    weights = []
    for method, alpha in (("gptq", 0.25), ("gptaq", 0.0)):
        model = copy.deepcopy(base)
        settings = CalibrationSettings(method=method, solver=SolverConfig.of(bits=4, alpha=alpha),
                                       act_quant_during_calibration=True)
        quantize_model(model, adapter, settings, [images], progress=False)
        weights.append([m.weight for m in model.modules() if isinstance(m, QuantLinear)])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


@pytest.mark.parametrize("path", sorted(vq_main.CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    assert make_config(VitRunConfig, yaml_path=path).run_name.startswith("vit_quant-")


def test_kl_is_measured_for_every_method_whatever_the_order_of_methods(fake_folder, tmp_path):
    csv_path, _ = vq_main.run(_config(fake_folder, tmp_path / "results", methods=["gptq", "fp", "gptaq"]))
    with open(csv_path, newline="") as handle:
        rows = {row["metric"]: row for row in csv.DictReader(handle)}
    assert float(rows["fp_kl"]["gptq"]) > 0 and float(rows["fp_kl"]["gptaq"]) > 0
    assert rows["fp_kl_vs_gptq_low"]["gptaq"] != ""
