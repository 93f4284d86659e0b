"""The shared result schema: one CSV per run (a row per metric, a column per method) and a sidecar JSON.

``results/<name>.csv`` columns: ``model, setting, metric, higher_is_better`` then one column per method
(the methods of :mod:`common.methods` that the run computed, in registry order), then the run's scalar settings (lists
joined with ``+``; a setting named like a fixed column, e.g. ``model``, is that column). Accuracies are in
percent, perplexities plain. A row whose metric ends in :data:`STDERR_SUFFIX` holds the standard errors of
the row it names (``higher_is_better`` False).
``results/<name>.json`` holds the settings, per-stage wall times, per-layer calibration errors, seed,
package versions, device and git commit, and the SHA-256 of the CSV (``csv_sha256``). The pair is written as
a set: both files are complete on disk before either is renamed into place, the JSON last, so a reader
trusts a CSV only when a JSON beside it vouches for its bytes; an interrupted write leaves either no new
file or a CSV without its JSON, which readers refuse as incomplete. Temporary files that killed runs left
behind are removed. Files of an earlier run with the same name are first moved to ``results/history/``
(never overwritten).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import distributed
from common.files import (
    HISTORY,
    atomic_write_set,
    csv_text,
    json_text,
    move_to_history,
    sweep_stale_temporaries,
    write_text,
)
from common.methods import BASELINE, METHOD_NAMES
from common.results.intervals import comparisons
from common.results.provenance import git_commit, package_versions

STDERR_SUFFIX = "_stderr"
"""A metric named ``<metric>_stderr`` is the standard error of ``<metric>`` (same units), not a result of its own."""

INTERVAL_BOUNDS = ("low", "high", "p")
"""Rows ``<metric>_vs_<baseline>_low`` / ``_high`` hold each method's paired 95 % interval against the
baseline (accuracies: method − baseline in points; perplexities: the ratio method / baseline) and
``_p`` the exact McNemar p-value (0/1 outcomes only); see :mod:`common.results.intervals`."""

_INTERVAL_ROW = re.compile(rf"_vs_[A-Za-z0-9_]+_({'|'.join(INTERVAL_BOUNDS)})$")


def interval_metric(metric: str, baseline: str, bound: str) -> str:
    """The row name of ``bound`` (one of :data:`INTERVAL_BOUNDS`) of ``metric``'s interval vs ``baseline``."""
    return f"{metric}_vs_{baseline}_{bound}"


COUNT_PREFIX = "images_"
"""A metric named ``images_<what>`` counts evaluation images (e.g. those whose top-1 class differs from the
baseline's): a description of the run, not a score; tables show it as an integer, with no best and no
difference."""


def is_count(metric: str) -> bool:
    """Whether a row counts images (:data:`COUNT_PREFIX`)."""
    return metric.startswith(COUNT_PREFIX)


def is_auxiliary(metric: str) -> bool:
    """Whether a row describes another row's uncertainty (a standard error or an interval bound)."""
    return metric.endswith(STDERR_SUFFIX) or _INTERVAL_ROW.search(metric) is not None


def interval_rows(per_example: Mapping[str, Mapping[str, Mapping[str, Any]]], baseline: str = BASELINE
                  ) -> list[MetricRow]:
    """The interval rows (:data:`INTERVAL_BOUNDS`) of every setting of ``per_example``
    (``{setting: {method: {metric: data}}}``), against ``baseline``."""
    rows = []
    for setting, methods in per_example.items():
        for metric, intervals in comparisons(methods, baseline).items():
            bounds = {"low": {m: i.low for m, i in intervals.items()},
                      "high": {m: i.high for m, i in intervals.items()},
                      "p": {m: i.p_value for m, i in intervals.items() if i.p_value is not None}}
            rows += [MetricRow(interval_metric(metric, baseline, bound), False, values, setting)
                     for bound, values in bounds.items() if values]
    return rows

CSV_DIGEST_KEY = "csv_sha256"
"""The JSON's record of its CSV's SHA-256: the JSON is written last, so it vouches for a complete pair."""


@dataclass
class MetricRow:
    """One metric of one model/setting, measured for every method.

    ``setting`` overrides the run's setting label for this row (a run that compares several rotations
    labels each row with its rotation, e.g. ``W4A4 SpinQuant``).
    """

    metric: str
    higher_is_better: bool
    values: dict[str, float] = field(default_factory=dict)
    setting: str | None = None


def write_run(
    results_dir: str | Path,
    name: str,
    *,
    model: str,
    setting: str,
    rows: Sequence[MetricRow],
    settings: Mapping[str, Any],
    metadata: Mapping[str, Any],
    per_example: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
) -> tuple[Path, Path]:
    """Write ``<results_dir>/<name>.csv`` and ``.json`` (see the module docstring); returns both paths.

    ``per_example`` (``{setting: {method: {metric: data}}}``: per-window mean NLLs of a perplexity, 0/1
    outcome strings of an accuracy) goes into the JSON under ``"per_example"``, and the paired intervals
    of every method against :data:`common.methods.BASELINE` computed from it become rows of the CSV.
    """
    results_dir = Path(results_dir)
    if not distributed.is_main():  # rank 0 writes the run's files
        return results_dir / f"{name}.csv", results_dir / f"{name}.json"
    if per_example:
        rows = [*rows, *interval_rows(per_example)]
        metadata = {**metadata, "per_example": per_example}
    csv_path, json_path = results_dir / f"{name}.csv", results_dir / f"{name}.json"
    methods = [m for m in METHOD_NAMES if any(m in row.values for row in rows)]
    scalars = {k: v for k, v in settings.items() if isinstance(v, str | int | float | bool) or v is None}
    lists = {k: "+".join(map(str, v)) for k, v in settings.items() if isinstance(v, list | tuple)}
    fixed = ["model", "setting", "metric", "higher_is_better", *methods]
    setting_columns = {k: v for k, v in {**scalars, **lists}.items() if k not in fixed}
    fieldnames = [*fixed, *setting_columns]
    table = [
        {
            "model": model,
            "setting": row.setting or setting,
            "metric": row.metric,
            "higher_is_better": row.higher_is_better,
            **{m: _fmt(row.values.get(m)) for m in methods},
            **setting_columns,
        }
        for row in rows
    ]
    csv_body = csv_text(table, fieldnames)
    payload = {
        "name": name,
        "model": model,
        "setting": setting,
        "settings": dict(settings),
        "git_commit": git_commit(),
        "versions": package_versions(),
        **metadata,
        CSV_DIGEST_KEY: hashlib.sha256(csv_body.encode("utf-8")).hexdigest(),
    }
    json_body = json_text(payload)
    sweep_stale_temporaries(results_dir)
    move_to_history([csv_path, json_path], results_dir / HISTORY)
    atomic_write_set([(csv_path, lambda tmp: write_text(tmp, csv_body)),
                      (json_path, lambda tmp: write_text(tmp, json_body))])
    return csv_path, json_path


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"
