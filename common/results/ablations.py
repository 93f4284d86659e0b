"""Optional report sections from ablation runs: GPTAQ's ``α`` and its exact vs official lazy update.

Ablation runs are ordinary result files (the schema of :mod:`common.results.runs`) in ``<results>/ablations/``
(:data:`ABLATIONS_DIR`),
written by ``make report-ablations`` (``fake_quant/run_ablations.sh``). :func:`ablation_markdown` turns them
into two sections of the report:

* **α sweep**: for every (model, setting, metric), the GPTAQ value of each run by its ``alpha`` setting,
  with the GPTQ value (which does not depend on ``α``) as reference where a run computed it, and a figure
  (``report_ablation_alpha.png``) of the metric against ``α``;
* **lazy-update form**: every line that has both ``gptaq`` (the exact, blocksize-independent form) and
  ``gptaq_official`` (the official code's form), with their difference.

Runs of one (model, setting, metric) that differ in anything but ``α`` and bookkeeping get a ⚠ note naming
the differing settings, as in the main tables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.methods import GPTAQ, GPTAQ_OFFICIAL, GPTQ
from common.results.reading import MISSING, ReportError, Run, differing_keys, load_runs
from common.results.runs import is_auxiliary
from common.results.style import cell_text, decimals_for, number_text, png_writer, short, table_line

ABLATIONS_DIR = "ablations"
ALPHA_FIGURE = "report_ablation_alpha.png"


@dataclass(frozen=True)
class AlphaPoint:
    """One GPTAQ value at one ``α`` (and the run's GPTQ value, if it computed one)."""

    alpha: float
    gptaq: float
    gptq: float | None
    run: str


def _alpha(run: Run) -> float:
    try:
        return float(run.settings["alpha"])
    except (KeyError, ValueError):
        raise ReportError(f"{run.name}.csv (an ablation run): its alpha setting must be a number, got "
                          f"{run.settings.get('alpha', 'none')!r}") from None


def alpha_sweeps(runs: Sequence[Run]) -> dict[tuple[str, str, str, bool], list[AlphaPoint]]:
    """``{(model, setting, metric, higher_is_better): points sorted by α}`` from every line with a GPTAQ value."""
    sweeps: dict[tuple[str, str, str, bool], list[AlphaPoint]] = {}
    for run in runs:
        for record in run.records:
            if GPTAQ.name in record.values and not is_auxiliary(record.metric):
                key = (record.model, record.setting, record.metric, record.higher_is_better)
                point = AlphaPoint(_alpha(run), record.values[GPTAQ.name], record.values.get(GPTQ.name), run.name)
                sweeps.setdefault(key, []).append(point)
    return {key: sorted(points, key=lambda p: (p.alpha, p.run)) for key, points in sorted(sweeps.items())}


def _mismatch_notes(runs: Sequence[Run]) -> list[str]:
    differ = {key: values for key, values in differing_keys(runs).items() if key != "alpha"}
    if not differ:
        return []
    parts = [f"{key} ({'; '.join(f'`{name}`: {short(v)}' for name, v in sorted(values.items()))})"
             for key, values in differ.items()]
    return [f"the ablation runs differ in more than α, do not read the sweep as like for like: {', '.join(parts)}"]


def _alpha_table(key: tuple[str, str, str, bool], points: Sequence[AlphaPoint]) -> list[str]:
    model, setting, metric, higher = key
    decimals = decimals_for([p.gptaq for p in points] + [p.gptq for p in points if p.gptq is not None])
    references = sorted({p.gptq for p in points if p.gptq is not None})
    best = (max if higher else min)(points, key=lambda p: p.gptaq)
    lines = [f"**{cell_text(model)}, {cell_text(setting)}, {cell_text(metric)} {'↑' if higher else '↓'}** "
             f"(GPTQ: {', '.join(number_text(v, decimals) for v in references) or MISSING})", "",
             table_line(["α", "GPTAQ", "GPTAQ − GPTQ", "Run"]), table_line(["---:", "---:", "---:", "---"])]
    for point in points:
        value = number_text(point.gptaq, decimals)
        diff = None if not references else point.gptaq - references[0]
        lines.append(table_line([f"{point.alpha:g}", f"**{value}**" if point is best else value,
                                  number_text(diff, decimals, signed=True), f"`{cell_text(point.run)}`"]))
    return [*lines, ""]


def _lazy_update_lines(runs: Sequence[Run]) -> list[str]:
    rows = []
    for run in runs:
        for record in run.records:
            exact, official = record.values.get(GPTAQ.name), record.values.get(GPTAQ_OFFICIAL.name)
            if exact is None or official is None or is_auxiliary(record.metric):
                continue
            decimals = decimals_for([exact, official])
            rows.append(table_line([cell_text(record.model), cell_text(record.setting),
                                     f"{cell_text(record.metric)} {'↑' if record.higher_is_better else '↓'}",
                                     f"{_alpha(run):g}", number_text(exact, decimals), number_text(official, decimals),
                                     number_text(official - exact, decimals, signed=True), f"`{cell_text(run.name)}`"]))
    if not rows:
        return [f"No ablation run computed both forms (methods `{GPTAQ.name}` and `{GPTAQ_OFFICIAL.name}`).", ""]
    header = ["Model", "Setting", "Metric", "α", f"{GPTAQ.label} (exact)", GPTAQ_OFFICIAL.label, "Official − exact",
              "Run"]
    return [table_line(header), table_line(["---"] * 3 + ["---:"] * 4 + ["---"]), *sorted(rows), ""]


def plot_alpha(sweeps: dict[tuple[str, str, str, bool], list[AlphaPoint]]) -> Figure | None:
    """GPTAQ's metric against ``α`` (GPTQ dashed), a panel per (model, setting, metric); None if nothing to plot."""
    panels = {key: points for key, points in sweeps.items() if len({p.alpha for p in points}) > 1}
    if not panels:
        return None
    fig = Figure(figsize=(6.5, 3.6 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, ((model, setting, metric, higher), points) in zip(axes, panels.items(), strict=True):
        ax.plot([p.alpha for p in points], [p.gptaq for p in points], marker="o", color=GPTAQ.color,
                label=GPTAQ.label)
        for i, reference in enumerate(sorted({p.gptq for p in points if p.gptq is not None})):
            ax.axhline(reference, color=GPTQ.color, linestyle="--", label=GPTQ.label if i == 0 else None)
        ax.set_xlabel("α (GPTAQ drift-correction scale; 0.25 in the official code)")
        ax.set_ylabel(metric + (" (higher is better)" if higher else " (lower is better)"))
        ax.set_title(f"{model}, {setting}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("GPTAQ: sensitivity to α")
    return fig


def ablation_markdown(folder: Path) -> tuple[list[str], dict[str, Callable[[str], None]]]:
    """The ablation sections' Markdown lines from the runs in ``folder``, and their figures: ``{file name:
    write(path)}``, to be written beside the report."""
    runs = load_runs(folder)
    sweeps = alpha_sweeps(runs)
    lines = ["## Ablations", "", f"From {len(runs)} run(s) in `{folder.name}/` (`make report-ablations`).", "",
             "### GPTAQ: α sweep", ""]
    notes = _mismatch_notes(runs)
    lines += [f"⚠ {cell_text(note)}" for note in notes] + ([""] if notes else [])
    if not sweeps:
        lines += ["No ablation run computed GPTAQ.", ""]
    for key, points in sweeps.items():
        lines += _alpha_table(key, points)
    figures = {}
    figure = plot_alpha(sweeps)
    if figure is not None:
        lines += [f"![GPTAQ against α]({ALPHA_FIGURE})", ""]
        figures[ALPHA_FIGURE] = png_writer(figure)
    lines += ["### GPTAQ: exact vs official lazy update", "",
              "The exact form gives the column-by-column result for any block size; the official code's "
              "cross-block update multiplies P by the already quantized block "
              "(see `common/solvers/column_loop.py`).", ""]
    return lines + _lazy_update_lines(runs), figures
