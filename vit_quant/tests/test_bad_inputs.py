"""Bad inputs of ``python -m vit_quant.main``: one clear line naming the setting, before a model is loaded (the
settings shared with the Llama trees are covered by ``fake_quant/tests/test_bad_inputs.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.tests.bad_inputs import BadInput, expect_refusal
from vit_quant import main as vq_main
from vit_quant.embedded_weights import record_path
from vit_quant.tests.fake_data import write_fashion_folder, write_tiny_embedded


def _fashion(missing: str | None = None, weights: str = "intact"):
    """Fake Fashion-MNIST and a tiny embedded model's weights (``intact``, ``changed``: a byte flipped after
    its record was written, ``unrecorded``: without its record, ``missing``: a path with no file)."""
    def setup(folder: Path) -> list[str]:
        data = folder / "fmnist"
        write_fashion_folder(data, n_train=16, n_test=8)
        if missing:
            (data / f"{missing}.gz").unlink()
        tiny = write_tiny_embedded(folder / "tiny.safetensors")
        if weights == "changed":
            content = tiny.read_bytes()
            tiny.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))
        elif weights == "unrecorded":
            record_path(tiny).unlink()
        elif weights == "missing":
            tiny = folder / "nonexistent.safetensors"
        return ["--data_path", str(data), "--checkpoint", str(tiny)]

    return setup


def _imagenet_without_val(folder: Path) -> list[str]:
    (folder / "imagenet" / "train").mkdir(parents=True)
    return ["--model", "deit_tiny_patch16_224", "--data_path", str(folder / "imagenet")]


def _imagenet(folder: Path) -> list[str]:
    for split in ("train", "val"):
        (folder / "imagenet" / split).mkdir(parents=True)
    return ["--model", "deit_tiny_patch16_224", "--data_path", str(folder / "imagenet")]


def _with(setup, *argv: str):
    def combined(folder: Path) -> list[str]:
        return [*setup(folder), *argv]

    return combined


CASES = [
    BadInput("unknown timm model", ["--model", "not_a_vit"], "unknown model 'not_a_vit'", _fashion()),
    BadInput("weight bits zero", ["--w_bits", "0"], "w_bits must be an integer in 1..16", _fashion()),
    BadInput("activation bits 32", ["--a_bits", "32"], "a_bits must be an integer in 1..16", _fashion()),
    BadInput("unknown method", ["--methods", "fp,smoothquant"], "methods must be one of", _fashion()),
    BadInput("weight group not dividing the ViT", ["--w_groupsize", "48"], "w_groupsize must be -1 or a positive "
             "divisor of every quantized linear's input size; 48 does not divide 32", _fashion()),
    BadInput("zero evaluation batch", ["--eval_batch_size", "0"], "eval_batch_size", _fashion()),
    BadInput("zero evaluation images", ["--eval_max_images", "0"], "eval_max_images must be a positive", _fashion()),
    BadInput("negative workers", ["--workers", "-1"], "workers must be 0", _fashion()),
    BadInput("embedded weights without their record", [], "checkpoint: ", _fashion(weights="unrecorded")),
    BadInput("embedded weights changed after training", [], "tiny.safetensors: SHA-256 differs from the one in "
             "tiny.json", _fashion(weights="changed")),
    BadInput("embedded checkpoint missing", [], "checkpoint", _fashion(weights="missing")),
    BadInput("Fashion-MNIST folder missing", ["--data_path", "/nonexistent/fmnist"], "data_path: Fashion-MNIST folder "
             "/nonexistent/fmnist does not exist"),
    BadInput("Fashion-MNIST file missing", [], "data_path: Fashion-MNIST file",
             _fashion("t10k-labels-idx1-ubyte")),
    BadInput("timm model without data", ["--model", "deit_tiny_patch16_224"], "data_path must point to an ImageNet "
             "root"),
    BadInput("ImageNet without val", [], "ImageNet folder", _imagenet_without_val),
    BadInput("timm checkpoint missing", [], "checkpoint: /nonexistent.pth is not a file",
             _with(_imagenet, "--checkpoint", "/nonexistent.pth")),
    BadInput("group not dividing DeiT", [], "w_groupsize must be -1 or a positive divisor of every quantized "
             "linear's input size; 100 does not divide 192", _with(_imagenet, "--w_groupsize", "100")),
    BadInput("results under a file", [], "results_dir: ", lambda f: (f / "x").write_text("") or
             ["--results_dir", str(f / "x" / "r")]),
]


@pytest.fixture
def watched(tmp_path, monkeypatch):
    events: list[str] = []

    def refuse(*args, **kwargs):
        events.append("load")
        raise AssertionError("a model was loaded or trained before the bad input was refused")

    monkeypatch.setattr(vq_main, "load_model_and_source", refuse)
    return tmp_path, events


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.case)
def test_refused_before_a_model_is_loaded(case: BadInput, watched, capsys) -> None:
    folder, events = watched
    extra = case.setup(folder) if case.setup else []
    line = expect_refusal(vq_main.main, ["--results_dir", str(folder / "results"), *case.argv, *extra], capsys)
    assert case.names in line
    assert events == []
    assert not (folder / "results").exists()
