"""A Llama checkpoint read one decoder block at a time: the model is never whole in memory.

:class:`BlockwiseLlama` builds the model on the ``meta`` device (parameters without memory; buffers such as
the rotary frequencies are real) and materialises, on request, one decoder block (:meth:`BlockwiseLlama.load`),
the embedding (:meth:`BlockwiseLlama.embedded`) or the final norm and head (:meth:`BlockwiseLlama.final`)
from the checkpoint's safetensors files (:class:`CheckpointTensors` reads single tensors), converted to the
run's dtype exactly as ``from_pretrained`` converts them. Each piece is then rotated (a :class:`LayerRotation`,
e.g. :class:`fake_quant.rotation.QuaRot`, applied to that piece alone) and its linears get their activation
quantizers, so a block loaded here is bit for bit the block of the whole model loaded, rotated and wrapped in
memory.

Resident memory: one block in the run's dtype (``4·h² + 3·h·i`` values for hidden size ``h`` and MLP size
``i``, with as many KV heads as heads; fewer KV heads need less), plus the float64 temporaries of its rotation
(a slice of one weight matrix at a time, its float64 copy and its rotated copy: 32 MiB each at most), plus
the embedding (``v·h`` values, vocabulary ``v``) while the model runs up to its first block, plus norm and
head while the evaluation computes logits.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM, PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

from common.llama.loading import ModelLoadError
from common.memory import release_freed_memory

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
HEAD = "lm_head.weight"


class CheckpointTensors:
    """The tensors of a Hugging Face safetensors checkpoint folder (sharded or not), read one at a time.

    Raises ``ModelLoadError`` naming the folder if it holds no safetensors checkpoint or its index names a
    missing file.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        elif (self.folder / SINGLE_FILE).is_file():
            with safe_open(self.folder / SINGLE_FILE, "pt") as handle:
                self.files = dict.fromkeys(handle.keys(), self.folder / SINGLE_FILE)
        else:
            raise ModelLoadError(f"{self.folder} holds no safetensors checkpoint ({SINGLE_FILE} or {INDEX_FILE}): "
                                 f"one block at a time needs one; pass --model_loading whole for other formats")
        missing = sorted({str(path) for path in self.files.values() if not path.is_file()})
        if missing:
            raise ModelLoadError(f"{index} names files that are not there: {missing}")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` in ``dtype`` on the CPU; each file is opened once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise ModelLoadError(f"the checkpoint in {self.folder} has no tensor {name!r}")
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for path, wanted in by_file.items():
            with safe_open(path, "pt") as handle:
                for name in wanted:
                    tensors[name] = handle.get_tensor(name).to(dtype)
        return tensors

    def identity(self) -> list[dict[str, object]]:
        """Each file's name, size and modification time (what a resumed run checks has not changed)."""
        paths = sorted({*self.files.values(), *self.folder.glob("*.json")})
        return [{"file": path.name, "bytes": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}
                for path in paths]


class TensorSource(Protocol):
    """Named tensors read on request (:class:`CheckpointTensors`)."""

    def __contains__(self, name: str) -> bool: ...

    def read(self, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]: ...

    def identity(self) -> list[dict[str, object]]: ...


class LayerRotation(Protocol):
    """A function-preserving rotation that can be applied piece by piece (:class:`fake_quant.rotation.QuaRot`)."""

    def rotate_layer(self, layer: nn.Module, index: int) -> None:
        """Rotate decoder layer ``index`` in place (it may replace submodules)."""

    def rotate_embedding(self, embedding: torch.Tensor) -> None:
        """Rotate the input embedding in place."""

    def rotate_head(self, norm: nn.Module, head: nn.Linear) -> None:
        """Fold the final norm into the head and rotate it, in place."""


@dataclass
class BlockwiseLlama:
    """A ``LlamaForCausalLM`` checkpoint folder, materialised one piece at a time (see the module docstring).

    Args:
        folder: the checkpoint folder (``config.json`` and safetensors files).
        dtype: the run's parameter dtype.
        rotation: applied to each piece as it is materialised, or ``None``.
        attn_implementation: the attention function the blocks run (the rotation's, when it quantizes the
            KV cache), or ``None`` for the one ``from_pretrained`` picks.
        add_quantizers: called on each materialised block, after the rotation (activation quantizers).
    """

    folder: Path
    dtype: torch.dtype
    rotation: LayerRotation | None = None
    attn_implementation: str | None = None
    add_quantizers: Callable[[nn.Module], None] | None = None
    tensors: TensorSource | None = None
    """Where the tensors are read (default: :class:`CheckpointTensors` of ``folder``; an exported checkpoint's
    :class:`common.export.checkpoint.ExportedTensors` dequantizes them)."""

    def __post_init__(self) -> None:
        if self.tensors is None:
            self.tensors = CheckpointTensors(self.folder)
        self.skeleton = _empty_model(self.folder, self.dtype)
        self.set_rotation(self.rotation, self.attn_implementation)

    def set_rotation(self, rotation: LayerRotation | None, attn_implementation: str | None) -> None:
        """Rotate every piece materialised from now on; the blocks run ``attn_implementation`` (if given)."""
        self.rotation, self.attn_implementation = rotation, attn_implementation
        if rotation is not None:
            self.config.tie_word_embeddings = False  # the head is rotated on its own (as untie_embeddings does)
        if attn_implementation is not None:
            self.skeleton.set_attn_implementation(attn_implementation)

    @property
    def config(self) -> PretrainedConfig:
        return self.skeleton.config

    def __len__(self) -> int:
        return len(self.skeleton.model.layers)

    def load(self, index: int) -> nn.Module:
        """Decoder block ``index`` on the CPU: read, rotated, its linears wrapped with their quantizers."""
        with init_empty_weights(include_buffers=False):
            layer = LlamaDecoderLayer(self.config, layer_idx=index)
        prefix = f"model.layers.{index}."
        names = [prefix + name for name in layer.state_dict()]
        values = self.tensors.read(names, self.dtype)
        layer.load_state_dict({name[len(prefix):]: value for name, value in values.items()}, assign=True)
        layer.eval()
        if self.rotation is not None:
            self.rotation.rotate_layer(layer, index)
            release_freed_memory()  # the rotation's float64 slices
        if self.add_quantizers is not None:
            self.add_quantizers(layer)
        return layer

    @contextmanager
    def embedded(self) -> Iterator[LlamaForCausalLM]:
        """The model with its embedding materialised (rotated) and every block on ``meta``, for the ``with``
        block: enough to run it up to its first block. The embedding goes back to ``meta`` on exit."""
        embedding = self.tensors.read([EMBEDDING], self.dtype)[EMBEDDING]
        if self.rotation is not None:
            self.rotation.rotate_embedding(embedding)
        self.skeleton.model.embed_tokens.weight = nn.Parameter(embedding, requires_grad=False)
        del embedding
        try:
            yield self.skeleton
        finally:
            self.skeleton.model.embed_tokens.to("meta")

    def outside_blocks(self) -> dict[str, torch.Tensor]:
        """The tensors outside the blocks as the whole model (rotated) holds them: embedding, final norm and,
        unless tied to the embedding, the head."""
        with self.embedded() as model:
            tensors = {EMBEDDING: model.model.embed_tokens.weight.detach()}
        norm, head = self.final()
        tensors[FINAL_NORM] = norm.weight.detach()
        if not self.config.tie_word_embeddings:
            tensors[HEAD] = head.weight.detach()
        return tensors

    def final(self) -> tuple[nn.Module, nn.Linear]:
        """The final norm and the head (the embedding when the checkpoint ties them), materialised and rotated."""
        head_name = HEAD if HEAD in self.tensors else EMBEDDING
        values = self.tensors.read([FINAL_NORM, head_name], self.dtype)
        with init_empty_weights(include_buffers=False):
            norm = LlamaRMSNorm(self.config.hidden_size, eps=self.config.rms_norm_eps)
            head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        norm.weight = nn.Parameter(values[FINAL_NORM], requires_grad=False)
        head.weight = nn.Parameter(values[head_name], requires_grad=False)
        if self.rotation is not None:
            self.rotation.rotate_head(norm, head)
        return norm.eval(), head.eval()


def _empty_model(folder: Path, dtype: torch.dtype) -> LlamaForCausalLM:
    """The model of ``folder`` with every parameter on ``meta`` and its buffers real, as ``from_pretrained``
    would build it (same configuration, attention implementation and buffer values)."""
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # an exported checkpoint: its tensors are read as floats
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
