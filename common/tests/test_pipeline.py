"""The method comparison's weight snapshot: restored exactly, tied tensors kept tied, nothing left behind."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from common.files import sweep_stale_temporaries
from common.pipeline import WeightSnapshot
from common.tests.llama_fixtures import tiny_llama


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
