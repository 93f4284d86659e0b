"""Reading result files: a run's CSV (the schema of :mod:`common.results.runs`) and sidecar JSON, and their provenance.

A malformed CSV or JSON raises :class:`ReportError` naming the file and line. :func:`differing_keys` lists
what two runs' numbers depend on that differs: their settings (bookkeeping aside), device, git commit and
data hashes.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.methods import METHOD_NAMES
from common.results.provenance import BENCH_CSVS
from common.results.runs import CSV_DIGEST_KEY

TREES = ("fake_quant", "spinquant", "vit_quant")
FIXED_COLUMNS = ("model", "setting", "metric", "higher_is_better")
BOOKKEEPING = frozenset({
    "name", "methods", "results_dir", "save_qmodel_path", "load_qmodel_path", "eval_batch_size",
    "calib_batch_size", "offload", "device", "rotation_path", "rotation_micro_batch_size",
    "rotation_checkpoint_every",
})
"""Settings that do not change a run's numbers (names, folders, batch splitting, devices)."""
MISSING = "—"
TRUE_TEXT, FALSE_TEXT = ("true", "1"), ("false", "0")


class ReportError(ValueError):
    """A results folder or file cannot be reported (the message names the file and line)."""


@dataclass(frozen=True)
class MetricRecord:
    """One CSV line: a metric of one model/setting with a value per method (absent = not computed)."""

    model: str
    setting: str
    metric: str
    higher_is_better: bool
    values: dict[str, float]


@dataclass
class Run:
    """The contents of one ``<name>.csv`` and its sidecar JSON (``meta`` is None when it is missing)."""

    name: str
    tree: str
    records: list[MetricRecord]
    settings: dict[str, str]
    meta: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)


def setting_text(value: Any) -> str:
    """A settings value as the CSV writer stores it (lists joined with ``+``, None empty)."""
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return "+".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _parse_bool(text: str, where: str) -> bool:
    if text.strip().lower() in TRUE_TEXT:
        return True
    if text.strip().lower() in FALSE_TEXT:
        return False
    raise ReportError(f"{where}: higher_is_better must be True or False, got {text!r}")


def _parse_value(text: str, column: str, where: str) -> float | None:
    if text.strip() == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise ReportError(f"{where}: column {column!r} must be a number or empty, got {text!r}") from None


def _column_roles(header: list[str], where: str) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Indices of the fixed, method and settings columns (first occurrence of a duplicated name wins)."""
    first: dict[str, int] = {}
    for index, name in enumerate(header):
        first.setdefault(name, index)
    missing = [name for name in FIXED_COLUMNS if name not in first]
    if missing:
        raise ReportError(f"{where}: missing column(s) {', '.join(missing)} (header: {','.join(header)})")
    fixed = {name: first[name] for name in FIXED_COLUMNS}
    methods = {name: first[name] for name in METHOD_NAMES if name in first}
    taken = set(fixed.values()) | set(methods.values())
    settings = {name: index for index, name in enumerate(header) if index not in taken}
    return fixed, methods, settings


def read_csv(path: Path) -> tuple[list[MetricRecord], list[dict[str, str]]]:
    """The metric records of a result CSV and, per line, its settings columns."""
    records: list[MetricRecord] = []
    settings: list[dict[str, str]] = []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if not header:
                raise ReportError(f"{path}:1: no header row (the file or its first line is empty)")
            fixed, methods, setting_columns = _column_roles(header, f"{path}:1")
            for line in reader:
                if not line:
                    continue
                where = f"{path}:{reader.line_num}"
                if len(line) != len(header):
                    raise ReportError(f"{where}: {len(line)} fields, the header has {len(header)}")
                values = {m: _parse_value(line[i], m, where) for m, i in methods.items()}
                records.append(MetricRecord(
                    model=line[fixed["model"]], setting=line[fixed["setting"]], metric=line[fixed["metric"]],
                    higher_is_better=_parse_bool(line[fixed["higher_is_better"]], where),
                    values={m: v for m, v in values.items() if v is not None},
                ))
                settings.append({name: line[i] for name, i in setting_columns.items()})
        except csv.Error as error:
            raise ReportError(f"{path}:{reader.line_num}: {error}") from None
    return records, settings


def read_json(path: Path) -> dict[str, Any] | None:
    """The sidecar JSON object, or None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from None
    if not isinstance(payload, dict):
        raise ReportError(f"{path}:1: expected a JSON object, got {type(payload).__name__}")
    _check_sidecar(path, payload)
    return payload


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _nested_mappings(value: Any, depth: int) -> bool:
    """Whether ``value`` is a mapping whose values are mappings, ``depth`` levels down."""
    if not isinstance(value, dict):
        return False
    return depth == 1 or all(_nested_mappings(inner, depth - 1) for inner in value.values())


SIDECAR_SHAPES: dict[str, tuple[str, Any]] = {
    "tree": ("a string", lambda v: isinstance(v, str)),
    "name": ("a string", lambda v: isinstance(v, str)),
    "settings": ("an object of settings", lambda v: isinstance(v, dict)),
    "versions": ("an object of package versions", lambda v: isinstance(v, dict)),
    "data_sha256": ("an object of data hashes", lambda v: isinstance(v, dict)),
    "seconds": ("an object of stage names to numbers of seconds",
                lambda v: isinstance(v, dict) and all(_is_number(x) for x in v.values())),
    "per_example": ("an object setting → method → metric → per-example values", lambda v: _nested_mappings(v, 3)),
}
"""What the report reads from a sidecar JSON, key by key: what each must be (a key may be absent)."""


def _check_sidecar(path: Path, payload: dict[str, Any]) -> None:
    """``ReportError`` naming the file and key when a key the report reads has another shape (a hand edit)."""
    for key, (shape, valid) in SIDECAR_SHAPES.items():
        if key in payload and payload[key] is not None and not valid(payload[key]):
            raise ReportError(f"{path}: {key!r} must be {shape}, got {short_json(payload[key])}")


def short_json(value: Any, limit: int = 80) -> str:
    """``value`` as JSON, cut to ``limit`` characters."""
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def tree_of(name: str, meta: dict[str, Any] | None) -> str:
    """The run's tree: the JSON's ``tree``, else the file name's prefix, else ``other``."""
    if meta is not None and isinstance(meta.get("tree"), str) and meta["tree"]:
        return meta["tree"]
    return next((tree for tree in TREES if name.startswith(tree)), "other")


def _consistency_notes(name: str, meta: dict[str, Any] | None, csv_settings: list[dict[str, str]]) -> list[str]:
    """Disagreements between the CSV lines, and between the CSV and its JSON."""
    notes = []
    if any(line != csv_settings[0] for line in csv_settings[1:]):
        notes.append(f"run `{name}`: the settings columns differ between lines of its CSV")
    if meta is None:
        notes.append(f"run `{name}`: no sidecar JSON (an interrupted run, or a file made by hand); git commit, "
                     "versions, device, data hashes and wall times are unknown, settings are read from the CSV")
        return notes
    if meta.get("name", name) != name:
        notes.append(f"run `{name}`: its JSON names another run, `{meta['name']}`")
    json_settings = {k: setting_text(v) for k, v in (meta.get("settings") or {}).items()}
    first = csv_settings[0] if csv_settings else {}
    differ = sorted(k for k in first.keys() & json_settings.keys() if first[k] != json_settings[k])
    if differ:
        notes.append(f"run `{name}`: CSV and JSON disagree on {', '.join(differ)}")
    return notes


def read_run(csv_path: Path) -> Run:
    """One run from its CSV and (if present) its sidecar JSON.

    A JSON that records another CSV's SHA-256 (a CSV rewritten by hand, or the pair of an interrupted write)
    is not used: the run is read as one without JSON, with a note saying why.
    """
    records, csv_settings = read_csv(csv_path)
    name = csv_path.stem
    meta = read_json(csv_path.with_suffix(".json"))
    stale = None
    if meta is not None and isinstance(meta.get(CSV_DIGEST_KEY), str):
        digest = hashlib.sha256(csv_path.read_bytes()).hexdigest()
        if digest != meta[CSV_DIGEST_KEY]:
            stale = (f"run `{name}`: its JSON vouches for other CSV contents (csv_sha256 "
                     f"{meta[CSV_DIGEST_KEY][:12]}…, the CSV has {digest[:12]}…); the JSON is not used")
            meta = None
    json_settings = (meta or {}).get("settings")
    if isinstance(json_settings, dict):
        settings = {k: setting_text(v) for k, v in json_settings.items()}
    else:
        settings = csv_settings[0] if csv_settings else {}
    notes = _consistency_notes(name, meta, csv_settings)
    return Run(name, tree_of(name, meta), records, settings, meta, [stale, *notes] if stale else notes)


def load_runs(results_dir: Path) -> list[Run]:
    """Every run of ``results_dir`` (``*.csv`` at its top level but the solver benchmark's), sorted by name."""
    if not results_dir.is_dir():
        raise ReportError(f"results folder {results_dir} does not exist (run an experiment first)")
    paths = sorted(path for path in results_dir.glob("*.csv") if path.name not in BENCH_CSVS)
    if not paths:
        raise ReportError(f"no result files (*.csv) in {results_dir} (run an experiment first)")
    return [read_run(path) for path in paths]


def provenance(run: Run) -> dict[str, str]:
    """What a run's numbers depend on: its settings (bookkeeping aside), device, git commit, data hashes."""
    keys = {k: v for k, v in run.settings.items() if k not in BOOKKEEPING}
    if run.meta is not None:
        keys["device"] = str(run.meta.get("device", MISSING))
        keys["git_commit"] = str(run.meta.get("git_commit", MISSING))
        for data, digest in (run.meta.get("data_sha256") or {}).items():
            keys[f"data_sha256[{data}]"] = str(digest)
    return keys


def differing_keys(runs: Sequence[Run]) -> dict[str, dict[str, str]]:
    """``{key: {run name: value}}`` for the provenance keys whose values differ among ``runs``.

    A run without sidecar JSON takes part only for the keys it has (its own note says the rest is unknown).
    """
    known = {run.name: provenance(run) for run in runs}
    differ: dict[str, dict[str, str]] = {}
    for key in sorted(set().union(*known.values())):
        values = {run.name: known[run.name].get(key, MISSING) for run in runs
                  if run.meta is not None or key in known[run.name]}
        if len(set(values.values())) > 1:
            differ[key] = values
    return differ
