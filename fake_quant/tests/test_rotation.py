"""Tests of fake_quant.rotation: QuaRot's rotation must preserve the model's function (up to rounding)."""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from common.engine.adapter import find_tails
from common.llama.adapter import TAILS, add_activation_quantizers
from common.llama.rotation import KVQuantizer, OnlineHadamard, OnlineOrthogonal, fold_rms_norms
from common.quant.hadamard import hadamard_transform
from common.quant.qlinear import QuantLinear
from common.quant.quantizers import ActivationQuantizer
from fake_quant.rotation import rotate_model

pytestmark = pytest.mark.numerics  # float results against references: CI reruns them on other kernels

VOCAB = 128
# (hidden, heads, kv_heads, head_dim, intermediate): GQA, all sizes constructible
CONSTRUCTIBLE = (96, 4, 2, 24, 160)
# no Hadamard of order 54, 18 or 90 exists: every transform falls back to a random orthogonal matrix
NOT_CONSTRUCTIBLE = (54, 3, 1, 18, 90)


def tiny_llama(sizes: tuple[int, ...] = CONSTRUCTIBLE, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A random 2-layer Llama with tied embeddings and non-unit RMSNorm scales."""
    hidden, heads, kv_heads, head_dim, intermediate = sizes
    config = LlamaConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    generator = torch.Generator().manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LlamaRMSNorm):
                module.weight.copy_(0.5 + 1.5 * torch.rand(module.weight.shape, generator=generator))
    return model.to(dtype).eval()


def input_ids(batch: int = 2, length: int = 13) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def relative_max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def rotated_copy(model: LlamaForCausalLM, **kwargs: object) -> LlamaForCausalLM:
    rotated = copy.deepcopy(model)
    rotate_model(rotated, **kwargs)
    return rotated


def _float64_rms_norm(self: LlamaRMSNorm, x: torch.Tensor) -> torch.Tensor:
    """HF's RMSNorm computes in float32 even for float64 inputs; this one keeps the input dtype."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["hadamard", "random"])
def test_rotation_preserves_logits_float32(mode: str, attn: str, margin) -> None:
    model = tiny_llama()
    model.set_attn_implementation(attn)
    ids = input_ids()
    rotated = rotated_copy(model, mode=mode, seed=3, rotate_k=True)
    assert rotated.config._attn_implementation == f"rotated_kv_{attn}"
    margin("relative max logit difference, float32", relative_max_diff(logits(rotated, ids), logits(model, ids)),
           below=1e-5)  # measured 3e-7 .. 5e-7


@pytest.mark.parametrize("mode", ["hadamard", "random"])
def test_rotation_is_exact_in_float64(mode: str, monkeypatch: pytest.MonkeyPatch, margin) -> None:
    monkeypatch.setattr(LlamaRMSNorm, "forward", _float64_rms_norm)
    model = tiny_llama(dtype=torch.float64)
    ids = input_ids()
    rotated = rotated_copy(model, mode=mode, seed=3, rotate_k=True)
    margin("relative max logit difference, float64", relative_max_diff(logits(rotated, ids), logits(model, ids)),
           below=1e-12)  # measured ~1e-15


def test_rotation_without_online_transforms_is_a_plain_llama(margin) -> None:
    model = tiny_llama()
    ids = input_ids()
    rotated = rotated_copy(model, seed=3, online=False)
    assert not any(isinstance(module, QuantLinear) for module in rotated.modules())
    assert type(rotated.model.layers[0].mlp.down_proj) is nn.Linear
    margin("relative max logit difference, float32, fused transforms only",
           relative_max_diff(logits(rotated, ids), logits(model, ids)), below=1e-5)
    reloaded = LlamaForCausalLM(rotated.config).eval()
    reloaded.load_state_dict(rotated.state_dict())
    assert torch.equal(logits(reloaded, ids), logits(rotated, ids))  # nothing outside the state dict


def test_fallback_to_random_orthogonal_warns_and_preserves_logits(margin) -> None:
    model = tiny_llama(NOT_CONSTRUCTIBLE)
    ids = input_ids()
    rotated = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="no constructible Hadamard matrix") as record:
        info = rotate_model(rotated, mode="hadamard", seed=0, rotate_k=True)
    assert len(record) == 4  # residual, head_dim, o_proj, down_proj
    assert info.residual.startswith("random_orthogonal(54")
    assert info.o_proj_online.startswith("random_orthogonal(54")
    assert info.down_proj_online.startswith("random_orthogonal(90")
    assert info.k_rotation.startswith("random_orthogonal(18")
    assert isinstance(rotated.model.layers[0].mlp.down_proj.input_transform, OnlineOrthogonal)
    margin("relative max logit difference", relative_max_diff(logits(rotated, ids), logits(model, ids)), below=1e-5)


def test_structure_weights_and_info() -> None:
    model = tiny_llama()
    rotated = copy.deepcopy(model)
    info = rotate_model(rotated, mode="hadamard", seed=0)
    assert (info.mode, info.seed, info.shape.hidden_size, info.shape.num_layers) == ("hadamard", 0, 96, 2)
    assert (info.shape.num_heads, info.shape.num_kv_heads, info.shape.head_dim) == (4, 2, 24)
    assert info.shape.intermediate_size == 160
    assert info.o_proj_online == "hadamard(96)" and info.down_proj_online == "hadamard(160)"
    assert info.v_o_heads == "hadamard(24)" and info.k_rotation is None
    assert info.attn_implementation == "sdpa"
    assert rotated.config.tie_word_embeddings is False
    assert rotated.lm_head.weight.data_ptr() != rotated.model.embed_tokens.weight.data_ptr()
    for norm in [m for m in rotated.modules() if isinstance(m, LlamaRMSNorm)]:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    for layer in rotated.model.layers:
        for wrapped in (layer.self_attn.o_proj, layer.mlp.down_proj):
            assert isinstance(wrapped, QuantLinear) and isinstance(wrapped.input_transform, OnlineHadamard)
        assert type(layer.self_attn.q_proj) is nn.Linear and type(layer.mlp.up_proj) is nn.Linear
        assert not hasattr(layer.self_attn, "kv_quantizer")
    original = model.state_dict()  # tied: lm_head.weight is the original embedding
    for name, tensor in rotated.state_dict().items():
        if "norm" not in name and name in original:
            assert not torch.allclose(tensor, original[name], atol=1e-3), name


def test_fold_rms_norms_preserves_logits(margin) -> None:
    model = tiny_llama()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # fold needs untied weights
    ids = input_ids()
    reference = logits(model, ids)
    fold_rms_norms(model)
    assert all(torch.all(m.weight == 1) for m in model.modules() if isinstance(m, LlamaRMSNorm))
    margin("relative max logit difference", relative_max_diff(logits(model, ids), reference), below=1e-5)


def test_online_hadamard_fusion_convention() -> None:
    linear = nn.Linear(24, 5, bias=True).double()
    x = torch.randn(3, 24, dtype=torch.float64)
    fused = nn.Linear(24, 5, bias=True).double()
    fused.load_state_dict(linear.state_dict())
    with torch.no_grad():
        fused.weight.copy_(hadamard_transform(fused.weight))
    wrapped = QuantLinear(fused, input_transform=OnlineHadamard(24))
    torch.testing.assert_close(wrapped(x), linear(x), rtol=1e-12, atol=1e-12)


def test_kv_quantizer_rotates_then_quantizes_per_head_and_token() -> None:
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 5, 16, generator=generator)
    key = torch.randn(2, 2, 7, 16, generator=generator)
    value = torch.randn(2, 2, 7, 16, generator=generator)
    kv = KVQuantizer(OnlineHadamard(16), k_bits=4, v_bits=3, clip_ratio=0.9)
    q, k, v = kv(query, key, value)
    torch.testing.assert_close(q, hadamard_transform(query))
    torch.testing.assert_close(k, ActivationQuantizer(4, clip_ratio=0.9)(hadamard_transform(key)))
    torch.testing.assert_close(v, ActivationQuantizer(3, clip_ratio=0.9)(value))
    exact = KVQuantizer(OnlineHadamard(16), k_bits=16, v_bits=16, clip_ratio=1.0)
    q, k, _ = exact(query, key, value)
    torch.testing.assert_close(q @ k[:, :1].transpose(-1, -2), query @ key[:, :1].transpose(-1, -2))


def test_kv_quantization_is_active_in_the_model(margin) -> None:
    model = tiny_llama()
    ids = input_ids()
    reference = logits(model, ids)
    rotated = copy.deepcopy(model)
    info = rotate_model(rotated, k_bits=4, v_bits=4, kv_clip_ratio=0.95)
    assert info.k_rotation == "hadamard(24)" and (info.k_bits, info.v_bits) == (4, 4)
    kv = rotated.model.layers[1].self_attn.kv_quantizer
    assert (kv.k_quantizer.bits, kv.v_quantizer.bits, kv.k_quantizer.clip_ratio) == (4, 4, 0.95)
    difference = relative_max_diff(logits(rotated, ids), reference)
    margin("relative max logit change by K4V4", difference, above=1e-4, below=0.5)


def test_generation_with_kv_cache_matches() -> None:
    model = tiny_llama()
    rotated = rotated_copy(model, mode="hadamard", seed=1, rotate_k=True)
    prompt = input_ids(batch=1, length=6)
    settings = {"max_new_tokens": 6, "do_sample": False, "use_cache": True, "pad_token_id": 0}
    with torch.no_grad():
        expected = model.generate(prompt, **settings)
        produced = rotated.generate(prompt, **settings)
    assert torch.equal(produced, expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "hadamrd"}, r"mode must be one of \['hadamard', 'random'\]"),
        ({"k_bits": 0}, "k_bits"),
        ({"k_bits": 17}, "k_bits"),
        ({"v_bits": 2.5}, "v_bits"),
        ({"v_bits": True}, "v_bits"),
        ({"kv_clip_ratio": 0.0}, "kv_clip_ratio"),
        ({"seed": "0"}, "seed"),
        ({"online": False, "k_bits": 4}, "online=False keeps no online transform"),
    ],
)
def test_bad_arguments_raise_before_touching_the_model(kwargs: dict, match: str) -> None:
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        rotate_model(model, **kwargs)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_kv_needs_sdpa_or_eager_attention() -> None:
    model = tiny_llama()
    model.config._attn_implementation_internal = "flex_attention"  # as if loaded with flex attention
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="flex_attention"):
        rotate_model(model, k_bits=4)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_unsupported_model_and_double_rotation_raise() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        rotate_model(gpt2)
    model = tiny_llama()
    rotate_model(model)
    with pytest.raises(ValueError, match="already rotated"):
        rotate_model(model)


@pytest.mark.slow
def test_embedded_smollm2_rotation_preserves_logits(margin) -> None:
    from common.llama.loading import load_llama

    model, tokenizer = load_llama("embedded")
    text = (
        "The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city of France. "
        "It is located on the river Seine, in the north of the country."
    )
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    reference = logits(model, ids)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every SmolLM2 size (576, 64, 1536) has a Hadamard construction
        info = rotate_model(model, mode="hadamard", seed=0, rotate_k=True)
    elapsed = time.perf_counter() - start
    assert (info.o_proj_online, info.down_proj_online, info.k_rotation) == (
        "hadamard(576)",
        "hadamard(1536)",
        "hadamard(64)",
    )
    rotated = logits(model, ids)
    abs_diff = (rotated - reference).abs().max().item()
    rel_diff = relative_max_diff(rotated, reference)
    print(f"SmolLM2 rotation: {elapsed:.1f} s, logits max abs diff {abs_diff:.2e}, relative {rel_diff:.2e}")
    margin("relative max logit difference, SmolLM2", rel_diff, below=2e-5)  # measured 2.4e-6
    assert torch.equal(rotated.argmax(-1), reference.argmax(-1))


def test_rotated_blocks_keep_the_adapters_tails() -> None:
    """With online transforms and KV quantization the attention still returns o_proj's output (the engine
    computes it from o_proj's recorded input once q/k/v are solved) and the MLP down_proj's."""
    model = tiny_llama()
    rotate_model(model, k_bits=4, v_bits=4)
    add_activation_quantizers(model, bits=4, sym=False, clip_ratio=0.9, groupsize=-1)
    assert find_tails(model.model.layers[0], lambda: model(input_ids())) == TAILS
