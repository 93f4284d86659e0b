"""Write and read Hugging Face folders of quantized models in the formats of :mod:`common.export.formats`.

A folder holds ``config.json`` (the model's configuration with a ``quantization_config``), for the gptq
formats ``quantize_config.json`` (the same settings, for GPTQModel's older readers), the tokenizer and the
weights in safetensors shards with their index (``model-<k>-of-<n>.safetensors``, one per decoder layer and one
for the rest, so that a model held one block at a time is written one block at a time): each quantized linear
packed as its format says (and its bias), every other tensor as it was, tied embeddings once. A folder with a
single ``model.safetensors`` reads too. :func:`read_checkpoint` is this repo's reader: it needs nothing beyond
transformers and safetensors and rebuilds the float model the checkpoint encodes.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.initialization import no_init_weights

from common.export.formats import (
    COMPRESSED_TENSORS,
    MARKERS,
    PART_NAMES,
    CheckpointError,
    ExportSettings,
    StoredSettings,
    stored_settings,
)
from common.files import HISTORY, move_to_history, sweep_stale_temporaries, temporary_dir
from common.quant.qlinear import QuantLinear

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
UNQUANTIZED = ["lm_head"]
"""The linears of a decoder no method quantizes (compressed-tensors' ``ignore``)."""


def packed_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """``{module name: linear}`` of every linear whose weight lies on a recorded grid, checked exportable.

    Raises ``ValueError`` naming the linear if it carries an online input transform or quantizes its input
    (neither exists in the format).
    """
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, QuantLinear) and module.weight_grid is not None}
    for name, linear in linears.items():
        if linear.input_transform is not None:
            raise ValueError(f"{name} applies an online transform to its input, which no exported checkpoint can "
                             f"hold: rotate without online Hadamards (rotate_online: false) or not at all")
        if linear.act_quantizer.enabled:
            raise ValueError(f"{name} quantizes its input activations ({linear.act_quantizer.bits} bits), which no "
                             f"exported checkpoint can hold: export weight-only models (a_bits: 16)")
    return linears


def packed_state(module: nn.Module, settings: ExportSettings, prefix: str = "",
                 skip: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors of ``module`` (names prefixed with ``prefix``): its quantized linears packed in
    ``settings.format``, every other tensor as it is (on CPU, contiguous), the names in ``skip`` (unprefixed)
    left out."""
    linears = packed_linears(module)
    state: dict[str, torch.Tensor] = {}
    for name, linear in linears.items():
        codes = linear.weight_grid.codes(linear.weight)
        for key, tensor in settings.pack(codes.cpu(), linear.weight_grid.to("cpu")).items():
            state[f"{prefix}{name}.{key}"] = tensor
    packed_weights = {f"{name}.weight" for name in linears}
    for key, tensor in module.state_dict().items():
        if key not in packed_weights and key not in skip:
            state[prefix + key] = tensor.detach().to("cpu").contiguous()
    return state


def model_shards(model: PreTrainedModel, settings: ExportSettings) -> Iterator[dict[str, torch.Tensor]]:
    """A decoder's checkpoint tensors in shards (see :func:`write_checkpoint`): one per decoder layer, then one
    with everything else (embedding, final norm, head; a tied head is left out, as transformers saves it)."""
    if not packed_linears(model):
        raise ValueError("the model has no quantized linear with a recorded grid: quantize it first")
    layers = model.get_decoder().layers
    for index, layer in enumerate(layers):
        yield packed_state(layer, settings, f"model.layers.{index}.")
    inside = {f"model.layers.{index}.{key}" for index, layer in enumerate(layers) for key in layer.state_dict()}
    tied = _tied_head(model)
    yield {key: tensor.detach().to("cpu").contiguous() for key, tensor in model.state_dict().items()
           if key not in inside and key != tied}


def write_checkpoint(model: PreTrainedModel, folder: str | Path, settings: ExportSettings,
                     tokenizer: Any = None) -> Path:
    """Write the checkpoint folder of ``model`` (see :func:`write_shards`); returns ``folder``."""
    layers = len(model.get_decoder().layers)
    return write_shards(model_shards(model, settings), layers + 1, model.config.to_dict(), folder, settings,
                        tokenizer)


def write_shards(shards: Iterable[dict[str, torch.Tensor]], count: int, config: Mapping[str, Any],
                 folder: str | Path, settings: ExportSettings, tokenizer: Any = None) -> Path:
    """Write a checkpoint folder atomically (it appears complete or not at all; an earlier folder of that name
    is moved to ``history/`` beside it):
    ``count`` safetensors shards, written one at a time as ``shards`` yields them (a decoder layer each, then
    the rest: the model is never whole in memory), their index, ``config.json`` (``config`` with the
    ``quantization_config``), for the gptq formats ``quantize_config.json``, and the tokenizer. Returns
    ``folder``."""
    folder = Path(folder)
    quantization = settings.quantization_config(UNQUANTIZED)
    config = {**config, "quantization_config": quantization}
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(folder.parent)
    tmp = temporary_dir(folder)
    try:
        weight_map: dict[str, str] = {}
        total = 0
        written = 0
        for written, state in enumerate(shards, start=1):
            name = f"model-{written:05d}-of-{count:05d}.safetensors"
            try:
                save_file(state, str(tmp / name), metadata={"format": "pt"})
            except SafetensorError as error:  # the library's I/O failure (a full disk): an OSError, with the folder
                raise OSError(f"cannot write the checkpoint {folder} ({error})") from None
            weight_map.update(dict.fromkeys(state, name))
            total += sum(tensor.nbytes for tensor in state.values())
        if written != count:
            raise ValueError(f"expected {count} shards, got {written}")
        _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_json(tmp / "config.json", config)
        if settings.format != COMPRESSED_TENSORS:
            _write_json(tmp / "quantize_config.json", quantization)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))
        _replace_folder(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def read_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, Any]:
    """The float model a checkpoint folder encodes (eval mode, CPU, ``dtype``) and its tokenizer (or ``None``).

    Quantized linears are dequantized as their format defines (``scales · (q − zero)``), in float32 before
    the cast to ``dtype``. Raises :class:`CheckpointError` naming the file for a missing, unreadable,
    truncated or inconsistent folder.
    """
    folder = Path(folder)
    tensors = ExportedTensors(folder)
    config = AutoConfig.from_pretrained(str(folder))
    del config.quantization_config  # the rebuilt model is a plain float one
    with no_init_weights():  # every parameter is read below: skip the random initialisation
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # part of the initialisation skipped above
    expected = set(model.state_dict())
    tied = _tied_head(model)
    missing = sorted(expected - tensors.names - {tied})
    unknown = sorted(tensors.names - expected)
    if missing or unknown:
        raise CheckpointError(f"{folder} does not hold this model's tensors (missing: {missing[:3]}, unknown: "
                              f"{unknown[:3]})")
    state = tensors.read(sorted(tensors.names), dtype)
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise CheckpointError(f"{folder} does not fit the model of its config.json ({error})") from None
    tokenizer = AutoTokenizer.from_pretrained(str(folder)) if (folder / "tokenizer_config.json").is_file() else None
    return model.eval(), tokenizer


class ExportedTensors:
    """The float tensors a checkpoint folder encodes, read one at a time (its quantized linears' weights
    dequantized on reading): what :func:`read_checkpoint` and a model read one block at a time
    (:class:`common.llama.blockwise.BlockwiseLlama`) read. Raises :class:`CheckpointError` naming the file
    for a missing, unreadable, truncated or inconsistent folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.settings = read_stored_settings(self.folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
                raise CheckpointError(f"{index} is not a readable safetensors index ({error!r})") from None
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        else:
            self.files = dict.fromkeys(_keys(self.folder / WEIGHTS_FILE), self.folder / WEIGHTS_FILE)
        for path in sorted(set(self.files.values())):
            _keys(path)  # every shard's header is checked before any tensor is read
        self.marker = MARKERS[self.settings.format]
        self.packed = {key.rsplit(".", 1)[0] for key in self.files if key.endswith(f".{self.marker}")}
        parts = PART_NAMES[self.settings.format]
        self.names = ({key for key in self.files
                       if key.rsplit(".", 1)[0] not in self.packed or key.rsplit(".", 1)[1] not in parts}
                      | {f"{module}.weight" for module in self.packed})

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def read(self, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``{name: float tensor}`` in ``dtype`` on the CPU."""
        out = {}
        for name in names:
            module = name.rsplit(".", 1)[0]
            if module in self.packed and name.endswith(".weight"):
                parts = {part: self._tensor(f"{module}.{part}") for part in self.settings.part_names()}
                try:
                    out[name] = self.settings.unpack(parts).to(dtype)
                except (ValueError, RuntimeError, IndexError) as error:
                    raise CheckpointError(f"{self.files[f'{module}.{self.marker}']}: {module} cannot be unpacked "
                                          f"({error})") from None
            else:
                out[name] = self._tensor(name).to(dtype)
        return out

    def _tensor(self, key: str) -> torch.Tensor:
        path = self.files.get(key)
        if path is None:
            module = key.rsplit(".", 1)[0]
            raise CheckpointError(f"{self.folder}: {module} has a {self.marker} but no {key.rsplit('.', 1)[1]}"
                                  if module in self.packed else f"{self.folder} holds no tensor {key}")
        try:
            with safe_open(str(path), "pt") as handle:
                return handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None

    def identity(self) -> list[dict[str, object]]:
        paths = sorted({*self.files.values(), *self.folder.glob("*.json")})
        return [{"file": path.name, "bytes": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}
                for path in paths]


def _keys(path: Path) -> list[str]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        with safe_open(str(path), "pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None


def _tied_head(model: PreTrainedModel) -> str | None:
    """``"lm_head.weight"`` (or the head's name) when the head shares the input embedding's tensor."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or not getattr(model.config, "tie_word_embeddings", False):
        return None
    if head.weight is not embed.weight and head.weight.data_ptr() != embed.weight.data_ptr():
        return None
    return next(f"{name}.weight" for name, module in model.named_modules() if module is head)


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Rename ``tmp`` onto ``folder``; an existing ``folder`` (an earlier export, or anything else of that name)
    is first moved to ``<folder's parent>/history/`` — nothing is deleted."""
    for moved in move_to_history([folder], folder.parent / HISTORY):
        logger.warning("%s existed: moved to %s", folder, moved)
    tmp.rename(folder)


def read_stored_settings(folder: str | Path) -> StoredSettings:
    """The settings of ``folder/config.json``'s ``quantization_config``; :class:`CheckpointError` naming the
    file if it is missing, unreadable or not a checkpoint of a format this reader can read."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: {folder} is not an exported checkpoint (--export_gptq)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not readable JSON ({error})") from None
    return stored_settings(config.get("quantization_config") if isinstance(config, dict) else None, str(path))
