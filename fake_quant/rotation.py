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
from torch import nn
from transformers import LlamaForCausalLM

from common.llama.loading import untie_embeddings
from common.llama.rotation import (
    LlamaShape,
    OnlineTransform,
    check_llama,
    fold_final_norm,
    fold_layer_norms,
    fuse_online,
    install_kv_quantizer,
    kv_attention_name,
    online_transform,
    rotate_embedding_,
    rotate_layer_weights_,
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


@dataclass
class QuaRot:
    """The transforms :func:`rotate_model` applies, built once from the model's sizes and applied piece by piece:
    to every decoder layer (:meth:`rotate_layer`), to the embedding (:meth:`rotate_embedding`) and to the head
    (:meth:`rotate_head`).
    A model loaded one block at a time (:mod:`common.llama.blockwise`) is rotated block by block with the same
    calls, so both give the same bits.

    Attributes:
        residual: ``Q`` [hidden, hidden], float64.
        head: the head_dim rotation ``H_d`` (V/O heads, and K after RoPE when ``k_rotation`` is set);
            ``head_matrix`` its float64 matrix.
        o_online, down_online: the online transforms of the o_proj and down_proj inputs (``None``: not online).
        k_rotation: the online transform of queries and keys after RoPE, or ``None``.
        info: what is done, as labels.
    """

    residual: torch.Tensor
    head: OnlineTransform
    head_matrix: torch.Tensor
    o_online: OnlineTransform | None
    down_online: OnlineTransform | None
    k_rotation: OnlineTransform | None
    info: RotationInfo

    @classmethod
    def build(
        cls,
        shape: LlamaShape,
        attn_implementation: str,
        *,
        mode: str = "hadamard",
        seed: int = 0,
        k_bits: int = FULL_PRECISION_BITS,
        v_bits: int = FULL_PRECISION_BITS,
        kv_clip_ratio: float = 1.0,
        rotate_k: bool | None = None,
        online: bool = True,
    ) -> QuaRot:
        """The rotation of a model of ``shape`` whose attention runs ``attn_implementation`` (arguments as
        :func:`rotate_model`'s)."""
        check_mode(mode)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        check_bits(k_bits, "k_bits")
        check_bits(v_bits, "v_bits")
        check_clip_ratio(kv_clip_ratio, "kv_clip_ratio")
        rotate_k = k_bits < FULL_PRECISION_BITS if rotate_k is None else bool(rotate_k)
        if not online and (rotate_k or k_bits < FULL_PRECISION_BITS or v_bits < FULL_PRECISION_BITS):
            raise ValueError(f"online=False keeps no online transform, so it allows no K rotation or KV-cache "
                             f"quantization; got rotate_k={rotate_k}, k_bits={k_bits}, v_bits={v_bits}")
        kv_on = rotate_k or k_bits < FULL_PRECISION_BITS or v_bits < FULL_PRECISION_BITS
        head = online_transform(shape.head_dim, seed=seed + _SEED_OFFSET["head"], what="head_dim rotation")
        o_online = down_online = None
        if online:
            o_in = shape.num_heads * shape.head_dim
            o_online = online_transform(o_in, seed=seed + _SEED_OFFSET["o_proj"], what="o_proj online rotation")
            down_online = online_transform(shape.intermediate_size, seed=seed + _SEED_OFFSET["down_proj"],
                                           what="down_proj online rotation")
        k_rotation = head if rotate_k else None
        if kv_on:
            attn_implementation = kv_attention_name(attn_implementation)
        residual_label = (
            f"random_hadamard({shape.hidden_size}, seed={seed})"
            if mode == "hadamard" and is_constructible(shape.hidden_size)
            else f"random_orthogonal({shape.hidden_size}, seed={seed})"
        )
        info = RotationInfo(
            mode=mode, seed=seed, shape=shape, residual=residual_label, v_o_heads=head.label,
            o_proj_online=o_online.label if o_online is not None else None,
            down_proj_online=down_online.label if down_online is not None else None,
            k_rotation=k_rotation.label if k_rotation is not None else None,
            k_bits=k_bits, v_bits=v_bits, kv_clip_ratio=float(kv_clip_ratio),
            attn_implementation=attn_implementation,
        )
        return cls(residual_rotation(shape.hidden_size, mode=mode, seed=seed), head, transform_matrix(head), o_online,
                   down_online, k_rotation, info)

    @property
    def quantizes_kv(self) -> bool:
        return self.k_rotation is not None or min(self.info.k_bits, self.info.v_bits) < FULL_PRECISION_BITS

    def rotate_layer(self, layer: nn.Module, index: int) -> None:
        """Rotate decoder layer ``index`` in place: fold its norms, rotate its weights, fuse the online
        transforms (o_proj and down_proj become ``QuantLinear``), attach the KV quantizer."""
        fold_layer_norms(layer)
        rotate_layer_weights_(layer, index, residual=self.residual, head=self.head_matrix)
        if self.o_online is not None:
            layer.self_attn.o_proj = fuse_online(layer.self_attn.o_proj, copy.deepcopy(self.o_online))
        if self.down_online is not None:
            layer.mlp.down_proj = fuse_online(layer.mlp.down_proj, copy.deepcopy(self.down_online))
        if self.quantizes_kv:
            install_kv_quantizer(layer, self.k_rotation, k_bits=self.info.k_bits, v_bits=self.info.v_bits,
                                 clip_ratio=self.info.kv_clip_ratio)

    def rotate_embedding(self, embedding: torch.Tensor) -> None:
        """Rotate the input embedding [vocab, hidden] in place."""
        rotate_embedding_(embedding, self.residual)

    def rotate_head(self, norm: nn.Module, head: nn.Linear) -> None:
        """Fold the final ``norm`` into the (untied) ``head`` and rotate it, in place."""
        fold_final_norm(norm, head)
        rotate_embedding_(head.weight, self.residual)


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
    check_llama(model)
    plan = QuaRot.build(LlamaShape.of(model), model.config._attn_implementation, mode=mode, seed=seed,
                        k_bits=k_bits, v_bits=v_bits, kv_clip_ratio=kv_clip_ratio, rotate_k=rotate_k, online=online)
    untie_embeddings(model)
    plan.rotate_embedding(model.get_input_embeddings().weight)
    plan.rotate_head(model.model.norm, model.lm_head)
    for index, layer in enumerate(model.model.layers):
        plan.rotate_layer(layer, index)
    model.set_attn_implementation(plan.info.attn_implementation)
    return plan.info
