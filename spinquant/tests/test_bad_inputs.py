"""Bad inputs of ``python -m spinquant.main``: one clear line naming the setting, before the model loads.

The settings shared with fake_quant (bits, groups, corpora, outputs, config files) are covered by
``fake_quant/tests/test_bad_inputs.py`` through the same code; these are spinquant's own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from common.llama.rotation import LlamaShape
from common.tests.bad_inputs import BadInput, expect_refusal
from common.tests.llama_fixtures import TINY_CORPUS, tiny_llama
from spinquant import main as sq_main
from spinquant.rotation import initial_rotation, save_rotation

BASE = ["--calib_dataset", TINY_CORPUS, "--eval_datasets", TINY_CORPUS, "--seqlen", "32", "--nsamples", "4",
        "--eval_max_windows", "2", "--device", "cpu", "--rotation_steps", "3", "--rotation_nsamples", "4",
        "--rotation_seqlen", "16", "--rotation_batch_size", "2", "--methods", "fp"]


def _tiny_shape() -> LlamaShape:
    return LlamaShape.from_config(tiny_llama().config)


def _rotation_file(edit):
    def setup(folder: Path) -> list[str]:
        path = folder / "R.safetensors"
        shape = _tiny_shape()
        rotation = initial_rotation(shape, 0)
        save_rotation(path, rotation, shape, {})
        edit(path, rotation, shape)
        return ["--rotation_path", str(path)]

    return setup


def _nan_matrix(path: Path, rotation, shape) -> None:
    rotation.r2[1][0, 0] = float("nan")
    save_rotation(path, rotation, shape, {})


def _not_orthogonal(path: Path, rotation, shape) -> None:
    rotation.r1.mul_(1.5)
    save_rotation(path, rotation, shape, {})


def _missing_matrix(path: Path, rotation, shape) -> None:
    tensors = {k: v for k, v in rotation.tensors().items() if k != "R2.1"}
    save_file(tensors, str(path), metadata={"shape": '{"hidden_size": 64, "num_layers": 2, "num_heads": 4, '
                                                     '"num_kv_heads": 2, "head_dim": 16, "intermediate_size": 128}'})


def _not_safetensors(path: Path, rotation, shape) -> None:
    path.write_bytes(b"not a safetensors file")


def _other_model(path: Path, rotation, shape) -> None:
    other = LlamaShape(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16, intermediate_size=64)
    save_rotation(path, initial_rotation(other, 0), other, {})


def _a_folder(folder: Path) -> list[str]:
    (folder / "rotations").mkdir()
    return ["--rotation_path", str(folder / "rotations")]


def _under_a_file(folder: Path) -> list[str]:
    (folder / "a_file").write_text("")
    return ["--rotation_path", str(folder / "a_file" / "R.safetensors")]


CASES = [
    BadInput("no steps", ["--rotation_steps", "0"], "rotation_steps must be a positive integer"),
    BadInput("momentum 1", ["--rotation_momentum", "1.0"], "rotation_momentum must be in [0, 1)"),
    BadInput("batch above the windows", ["--rotation_batch_size", "64"], "rotation_batch_size (64) must not exceed "
             "rotation_nsamples"),
    BadInput("zero micro batch", ["--rotation_micro_batch_size", "0"], "rotation_micro_batch_size must be a positive"),
    BadInput("zero checkpoint interval", ["--rotation_checkpoint_every", "0"], "rotation_checkpoint_every must be"),
    BadInput("training weight bits zero", ["--rotation_w_bits", "0"], "rotation_w_bits must be an integer in 1..16"),
    BadInput("zero learning rate", ["--rotation_lr", "0"], "rotation_lr must be > 0"),
    BadInput("NaN learning rate", ["--rotation_lr", "nan"], "rotation_lr must be > 0"),
    BadInput("one-token training windows", ["--rotation_seqlen", "1"], "rotation_seqlen must be at least 2"),
    BadInput("training windows beyond the positions", ["--rotation_seqlen", "200"], "rotation_seqlen=200 is longer "
             "than the model's max_position_embeddings (128)"),
    BadInput("rotation path is a folder", [], "is a folder; give the path of a rotation file", _a_folder),
    BadInput("rotation path under a file", [], "rotation_path: ", _under_a_file),
    BadInput("NaN in a rotation", [], "R2.1 contains NaN or Inf", _rotation_file(_nan_matrix)),
    BadInput("rotation not orthogonal", [], "R1 is not orthogonal", _rotation_file(_not_orthogonal)),
    BadInput("rotation matrix missing", [], "R2.1 must be [16, 16], missing", _rotation_file(_missing_matrix)),
    BadInput("rotation file unreadable", [], "is not a readable safetensors file", _rotation_file(_not_safetensors)),
    BadInput("rotation of another model", [], "was made for another model: hidden_size 32 in the file vs 64",
             _rotation_file(_other_model)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.case)
def test_refused_before_the_model_loads(case: BadInput, watched_llama, capsys) -> None:
    folder, events = watched_llama
    extra = case.setup(folder) if case.setup else ["--rotation_path", str(folder / "R.safetensors")]
    capsys.readouterr()
    line = expect_refusal(sq_main.main, ["--results_dir", str(folder / "results"), *BASE, *case.argv, *extra], capsys)
    assert case.names in line
    assert events == [], "the model was loaded before the bad input was refused"


def test_unwritable_rotation_folder_is_refused_first(watched_llama, unwritable_dir, capsys) -> None:
    folder, events = watched_llama
    argv = ["--results_dir", str(folder / "results"), *BASE, "--rotation_path", str(unwritable_dir / "R.safetensors")]
    line = expect_refusal(sq_main.main, argv, capsys)
    assert "rotation_path: cannot write to folder" in line and events == []


@pytest.mark.parametrize("head_dim", [None, 24])
def test_sizes_from_the_configuration_equal_the_models(head_dim) -> None:
    """The preflight checks a rotation file against sizes read from the configuration alone."""
    config = tiny_llama().config
    if head_dim is not None:
        config.head_dim = head_dim
    assert LlamaShape.from_config(config) == LlamaShape.of(LlamaForCausalLM(config))
