"""Write and read Hugging Face folders in the ``gptq`` checkpoint format (see :mod:`common.export.gptq_format`).

A folder holds ``config.json`` (the model's configuration with a ``quantization_config``),
``quantize_config.json`` (the same settings, for GPTQModel's older readers), the tokenizer and
``model.safetensors``: each quantized linear as ``qweight``/``qzeros``/``scales``/``g_idx`` (and its bias),
every other tensor as it was, tied embeddings once. :func:`read_gptq_checkpoint` is this repo's reader: it
needs nothing beyond transformers and safetensors and rebuilds the float model the checkpoint encodes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.initialization import no_init_weights

from common.export.gptq_format import BITS, check_format_bits, pack_linear, unpack_linear
from common.files import sweep_stale_temporaries, temporary_dir
from common.quant.qlinear import QuantLinear

WEIGHTS_FILE = "model.safetensors"
PACKED = ("qweight", "qzeros", "scales", "g_idx")
"""The tensors of one quantized linear, ``<module>.<name>``."""


def _producer() -> str:
    """``<package>:<version>`` of this repository, the ``meta.quantizer`` entry readers log."""
    try:
        return f"gptaq-repro:{metadata.version('gptaq-repro')}"
    except metadata.PackageNotFoundError:
        return "gptaq-repro:unknown"


class CheckpointError(ValueError):
    """An exported folder that cannot be read back (missing, corrupted, truncated or inconsistent file)."""


@dataclass(frozen=True)
class GptqSettings:
    """The ``quantization_config`` of a checkpoint: what its readers need to unpack it.

    Attributes:
        bits: one of :data:`common.export.gptq_format.BITS`.
        group_size: input columns per group, -1 for one group per output row.
        desc_act: the columns were quantized in act_order (``g_idx`` is then a permutation of the groups).
        sym: symmetric grid (every zero point ``2**(bits-1)``).
        damp_percent: the Hessian damping used (informational).
        method: the method that produced the weights (``gptq``, ``gptaq``, ...), kept in ``meta``.
    """

    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    damp_percent: float
    method: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "static_groups": False,
            "true_sequential": True,
            "damp_percent": self.damp_percent,
            "pack_dtype": "int32",
            "lm_head": False,
            "meta": {"quantizer": [_producer()], "method": self.method},
        }


def packed_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """``{module name: linear}`` of every linear whose weight lies on a recorded grid, checked exportable.

    Raises ``ValueError`` naming the linear if it carries an online input transform or quantizes its input
    (neither exists in the format).
    """
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, QuantLinear) and module.weight_grid is not None}
    for name, linear in linears.items():
        if linear.input_transform is not None:
            raise ValueError(f"{name} applies an online transform to its input, which a gptq checkpoint cannot "
                             f"hold: rotate without online Hadamards (rotate_online: false) or not at all")
        if linear.act_quantizer.enabled:
            raise ValueError(f"{name} quantizes its input activations ({linear.act_quantizer.bits} bits), which a "
                             f"gptq checkpoint cannot hold: export weight-only models (a_bits: 16)")
    return linears


def gptq_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: packed quantized linears, every other tensor as it is (on CPU, contiguous).

    A tied output head (``config.tie_word_embeddings`` and the very tensor of the input embedding) is left
    out, as transformers saves it.
    """
    linears = packed_linears(model)
    if not linears:
        raise ValueError("the model has no quantized linear with a recorded grid: quantize it first")
    state: dict[str, torch.Tensor] = {}
    for name, linear in linears.items():
        codes = linear.weight_grid.codes(linear.weight)
        for key, tensor in pack_linear(codes.cpu(), linear.weight_grid.to("cpu")).items():
            state[f"{name}.{key}"] = tensor
    packed_weights = {f"{name}.weight" for name in linears}
    tied = _tied_head(model)
    for key, tensor in model.state_dict().items():
        if key in packed_weights or key == tied:
            continue
        state[key] = tensor.detach().to("cpu").contiguous()
    return state


def write_gptq_checkpoint(model: PreTrainedModel, folder: str | Path, settings: GptqSettings,
                          tokenizer: Any = None) -> Path:
    """Write the checkpoint folder (see the module docstring) atomically: it appears complete or not at all,
    replacing an earlier one. Returns ``folder``."""
    check_format_bits(settings.bits, "w_bits")
    folder = Path(folder)
    state = gptq_state_dict(model)
    config = model.config.to_dict()
    config["quantization_config"] = settings.as_dict()
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(folder.parent)
    tmp = temporary_dir(folder)
    try:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n",
                                         encoding="utf-8")
        (tmp / "quantize_config.json").write_text(json.dumps(settings.as_dict(), indent=2, sort_keys=True) + "\n",
                                                  encoding="utf-8")
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))
        _replace_folder(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def read_gptq_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, Any]:
    """The float model a checkpoint folder encodes (eval mode, CPU, ``dtype``) and its tokenizer (or ``None``).

    Quantized linears are dequantized as the format defines, ``scales · (q − (qzero + 1))``, in float32
    before the cast to ``dtype``. Raises :class:`CheckpointError` naming the file for a missing, unreadable,
    truncated or inconsistent folder.
    """
    folder = Path(folder)
    quantization = read_quantization_config(folder)
    bits = quantization["bits"]
    tensors = _read_tensors(folder / WEIGHTS_FILE)
    state = _dequantized_state(tensors, bits, folder / WEIGHTS_FILE)
    config = AutoConfig.from_pretrained(str(folder))
    del config.quantization_config  # the rebuilt model is a plain float one
    with no_init_weights():  # every parameter is read below: skip the random initialisation
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # part of the initialisation skipped above
    expected = set(model.state_dict())
    tied = _tied_head(model)
    missing = sorted(expected - set(state) - {tied})
    unknown = sorted(set(state) - expected)
    if missing or unknown:
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not hold this model's tensors (missing: "
                              f"{missing[:3]}, unknown: {unknown[:3]})")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not fit the model of its config.json ({error})") from None
    tokenizer = AutoTokenizer.from_pretrained(str(folder)) if (folder / "tokenizer_config.json").is_file() else None
    return model.eval(), tokenizer


def _tied_head(model: PreTrainedModel) -> str | None:
    """``"lm_head.weight"`` (or the head's name) when the head shares the input embedding's tensor."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or not getattr(model.config, "tie_word_embeddings", False):
        return None
    if head.weight is not embed.weight and head.weight.data_ptr() != embed.weight.data_ptr():
        return None
    return next(f"{name}.weight" for name, module in model.named_modules() if module is head)


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Rename ``tmp`` onto ``folder``; an existing ``folder`` is moved aside first and removed after."""
    old = None
    if folder.exists():
        old = temporary_dir(folder)
        old.rmdir()
        folder.rename(old)
    tmp.rename(folder)
    if old is not None:
        shutil.rmtree(old)


def read_quantization_config(folder: str | Path) -> Mapping[str, Any]:
    """The checked ``quantization_config`` of ``folder/config.json``; :class:`CheckpointError` naming the
    file if it is missing, unreadable or not a gptq checkpoint this reader can read."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: {folder} is not an exported checkpoint (--export_gptq)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not readable JSON ({error})") from None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "gptq":
        raise CheckpointError(f"{path} has no quantization_config with quant_method 'gptq'")
    if quantization.get("checkpoint_format", "gptq") != "gptq" or quantization.get("bits") not in BITS:
        raise CheckpointError(f"{path}: only checkpoint_format 'gptq' with bits in {BITS} can be read, got "
                              f"{quantization.get('checkpoint_format')!r} with bits {quantization.get('bits')!r}")
    return quantization


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        with safe_open(str(path), "pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None


def _dequantized_state(tensors: dict[str, torch.Tensor], bits: int, path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    modules = {key.rsplit(".", 1)[0] for key in tensors if key.endswith(".qweight")}
    for module in sorted(modules):
        parts = {name: tensors.get(f"{module}.{name}") for name in PACKED}
        absent = [name for name, tensor in parts.items() if tensor is None]
        if absent:
            raise CheckpointError(f"{path}: {module} has a qweight but no {', '.join(absent)}")
        try:
            state[f"{module}.weight"] = unpack_linear(parts, bits)
        except (ValueError, RuntimeError, IndexError) as error:
            raise CheckpointError(f"{path}: {module} cannot be unpacked ({error})") from None
    packed = {f"{module}.{name}" for module in modules for name in PACKED}
    state.update({key: tensor for key, tensor in tensors.items() if key not in packed})
    return state
