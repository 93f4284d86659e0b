"""QuaRot's function-preserving rotation of a Hugging Face ``LlamaForCausalLM`` (implemented from the math).

Built from the shared pieces of :mod:`common.llama.rotation` (see its docstring for the conventions). Steps of
:func:`rotate_model`, each preserving the model's function up to rounding:

1. Untie ``lm_head`` from ``embed_tokens`` and fold every RMSNorm scale into the linears that read it.
2. Residual stream rotation ``Q`` [hidden, hidden], seeded: ``mode="hadamard"`` uses
   ``random_hadamard_matrix`` (``H diag(±1) / sqrt(n)``), ``mode="random"`` a Haar-random orthogonal matrix.
3. V / O head rotation: the normalized Hadamard ``H_d`` over ``head_dim`` (the same in every layer) rotates
   every value head (and so the V cache) and is undone in o_proj's columns.
4. down_proj input: an online Hadamard over ``intermediate_size``, fused into down_proj's columns.
5. o_proj input: QuaRot uses ``H_heads ⊗ H_d`` (a Hadamard across heads times one within heads). The
   embedded SmolLM2 has 9 heads and no Hadamard of order 9 exists, so **our choice** is ONE online Hadamard
   over the whole o_proj input dimension ``num_heads * head_dim`` (576 = 36·16 is constructible), fused
   into o_proj's columns as for down_proj. Together with step 3 the o_proj input is rotated by
   ``H_576 (I_9 ⊗ H_64)``, which spreads outliers across all channels as QuaRot intends.
6. Optional K rotation (``H_d`` on queries and keys after RoPE) and KV-cache fake quantization.

``online=False`` stops after step 3: every transform is then fused into the weights and the model is a plain
``LlamaForCausalLM`` again (the weight-only QuaRot rows of the paper; what a ``gptq`` checkpoint can hold).

Online transforms are installed by replacing ``self_attn.o_proj`` and ``mlp.down_proj`` with
:class:`common.quant.qlinear.QuantLinear` (``input_transform=`` the online module); other linears stay
``nn.Linear``. Fallback: any transform whose size has no Hadamard construction (see :mod:`common.quant.hadamard`)
becomes a fixed seeded random orthogonal matrix, with a warning.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM

from common.llama.rotation import (
    LlamaShape,
    check_kv_attention,
    check_llama,
    fuse_down_proj_online,
    fuse_online,
    install_kv_quantizers,
    online_transform,
    prepare_for_rotation,
    rotate_weights_,
    transform_matrix,
)
from common.quant.hadamard import is_constructible, random_hadamard_matrix, random_orthogonal_matrix
from common.quant.quantizers import FULL_PRECISION_BITS, check_bits, check_clip_ratio

MODES = ("hadamard", "random")
"""Allowed residual-rotation modes."""

# Seed offsets of the fallback random orthogonal matrices, so that they differ from Q and from each other.
_SEED_OFFSET = {"o_proj": 1, "down_proj": 2, "head": 3}


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


@dataclass
class RotationInfo:
    """What :func:`rotate_model` did (sizes and the transforms used, as labels like ``hadamard(576)``)."""

    mode: str
    seed: int
    shape: LlamaShape
    residual: str
    v_o_heads: str
    o_proj_online: str | None
    down_proj_online: str | None
    k_rotation: str | None
    k_bits: int
    v_bits: int
    kv_clip_ratio: float
    attn_implementation: str


def rotate_model(
    model: LlamaForCausalLM,
    *,
    mode: str = "hadamard",
    seed: int = 0,
    k_bits: int = FULL_PRECISION_BITS,
    v_bits: int = FULL_PRECISION_BITS,
    kv_clip_ratio: float = 1.0,
    rotate_k: bool | None = None,
    online: bool = True,
) -> RotationInfo:
    """Apply QuaRot's rotation to ``model`` in place (see the module docstring); returns what was done.

    Args:
        model: a ``LlamaForCausalLM`` (any dtype/device; weight products run in float64).
        mode: residual rotation, one of :data:`MODES`.
        seed: seed of the residual rotation (and of any fallback random orthogonal matrix).
        k_bits, v_bits: KV-cache fake-quantization bits, 1..16 (16 = off).
        kv_clip_ratio: range shrink of the KV quantizers, in (0, 1].
        rotate_k: online Hadamard on queries/keys after RoPE; ``None`` means "when ``k_bits < 16``" (as QuaRot).
        online: install the online Hadamards of steps 4-6; ``False`` keeps only the transforms fused into weights.

    Raises:
        ValueError: unknown ``mode``, bits outside 1..16, bad clip ratio, unsupported or already rotated model.
    """
    check_mode(mode)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    check_bits(k_bits, "k_bits")
    check_bits(v_bits, "v_bits")
    check_clip_ratio(kv_clip_ratio, "kv_clip_ratio")
    check_llama(model)
    rotate_k = k_bits < FULL_PRECISION_BITS if rotate_k is None else bool(rotate_k)
    if not online and (rotate_k or k_bits < FULL_PRECISION_BITS or v_bits < FULL_PRECISION_BITS):
        raise ValueError(f"online=False keeps no online transform, so it allows no K rotation or KV-cache "
                         f"quantization; got rotate_k={rotate_k}, k_bits={k_bits}, v_bits={v_bits}")
    kv_on = rotate_k or k_bits < FULL_PRECISION_BITS or v_bits < FULL_PRECISION_BITS
    if kv_on:
        check_kv_attention(model)

    shape = prepare_for_rotation(model)
    o_in = model.model.layers[0].self_attn.o_proj.in_features
    q = residual_rotation(shape.hidden_size, mode=mode, seed=seed)
    head = online_transform(shape.head_dim, seed=seed + _SEED_OFFSET["head"], what="head_dim rotation")
    head_matrix = transform_matrix(head)
    rotate_weights_(model, residual=q, heads=[head_matrix] * shape.num_layers)
    o_online = down_online = None
    if online:
        o_online = online_transform(o_in, seed=seed + _SEED_OFFSET["o_proj"], what="o_proj online rotation")
        down_online = online_transform(shape.intermediate_size, seed=seed + _SEED_OFFSET["down_proj"],
                                       what="down_proj online rotation")
        for layer in model.model.layers:
            layer.self_attn.o_proj = fuse_online(layer.self_attn.o_proj, copy.deepcopy(o_online))
        fuse_down_proj_online(model, down_online)

    k_rotation = head if rotate_k else None
    attn_implementation = model.config._attn_implementation
    if kv_on:
        attn_implementation = install_kv_quantizers(model, k_rotation, k_bits=k_bits, v_bits=v_bits,
                                                    clip_ratio=kv_clip_ratio)
    residual_label = (
        f"random_hadamard({shape.hidden_size}, seed={seed})"
        if mode == "hadamard" and is_constructible(shape.hidden_size)
        else f"random_orthogonal({shape.hidden_size}, seed={seed})"
    )
    return RotationInfo(
        mode=mode,
        seed=seed,
        shape=shape,
        residual=residual_label,
        v_o_heads=head.label,
        o_proj_online=o_online.label if o_online is not None else None,
        down_proj_online=down_online.label if down_online is not None else None,
        k_rotation=k_rotation.label if k_rotation is not None else None,
        k_bits=k_bits,
        v_bits=v_bits,
        kv_clip_ratio=float(kv_clip_ratio),
        attn_implementation=attn_implementation,
    )
