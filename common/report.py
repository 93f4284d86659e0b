"""One comparison report across all trees: ``python -m common.report [--results-dir D] [--output F]``.

Reads every ``<results-dir>/*.csv`` (the schema of :mod:`common.runs`) with its sidecar JSON and writes a
Markdown report (default ``<results-dir>/REPORT.md``) with one section per tree (fake_quant, spinquant,
vit_quant): a table of model x setting x metric with the FP, RTN, GPTQ, GPTAQ (and GPTAQ official) values,
the better of GPTQ and GPTAQ in bold, the runs' settings, versions and wall times, and one figure per tree
(``report_<tree>.png`` beside the report) of the main metric: perplexity for the LLM trees, top-1 for ViTs.

Provenance: runs of the same model and setting whose configurations differ (any setting but bookkeeping
ones such as the run name or batch sizes, the device, the git commit, the data hashes) get a numbered ⚠
note naming the differing keys on each of their rows; a run without sidecar JSON gets a ⚠ note too.

Errors: a malformed CSV or JSON raises :class:`ReportError` naming the file and line; so does an empty or
missing results folder (no report is written). The command line prints ``error: ...`` and exits 2.
The same inputs give a byte-identical report (sorted order, no timestamps).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.results import atomic_write_text
from common.runs import METHOD_COLUMNS

TREES = ("fake_quant", "spinquant", "vit_quant")
FIXED_COLUMNS = ("model", "setting", "metric", "higher_is_better")
LABELS = {"fp": "FP", "rtn": "RTN", "gptq": "GPTQ", "gptaq": "GPTAQ", "gptaq_official": "GPTAQ (official)"}
PLOTTED = ("gptq", "gptaq", "gptaq_official")
COLORS = {"gptq": "#4C72B0", "gptaq": "#DD8452", "gptaq_official": "#55A868"}
BOOKKEEPING = frozenset({
    "name", "methods", "results_dir", "save_qmodel_path", "load_qmodel_path", "eval_batch_size",
    "calib_batch_size", "offload", "device",
})
HIGHLIGHTED = (
    "seed", "nsamples", "seqlen", "calib_dataset", "w_bits", "a_bits", "k_bits", "v_bits", "w_groupsize",
    "a_groupsize", "w_clip", "a_clip_ratio", "percdamp", "act_order", "alpha", "lazy_update",
)
MISSING = "—"
TRUE_TEXT, FALSE_TEXT = ("true", "1"), ("false", "0")
HASH = re.compile(r"([0-9a-f]{32,64})(\+dirty)?")


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


@dataclass(frozen=True)
class TableRow:
    """A table line: a record of a run, with the numbers of its ⚠ notes."""

    run: Run
    record: MetricRecord
    notes: tuple[int, ...]


@dataclass
class TreeTable:
    """The rows of one tree's table and the texts of its numbered notes."""

    tree: str
    runs: list[Run]
    rows: list[TableRow]
    notes: list[str]


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


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
    methods = {name: first[name] for name in METHOD_COLUMNS if name in first}
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
    return payload


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
        notes.append(f"run `{name}`: no sidecar JSON; git commit, versions, device, data hashes and "
                     "wall times are unknown, settings are read from the CSV")
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
    """One run from its CSV and (if present) its sidecar JSON."""
    records, csv_settings = read_csv(csv_path)
    name = csv_path.stem
    meta = read_json(csv_path.with_suffix(".json"))
    json_settings = (meta or {}).get("settings")
    if isinstance(json_settings, dict):
        settings = {k: setting_text(v) for k, v in json_settings.items()}
    else:
        settings = csv_settings[0] if csv_settings else {}
    return Run(name, tree_of(name, meta), records, settings, meta, _consistency_notes(name, meta, csv_settings))


def load_runs(results_dir: Path) -> list[Run]:
    """Every run of ``results_dir`` (``*.csv`` at its top level), sorted by name."""
    if not results_dir.is_dir():
        raise ReportError(f"results folder {results_dir} does not exist (run an experiment first)")
    paths = sorted(results_dir.glob("*.csv"))
    if not paths:
        raise ReportError(f"no result files (*.csv) in {results_dir} (run an experiment first)")
    return [read_run(path) for path in paths]


# ---------------------------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------------------------


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


def short(value: str) -> str:
    """Hashes and commits cut to 12 hex digits (a ``+dirty`` mark kept); other values unchanged."""
    match = HASH.fullmatch(value)
    if match is None:
        return value if value != "" else "None"
    return match.group(1)[:12] + "…" + (match.group(2) or "")


def _mismatch_note(model: str, setting: str, differ: dict[str, dict[str, str]]) -> str:
    parts = [f"{key} ({'; '.join(f'`{name}`: {short(v)}' for name, v in sorted(values.items()))})"
             for key, values in differ.items()]
    return (f"model `{model}`, setting `{setting}`: these rows come from runs with different configurations, "
            f"do not compare them as like for like; they differ in {', '.join(parts)}")


def build_table(tree: str, runs: Sequence[Run]) -> TreeTable:
    """The sorted rows of one tree with their ⚠ notes: mismatched configurations first, then run notes."""
    groups: dict[tuple[str, str], dict[str, Run]] = {}
    for run in runs:
        for record in run.records:
            groups.setdefault((record.model, record.setting), {})[run.name] = run
    notes: list[str] = []
    group_note: dict[tuple[str, str], int] = {}
    for key in sorted(groups):
        differ = differing_keys([groups[key][name] for name in sorted(groups[key])])
        if differ:
            notes.append(_mismatch_note(*key, differ))
            group_note[key] = len(notes)
    run_notes: dict[str, list[int]] = {}
    for run in sorted(runs, key=lambda r: r.name):
        for text in run.notes:
            notes.append(text)
            run_notes.setdefault(run.name, []).append(len(notes))
    rows = []
    for run in runs:
        for record in run.records:
            group = group_note.get((record.model, record.setting))
            numbers = ([group] if group is not None else []) + run_notes.get(run.name, [])
            rows.append(TableRow(run, record, tuple(sorted(numbers))))
    rows.sort(key=lambda r: (r.record.model, r.record.setting, r.record.metric, r.run.name))
    return TreeTable(tree, sorted(runs, key=lambda r: r.name), rows, notes)


# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------


def _decimals(values: Iterable[float]) -> int:
    finite = [abs(v) for v in values if math.isfinite(v)]
    return 2 if finite and max(finite) >= 1 else 4


def _number(value: float | None, decimals: int, signed: bool = False) -> str:
    if value is None:
        return MISSING
    return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"


def better_method(record: MetricRecord) -> str | None:
    """``gptq`` or ``gptaq``, whichever is better for the record's metric; None on a tie or a missing value."""
    gptq, gptaq = record.values.get("gptq"), record.values.get("gptaq")
    if gptq is None or gptaq is None or gptq == gptaq or math.isnan(gptq) or math.isnan(gptaq):
        return None
    gptaq_wins = gptaq > gptq if record.higher_is_better else gptaq < gptq
    return "gptaq" if gptaq_wins else "gptq"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table_line(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _methods(rows: Sequence[TableRow]) -> tuple[list[str], list[str]]:
    """The method columns before and after the GPTAQ − GPTQ column (GPTAQ official only when present)."""
    official = any("gptaq_official" in row.record.values for row in rows)
    return ["fp", "rtn", "gptq", "gptaq"], ["gptaq_official"] if official else []


def _row_cells(row: TableRow, before: Sequence[str], after: Sequence[str]) -> list[str]:
    record = row.record
    decimals = _decimals(record.values.values())
    best = better_method(record)

    def value(method: str) -> str:
        text = _number(record.values.get(method), decimals)
        return f"**{text}**" if method == best else text

    gptq, gptaq = record.values.get("gptq"), record.values.get("gptaq")
    diff = None if gptq is None or gptaq is None else gptaq - gptq
    marks = " ⚠" + ",".join(map(str, row.notes)) if row.notes else ""
    return [
        _cell(record.model), _cell(record.setting), _cell(f"{record.metric} {'↑' if record.higher_is_better else '↓'}"),
        *map(value, before), _number(diff, decimals, signed=True), *map(value, after),
        f"`{_cell(row.run.name)}`{marks}",
    ]


def table_markdown(table: TreeTable) -> list[str]:
    """The Markdown lines of a tree's table (and its ⚠ notes)."""
    before, after = _methods(table.rows)
    header = ["Model", "Setting", "Metric", *(LABELS[m] for m in before), "GPTAQ − GPTQ",
              *(LABELS[m] for m in after), "Run"]
    lines = [_table_line(header), _table_line(["---"] * 3 + ["---:"] * (len(header) - 4) + ["---"])]
    lines += [_table_line(_row_cells(row, before, after)) for row in table.rows]
    if table.notes:
        lines += ["", "Notes:", ""] + [f"- ⚠{i}: {_cell(text)}" for i, text in enumerate(table.notes, 1)]
    return lines


def _settings_text(settings: dict[str, str], keys: Iterable[str]) -> str:
    return ", ".join(f"{key} `{short(settings[key])}`" for key in keys) or MISSING


def _seconds_text(seconds: Any) -> str:
    if not isinstance(seconds, dict) or not seconds:
        return "not recorded"
    stages = [f"{stage} {float(value):.1f} s" for stage, value in seconds.items()]
    return ", ".join(stages) + f"; total {sum(float(v) for v in seconds.values()):.1f} s"


def run_markdown(run: Run) -> list[str]:
    """The Markdown lines describing one run: files, settings, provenance, versions and wall times."""
    main = [key for key in HIGHLIGHTED if key in run.settings]
    other = sorted(key for key in run.settings if key not in HIGHLIGHTED)
    lines = [f"#### `{run.name}`", ""]
    sources = f"`{run.name}.csv` + `{run.name}.json`" if run.meta is not None else f"`{run.name}.csv` (no JSON)"
    lines.append(f"- Files: {sources}")
    lines.append(f"- Settings: {_settings_text(run.settings, main)}")
    lines.append(f"- Other settings: {_settings_text(run.settings, other)}")
    if run.meta is not None:
        versions = run.meta.get("versions") or {}
        data = run.meta.get("data_sha256") or {}
        lines.append(f"- Device: {run.meta.get('device', MISSING)}; git commit "
                     f"`{short(str(run.meta.get('git_commit', MISSING)))}`")
        lines.append(f"- Versions: {', '.join(f'{k} {v}' for k, v in sorted(versions.items())) or MISSING}")
        hashes = ", ".join(f"{k} `{short(str(v))}`" for k, v in sorted(data.items()))
        lines.append(f"- Data SHA-256: {hashes or MISSING}")
        lines.append(f"- Wall time: {_seconds_text(run.meta.get('seconds'))}")
    return [*lines, ""]


def tree_markdown(table: TreeTable, figure: str | None) -> list[str]:
    """The section of one tree: table, notes, figure link and the runs' details."""
    lines = [f"## {table.tree}", ""]
    if not table.runs:
        return [*lines, "No results for this tree.", ""]
    lines += [*table_markdown(table), ""]
    if figure is not None:
        lines += [f"![{table.tree}: GPTQ vs GPTAQ]({figure})", ""]
    lines += ["### Runs", ""]
    for run in table.runs:
        lines += run_markdown(run)
    return lines


def report_markdown(tables: Sequence[TreeTable], figures: dict[str, str]) -> str:
    """The whole report: a header, then a section per tree."""
    count = sum(len(table.runs) for table in tables)
    lines = [
        "# GPTAQ vs GPTQ: comparison report",
        "",
        f"Generated by `python -m common.report` from {count} result file(s) (`*.csv` with sidecar `*.json`).",
        "",
        "- **Bold**: the better of GPTQ and GPTAQ for the row's metric (↓ lower is better, ↑ higher is better).",
        "- GPTAQ − GPTQ: the difference of the two (negative is better for ↓ metrics, positive for ↑).",
        f"- {MISSING}: not computed by that run.",
        "- ⚠n: see note n under the table (configurations that differ, missing provenance).",
        "",
    ]
    for table in tables:
        lines += tree_markdown(table, figures.get(table.tree))
    return "\n".join(lines).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------


def is_main_metric(metric: str) -> bool:
    """Perplexities (``*_ppl``) and top-1 accuracies are plotted."""
    return metric.endswith("_ppl") or metric == "ppl" or "top1" in metric


def _axis_labels(metric: str, values: Sequence[float], log: bool) -> tuple[str, str]:
    """The panel's title and y-axis label (with the unit and the scale)."""
    if "top1" in metric:
        unit = "%" if any(v > 1 for v in values) else "fraction"
        return f"{metric}: higher is better", f"top-1 accuracy ({unit})"
    dataset = metric.removesuffix("_ppl").removesuffix("ppl") or "evaluation"
    return f"{dataset} perplexity: lower is better", "perplexity" + (" (log scale)" if log else "")


def _group_label(row: TableRow, duplicated: bool) -> str:
    label = f"{row.record.model}\n{row.record.setting}"
    if duplicated:
        label += f"\n{row.run.name}"
    return label + (" (!)" if row.notes else "")


def _draw_bars(ax: Axes, rows: Sequence[TableRow], methods: Sequence[str], log: bool) -> None:
    """One bar per method and row, side by side, each labelled with its value."""
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        points = [(x, row.record.values[method]) for x, row in enumerate(rows) if method in row.record.values]
        offset = (i - (len(methods) - 1) / 2) * width
        bars = ax.bar([x + offset for x, _ in points], [v for _, v in points], width,
                      label=LABELS[method], color=COLORS[method])
        labels = [_number(v, _decimals([v])) for _, v in points]
        if log:  # short bars on a log axis: values above them
            ax.bar_label(bars, labels=labels, rotation=90, fontsize=7, padding=2)
        else:
            ax.bar_label(bars, labels=labels, label_type="center", rotation=90, fontsize=7, color="white")


def _draw_fp(ax: Axes, rows: Sequence[TableRow]) -> None:
    """FP as a dashed reference line across each row's group of bars."""
    points = [(x, row.record.values["fp"]) for x, row in enumerate(rows) if "fp" in row.record.values]
    for j, (x, value) in enumerate(points):
        ax.hlines(value, x - 0.45, x + 0.45, colors="black", linestyles="--", linewidth=1.2,
                  label="FP (reference)" if j == 0 else None)


def _plot_panel(ax: Axes, metric: str, rows: Sequence[TableRow]) -> None:
    """GPTQ, GPTAQ (and GPTAQ official) bars per model/setting with FP as reference, for one metric."""
    methods = [m for m in PLOTTED if any(m in row.record.values for row in rows)]
    plotted = [v for row in rows for m in (*methods, "fp") if (v := row.record.values.get(m)) is not None]
    positive = [v for v in plotted if v > 0 and math.isfinite(v)]
    log = not rows[0].record.higher_is_better and bool(positive) and max(positive) > 10 * min(positive)
    if methods:
        _draw_bars(ax, rows, methods, log)
    _draw_fp(ax, rows)
    keys = [(row.record.model, row.record.setting) for row in rows]
    labels = [_group_label(row, keys.count(key) > 1) for row, key in zip(rows, keys, strict=True)]
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(min(positive) / 2, max(positive) * 4)
    title, ylabel = _axis_labels(metric, plotted, log)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    flagged = any(row.notes for row in rows)
    ax.set_xlabel("model / setting" + (" ((!) = flagged, see the notes in the report)" if flagged else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def save_png(fig: Figure, path: Path) -> Path:
    """Save ``fig`` as PNG through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format="png", dpi=120, metadata={"Software": None})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def plot_tree(table: TreeTable, path: Path) -> bool:
    """Bars of GPTQ vs GPTAQ (FP as a dashed line) per model/setting, a panel per main metric.

    Returns False (and writes nothing) when the tree has no main metric to plot.
    """
    metrics = sorted({row.record.metric for row in table.rows if is_main_metric(row.record.metric)})
    if not metrics:
        return False
    panels = {metric: [row for row in table.rows if row.record.metric == metric] for metric in metrics}
    widest = max(len(rows) for rows in panels.values())
    fig = Figure(figsize=(max(6.0, 1.6 * widest + 2.0), 3.8 * len(metrics)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics, strict=True):
        _plot_panel(ax, metric, panels[metric])
    fig.suptitle(f"{table.tree}: GPTQ vs GPTAQ")
    save_png(fig, path)
    return True


# ---------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------


def build_tables(runs: Sequence[Run]) -> list[TreeTable]:
    """A table per tree: the three known trees (even when empty), then any other tree name, sorted."""
    extra = sorted({run.tree for run in runs} - set(TREES))
    return [build_table(tree, [run for run in runs if run.tree == tree]) for tree in (*TREES, *extra)]


def write_report(results_dir: str | Path, output: str | Path | None = None) -> tuple[Path, list[Path]]:
    """Write the report (default ``<results_dir>/REPORT.md``) and its figures; returns their paths."""
    results_dir = Path(results_dir)
    output = Path(output) if output is not None else results_dir / "REPORT.md"
    tables = build_tables(load_runs(results_dir))
    figures: dict[str, str] = {}
    for table in tables:
        name = f"report_{table.tree}.png"
        if table.runs and plot_tree(table, output.parent / name):
            figures[table.tree] = name
    atomic_write_text(output, report_markdown(tables, figures))
    return output, [output.parent / name for name in figures.values()]


def main(argv: list[str] | None = None) -> int:
    """Command line: write the report, or print ``error: ...`` and return 2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="folder of the result CSV/JSON")
    parser.add_argument("--output", type=Path, default=None, help="report file (default: <results-dir>/REPORT.md)")
    args = parser.parse_args(argv)
    try:
        output, figures = write_report(args.results_dir, args.output)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {output}" + "".join(f", {path}" for path in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
