"""Every setting of every tree refuses a value outside what it declares, on the command line, before any work.

For each field of the three trees' settings classes, values are generated from its declared type and the
:class:`~common.rules.Accepts` of its ``describe(...)``: a wrong type, each bound crossed, a string outside the
choices, and for free-form strings one value per kind (a path under a regular file for an output, a missing
path for an input, ...). Each is run through the tree's entry point on its tiny offline setup and must end
with exit status 2 and one ``error:`` line naming the setting, before the run starts its work (the moment
:func:`common.run.start_run` has finished the tree's preflight). A setting that declares nothing (a new
field without ``low``/``high``/``choices``/``kind``, not a boolean) fails
:func:`test_every_setting_declares_its_values`.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path

import pytest

from common import run as run_module
from common.config import _base_type
from common.rules import Accepts
from common.tests.bad_inputs import expect_refusal
from common.tests.llama_fixtures import TINY_CORPUS
from fake_quant import main as fq_main
from fake_quant.settings import LlamaRunConfig
from spinquant import main as sq_main
from spinquant.settings import SpinQuantConfig
from vit_quant import main as vq_main
from vit_quant.settings import VitRunConfig
from vit_quant.tests.fake_data import write_fashion_folder

LLAMA_BASE = ["--calib_dataset", TINY_CORPUS, "--eval_datasets", TINY_CORPUS, "--seqlen", "32", "--nsamples", "4",
              "--eval_max_windows", "2", "--device", "cpu", "--model_loading", "whole", "--methods", "fp,rtn"]
SPINQUANT_BASE = ["--calib_dataset", TINY_CORPUS, "--eval_datasets", TINY_CORPUS, "--seqlen", "32", "--nsamples",
                  "4", "--eval_max_windows", "2", "--device", "cpu", "--rotation_steps", "3", "--rotation_nsamples",
                  "4", "--rotation_seqlen", "16", "--rotation_batch_size", "2", "--methods", "fp"]
VIT_BASE = ["--device", "cpu", "--methods", "fp,rtn"]

NEEDS: dict[str, list[str]] = {  # what a setting needs beside it to be read at all
    "export_gptq": ["--a_bits", "16", "--w_grid", "gptq", "--no-rotate"],
    "checkpoint_dir": ["--model_loading", "blockwise"],
    "checkpoint": ["--model", "deit_tiny_patch16_224"],
    "tasks_include_path": ["--tasks", "cloze_embedded"],
}


@dataclasses.dataclass(frozen=True)
class Tree:
    """A tree's settings class, entry point and base command line on its tiny setup."""

    name: str
    settings: type
    main: Callable[[list[str]], int]
    base: Callable[[Path], list[str]]


def _vit_base(folder: Path) -> list[str]:
    data = folder / "fmnist"
    if not data.exists():
        write_fashion_folder(data, n_train=16, n_test=8)
    return [*VIT_BASE, "--data_path", str(data)]


TREES = [
    Tree("fake_quant", LlamaRunConfig, fq_main.main, lambda folder: list(LLAMA_BASE)),
    Tree("spinquant", SpinQuantConfig, sq_main.main, lambda folder: list(SPINQUANT_BASE)),
    Tree("vit_quant", VitRunConfig, vq_main.main, _vit_base),
]


def _accepts(field: dataclasses.Field) -> Accepts:
    return field.metadata.get("accepts", Accepts())


def _number_text(value: float, integer: bool) -> str:
    return str(int(value)) if integer else repr(float(value))


def bad_values(base: type, accepts: Accepts, folder: Path) -> list[str]:
    """Values outside what a setting of type ``base`` (``str`` for a list of strings) declares, as the command line
    or a YAML file writes them (a boolean's wrong value only fits in a YAML file: ``--flag``/``--no-flag``)."""
    if base is bool:
        return ["maybe"]
    if base in (int, float):
        integer = base is int
        values = ["1.5" if integer else "abc"] + ([] if integer else ["nan"])
        step = 1 if integer else 0.5
        if accepts.low is not None:
            values.append(_number_text(accepts.low - step, integer))
        if accepts.high is not None:
            values.append(_number_text(accepts.high + step, integer))
        if accepts.above is not None:
            values.append(_number_text(accepts.above, integer))
        if accepts.below is not None:
            values.append(_number_text(accepts.below, integer))
        return values
    if accepts.choices is not None:
        return ["no-such-choice"]
    return [_bad_string(accepts.kind, folder)]


def _bad_string(kind: str | None, folder: Path) -> str:
    if kind in ("output", "existing"):
        blocker = folder / "a_file"
        blocker.write_text("")
        return str(blocker / "sub") if kind == "output" else str(folder / "absent")
    return {"name": "a/b", "device": "gpu", "model": "", "task": "no_such_task",
            "linear": "mlp.no_such_proj"}[kind]


def cases() -> list[tuple[Tree, str]]:
    return [(tree, field.name) for tree in TREES for field in dataclasses.fields(tree.settings)]


def test_every_setting_declares_its_values() -> None:
    undeclared = []
    for tree in TREES:
        hints = typing.get_type_hints(tree.settings)
        for field in dataclasses.fields(tree.settings):
            base, _ = _base_type(hints[field.name])
            if base is not bool and not _accepts(field).declared:
                undeclared.append(f"{tree.name}.{field.name}")
    assert not undeclared, f"settings without declared values (describe(..., low=, high=, choices=, kind=)): " \
                           f"{undeclared}"


class WorkStarted(AssertionError):
    """The run got past its preflight: the bad value was accepted."""


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting a run's work (past :func:`common.run.start_run`'s preflight) fails the test."""
    def started(*args, **kwargs):
        raise WorkStarted("the run started its work")

    monkeypatch.setattr(run_module, "Run", started)


@pytest.mark.parametrize(("tree", "name"), cases(), ids=lambda value: getattr(value, "name", value))
def test_a_value_outside_the_declared_ones_is_refused_naming_the_setting(tree: Tree, name: str, tiny_setup: Path,
                                                                         no_work, capsys) -> None:
    field = next(f for f in dataclasses.fields(tree.settings) if f.name == name)
    base, _ = _base_type(typing.get_type_hints(tree.settings)[name])
    if typing.get_origin(base) is list:
        base = str
    refused = []
    for value in bad_values(base, _accepts(field), tiny_setup):
        if base is bool:
            config = tiny_setup / "bad.yaml"
            config.write_text(f"{name}: {value}\n")
            given = ["--config", str(config)]
        else:
            given = [f"--{name}", value]
        argv = ["--results_dir", str(tiny_setup / "results"), *tree.base(tiny_setup), *NEEDS.get(name, []), *given]
        capsys.readouterr()
        try:
            line = expect_refusal(tree.main, argv, capsys)
        except WorkStarted:
            pytest.fail(f"{tree.name}: --{name} {value!r} was accepted")
        assert name in line, f"{tree.name}: --{name} {value!r}: the error does not name the setting: {line}"
        refused.append(value)
    assert refused
