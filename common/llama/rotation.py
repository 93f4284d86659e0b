"""Function-preserving rotations of a Hugging Face ``LlamaForCausalLM``: what QuaRot and SpinQuant share.

Conventions: activations are row vectors, ``nn.Linear`` computes ``y = x @ W.T + b`` with ``W`` [out, in], and
rotating a space by an orthogonal ``M`` maps ``x -> x @ M``.

* **Preparation** (:func:`prepare_for_rotation`): untie ``lm_head`` from ``embed_tokens`` and fold every
  RMSNorm scale ``g`` into the linears that read it (``W <- W diag(g)``, ``g <- 1``). A Llama RMSNorm with
  ``g = 1`` has no mean subtraction and no bias, so it commutes with any orthogonal ``Q``:
  ``RMSNorm(x Q) = RMSNorm(x) Q``.
* **Residual rotation** ``Q`` [hidden, hidden] (QuaRot's ``Q``, SpinQuant's ``R1``): embedding rows
  ``E <- E Q``; readers of the residual (q, k, v, gate, up, lm_head) ``W <- W Q``; writers (o_proj,
  down_proj) ``W <- Qᵀ W``, ``b <- b Q``.
* **Head rotation** ``M_l`` [head_dim, head_dim] of layer ``l`` (QuaRot's ``H_d``, SpinQuant's ``R2``): every
  value head ``v_h <- v_h M_l`` (v_proj's rows of KV head ``h``: ``W_h <- M_lᵀ W_h``, ``b_h <- b_h M_l``) and
  o_proj's columns of every attention head ``W_o[:, h] <- W_o[:, h] M_l``, so o_proj's output is unchanged.
* **Online transforms** ``T(x) = x @ A.T`` (orthogonal ``A``) are *fused* into a linear that reads ``T(x)`` by
  ``W <- T(W)`` (``T`` applied to ``W``'s rows), so that ``T(x) @ T(W).T == x @ W.T``; the linear becomes a
  :class:`common.quant.qlinear.QuantLinear` that applies ``T`` to its input at run time (QuaRot's and SpinQuant's
  Hadamard on the down_proj input).
* **K rotation and KV-cache quantization** (:class:`KVQuantizer`): a registered attention function rotates
  queries and keys by an orthogonal transform after RoPE (``q kᵀ`` unchanged; SpinQuant's ``R3``) and then
  fake-quantizes K and V per (token, head).

:func:`rotated_weights` is a pure function of the weights and the rotation matrices, differentiable in the
matrices: SpinQuant trains through it in float32, and :func:`rotate_weights_` applies it in float64 to a
model in place.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaForCausalLM, PretrainedConfig
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

from common.llama.loading import untie_embeddings
from common.quant.hadamard import hadamard_transform, is_constructible, random_orthogonal_matrix
from common.quant.qlinear import QuantLinear
from common.quant.quantizers import ActivationQuantizer

KV_ATTENTION_PREFIX = "rotated_kv_"
"""Registered attention implementations ``rotated_kv_sdpa`` / ``rotated_kv_eager``."""

READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")
EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")
_ROTATION_ROWS = 4096
"""Rows of an embedding matrix rotated at once (float64 copies of 4096 × hidden)."""
ROTATION_SLICE_BYTES = 32 * 2**20
"""Float64 bytes of the slice of a block's weight rotated at once (its copy and its product each hold this)."""


@dataclass(frozen=True)
class LlamaShape:
    """The sizes a rotation needs, read from a model's first layer."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> LlamaShape:
        """The sizes as a model's configuration states them (before any weight is read)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
        )

    def linear_input_sizes(self) -> dict[str, int]:
        """Input features of each decoder linear, by its name in a layer."""
        return {
            "self_attn.q_proj": self.hidden_size, "self_attn.k_proj": self.hidden_size,
            "self_attn.v_proj": self.hidden_size, "self_attn.o_proj": self.num_heads * self.head_dim,
            "mlp.gate_proj": self.hidden_size, "mlp.up_proj": self.hidden_size,
            "mlp.down_proj": self.intermediate_size,
        }

    @classmethod
    def of(cls, model: LlamaForCausalLM) -> LlamaShape:
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        return cls(
            hidden_size=model.config.hidden_size,
            num_layers=len(model.model.layers),
            num_heads=model.config.num_attention_heads,
            num_kv_heads=model.config.num_key_value_heads,
            head_dim=attn.head_dim,
            intermediate_size=mlp.down_proj.in_features,
        )


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
    """Fixed orthogonal transform of the last dim, ``x [..., n] -> x @ A.T`` (``A`` kept in float64)."""

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


def transform_matrix(transform: OnlineTransform) -> torch.Tensor:
    """The float64 matrix ``M`` [n, n] with ``transform(x) == x @ M``."""
    return transform(torch.eye(transform.n, dtype=torch.float64))


def check_llama(model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` is a ``LlamaForCausalLM`` that has not been rotated or wrapped yet."""
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"rotations support LlamaForCausalLM only, got {type(model).__name__}")
    wrapped = [m for layer in model.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    if any(isinstance(module, QuantLinear) for module in wrapped):
        raise ValueError("the model is already rotated or wrapped (o_proj or down_proj is a QuantLinear)")


@torch.no_grad()
def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a (float64) result into ``param`` in place, keeping its dtype and device."""
    param.copy_(value.to(dtype=param.dtype, device=param.device))


def _fold(norm: nn.Module, readers: Sequence[nn.Linear]) -> None:
    scale = norm.weight.double()
    for linear in readers:
        for rows in linear.weight.split(_ROTATION_ROWS):  # float64 copies of a slice of rows at a time
            _set(rows, rows.double() * scale)
    norm.weight.fill_(1.0)


@torch.no_grad()
def fold_layer_norms(layer: nn.Module) -> None:
    """Fold a decoder layer's two RMSNorm scales into the linears that read them (``W <- W diag(g)``; ``g <- 1``)."""
    attn, mlp = layer.self_attn, layer.mlp
    _fold(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
    _fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])


@torch.no_grad()
def fold_final_norm(norm: nn.Module, head: nn.Linear) -> None:
    """Fold the final RMSNorm's scale into the (untied) ``lm_head``; ``g <- 1``."""
    _fold(norm, [head])


def fold_rms_norms(model: LlamaForCausalLM) -> None:
    """Fold each RMSNorm's scale ``g`` [hidden] into the linears that read it (``W <- W diag(g)``); ``g <- 1``."""
    fold_final_norm(model.model.norm, model.lm_head)
    for layer in model.model.layers:
        fold_layer_norms(layer)


def prepare_for_rotation(model: LlamaForCausalLM) -> LlamaShape:
    """Untie the embeddings and fold the RMSNorm scales (in place, function-preserving); returns the sizes."""
    check_llama(model)
    untie_embeddings(model)
    fold_rms_norms(model)
    return LlamaShape.of(model)


def _rotate_value_rows(weight: torch.Tensor, head: torch.Tensor, head_dim: int) -> torch.Tensor:
    """v_proj's weight [kv_heads * d, hidden]: each head's rows ``W_h <- Mᵀ W_h``."""
    blocks = weight.reshape(-1, head_dim, weight.shape[1])
    return (head.T @ blocks).reshape(weight.shape)


def _rotate_value_bias(bias: torch.Tensor, head: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (bias.reshape(-1, head_dim) @ head).reshape(bias.shape)


def _rotate_output_columns(weight: torch.Tensor, head: torch.Tensor, head_dim: int) -> torch.Tensor:
    """o_proj's weight [hidden, heads * d]: each head's columns ``W_o[:, h] <- W_o[:, h] M``."""
    return (weight.reshape(weight.shape[0], -1, head_dim) @ head).reshape(weight.shape)


def rotated_weights(
    weights: Mapping[str, torch.Tensor],
    shape: LlamaShape,
    *,
    residual: torch.Tensor,
    heads: Sequence[torch.Tensor],
    embeddings: bool = True,
) -> dict[str, torch.Tensor]:
    """The rotated versions of every weight a rotation changes (see the module docstring); a pure function.

    Args:
        weights: ``{state-dict name: tensor}`` of a prepared model (names as in ``LlamaForCausalLM``, e.g.
            ``model.layers.0.self_attn.q_proj.weight``); biases are rotated when present.
        shape: the model's sizes.
        residual: ``Q`` [hidden, hidden], orthogonal.
        heads: one ``M_l`` [head_dim, head_dim] per layer, orthogonal.
        embeddings: also rotate ``model.embed_tokens.weight`` and ``lm_head.weight``.

    Returns:
        ``{name: rotated tensor}`` in the dtype of the products (pass float64 tensors for exact fusing;
        gradients flow to ``residual`` and ``heads``).
    """
    if len(heads) != shape.num_layers:
        raise ValueError(f"heads must hold one matrix per layer ({shape.num_layers}), got {len(heads)}")
    out: dict[str, torch.Tensor] = {}
    if embeddings:
        out.update({name: weights[name] @ residual for name in EMBEDDINGS})
    for index, head in enumerate(heads):
        out.update(_rotated_layer(weights, index, residual, head, shape.head_dim))
    return out


def _rotated_layer(weights: Mapping[str, torch.Tensor], index: int, residual: torch.Tensor, head: torch.Tensor,
                   head_dim: int) -> dict[str, torch.Tensor]:
    """The rotated weights of decoder layer ``index`` (see :func:`rotated_weights`)."""
    prefix = f"model.layers.{index}."
    out: dict[str, torch.Tensor] = {}
    for name in [f"{prefix}{module}.{kind}" for module in (*READERS, *WRITERS) for kind in ("weight", "bias")]:
        if weights.get(name) is not None:
            rotated = _rotated_tensor(name[len(prefix):], weights[name], residual, head, head_dim)
            if rotated is not None:
                out[name] = rotated
    return out


def _rotated_tensor(name: str, value: torch.Tensor, residual: torch.Tensor, head: torch.Tensor,
                    head_dim: int) -> torch.Tensor | None:
    """One rotated weight or bias of a decoder layer (``name`` within the layer, e.g. ``mlp.up_proj.weight``), or
    ``None`` when the rotations leave it unchanged."""
    module, _, kind = name.rpartition(".")
    if kind == "weight" and module in READERS:  # W <- W Q, and v_proj's heads W_h <- Mᵀ W_h
        rotated = value @ residual
        return _rotate_value_rows(rotated, head, head_dim) if module == "self_attn.v_proj" else rotated
    if kind == "weight" and module in WRITERS:  # W <- Qᵀ W, and o_proj's head columns W_o[:, h] <- W_o[:, h] M
        rotated = residual.T @ value
        return _rotate_output_columns(rotated, head, head_dim) if module == "self_attn.o_proj" else rotated
    if kind == "bias" and module in WRITERS:  # b <- b Q
        return value @ residual
    if kind == "bias" and module == "self_attn.v_proj":  # b_h <- b_h M
        return _rotate_value_bias(value, head, head_dim)
    return None


@torch.no_grad()
def rotate_weights_(model: LlamaForCausalLM, *, residual: torch.Tensor, heads: Sequence[torch.Tensor]) -> None:
    """Apply :func:`rotated_weights` to a prepared ``model`` in place, computing in float64.

    One tensor (embeddings, in row chunks) or one layer at a time, so the float64 copies stay small.
    """
    shape = LlamaShape.of(model)
    if len(heads) != shape.num_layers:
        raise ValueError(f"heads must hold one matrix per layer ({shape.num_layers}), got {len(heads)}")
    embeddings = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    if embeddings[0].data_ptr() == embeddings[1].data_ptr():  # tied embeddings: rotated once
        embeddings = embeddings[:1]
    for embedding in embeddings:
        rotate_embedding_(embedding, residual)
    for index, (layer, head) in enumerate(zip(model.model.layers, heads, strict=True)):
        rotate_layer_weights_(layer, index, residual=residual, head=head)


@torch.no_grad()
def rotate_embedding_(embedding: torch.Tensor, residual: torch.Tensor) -> None:
    """``E <- E Q`` in place for an embedding or head matrix [rows, hidden] (float64 products, in row chunks)."""
    residual = residual.double()
    for rows in embedding.split(_ROTATION_ROWS):
        _set(rows, rows.double() @ residual)


@torch.no_grad()
def rotate_layer_weights_(layer: nn.Module, index: int, *, residual: torch.Tensor, head: torch.Tensor) -> None:
    """:func:`rotated_weights` of one prepared decoder layer (number ``index``), in place, in float64: one tensor
    at a time and, in a large one, a slice at a time (:func:`_independent_slices`), so the float64 temporaries
    are of :data:`ROTATION_SLICE_BYTES` at most."""
    residual, head = residual.double(), head.double()
    head_dim = layer.self_attn.head_dim
    for name, tensor in layer.state_dict().items():
        for part in _independent_slices(name, tensor, head_dim):
            rotated = _rotated_tensor(name, tensor[part].double(), residual, head, head_dim)
            if rotated is None:
                break
            _set(tensor[part], rotated)


def _independent_slices(name: str, tensor: torch.Tensor, head_dim: int) -> list[tuple[slice, ...]]:
    """Index tuples of ``tensor`` (a decoder layer's ``name``) that :func:`_rotated_tensor` rotates each on its
    own with the same result: a reader's weight (``W Q``, and ``Mᵀ W_h`` per head of ``head_dim`` rows) by rows,
    a writer's (``Qᵀ W``, and ``W_o[:, h] M`` per head of ``head_dim`` columns) by columns, each slice of at
    most :data:`ROTATION_SLICE_BYTES` in float64 (whole heads); anything else whole."""
    module, _, kind = name.rpartition(".")
    if kind != "weight" or tensor.dim() != 2:
        return [(slice(None),)]
    reader = module in READERS
    if not reader and module not in WRITERS:
        return [(slice(None),)]
    length, other = (tensor.shape[0], tensor.shape[1]) if reader else (tensor.shape[1], tensor.shape[0])
    step = max(head_dim, ROTATION_SLICE_BYTES // (8 * other) // head_dim * head_dim)
    parts = [slice(start, min(start + step, length)) for start in range(0, length, step)]
    return [(part,) if reader else (slice(None), part) for part in parts]


@torch.no_grad()
def fuse_online(linear: nn.Linear, transform: OnlineTransform) -> QuantLinear:
    """Fuse ``transform`` into ``linear``'s columns (``W <- T(W)``, a slice of rows at a time: each row is
    transformed on its own) and wrap it to apply ``T`` online."""
    weight = linear.weight
    step = max(1, ROTATION_SLICE_BYTES // (8 * weight.shape[1]))
    for rows in weight.split(step):
        _set(rows, transform(rows.double()))
    return QuantLinear(linear, input_transform=transform)


def fuse_down_proj_online(model: LlamaForCausalLM, transform: OnlineTransform) -> None:
    """Fuse an online transform of the down_proj input into every layer (QuaRot's and SpinQuant's R4)."""
    for layer in model.model.layers:
        layer.mlp.down_proj = fuse_online(layer.mlp.down_proj, copy.deepcopy(transform))


class KVQuantizer(nn.Module):
    """Online K rotation and K/V fake quantization, applied inside attention after RoPE.

    Shapes: ``query`` [batch, heads, q_len, head_dim], ``key``/``value`` [batch, kv_heads, kv_len, head_dim]
    (after the cache update, so the cache itself holds unquantized keys/values; quantization is per row of
    ``head_dim``, i.e. per token and head, hence identical for a token however often it is re-read).

    Args:
        k_rotation: transform of ``head_dim`` applied to queries and keys, or ``None``.
        k_bits, v_bits: 1..16 (16 = not quantized), asymmetric grids.
        clip_ratio: range shrink of both quantizers, in (0, 1].

    ``quantize_input`` (a flag, as on :class:`common.quant.qlinear.QuantLinear`) turns the quantizers off so
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
    """Register ``rotated_kv_<base>`` in transformers' attention and mask registries (same mask as ``base``)."""
    for base, (function, mask) in _KV_BASES.items():
        AttentionInterface.register(KV_ATTENTION_PREFIX + base, _kv_attention(function))
        AttentionMaskInterface.register(KV_ATTENTION_PREFIX + base, mask)


_register_kv_attention()


def check_kv_attention(model: LlamaForCausalLM) -> None:
    """Raise ``ValueError`` unless the model's attention implementation can host a :class:`KVQuantizer`."""
    base = model.config._attn_implementation
    if base not in _KV_BASES:
        raise ValueError(f"K rotation / KV quantization needs attention {sorted(_KV_BASES)}, the model uses {base!r}")


def install_kv_quantizers(
    model: LlamaForCausalLM, k_rotation: OnlineTransform | None, *, k_bits: int, v_bits: int, clip_ratio: float
) -> str:
    """Attach a :class:`KVQuantizer` to every attention layer and switch to the matching attention function.

    Returns the new attention implementation's name.
    """
    check_kv_attention(model)
    for layer in model.model.layers:
        install_kv_quantizer(layer, k_rotation, k_bits=k_bits, v_bits=v_bits, clip_ratio=clip_ratio)
    model.set_attn_implementation(kv_attention_name(model.config._attn_implementation))
    return model.config._attn_implementation


def install_kv_quantizer(layer: nn.Module, k_rotation: OnlineTransform | None, *, k_bits: int, v_bits: int,
                         clip_ratio: float) -> None:
    """Attach a :class:`KVQuantizer` to one decoder layer's attention (its model must run
    :func:`kv_attention_name`'s attention function)."""
    layer.self_attn.kv_quantizer = KVQuantizer(copy.deepcopy(k_rotation), k_bits=k_bits, v_bits=v_bits,
                                               clip_ratio=clip_ratio)


def kv_attention_name(base: str) -> str:
    """The registered attention function that runs a :class:`KVQuantizer` on top of attention ``base``."""
    if base.startswith(KV_ATTENTION_PREFIX):
        return base
    if base not in _KV_BASES:
        raise ValueError(f"K rotation / KV quantization needs attention {sorted(_KV_BASES)}, the model uses {base!r}")
    return KV_ATTENTION_PREFIX + base
