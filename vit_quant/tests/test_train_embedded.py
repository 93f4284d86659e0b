"""``python -m vit_quant.train_embedded``: a tiny candidate trained on fake data writes the weights and the
record that the runs load (the real recipes train for hours and never run here)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vit_quant import train_embedded
from vit_quant.data import load_fashion_mnist
from vit_quant.embedded_weights import load_embedded, record_path, sha256_of
from vit_quant.tests.fake_data import TINY_RECIPE, write_fashion_folder

CLUTTERED = dataclasses.replace(TINY_RECIPE, img_size=35, patch_size=7, clutter_pieces=2, epochs=2)


@pytest.fixture
def tiny_candidate(monkeypatch):
    monkeypatch.setitem(train_embedded.CANDIDATES, "tiny-cluttered", CLUTTERED)
    return "tiny-cluttered"


def test_training_writes_weights_and_their_record(tiny_candidate, tmp_path) -> None:
    data = tmp_path / "fmnist"
    write_fashion_folder(data, n_train=48, n_test=20)
    weights = tmp_path / "out" / "vit.safetensors"
    assert train_embedded.main(["--candidate", tiny_candidate, "--data_path", str(data), "--output", str(weights)]) == 0
    record = json.loads(record_path(weights).read_text())
    assert record["recipe"] == dataclasses.asdict(CLUTTERED) and record["candidate"] == tiny_candidate
    assert record["weights_sha256"] == sha256_of(weights) and len(record["epoch_losses"]) == 2
    assert sorted(record["data"]) == sorted(path.name for path in data.iterdir())
    assert record["no_blocks_top1"] == record["first_blocks_top1"][0]
    assert record["test_top1"] == record["first_blocks_top1"][-1] and len(record["first_blocks_top1"]) == 3
    assert set(record["weight_noise_top1"]) == {"0.1", "0.2", "0.4"} and 0 <= record["linear_probe_top1"] <= 100
    model, _ = load_embedded(weights)
    assert model.patch_embed.img_size == (35, 35)


def test_epochs_override_is_recorded(tiny_candidate, tmp_path) -> None:
    data = tmp_path / "fmnist"
    write_fashion_folder(data, n_train=32, n_test=10)
    weights = tmp_path / "vit.safetensors"
    train_embedded.main(["--candidate", tiny_candidate, "--data_path", str(data), "--output", str(weights),
                         "--epochs", "1"])
    assert json.loads(record_path(weights).read_text())["recipe"]["epochs"] == 1


@pytest.mark.parametrize(("argv", "names"), [
    (["--output", "vit.pt"], "--output: vit.pt must end in .safetensors"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--fit_seconds", "-1"], "--fit_seconds must be > 0"),
    (["--candidate", "nope"], "--candidate"),
])
def test_bad_arguments_name_the_option(argv, names, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_embedded.main(argv)
    assert exit_info.value.code == 2 and names in capsys.readouterr().err


@pytest.mark.parametrize(("where", "names"), [("output under a file", "--output: "),
                                              ("data missing", "data_path: ")])
def test_unusable_paths_are_refused_before_training(where, names, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(train_embedded, "train", lambda *args, **kwargs: pytest.fail("training started"))
    data = tmp_path / "fmnist"
    write_fashion_folder(data, n_train=8, n_test=4)
    output = tmp_path / "vit.safetensors"
    if where == "output under a file":
        (tmp_path / "file").write_text("")
        output = tmp_path / "file" / "vit.safetensors"
    else:
        data = tmp_path / "absent"
    with pytest.raises(SystemExit) as exit_info:
        train_embedded.main(["--data_path", str(data), "--output", str(output)])
    assert exit_info.value.code == 2 and names in capsys.readouterr().err


def test_fit_epochs_scales_with_the_time_given(tmp_path) -> None:
    write_fashion_folder(tmp_path, n_train=32, n_test=4)
    items = load_fashion_mnist("train", tmp_path)
    device = torch.device("cpu")
    assert train_embedded.fit_epochs(TINY_RECIPE, items, 1e-6, device, steps=2) == 1
    assert train_embedded.fit_epochs(TINY_RECIPE, items, 1e4, device, steps=2) > 10
