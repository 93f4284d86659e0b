"""QuaRot's function-preserving rotation of a Hugging Face ``LlamaForCausalLM`` (implemented from the math).

Conventions: activations are row vectors, ``nn.Linear`` computes ``y = x @ W.T + b`` with ``W`` [out, in].
An online transform ``T`` maps the last dim as ``T(x) = x @ M.T`` for an orthogonal ``M`` [n, n]; it is
*fused* into a linear that reads ``T(x)`` by ``W <- W @ M.T``, i.e. by applying ``T`` to ``W``'s rows
(``W' = T(W)``), so that ``T(x) @ W'.T == x @ W.T``. All weight products run in float64 and are cast back.

Steps of :func:`rotate_model` (each preserves the model's function up to rounding):

1. Untie ``lm_head`` from ``embed_tokens`` (they are rotated differently).
2. Fold every RMSNorm scale into the linears that read its output (``input_layernorm`` -> q/k/v,
   ``post_attention_layernorm`` -> gate/up, final ``norm`` -> ``lm_head``): ``W <- W diag(g)``, ``g <- 1``.
   A Llama RMSNorm has no mean subtraction and no bias, so with ``g = 1`` it commutes with any orthogonal
   ``Q``: ``RMSNorm(x Q) = RMSNorm(x) Q``.
3. Residual stream rotation ``x -> x Q`` with ``Q`` [hidden, hidden] orthogonal and seeded:
   ``mode="hadamard"`` uses ``random_hadamard_matrix`` (``H diag(±1) / sqrt(n)``), ``mode="random"`` a
   Haar-random orthogonal matrix. ``embed_tokens <- W_emb Q``; readers of the residual (q, k, v, gate, up,
   lm_head) ``W <- W Q``; writers (o_proj, down_proj) ``W <- Qᵀ W``, ``b <- b Q``.
4. V / O head rotation (as QuaRot): ``H_d`` (normalized Hadamard over ``head_dim``) is fused into v_proj's
   output rows of every KV head and into o_proj's input columns of every attention head, so the values
   (and the V cache) are rotated while o_proj's output is unchanged.
5. down_proj input: an online Hadamard over ``intermediate_size``, fused into down_proj's columns.
6. o_proj input: QuaRot uses ``H_heads ⊗ H_d`` (a Hadamard across heads times one within heads). The
   embedded SmolLM2 has 9 heads and no Hadamard of order 9 exists, so **our choice** is ONE online Hadamard
   over the whole o_proj input dimension ``num_heads * head_dim`` (576 = 36·16 is constructible), fused
   into o_proj's columns as for down_proj. Together with step 4 the o_proj input is rotated by
   ``H_576 (I_9 ⊗ H_64)``, which spreads outliers across all channels as QuaRot intends.
7. Optional K rotation and KV-cache fake quantization (see :class:`KVQuantizer`): a registered attention
   function rotates queries and keys by ``H_d`` after RoPE (``q kᵀ`` unchanged), then fake-quantizes K and
   V per (token, head) with an asymmetric :class:`common.quant.ActivationQuantizer`.

Online transforms are installed by replacing ``self_attn.o_proj`` and ``mlp.down_proj`` with
:class:`common.qlinear.QuantLinear` (``input_transform=`` the online module); other linears stay
``nn.Linear``. Fallback: any online / head transform whose size has no Hadamard construction (see
:mod:`common.hadamard`) becomes a fixed seeded random orthogonal matrix, with a warning.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, eager_attention_forward

from common.hadamard import (
    hadamard_transform,
    is_constructible,
    random_hadamard_matrix,
    random_orthogonal_matrix,
)
from common.qlinear import QuantLinear
from common.quant import FULL_PRECISION_BITS, ActivationQuantizer, check_bits, check_clip_ratio
from fake_quant.model_loading import untie_embeddings

MODES = ("hadamard", "random")
"""Allowed residual-rotation modes."""

KV_ATTENTION_PREFIX = "quarot_kv_"
"""Registered attention implementations ``quarot_kv_sdpa`` / ``quarot_kv_eager``."""

# Seed offsets of the fallback random orthogonal matrices, so that they differ from Q and from each other.
_SEED_OFFSET = {"o_proj": 1, "down_proj": 2, "head": 3}


class OnlineHadamard(nn.Module):
    """Normalized Hadamard transform of the last dim, ``x [..., n] -> x @ H_n.T / sqrt(n)`` (keeps dtype)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        if not is_constructible(n):
            raise ValueError(f"n={n} has no constructible Hadamard matrix")
        self.n = n

    @property
    def label(self) -> str:
        return f"hadamard({self.n})"

    def extra_repr(self) -> str:
        return f"n={self.n}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x)


class OnlineOrthogonal(nn.Module):
    """Fixed orthogonal transform of the last dim, ``x [..., n] -> x @ M.T`` (``M`` kept in float64)."""

    def __init__(self, matrix: torch.Tensor, label: str) -> None:
        super().__init__()
        self.n = matrix.shape[0]
        self.register_buffer("matrix", matrix.to(torch.float64))
        self.label = label

    def extra_repr(self) -> str:
        return f"n={self.n}, {self.label}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.to(dtype=x.dtype, device=x.device).T


OnlineTransform = OnlineHadamard | OnlineOrthogonal


def online_transform(n: int, *, seed: int, what: str) -> OnlineTransform:
    """``OnlineHadamard(n)`` if constructible, else (with a warning) a seeded random orthogonal transform."""
    if is_constructible(n):
        return OnlineHadamard(n)
    warnings.warn(
        f"{what}: n={n} has no constructible Hadamard matrix; using a fixed random orthogonal matrix (seed {seed})",
        stacklevel=2,
    )
    return OnlineOrthogonal(random_orthogonal_matrix(n, seed=seed), f"random_orthogonal({n}, seed={seed})")


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`MODES`, else raise ``ValueError`` listing them."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    return mode


def residual_rotation(n: int, *, mode: str, seed: int) -> torch.Tensor:
    """The residual-stream rotation ``Q`` [n, n] (float64, orthogonal) for ``mode`` in :data:`MODES`."""
    if check_mode(mode) == "hadamard":
        return random_hadamard_matrix(n, seed=seed)
    return random_orthogonal_matrix(n, seed=seed)


class KVQuantizer(nn.Module):
    """Online K rotation and K/V fake quantization, applied inside attention after RoPE.

    Shapes: ``query`` [batch, heads, q_len, head_dim], ``key``/``value`` [batch, kv_heads, kv_len, head_dim]
    (after the cache update, so the cache itself holds unquantized keys/values; quantization is per row of
    ``head_dim``, i.e. per token and head, hence identical for a token however often it is re-read).

    Args:
        k_rotation: transform of ``head_dim`` applied to queries and keys, or ``None``.
        k_bits, v_bits: 1..16 (16 = not quantized), asymmetric grids.
        clip_ratio: range shrink of both quantizers, in (0, 1].

    ``quantize_input`` (a flag, as on :class:`common.qlinear.QuantLinear`) turns the quantizers off so
    the full-precision stream and column see unquantized K/V (the rotation stays: it is exact).
    """

    def __init__(self, k_rotation: OnlineTransform | None, *, k_bits: int, v_bits: int, clip_ratio: float) -> None:
        super().__init__()
        self.k_rotation = k_rotation
        self.k_quantizer = ActivationQuantizer(k_bits, clip_ratio=clip_ratio)
        self.v_quantizer = ActivationQuantizer(v_bits, clip_ratio=clip_ratio)
        self.quantize_input = True

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.k_rotation is not None:
            query, key = self.k_rotation(query), self.k_rotation(key)
        if not self.quantize_input:
            return query, key, value
        return query, self.k_quantizer(key), self.v_quantizer(value)


def _kv_attention(base: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]) -> Callable:
    """An attention function that runs the module's :class:`KVQuantizer` and then ``base``."""

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query, key, value = module.kv_quantizer(query, key, value)
        return base(module, query, key, value, attention_mask, **kwargs)

    return attention


_KV_BASES = {
    "sdpa": (ALL_ATTENTION_FUNCTIONS["sdpa"], sdpa_mask),
    "eager": (eager_attention_forward, eager_mask),
}
"""Attention implementations the KV wrapper can run on: ``{name: (attention function, mask function)}``."""


def _register_kv_attention() -> None:
    """Register ``quarot_kv_<base>`` in transformers' attention and mask registries (same mask as ``base``)."""
    for base, (function, mask) in _KV_BASES.items():
        AttentionInterface.register(KV_ATTENTION_PREFIX + base, _kv_attention(function))
        AttentionMaskInterface.register(KV_ATTENTION_PREFIX + base, mask)


_register_kv_attention()


@dataclass
class RotationInfo:
    """What :func:`rotate_model` did (sizes and the transforms used, as labels like ``hadamard(576)``)."""

    mode: str
    seed: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    residual: str
    v_o_heads: str
    o_proj_online: str
    down_proj_online: str
    k_rotation: str | None
    k_bits: int
    v_bits: int
    kv_clip_ratio: float
    attn_implementation: str


@torch.no_grad()
def _set(param: torch.Tensor, value64: torch.Tensor) -> None:
    """Copy a float64 result into ``param`` (in place, keeping its dtype/device)."""
    param.copy_(value64.to(dtype=param.dtype, device=param.device))


@torch.no_grad()
def fold_rms_norms(model: LlamaForCausalLM) -> None:
    """Fold each RMSNorm's scale ``g`` [hidden] into the linears that read it (``W <- W diag(g)``); ``g <- 1``."""
    pairs = [(model.model.norm, [model.lm_head])]
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        pairs.append((layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]))
        pairs.append((layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]))
    for norm, readers in pairs:
        scale = norm.weight.double()
        for linear in readers:
            _set(linear.weight, linear.weight.double() * scale)
        norm.weight.fill_(1.0)


@torch.no_grad()
def _rotate_readers(linears: list[nn.Module], q: torch.Tensor) -> None:
    """Readers of the residual: ``W [out, hidden] <- W Q``."""
    for linear in linears:
        _set(linear.weight, linear.weight.double() @ q.to(linear.weight.device))


@torch.no_grad()
def _rotate_writer(linear: nn.Linear, q: torch.Tensor) -> None:
    """Writers of the residual: ``W [hidden, in] <- Qᵀ W``, ``b [hidden] <- b Q``."""
    q = q.to(linear.weight.device)
    _set(linear.weight, q.T @ linear.weight.double())
    if linear.bias is not None:
        _set(linear.bias, linear.bias.double() @ q)


@torch.no_grad()
def _rotate_v_o_heads(layer: LlamaDecoderLayer, head: OnlineTransform, head_dim: int) -> None:
    """Rotate each value head by ``M`` (``v_h <- v_h Mᵀ``) and undo it in o_proj's columns of every head."""
    v_proj, o_proj = layer.self_attn.v_proj, layer.self_attn.o_proj
    w_v = v_proj.weight.double()  # [kv_heads * d, hidden]; per head v_h = x W_h.T, W_h <- M W_h
    w_v = head(w_v.T.reshape(w_v.shape[1], -1, head_dim)).reshape(w_v.shape[1], -1).T
    _set(v_proj.weight, w_v)
    if v_proj.bias is not None:
        _set(v_proj.bias, head(v_proj.bias.double().reshape(-1, head_dim)).reshape(-1))
    w_o = o_proj.weight.double()  # [hidden, heads * d]; o_proj's columns of head h <- W_o[:, h] Mᵀ
    _set(o_proj.weight, head(w_o.reshape(w_o.shape[0], -1, head_dim)).reshape(w_o.shape))


@torch.no_grad()
def _fuse_online(linear: nn.Linear, transform: OnlineTransform) -> QuantLinear:
    """Fuse ``transform`` into ``linear``'s columns (``W <- T(W)``) and wrap it to apply ``T`` online."""
    _set(linear.weight, transform(linear.weight.double()))
    return QuantLinear(linear, input_transform=transform)


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"rotate_model supports LlamaForCausalLM only, got {type(model).__name__}")
    if any(isinstance(layer.self_attn.o_proj, QuantLinear) for layer in model.model.layers):
        raise ValueError("the model is already rotated or wrapped (o_proj is a QuantLinear)")


def _check_kv_attention(model: LlamaForCausalLM) -> None:
    base = model.config._attn_implementation
    if base not in _KV_BASES:
        raise ValueError(f"K rotation / KV quantization needs attention {sorted(_KV_BASES)}, the model uses {base!r}")


@torch.no_grad()
def _rotate_weights(
    model: LlamaForCausalLM,
    q: torch.Tensor,
    head: OnlineTransform,
    o_online: OnlineTransform,
    down_online: OnlineTransform,
) -> None:
    """Steps 3-6 of the module docstring on a model whose norms are folded (``q`` [hidden, hidden])."""
    emb = model.model.embed_tokens.weight
    _set(emb, emb.double() @ q.to(emb.device))
    _rotate_readers([model.lm_head], q)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _rotate_readers([attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj], q)
        _rotate_writer(attn.o_proj, q)
        _rotate_writer(mlp.down_proj, q)
        _rotate_v_o_heads(layer, head, attn.head_dim)
        attn.o_proj = _fuse_online(attn.o_proj, copy.deepcopy(o_online))
        mlp.down_proj = _fuse_online(mlp.down_proj, copy.deepcopy(down_online))


def _install_kv(
    model: LlamaForCausalLM, k_rotation: OnlineTransform | None, k_bits: int, v_bits: int, clip_ratio: float
) -> str:
    """Attach a :class:`KVQuantizer` to every attention layer and switch to the matching attention function."""
    base = model.config._attn_implementation
    for layer in model.model.layers:
        layer.self_attn.kv_quantizer = KVQuantizer(
            copy.deepcopy(k_rotation), k_bits=k_bits, v_bits=v_bits, clip_ratio=clip_ratio
        )
    model.set_attn_implementation(KV_ATTENTION_PREFIX + base)
    return model.config._attn_implementation


def rotate_model(
    model: LlamaForCausalLM,
    *,
    mode: str = "hadamard",
    seed: int = 0,
    k_bits: int = FULL_PRECISION_BITS,
    v_bits: int = FULL_PRECISION_BITS,
    kv_clip_ratio: float = 1.0,
    rotate_k: bool | None = None,
) -> RotationInfo:
    """Apply QuaRot's rotation to ``model`` in place (see the module docstring); returns what was done.

    Args:
        model: a ``LlamaForCausalLM`` (any dtype/device; weight products run in float64).
        mode: residual rotation, one of :data:`MODES`.
        seed: seed of the residual rotation (and of any fallback random orthogonal matrix).
        k_bits, v_bits: KV-cache fake-quantization bits, 1..16 (16 = off).
        kv_clip_ratio: range shrink of the KV quantizers, in (0, 1].
        rotate_k: online Hadamard on queries/keys after RoPE; ``None`` means "when ``k_bits < 16``" (as QuaRot).

    Raises:
        ValueError: unknown ``mode``, bits outside 1..16, bad clip ratio, unsupported or already rotated model.
    """
    check_mode(mode)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    check_bits(k_bits, "k_bits")
    check_bits(v_bits, "v_bits")
    check_clip_ratio(kv_clip_ratio, "kv_clip_ratio")
    _check_model(model)
    rotate_k = k_bits < FULL_PRECISION_BITS if rotate_k is None else bool(rotate_k)
    kv_on = rotate_k or k_bits < FULL_PRECISION_BITS or v_bits < FULL_PRECISION_BITS
    if kv_on:
        _check_kv_attention(model)

    config = model.config
    hidden = config.hidden_size
    head_dim = model.model.layers[0].self_attn.head_dim
    o_in = model.model.layers[0].self_attn.o_proj.in_features
    inter = model.model.layers[0].mlp.down_proj.in_features

    untie_embeddings(model)
    fold_rms_norms(model)
    q = residual_rotation(hidden, mode=mode, seed=seed)
    head = online_transform(head_dim, seed=seed + _SEED_OFFSET["head"], what="head_dim rotation")
    o_online = online_transform(o_in, seed=seed + _SEED_OFFSET["o_proj"], what="o_proj online rotation")
    down_online = online_transform(inter, seed=seed + _SEED_OFFSET["down_proj"], what="down_proj online rotation")

    _rotate_weights(model, q, head, o_online, down_online)

    k_rotation = head if rotate_k else None
    attn_implementation = (
        _install_kv(model, k_rotation, k_bits, v_bits, kv_clip_ratio) if kv_on else config._attn_implementation
    )
    residual_label = (
        f"random_hadamard({hidden}, seed={seed})"
        if mode == "hadamard" and is_constructible(hidden)
        else f"random_orthogonal({hidden}, seed={seed})"
    )
    return RotationInfo(
        mode=mode,
        seed=seed,
        hidden_size=hidden,
        num_layers=len(model.model.layers),
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        residual=residual_label,
        v_o_heads=head.label,
        o_proj_online=o_online.label,
        down_proj_online=down_online.label,
        k_rotation=k_rotation.label if k_rotation is not None else None,
        k_bits=k_bits,
        v_bits=v_bits,
        kv_clip_ratio=float(kv_clip_ratio),
        attn_implementation=attn_implementation,
    )
