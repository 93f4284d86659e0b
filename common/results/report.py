"""One comparison report across all trees: ``python -m common.results.report [--results-dir D] [--output F]``.

Reads every ``<results-dir>/*.csv`` (the schema of :mod:`common.results.runs`) with its sidecar JSON and writes a
Markdown report (default ``<results-dir>/REPORT.md``) with one section per tree (fake_quant, spinquant,
vit_quant): a table of model x setting x metric with a column per method of :mod:`common.methods` (the
default ones always, the others when a run computed them; a value with a standard error row, e.g. a zero-shot
accuracy, shows it as ``value ± stderr``), the best quantized value in bold, a
``method − baseline`` column for every other calibrated method (``--baseline``, default GPTQ), the runs'
settings, versions and wall times, and one figure per tree (``report_<tree>.png`` beside the report) of the
main metric: perplexity for the LLM trees, top-1 for ViTs.

Provenance: runs of the same model and setting whose configurations differ (any setting but bookkeeping
ones such as the run name or batch sizes, the device, the git commit, the data hashes) get a numbered ⚠
note naming the differing keys on each of their rows; a run without sidecar JSON gets a ⚠ note too.

Errors: a malformed CSV or JSON raises :class:`ReportError` naming the file and line; so does an empty or
missing results folder (no report is written). The command line prints ``error: ...`` and exits 2.
The same inputs give a byte-identical report (sorted order, no timestamps).

Ablations: when ``<results-dir>/ablations/`` holds result files (``make report-ablations``), the report ends
with the sections of :mod:`common.results.ablations` (GPTAQ's α sweep, exact vs official lazy update).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.config import ConfigError
from common.files import atomic_write_set, check_output_file, write_text
from common.methods import BASELINE, DEFAULT_METHODS, METHOD_NAMES, METHODS
from common.results.ablations import ABLATIONS_DIR, ablation_markdown
from common.results.intervals import MEAN_SUFFIXES, PairedInterval, comparisons, reproduces
from common.results.reading import (
    MISSING,
    TREES,
    MetricRecord,
    ReportError,
    Run,
    differing_keys,
    load_runs,
    read_run,
)
from common.results.runs import STDERR_SUFFIX, is_auxiliary, is_count
from common.results.style import (
    cell_text,
    decimals_for,
    number_text,
    png_writer,
    short,
    table_line,
)

HIGHLIGHTED = (
    "seed", "nsamples", "seqlen", "calib_dataset", "w_bits", "a_bits", "k_bits", "v_bits", "w_groupsize",
    "a_groupsize", "w_clip", "a_clip_ratio", "percdamp", "act_order", "alpha", "lazy_update",
)


@dataclass(frozen=True)
class TableRow:
    """A table line: a record of a run, with the numbers of its ⚠ notes."""

    run: Run
    record: MetricRecord
    notes: tuple[int, ...]
    stderr: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, PairedInterval] = field(default_factory=dict)


@dataclass
class TreeTable:
    """The rows of one tree's table, the texts of its numbered notes, and the method compared against."""

    tree: str
    runs: list[Run]
    rows: list[TableRow]
    notes: list[str]
    baseline: str = BASELINE


def _mismatch_note(model: str, setting: str, differ: dict[str, dict[str, str]]) -> str:
    parts = [f"{key} ({'; '.join(f'`{name}`: {short(v)}' for name, v in sorted(values.items()))})"
             for key, values in differ.items()]
    return (f"model `{model}`, setting `{setting}`: these rows come from runs with different configurations, "
            f"do not compare them as like for like; they differ in {', '.join(parts)}")


def _checked_per_example(run: Run) -> tuple[dict[str, dict[str, dict[str, Any]]], list[str]]:
    """The run's per-example data that reproduce its CSV values (:func:`reproduces`), and the
    ``setting/method/metric`` names of those that do not (a format of another version, an edited file)."""
    values = {(r.setting, r.metric): r.values for r in run.records}
    kept: dict[str, dict[str, dict[str, Any]]] = {}
    failed = []
    for setting, methods in ((run.meta or {}).get("per_example") or {}).items():
        for method, metrics in methods.items():
            for metric, data in metrics.items():
                value = values.get((setting, metric), {}).get(method)
                if value is not None and reproduces(metric, data, value):
                    kept.setdefault(setting, {}).setdefault(method, {})[metric] = data
                else:
                    failed.append(f"{setting}/{method}/{metric}")
    return kept, failed


def build_table(tree: str, runs: Sequence[Run], baseline: str = BASELINE) -> TreeTable:
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
    checked: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for run in sorted(runs, key=lambda r: r.name):
        checked[run.name], unreproduced = _checked_per_example(run)
        texts = [*run.notes]
        if unreproduced:
            texts.append(f"`{run.name}`: the per-example data in its JSON do not reproduce the table's value of "
                         f"{', '.join(unreproduced)}; no interval is shown for them")
        for text in texts:
            notes.append(text)
            run_notes.setdefault(run.name, []).append(len(notes))
    rows = []
    for run in runs:
        errors = {(r.model, r.setting, r.metric.removesuffix(STDERR_SUFFIX)): r.values
                  for r in run.records if r.metric.endswith(STDERR_SUFFIX)}
        intervals = {setting: comparisons(methods, baseline) for setting, methods in checked[run.name].items()}
        for record in run.records:
            if is_auxiliary(record.metric):
                continue
            group = group_note.get((record.model, record.setting))
            numbers = ([group] if group is not None else []) + run_notes.get(run.name, [])
            stderr = errors.get((record.model, record.setting, record.metric), {})
            paired = intervals.get(record.setting, {}).get(record.metric, {})
            rows.append(TableRow(run, record, tuple(sorted(numbers)), dict(stderr), dict(paired)))
    rows.sort(key=lambda r: (r.record.model, r.record.setting, r.record.metric, r.run.name))
    return TreeTable(tree, sorted(runs, key=lambda r: r.name), rows, notes, baseline)


# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------


def best_methods(record: MetricRecord) -> set[str]:
    """The quantized methods with the best value of the record's metric (all of them on a tie); empty when
    fewer than two quantized methods have a value."""
    values = {m: v for m, v in record.values.items() if METHODS[m].quantized and not math.isnan(v)}
    if len(values) < 2:
        return set()
    best = max(values.values()) if record.higher_is_better else min(values.values())
    return {m for m, v in values.items() if v == best}


def table_methods(rows: Sequence[TableRow]) -> list[str]:
    """The method columns of a table: the default methods, then any other present, in registry order."""
    present = {m for row in rows for m in row.record.values}
    return [m for m in METHOD_NAMES if m in DEFAULT_METHODS or m in present]


def compared_methods(methods: Sequence[str], baseline: str) -> list[str]:
    """The calibrated methods that get a ``method − baseline`` column."""
    return [m for m in methods if METHODS[m].calibrated and m != baseline]


def interval_text(interval: PairedInterval, decimals: int = 2) -> str:
    """``[low, high]`` of a difference (``decimals`` digits), ``×ratio [low, high]`` of a perplexity ratio;
    `` *`` when significant."""
    mark = " \\*" if interval.significant else ""
    if interval.null == 1.0:
        return f"(×{interval.estimate:.3f} [{interval.low:.3f}, {interval.high:.3f}]){mark}"
    return f"[{interval.low:+.{decimals}f}, {interval.high:+.{decimals}f}]{mark}"


def _row_cells(row: TableRow, methods: Sequence[str], baseline: str) -> list[str]:
    record = row.record
    count = is_count(record.metric)  # a count of images: integers, no best, no difference
    decimals = 0 if count else decimals_for(record.values.values())
    best = set() if count else best_methods(record)

    def value(method: str) -> str:
        text = number_text(record.values.get(method), decimals)
        text = f"**{text}**" if method in best else text
        error = row.stderr.get(method)
        return text if error is None or record.values.get(method) is None else f"{text} ± {error:.{decimals}f}"

    def difference(method: str) -> str:
        own, base = record.values.get(method), record.values.get(baseline)
        if count:
            return MISSING
        text = number_text(None if own is None or base is None else own - base, decimals, signed=True)
        interval = row.intervals.get(method)
        return (text if interval is None or own is None or base is None
                else f"{text} {interval_text(interval, decimals)}")

    marks = " ⚠" + ",".join(map(str, row.notes)) if row.notes else ""
    return [
        cell_text(record.model), cell_text(record.setting),
        cell_text(record.metric if count else f"{record.metric} {'↑' if record.higher_is_better else '↓'}"),
        *map(value, methods), *map(difference, compared_methods(methods, baseline)),
        f"`{cell_text(row.run.name)}`{marks}",
    ]


def run_table_markdown(csv_path: Path) -> str:
    """The table of one run's result files (``csv_path`` and its JSON), as the report shows it: every metric, each
    method's value and its difference to the baseline with the paired interval."""
    run = read_run(csv_path)
    return "\n".join(table_markdown(build_table(run.tree, [run])))


def table_markdown(table: TreeTable) -> list[str]:
    """The Markdown lines of a tree's table (and its ⚠ notes)."""
    methods = table_methods(table.rows)
    base = METHODS[table.baseline].label
    header = ["Model", "Setting", "Metric", *(METHODS[m].label for m in methods),
              *(f"{METHODS[m].label} − {base}" for m in compared_methods(methods, table.baseline)), "Run"]
    lines = [table_line(header), table_line(["---"] * 3 + ["---:"] * (len(header) - 4) + ["---"])]
    lines += [table_line(_row_cells(row, methods, table.baseline)) for row in table.rows]
    if table.notes:
        lines += ["", "Notes:", ""] + [f"- ⚠{i}: {cell_text(text)}" for i, text in enumerate(table.notes, 1)]
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
        lines += [f"![{table.tree}: every method against {METHODS[table.baseline].label}]({figure})", ""]
    lines += ["### Runs", ""]
    for run in table.runs:
        lines += run_markdown(run)
    return lines


def report_markdown(tables: Sequence[TreeTable], figures: dict[str, str]) -> str:
    """The whole report: a header, then a section per tree."""
    count = sum(len(table.runs) for table in tables)
    base = METHODS[tables[0].baseline].label if tables else METHODS[BASELINE].label
    lines = [
        "# Error-correcting quantization methods: comparison report",
        "",
        f"Generated by `python -m common.results.report` from {count} result file(s) (`*.csv` with sidecar "
        "`*.json`).",
        "",
        "- **Bold**: the best quantized method for the row's metric (↓ lower is better, ↑ higher is better).",
        f"- Method − {base}: the difference to the baseline (negative is better for ↓ metrics, positive for ↑), "
        "then, where the run kept its per-example data, the paired 95 % interval (`common/results/intervals.py`: "
        "10,000 bootstrap resamples of the evaluation windows, images or zero-shot items): of the difference in "
        "points for accuracies, of the perplexity ratio method / baseline (×) for perplexities. \\* marks a "
        "significant difference: the interval excludes no difference (0 points, ×1) and, for accuracies, the "
        "exact McNemar test on the disagreements gives p < 0.05.",
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
    """Perplexities (``*_ppl``), top-1 accuracies and per-example means (NLL, KL: :data:`MEAN_SUFFIXES`) are
    plotted."""
    return metric.endswith(("_ppl", *MEAN_SUFFIXES)) or metric == "ppl" or "top1" in metric


def _group_label(row: TableRow, duplicated: bool) -> str:
    label = f"{row.record.model}\n{row.record.setting}"
    if duplicated:  # the run's name, broken at dashes into short lines
        parts, line = [], ""
        for piece in row.run.name.split("-"):
            if line and len(line) + len(piece) > 14:
                parts.append(line + "-")
                line = ""
            line += ("-" if line else "") + piece
        label += "\n" + "\n".join([*parts, line])
    return label + (" (!)" if row.notes else "")


def _comparison(row: TableRow, method: str, baseline: str) -> tuple[float, float | None, float | None] | None:
    """(value, low, high) of ``method`` against ``baseline`` on one row: the ratio for perplexities, the
    difference otherwise; the interval bounds are ``None`` without per-example data."""
    own, base = row.record.values.get(method), row.record.values.get(baseline)
    if own is None or base is None or not (math.isfinite(own) and math.isfinite(base)):
        return None
    interval = row.intervals.get(method)
    if interval is not None:  # its estimate is the point: the same number, computed from the same data
        return interval.estimate, interval.low, interval.high
    if row.record.metric.endswith("_ppl"):
        return (own / base, None, None) if own > 0 and base > 0 else None
    return own - base, None, None


def _plot_panel(ax: Axes, metric: str, rows: Sequence[TableRow], baseline: str) -> None:
    """Each calibrated method against the baseline per model/setting, with its paired 95 % interval as error
    bars: the perplexity ratio on a log axis, or the accuracy difference in points. FP and RTN, orders of
    magnitude away at low bits, stay in the table so the axis is scaled to the differences between methods."""
    ratio = metric.endswith("_ppl")
    methods = [m for m in METHOD_NAMES if METHODS[m].calibrated and m != baseline
               and any(m in row.record.values for row in rows)]
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        offset = (i - (len(methods) - 1) / 2) * width
        points = [(x + offset, found) for x, row in enumerate(rows)
                  if (found := _comparison(row, method, baseline)) is not None]
        if not points:
            continue
        xs, values = [x for x, _ in points], [found[0] for _, found in points]
        low = [max(0.0, v - f[1]) if f[1] is not None else 0.0 for v, (_, f) in zip(values, points, strict=True)]
        high = [max(0.0, f[2] - v) if f[2] is not None else 0.0 for v, (_, f) in zip(values, points, strict=True)]
        ax.errorbar(xs, values, yerr=[low, high], fmt="o", capsize=3, color=METHODS[method].color,
                    label=METHODS[method].label, markersize=5)
        for x, value in zip(xs, values, strict=True):
            text = f"×{value:.3g}" if ratio else f"{value:+.3g}" if metric.endswith(MEAN_SUFFIXES) else f"{value:+.2f}"
            ax.annotate(text, (x, value), textcoords="offset points", xytext=(4, 0), fontsize=6, va="center")
    ax.axhline(1.0 if ratio else 0.0, color="black", linestyle="--", linewidth=1.0,
               label=f"{METHODS[baseline].label} (baseline)")
    if ratio:
        ax.set_yscale("log")
    keys = [(row.record.model, row.record.setting) for row in rows]
    labels = [_group_label(row, keys.count(key) > 1) for row, key in zip(rows, keys, strict=True)]
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    base = METHODS[baseline].label
    if ratio:
        dataset = metric.removesuffix("_ppl") or "evaluation"
        ax.set_title(f"{dataset} perplexity ÷ {base}'s (< 1 is better)")
        ax.set_ylabel(f"ratio to {base} (log scale)")
    elif metric.endswith(MEAN_SUFFIXES):
        ax.set_title(f"{metric} − {base}'s (< 0 is better)")
        ax.set_ylabel(f"difference to {base} (nats)")
    else:
        ax.set_title(f"{metric} − {base}'s (> 0 is better)")
        ax.set_ylabel(f"difference to {base} (points)")
    flagged = any(row.notes for row in rows)
    ax.set_xlabel("error bars: paired 95 % interval; FP and RTN: see the table"
                  + ("; (!): see the report's notes" if flagged else ""), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_tree(table: TreeTable) -> Figure | None:
    """Every method against the table's baseline per model/setting, a panel per main metric (see
    :func:`_plot_panel`); None when the tree has no main metric to plot."""
    metrics = sorted({row.record.metric for row in table.rows if is_main_metric(row.record.metric)})
    if not metrics:
        return None
    panels = {metric: [row for row in table.rows if row.record.metric == metric] for metric in metrics}
    widest = max(len(rows) for rows in panels.values())
    fig = Figure(figsize=(max(6.0, 1.6 * widest + 2.0), 3.8 * len(metrics)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics, strict=True):
        _plot_panel(ax, metric, panels[metric], table.baseline)
    fig.suptitle(f"{table.tree}: each method against {METHODS[table.baseline].label}")
    return fig


# ---------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------


def build_tables(runs: Sequence[Run], baseline: str = BASELINE) -> list[TreeTable]:
    """A table per tree: the three known trees (even when empty), then any other tree name, sorted."""
    extra = sorted({run.tree for run in runs} - set(TREES))
    return [build_table(tree, [run for run in runs if run.tree == tree], baseline) for tree in (*TREES, *extra)]


def write_report(results_dir: str | Path, output: str | Path | None = None,
                 baseline: str = BASELINE) -> tuple[Path, list[Path]]:
    """Write the report (default ``<results_dir>/REPORT.md``) and its figures beside it, as one set (all of them
    or, on any error, none); returns their paths. Every problem is a :class:`ReportError` naming the file or
    option, raised before anything is written."""
    if baseline not in METHODS or not METHODS[baseline].quantized:
        raise ReportError(f"baseline must be a quantized method, one of "
                          f"{tuple(m for m in METHOD_NAMES if METHODS[m].quantized)}, got {baseline!r}")
    results_dir = Path(results_dir)
    output = Path(output) if output is not None else results_dir / "REPORT.md"
    try:
        check_output_file(output, "--output")
    except ConfigError as error:
        raise ReportError(str(error)) from None
    tables = build_tables(load_runs(results_dir), baseline)
    figures: dict[str, Callable[[str], None]] = {}  # file name beside the report: write(path)
    tree_figures: dict[str, str] = {}
    for table in tables:
        figure = plot_tree(table) if table.runs else None
        if figure is not None:
            tree_figures[table.tree] = f"report_{table.tree}.png"
            figures[tree_figures[table.tree]] = png_writer(figure)
    text = report_markdown(tables, tree_figures)
    ablations = results_dir / ABLATIONS_DIR
    if ablations.is_dir() and any(ablations.glob("*.csv")):
        lines, ablation_figures = ablation_markdown(ablations)
        text += "\n" + "\n".join(lines).rstrip("\n") + "\n"
        figures.update(ablation_figures)
    paths = [output.parent / name for name in figures]
    try:
        atomic_write_set([*zip(paths, figures.values(), strict=True), (output, lambda tmp: write_text(tmp, text))])
    except OSError as error:
        raise ReportError(f"--output: cannot write the report and its figures in {output.parent} "
                          f"({error.strerror or error}); nothing was written") from None
    return output, paths


def main(argv: list[str] | None = None) -> int:
    """Command line: write the report, or print ``error: ...`` and return 2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="folder of the result CSV/JSON")
    parser.add_argument("--output", type=Path, default=None, help="report file (default: <results-dir>/REPORT.md)")
    parser.add_argument("--baseline", default=BASELINE, help=f"method the others are compared with ({BASELINE})")
    args = parser.parse_args(argv)
    try:
        output, figures = write_report(args.results_dir, args.output, args.baseline)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {output}" + "".join(f", {path}" for path in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
