"""Quantized models saved in this repository's own format, and read back for evaluation.

``--save_qmodel_path DIR`` writes ``DIR/<method>.safetensors`` (the fake-quantized model's state, tensors
shared by tied weights stored once) and ``DIR/settings.json`` (the run's settings and rotation);
``--load_qmodel_path DIR`` evaluates them again with the saved settings and this run's evaluation settings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_model

from common.config import ConfigError, given_settings
from common.files import HISTORY, atomic_write, atomic_write_json, move_to_history
from common.methods import METHODS

logger = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
Settings = TypeVar("Settings")


def prepare_save_folder(folder: Path) -> None:
    """Before a run saves into ``folder``: a non-empty ``folder`` (an earlier run's saved models, or anything
    else) is moved to ``history/`` beside it, so the folder holds this run's models alone and nothing is
    overwritten or deleted."""
    if folder.is_dir() and any(folder.iterdir()):
        for moved in move_to_history([folder], folder.parent / HISTORY):
            logger.warning("save_qmodel_path %s was not empty: moved to %s", folder, moved)


def save_quantized_model(model: torch.nn.Module, folder: Path, method: str, settings: Mapping[str, Any],
                         rotation: Mapping[str, Any] | None) -> None:
    """Write ``<folder>/<method>.safetensors`` and ``<folder>/settings.json`` (``settings``: the run's, as a
    dict; ``rotation``: what rebuilds its rotated architecture, or ``None``)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.to("cpu")
    atomic_write(folder / f"{method}.safetensors", lambda tmp: save_model(model, tmp, metadata={"method": method}))
    atomic_write_json(folder / SETTINGS_FILE, {"settings": dict(settings), "rotation": rotation})


RUN_MECHANICS = ("load_qmodel_path", "save_qmodel_path", "model_loading", "checkpoint_dir", "restart",
                 "keep_checkpoint")
"""Settings of how this run works, not of the saved models: free to differ from the saved run's."""


def load_saved_settings(config: Settings, evaluation: Sequence[str]) -> tuple[Settings, list[str]]:
    """The saved run's settings with this run's ``evaluation`` settings (names of ``config``'s fields), and
    the methods to evaluate: those this run names, or else every method the saved run named.

    ``config`` is the run's settings (a dataclass with ``load_qmodel_path`` and ``save_qmodel_path``). A
    ``ConfigError`` naming the setting, before any work, when the folder holds no settings file this version
    wrote, when a setting the user gave (other than an evaluation setting or :data:`RUN_MECHANICS`) differs
    from the saved one (the saved models cannot be evaluated as another setting), or when a method to
    evaluate has no saved file.
    """
    folder = Path(config.load_qmodel_path)
    settings_file = folder / SETTINGS_FILE
    if not settings_file.is_file():
        raise ConfigError(f"load_qmodel_path: {folder} holds no {SETTINGS_FILE} (save one with --save_qmodel_path)")
    try:
        saved = json.loads(settings_file.read_text(encoding="utf-8"))["settings"]
        overrides = {name: getattr(config, name) for name in evaluation}
        merged = type(config)(**{**saved, **overrides, "save_qmodel_path": None,
                                 "load_qmodel_path": config.load_qmodel_path})
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"load_qmodel_path: {settings_file} is not a settings file this version wrote "
                          f"({type(error).__name__}: {error})") from None
    given = given_settings(config)
    fixed = sorted(name for name in given - set(evaluation) - set(RUN_MECHANICS) - {"methods"}
                   if getattr(config, name) != getattr(merged, name))
    if fixed:
        differences = ", ".join(f"{name}: {getattr(config, name)!r} (saved: {getattr(merged, name)!r})"
                                for name in fixed)
        raise ConfigError(f"{', '.join(fixed)}: the models in load_qmodel_path {folder} were quantized with other "
                          f"settings ({differences}); a saved model is evaluated as it was saved: leave these "
                          f"settings out, or quantize again")
    methods = list(config.methods) if "methods" in given else list(merged.methods)
    missing = [m for m in methods if METHODS[m].quantized and not (folder / f"{m}.safetensors").is_file()]
    if missing:
        present = sorted(path.stem for path in folder.glob("*.safetensors"))
        raise ConfigError(f"methods: load_qmodel_path {folder} holds no saved model of {missing} (no "
                          f"<method>.safetensors; it holds {present or 'none'}): give methods it holds")
    return dataclasses.replace(merged, methods=methods), methods


def check_saved_models(folder: Path, methods: Sequence[str], model: torch.nn.Module) -> None:
    """Every saved ``<method>.safetensors`` is readable and holds this model's tensors (names and shapes).

    Read from the files' headers alone, before any evaluation; ``ConfigError`` names the file.
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for method in methods:
        if not METHODS[method].quantized:
            continue
        path = folder / f"{method}.safetensors"
        try:
            with safe_open(str(path), "pt") as handle:
                shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
            load_file(str(path))  # reads every tensor: a truncated file fails here
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise ConfigError(f"load_qmodel_path: {path} is not a readable safetensors file ({error})") from None
        unknown = sorted(set(shapes) - set(expected))
        wrong = sorted(name for name in shapes.keys() & expected.keys() if shapes[name] != expected[name])
        missing = sorted(name for name in set(expected) - set(shapes) if not _tied_alias(model, name, shapes))
        if unknown or wrong or missing:
            details = "; ".join(f"{label}: {', '.join(names[:3])}{' …' if len(names) > 3 else ''}"
                                for label, names in (("unknown tensors", unknown), ("other shapes", wrong),
                                                     ("missing tensors", missing)) if names)
            raise ConfigError(f"load_qmodel_path: {path} does not hold this model's weights ({details})")


def _tied_alias(model: torch.nn.Module, name: str, stored: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether ``name`` shares its tensor with a stored one (tied weights are saved once)."""
    state = model.state_dict()
    pointer = state[name].data_ptr()
    return any(state[other].data_ptr() == pointer for other in stored if other in state)

