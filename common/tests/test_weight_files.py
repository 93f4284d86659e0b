"""Tensors kept in files: the method comparison's weight snapshot and parked parameters, restored exactly, tied
tensors kept tied, nothing left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from common.files import sweep_stale_temporaries
from common.tests.llama_fixtures import tiny_llama
from common.weight_files import ResidentOnly, WeightSnapshot, parked


def test_snapshot_restores_every_tensor_exactly_and_keeps_ties(tmp_path: Path) -> None:
    model = tiny_llama().to(torch.bfloat16)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with WeightSnapshot(model, tmp_path) as start:
        assert [p.name for p in tmp_path.iterdir()] == [start.path.name] and f".{os.getpid()}." in start.path.name
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(3).add_(1)
        start.restore(model)
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, before[name]), name
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert start.path.stat().st_size < sum(t.nbytes for t in before.values())  # the tied tensor once
    assert list(tmp_path.iterdir()) == []
    assert sweep_stale_temporaries(tmp_path) == []


def test_parked_parameters_free_their_memory_and_come_back_exactly(tmp_path: Path) -> None:
    model = tiny_llama().to(torch.bfloat16)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    outside = {"embed": model.model.embed_tokens.weight, "head": model.lm_head.weight}
    before = {name: parameter.detach().clone() for name, parameter in outside.items()}
    with parked(outside, tmp_path):
        assert all(parameter.numel() == 0 for parameter in outside.values())
        assert model.model.embed_tokens.weight is outside["embed"]  # the module still holds the same parameter
        assert len(list(tmp_path.iterdir())) == 1
    for name, parameter in outside.items():
        assert parameter.dtype == torch.bfloat16 and torch.equal(parameter, before[name]), name
    assert list(tmp_path.iterdir()) == []


def test_parked_parameters_come_back_after_an_error(tmp_path: Path) -> None:
    model = tiny_llama()
    weight = model.lm_head.weight
    before = weight.detach().clone()
    with pytest.raises(RuntimeError, match="planted"), parked({"head": weight}, tmp_path):
        raise RuntimeError("planted")
    assert torch.equal(weight, before) and list(tmp_path.iterdir()) == []


def test_a_parked_parameter_inside_a_memory_mapped_checkpoint_keeps_its_own_values(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_file({"w": torch.full((256, 1024), 5.0)}, tmp_path / "w.safetensors")
    weight = torch.nn.Parameter(load_file(tmp_path / "w.safetensors")["w"], requires_grad=False)
    with torch.no_grad():
        weight.mul_(2)  # what the rotation does to a loaded checkpoint's weights: in place
    snapshots = tmp_path / "snapshots"
    with parked({"w": weight}, snapshots):
        assert weight.numel() == 0
    assert weight.shape == (256, 1024) and torch.all(weight == 10.0)


def test_resident_only_keeps_exactly_the_named_weights_in_memory(tmp_path: Path) -> None:
    layer = tiny_llama().model.layers[0]
    weights = {name: module.weight for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)}
    before = {name: weight.detach().clone() for name, weight in weights.items()}
    with ResidentOnly(weights, folder=tmp_path) as resident:
        for names in ({"mlp.down_proj"}, {"mlp.down_proj", "self_attn.q_proj"}, set(), set(weights)):
            resident.keep(names)
            assert {name for name, weight in weights.items() if weight.numel()} == names
            assert len(list(tmp_path.iterdir())) == len(weights) - len(names)
        resident.keep(set())
        with pytest.raises(KeyError, match="no parameters named"):
            resident.keep({"mlp.typo"})
    for name, weight in weights.items():
        assert torch.equal(weight, before[name]), name
    assert list(tmp_path.iterdir()) == []


def test_resident_only_brings_everything_back_after_an_error_and_can_be_disabled(tmp_path: Path) -> None:
    weight = tiny_llama().lm_head.weight
    before = weight.detach().clone()
    with pytest.raises(RuntimeError, match="planted"), ResidentOnly({"head": weight}, folder=tmp_path) as resident:
        resident.keep(set())
        raise RuntimeError("planted")
    assert torch.equal(weight, before) and list(tmp_path.iterdir()) == []
    with ResidentOnly({"head": weight}, enabled=False, folder=tmp_path) as resident:
        resident.keep(set())
        assert torch.equal(weight, before) and list(tmp_path.iterdir()) == []


def test_unchanged_parameters_are_written_once_and_can_be_discarded(tmp_path: Path) -> None:
    sums = {"a": torch.nn.Parameter(torch.randn(64, 64, dtype=torch.float64), requires_grad=False),
            "b": torch.nn.Parameter(torch.randn(64, 64, dtype=torch.float64), requires_grad=False)}
    before = {name: value.detach().clone() for name, value in sums.items()}
    with ResidentOnly(sums, unchanged=True, folder=tmp_path) as files:
        files.keep(())
        written = {path: path.stat().st_mtime_ns for path in tmp_path.iterdir()}
        assert len(written) == 2 and all(value.numel() == 0 for value in sums.values())
        for names in ({"a"}, {"b"}, (), {"a", "b"}, ()):
            files.keep(names)
            assert {name for name, value in sums.items() if value.numel()} == set(names)
            assert all(torch.equal(sums[name], before[name]) for name in names)
        assert {path: path.stat().st_mtime_ns for path in tmp_path.iterdir()} == written  # never written again
        files.discard()
    assert all(value.numel() == 0 for value in sums.values()) and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="unchanged"):
        ResidentOnly(sums, folder=tmp_path).discard()
