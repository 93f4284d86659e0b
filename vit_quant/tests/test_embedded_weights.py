"""The embedded ViT's weights file: float16 round trip, SHA-256 check, clear errors naming the file."""

from __future__ import annotations

import json
import re

import pytest
import torch

from vit_quant.embedded_weights import (
    EmbeddedWeightsError,
    checked_record,
    load_embedded,
    record_path,
    sha256_of,
    write_embedded,
)
from vit_quant.tests.fake_data import TINY_RECIPE, write_tiny_embedded


def test_round_trip_is_the_float16_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = TINY_RECIPE.build_model().eval()
    weights = tmp_path / "w.safetensors"
    write_embedded(model, {"recipe": {**vars(TINY_RECIPE)}, "test_top1": 12.5}, weights)
    record = json.loads(record_path(weights).read_text())
    assert record["weights_sha256"] == sha256_of(weights) and record["test_top1"] == 12.5
    loaded, read = load_embedded(weights)
    assert read == record and not loaded.training
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.half().float()), name
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded(images), model.half().float()(images))


def test_changed_weights_are_refused(tmp_path) -> None:
    weights = write_tiny_embedded(tmp_path / "w.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(EmbeddedWeightsError, match=re.escape("w.safetensors: SHA-256 differs from the one in w.json")):
        checked_record(weights)


@pytest.mark.parametrize("damage", ["no record", "no weights", "not json", "no recipe", "bad recipe"])
def test_missing_or_bad_record_names_the_file(tmp_path, damage) -> None:
    weights = write_tiny_embedded(tmp_path / "w.safetensors")
    record = record_path(weights)
    if damage == "no record":
        record.unlink()
    elif damage == "no weights":
        weights.unlink()
    elif damage == "not json":
        record.write_text("{")
    elif damage == "no recipe":
        record.write_text(json.dumps({"test_top1": 1.0}))
    else:
        record.write_text(json.dumps({"recipe": {"depth": 2, "wings": 4}}))
    expected = "no embedded ViT weights there" if damage.startswith("no ") and damage != "no recipe" else (
        "w.json: not a record written by vit_quant.train_embedded")
    with pytest.raises(EmbeddedWeightsError, match=re.escape(expected)):
        load_embedded(weights)


def test_a_pair_already_there_moves_to_history(tmp_path) -> None:
    first = write_tiny_embedded(tmp_path / "w.safetensors", seed=0)
    before = first.read_bytes(), record_path(first).read_text()
    write_tiny_embedded(tmp_path / "w.safetensors", seed=1)
    kept = sorted((tmp_path / "history").iterdir())
    assert [path.suffix for path in kept] == [".json", ".safetensors"]
    assert (kept[1].read_bytes(), kept[0].read_text()) == before
    assert checked_record(first)["weights_sha256"] != json.loads(before[1])["weights_sha256"]
