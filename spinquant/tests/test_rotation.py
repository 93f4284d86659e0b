"""SpinQuant's rotations: fused learned rotations preserve the function; rotation files round-trip and are checked."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common.llama.rotation import LlamaShape, OnlineHadamard
from common.quant.hadamard import random_orthogonal_matrix
from common.quant.qlinear import QuantLinear
from common.tests.llama_fixtures import tiny_llama
from spinquant.rotation import (
    RotationFileError,
    SpinRotation,
    fuse_rotation,
    initial_rotation,
    load_rotation,
    prepare_model,
    save_rotation,
)

pytestmark = pytest.mark.numerics  # float results against references: CI reruns them on other kernels


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))


def _random_rotation(shape: LlamaShape, seed: int) -> SpinRotation:
    """Dense random orthogonal R1/R2 (no Hadamard structure), like trained ones."""
    r2 = [random_orthogonal_matrix(shape.head_dim, seed=seed + 1 + i) for i in range(shape.num_layers)]
    return SpinRotation(random_orthogonal_matrix(shape.hidden_size, seed=seed), r2)


@pytest.mark.parametrize("k_bits", [16, 4])
def test_fused_rotation_preserves_the_function(k_bits: int, margin) -> None:
    """Untie, fold norms, R4, R3 (with a quantized K cache) and learned R1/R2: full-precision logits unchanged."""
    model = tiny_llama()
    ids = _ids()
    with torch.no_grad():
        reference = model(ids).logits
    rotated = copy.deepcopy(model)
    shape = prepare_model(rotated, seed=0, k_bits=k_bits, v_bits=16, kv_clip_ratio=1.0)
    fuse_rotation(rotated, _random_rotation(shape, seed=5))
    for layer in rotated.model.layers:
        assert isinstance(layer.mlp.down_proj, QuantLinear)
        assert isinstance(layer.mlp.down_proj.input_transform, OnlineHadamard)
        assert not isinstance(layer.self_attn.o_proj, QuantLinear)  # SpinQuant: no online o_proj rotation
    if k_bits < 16:
        assert isinstance(rotated.model.layers[0].self_attn.kv_quantizer.k_rotation, OnlineHadamard)
        for layer in rotated.model.layers:
            layer.self_attn.kv_quantizer.quantize_input = False  # compare the rotation alone
    with torch.no_grad():
        logits = rotated(ids).logits
    margin("relative max logit difference", (logits - reference).abs().max() / reference.abs().max(), below=1e-5)
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.v_proj.weight"):
        assert not torch.allclose(rotated.state_dict()[name], model.state_dict()[name], atol=1e-3)


def test_initial_rotation_is_seeded_random_hadamard() -> None:
    shape = LlamaShape.of(tiny_llama())
    first, again, other = initial_rotation(shape, 0), initial_rotation(shape, 0), initial_rotation(shape, 1)
    assert torch.equal(first.r1, again.r1) and not torch.equal(first.r1, other.r1)
    assert len(first.r2) == shape.num_layers and not torch.equal(first.r2[0], first.r2[1])
    for matrix in (first.r1, *first.r2):
        n = matrix.shape[0]
        torch.testing.assert_close(matrix.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64))
        torch.testing.assert_close(matrix.T @ matrix, torch.eye(n, dtype=torch.float64))


def test_rotation_file_round_trip(tmp_path: Path) -> None:
    shape = LlamaShape.of(tiny_llama())
    rotation = _random_rotation(shape, seed=2)
    rotation.step, rotation.losses = 7, [3.5, 3.25]
    rotation.momentum = {"R1": torch.randn(64, 64, dtype=torch.float64)}
    path = save_rotation(tmp_path / "R.safetensors", rotation, shape, {"rotation_lr": 1.5})
    loaded, settings = load_rotation(path, shape)
    assert settings == {"rotation_lr": 1.5}
    assert (loaded.step, loaded.losses) == (7, [3.5, 3.25])
    assert torch.equal(loaded.r1, rotation.r1) and all(map(torch.equal, loaded.r2, rotation.r2))
    assert torch.equal(loaded.momentum["R1"], rotation.momentum["R1"])
    assert [p.name for p in tmp_path.iterdir()] == ["R.safetensors"]  # no temporary file left behind


def _other_shape_model() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(config)


def test_rotation_file_for_another_model_is_refused(tmp_path: Path) -> None:
    shape = LlamaShape.of(tiny_llama())
    path = save_rotation(tmp_path / "R.safetensors", _random_rotation(shape, 0), shape, {})
    with pytest.raises(RotationFileError, match=r"R\.safetensors was made for another model: hidden_size 64 in the "
                                                r"file vs 32 in the model"):
        load_rotation(path, LlamaShape.of(_other_shape_model()))


def test_non_orthogonal_or_missing_matrices_are_refused(tmp_path: Path) -> None:
    shape = LlamaShape.of(tiny_llama())
    broken = _random_rotation(shape, 0)
    broken.r2[1] = broken.r2[1] * 1.01
    path = save_rotation(tmp_path / "broken.safetensors", broken, shape, {})
    with pytest.raises(RotationFileError, match=r"R2\.1 is not orthogonal"):
        load_rotation(path, shape)
    fewer_layers = LlamaShape(**{**shape.__dict__, "num_layers": 1})
    short = save_rotation(tmp_path / "short.safetensors", SpinRotation(broken.r1, broken.r2[:1]), fewer_layers, {})
    with pytest.raises(RotationFileError, match="num_layers 1 in the file vs 2 in the model"):
        load_rotation(short, shape)
    missing = save_rotation(tmp_path / "missing.safetensors", SpinRotation(broken.r1, broken.r2[:1]), shape, {})
    with pytest.raises(RotationFileError, match=r"R2\.1 must be \[16, 16\], missing"):
        load_rotation(missing, shape)


def test_unreadable_or_missing_file(tmp_path: Path) -> None:
    shape = LlamaShape.of(tiny_llama())
    with pytest.raises(RotationFileError, match="does not exist"):
        load_rotation(tmp_path / "absent.safetensors", shape)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(RotationFileError, match=r"garbage\.safetensors is not a readable safetensors file"):
        load_rotation(garbage, shape)
