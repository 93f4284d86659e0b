"""Weight-only runs exported as gptq checkpoints and read back (tiny random Llama, offline)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from common.config import ConfigError
from common.export.checkpoint import CheckpointError, read_checkpoint
from common.tests.llama_fixtures import tiny_llama
from fake_quant import main as fq_main
from fake_quant.settings import LlamaRunConfig

WEIGHT_ONLY = {
    "model_loading": "whole",
    "name": "tiny-w4", "calib_dataset": "tiny_text", "eval_datasets": ["tiny_text"], "nsamples": 8, "seqlen": 32,
    "eval_max_windows": 6, "calib_batch_size": 3, "device": "cpu", "w_clip": False, "a_bits": 16, "rotate": False,
    "w_grid": "gptq", "w_asym": False, "w_groupsize": 16, "act_order": True, "methods": ["fp", "rtn", "gptq", "gptaq"],
}


def _config(folder, **overrides) -> LlamaRunConfig:
    return LlamaRunConfig(**{**WEIGHT_ONLY, "results_dir": str(folder), **overrides})


def _ppl(csv_path) -> dict[str, str]:
    with open(csv_path, newline="") as handle:
        row = next(row for row in csv.DictReader(handle) if row["metric"] == "tiny_text_ppl")
    return {m: row[m] for m in ("fp", "rtn", "gptq", "gptaq") if m in row}


@pytest.mark.parametrize("overrides", [{}, {"w_asym": True, "w_bits": 3, "act_order": False},
                                       {"rotate": True, "rotate_online": False, "w_bits": 2, "w_groupsize": -1}],
                         ids=["sym-w4-g16-act_order", "asym-w3-g16", "rotated-w2-per_channel"])
def test_export_reproduces_the_fake_quantized_model_exactly(tiny_setup, overrides):
    export, saved = tiny_setup / "gptq", tiny_setup / "fake"
    csv_path, _ = fq_main.run(_config(tiny_setup, export_gptq=str(export), save_qmodel_path=str(saved), **overrides))
    for method in ("rtn", "gptq", "gptaq"):
        folder = export / method
        quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
        bits = overrides.get("w_bits", 4)
        assert quantization | {"meta": None} == quantization | {
            "quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits, "meta": None,
            "group_size": overrides.get("w_groupsize", 16), "desc_act": overrides.get("act_order", True),
            "sym": not overrides.get("w_asym", False)}
        assert json.loads((folder / "quantize_config.json").read_text())["bits"] == bits
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        keys = set(weight_map)
        assert sorted(set(weight_map.values())) == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
        with safe_open(str(folder / weight_map["model.layers.0.mlp.down_proj.qweight"]), "pt") as handle:
            assert handle.get_tensor("model.layers.0.mlp.down_proj.qweight").shape == (128 * bits // 32, 64)
            assert handle.get_tensor("model.layers.0.mlp.down_proj.qweight").dtype == torch.int32
            assert handle.get_tensor("model.layers.0.mlp.down_proj.scales").dtype == torch.float16
        assert "model.layers.0.mlp.down_proj.weight" not in keys
        assert ("lm_head.weight" in keys) == overrides.get("rotate", False)  # tied stays tied unless rotated
        fake = load_file(str(saved / f"{method}.safetensors"))
        model, _ = read_checkpoint(folder)
        for name, tensor in model.state_dict().items():
            if name in fake:
                assert torch.equal(tensor, fake[name]), name
    reread, _ = fq_main.run(_config(tiny_setup, name="reread", load_gptq=str(export), **overrides))
    assert reread.name == "reread-from-gptq.csv"
    assert _ppl(reread) == _ppl(csv_path)


def test_tied_embeddings_survive_and_the_unquantized_tensors_are_kept(tiny_setup):
    export = tiny_setup / "gptq"
    fq_main.run(_config(tiny_setup, methods=["gptq"], export_gptq=str(export)))
    model, tokenizer = read_checkpoint(export / "gptq")
    assert tokenizer is None  # the test tokenizer has nothing to save
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    original = tiny_llama()
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert torch.equal(model.model.norm.weight, original.model.norm.weight)
    quantized = model.model.layers[1].self_attn.q_proj.weight
    assert not torch.equal(quantized, original.model.layers[1].self_attn.q_proj.weight)


@pytest.mark.parametrize(("overrides", "match"), [
    ({"a_bits": 4}, "a_bits must be 16"),
    ({"k_bits": 4}, "k_bits and v_bits must be 16"),
    ({"rotate": True}, "rotate_online must be false"),
    ({"w_grid": "float"}, "w_grid must be 'gptq'"),
    ({"w_bits": 5}, r"w_bits must be one of \(2, 3, 4, 8\), got 5"),
    ({"methods": ["fp"]}, "methods must name a quantizing method"),
    ({"load_qmodel_path": "x"}, "^export_gptq and load_qmodel_path exclude each other"),
])
def test_unexportable_settings_are_refused_up_front(tiny_setup, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _config(tiny_setup, export_gptq=str(tiny_setup / "out"), **overrides)


def test_broken_checkpoints_are_clear_errors_naming_the_file(tiny_setup):
    export = tiny_setup / "gptq"
    fq_main.run(_config(tiny_setup, methods=["rtn"], export_gptq=str(export)))
    weights = export / "rtn" / "model-00001-of-00003.safetensors"  # decoder layer 0
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{weights} is not a readable safetensors file"):
        read_checkpoint(export / "rtn")
    with pytest.raises(ConfigError, match=f"load_gptq: {weights}"):
        fq_main.run(_config(tiny_setup, name="broken", methods=["fp", "rtn"], load_gptq=str(export)))
    weights.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        read_checkpoint(export / "rtn")
    config_file = export / "rtn" / "config.json"
    config_file.write_text("{ not json")
    with pytest.raises(CheckpointError, match=f"{config_file} is not readable JSON"):
        read_checkpoint(export / "rtn")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tiny_setup / "nowhere")


def test_reading_with_other_settings_is_refused(tiny_setup):
    export = tiny_setup / "gptq"
    fq_main.run(_config(tiny_setup, methods=["rtn"], export_gptq=str(export)))
    with pytest.raises(ConfigError, match=r"quantized with other settings than this run's .*group_size: 16 vs 32"):
        fq_main.run(_config(tiny_setup, name="other", methods=["fp", "rtn"], w_groupsize=32, load_gptq=str(export)))
    with pytest.raises(ConfigError, match=r"holds no checkpoint of \['rtn', 'gptq', 'gptaq'\] .*it holds none"):
        fq_main.run(_config(tiny_setup, name="none", load_gptq=str(tiny_setup / "empty")))
    with pytest.raises(ConfigError, match=r"holds no checkpoint of \['gptq'\] .*it holds \['rtn'\]"):
        fq_main.run(_config(tiny_setup, name="some", methods=["fp", "rtn", "gptq"], load_gptq=str(export)))


@pytest.mark.parametrize("rotate", [False, True], ids=["tied", "rotated"])
def test_blockwise_export_writes_the_same_files_and_reads_back_the_same(tiny_setup, rotate):
    """A model held one block at a time exports the bytes the in-memory model exports, and its reader (one
    block at a time) evaluates them to the same numbers."""
    settings = {"methods": ["fp", "rtn", "gptaq"], "rotate": rotate, "rotate_online": False}
    exported = {}
    for loading in ("whole", "blockwise"):
        folder = tiny_setup / f"gptq-{loading}"
        fq_main.run(_config(tiny_setup, name=loading, model_loading=loading, export_gptq=str(folder), **settings))
        exported[loading] = {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*"))
                             if path.is_file()}
    assert exported["whole"].keys() == exported["blockwise"].keys()
    assert [name for name in exported["whole"] if exported["whole"][name] != exported["blockwise"][name]] == []
    reread = {loading: _ppl(fq_main.run(_config(tiny_setup, name=f"reread-{loading}", model_loading=loading,
                                                load_gptq=str(tiny_setup / "gptq-whole"), **settings))[0])
              for loading in ("whole", "blockwise")}
    assert reread["whole"] == reread["blockwise"]


@pytest.mark.parametrize(("export_format", "overrides"), [
    ("gptq_v2", {"w_asym": True, "w_bits": 3}),
    ("compressed-tensors", {"w_asym": True, "w_grid": "float", "static_groups": True}),
    ("compressed-tensors", {"w_bits": 5, "w_groupsize": -1, "rotate": True, "rotate_online": False}),
], ids=["gptq_v2-asym-w3", "compressed_tensors-asym-float_grid-static_groups", "compressed_tensors-sym-w5-rotated"])
def test_every_format_reproduces_the_fake_quantized_model(tiny_setup, export_format, overrides):
    export, saved = tiny_setup / export_format, tiny_setup / "fake"
    csv_path, _ = fq_main.run(_config(tiny_setup, export_gptq=str(export), export_format=export_format,
                                      save_qmodel_path=str(saved), **overrides))
    for method in ("rtn", "gptq", "gptaq"):
        folder = export / method
        quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        if export_format == "gptq_v2":
            assert quantization["checkpoint_format"] == "gptq_v2"
            assert "model.layers.0.mlp.down_proj.qzeros" in weight_map
        else:
            assert quantization["quant_method"] == "compressed-tensors" and quantization["ignore"] == ["lm_head"]
            assert not (folder / "quantize_config.json").exists()
            name = "model.layers.0.mlp.down_proj.weight_zero_point"
            assert (name in weight_map) == overrides.get("w_asym", False)
            with safe_open(str(folder / weight_map["model.layers.0.mlp.down_proj.weight_packed"]), "pt") as handle:
                bits = overrides.get("w_bits", 4)
                assert handle.get_tensor("model.layers.0.mlp.down_proj.weight_packed").shape == (64, 128 * bits // 32)
                assert handle.get_tensor("model.layers.0.mlp.down_proj.weight_scale").dtype == torch.float32
        fake = load_file(str(saved / f"{method}.safetensors"))
        model, _ = read_checkpoint(folder)
        for name, tensor in model.state_dict().items():
            if name in fake:
                assert torch.equal(tensor, fake[name]), name
    with pytest.raises(ConfigError, match=f"is a {export_format} checkpoint, not gptq: give export_format: "
                                          f"{export_format}"):
        fq_main.run(_config(tiny_setup, name="reread", load_gptq=str(export), **overrides))
    reread, _ = fq_main.run(_config(tiny_setup, name="reread", load_gptq=str(export), export_format=export_format,
                                    **overrides))
    assert reread.name == f"reread-from-{export_format}.csv"
    assert _ppl(reread) == _ppl(csv_path)


@pytest.mark.parametrize(("overrides", "match"), [
    ({"w_groupsize": 16, "act_order": True}, "static_groups must be true with act_order and groups"),
    ({"dtype": "bfloat16"}, "dtype must be float32 or float16"),
    ({"dtype": "float16", "w_grid": "float"}, "w_grid must be 'gptq' .*for a float16 model"),
    ({"w_bits": 9}, r"w_bits must be one of \(1, 2, 3, 4, 5, 6, 7, 8\), got 9"),
])
def test_what_compressed_tensors_cannot_hold_is_refused_up_front(tiny_setup, overrides, match):
    with pytest.raises(ConfigError, match="export_gptq writes weight-only compressed-tensors checkpoints: .*" + match):
        _config(tiny_setup, export_gptq=str(tiny_setup / "out"), export_format="compressed-tensors", **overrides)


def test_an_existing_folder_is_moved_to_history_not_deleted(tiny_setup):
    export = tiny_setup / "gptq"
    (export / "rtn").mkdir(parents=True)
    (export / "rtn" / "mine.txt").write_text("the user's notes")
    fq_main.run(_config(tiny_setup, methods=["rtn"], export_gptq=str(export)))
    kept = list((export / "history").glob("rtn-*/mine.txt"))
    assert [path.read_text() for path in kept] == ["the user's notes"]
    read_checkpoint(export / "rtn")
