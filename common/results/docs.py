"""The documentation's tables, generated from the result files under ``docs/results/``:
``python -m common.results.docs [--check]`` (``make docs``).

``README.md`` and ``docs/*.md`` hold generated blocks::

    <!-- generated: KIND NAME ... -->
    (the table)
    <!-- end generated -->

and this command rewrites each block from the committed result files (``docs/results/NAME.csv`` with its
sidecar JSON, written by the command the surrounding text names). Kinds:

* ``runs NAME ...``: the comparison table of those runs (:func:`common.results.report.table_markdown`: a
  column per method, the best quantized value in bold, each calibrated method's difference to GPTQ with its
  paired 95 % interval), and a line per run naming its machine, its torch version and its time (the commit
  and the rest of its provenance are in its JSON);
* ``profile NAME``: the run's stage profile (seconds, GFLOP, times the floor at the matmul rate measured at the
  start of the run, peak resident memory in MiB);
* ``readback NAME FROM``: a weight-only run's perplexities beside the ones its exported checkpoints give when
  read back (run ``FROM``);
* ``bench NAME``: a benchmark CSV (``docs/results/NAME.csv``) as a table;
* ``memory NAME``: the memory formula for the paper's models, and beside the peaks of ``make bench-memory``
  (``docs/results/NAME.csv``);
* ``vit_candidates NAME ...``: the embedded-ViT recipes compared, one line each: its training record
  (``docs/results/vit_candidates/NAME.json``, written by ``vit_quant.train_embedded``: task, shape, epochs,
  training time, FP top-1, no-block and linear-probe references, top-1 under 40 % weight noise) and its W4A4
  and W2A4 runs (``NAME-w4a4``, ``NAME-w2a4`` there: RTN's drop from FP, GPTAQ − GPTQ in top-1 with the
  paired interval, and the share of test images on which GPTQ and GPTAQ predict different classes); the name
  ``shipped`` takes the shipped model's record and the documented runs.

``--check`` rewrites nothing and exits 1 naming every block that differs from what the files give (the test
suite runs it), so a table in the docs cannot drift from its result file.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from common.files import atomic_write_text
from common.methods import BASELINE
from common.results.intervals import paired_interval
from common.results.provenance import REPO_ROOT
from common.results.reading import ReportError, Run, read_run
from common.results.report import build_table, interval_text, table_markdown
from common.results.runs import COUNT_PREFIX
from common.results.style import table_line

RESULTS = Path("docs") / "results"
BLOCK = re.compile(r"(<!-- generated: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.DOTALL)


class DocsError(ValueError):
    """A generated block names a kind or a result file that does not exist."""


def _result_file(root: Path, name: str) -> Path:
    """``docs/results/<name>.csv``; ``DocsError`` when it does not exist."""
    path = root / RESULTS / f"{name}.csv"
    if not path.is_file():
        raise DocsError(f"{path} does not exist (a generated block names it)")
    return path


def _run(root: Path, name: str) -> Run:
    path = _result_file(root, name)
    run = read_run(path)
    if run.meta is None:
        raise DocsError(f"{path} has no sidecar JSON")
    return run


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _provenance(run: Run) -> str:
    meta = run.meta
    seconds = sum(row["seconds"] for row in meta["profile"]["stages"] if ": " not in row["stage"])
    return f"`{run.name}`: {meta['device']}, torch {meta['versions'].get('torch')}, {_minutes(seconds)} of stages"


def runs_table(root: Path, names: Sequence[str]) -> list[str]:
    runs = [_run(root, name) for name in names]
    trees = {run.tree for run in runs}
    lines = table_markdown(build_table(trees.pop() if len(trees) == 1 else "runs", runs))
    return lines + [""] + [f"- {_provenance(run)}" for run in runs]


def profile_table(root: Path, names: Sequence[str]) -> list[str]:
    (name,) = names
    run = _run(root, name)
    profile = run.meta["profile"]
    lines = [table_line(["stage", "s", "GFLOP", "× floor", "peak MiB"]),
             table_line(["---", "---:", "---:", "---:", "---:"])]
    for row in profile["stages"]:
        cells = [row["stage"], f"{row['seconds']:.1f}",
                 "—" if row["gflop"] is None else f"{row['gflop']:.0f}",
                 "—" if row["times_floor"] is None else f"{row['times_floor']:.2f}", str(row["peak_rss_mb"])]
        lines.append(table_line(cells))
    return [*lines, "", f"- {_provenance(run)}; float32 matmul {profile['matmul_gflops']} GFLOP/s at the start"]


def readback_table(root: Path, names: Sequence[str]) -> list[str]:
    run, read = (_run(root, name) for name in names)
    lines = [table_line(["setting", "method", "fake-quantized", "read back from the checkpoint", "identical"]),
             table_line(["---", "---", "---:", "---:", "---"])]
    for record in run.records:
        if not record.metric.endswith("_ppl"):
            continue
        back = next((r for r in read.records if (r.setting, r.metric) == (record.setting, record.metric)), None)
        for method, value in record.values.items():
            again = None if back is None else back.values.get(method)
            if again is not None and method != "fp":
                lines.append(table_line([record.setting, method, f"{value:.6g}", f"{again:.6g}",
                                         "yes" if again == value else "no"]))
    return [*lines, "", f"- {_provenance(run)}", f"- {_provenance(read)}"]


def bench_table(root: Path, names: Sequence[str]) -> list[str]:
    (name,) = names
    path = _result_file(root, name)
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns = [key for key in rows[0] if key != "device"] if rows else []
    lines = [table_line(columns), table_line(["---:" if _numeric(rows, c) else "---" for c in columns])]
    lines += [table_line([_short_number(row[c]) for c in columns]) for row in rows]
    devices = sorted({row.get("device", "") for row in rows})
    return [*lines, "", f"- `{name}.csv`: {', '.join(devices)}"]


def _short_number(text: str) -> str:
    """A number written with more than 4 decimals, to 5 significant digits (``90.08193951899739`` → ``90.082``);
    any other cell as written."""
    whole, _, decimals = text.partition(".")
    if len(decimals) <= 4 or not decimals.isdigit() or not whole.lstrip("-").isdigit():
        return text
    return f"{float(text):.5g}"


def solver_ratios_table(root: Path, names: Sequence[str]) -> list[str]:
    """Each method's solve time as a ratio to GPTQ's, a column per shape (``docs/results/NAME.csv`` of
    ``make bench-solver``)."""
    (name,) = names
    with _result_file(root, name).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    shapes = list(dict.fromkeys(f"{row['rows']} × {row['columns']}" for row in rows))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    ratio = {(row["method"], f"{row['rows']} × {row['columns']}"): row["over_gptq"] for row in rows}
    lines = [table_line(["method", *shapes]), table_line(["---", *["---:"] * len(shapes)])]
    lines += [table_line([method, *(ratio.get((method, shape), "—") for shape in shapes)]) for method in methods]
    devices = sorted({row.get("device", "") for row in rows})
    return [*lines, "", f"- `{name}.csv`: {', '.join(devices)}, {rows[0]['dtype'] if rows else ''}"]


def memory_table(root: Path, names: Sequence[str]) -> list[str]:
    """The memory formula (:mod:`common.llama.memory`) for the paper's models, and beside the peaks measured
    by ``make bench-memory`` (``docs/results/NAME.csv``)."""
    (name,) = names
    from common.bench.memory import NSAMPLES, SEQLEN
    from common.bench.synthetic_llama import SHAPES
    from common.llama.memory import GIB, ModelShape, calibration_bytes, paper_rows, peak_bytes

    lines = [table_line(["model", "float16 GiB", "this repo: host GiB", "this repo: GPU GiB",
                         "official code: weights in host GiB", "GPTQModel: weights in host GiB"]),
             table_line(["---", "---:", "---:", "---:", "---:", "---:"])]
    lines += [table_line(row) for row in paper_rows()]
    with _result_file(root, name).open(newline="", encoding="utf-8") as handle:
        measured = list(csv.DictReader(handle))
    lines += ["", table_line(["synthetic checkpoint", "loading", "checkpoint GiB", "formula GiB (model terms)",
                              "measured peak GiB", "measured − formula"]),
              table_line(["---", "---", "---:", "---:", "---:", "---:"])]
    for row in measured:
        config = SHAPES[row["shape"]]
        shape = ModelShape(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                           config["hidden_size"] // config["num_attention_heads"] * config["num_key_value_heads"],
                           49152)
        formula = peak_bytes(calibration_bytes(shape, int(row.get("tokens") or NSAMPLES * SEQLEN), 4,
                                               resident_only=True)) / GIB
        peak = float(row["peak_rss_gib"])
        layers = int(row.get("layers") or config["num_hidden_layers"])
        label = row["shape"] if layers == config["num_hidden_layers"] else \
            f"{row['shape']} (first {layers} of {config['num_hidden_layers']} layers)"
        lines.append(table_line([label, row["model_loading"], row["checkpoint_gib"], f"{formula:.2f}",
                                 f"{peak:.2f}", f"{peak - formula:.2f}"]))
    devices = sorted({row.get("device", "") for row in measured})
    return [*lines, "", f"- `{name}.csv`: {', '.join(devices)}"]


CANDIDATES = "vit_candidates"
"""The folder of ``docs/results`` holding the embedded-ViT recipes' training records and runs."""


SHIPPED = "shipped"
"""In a ``vit_candidates`` block: the shipped model (its record in ``vit_quant/weights/``, its runs the
documented ``vit_quant-fmnist-vit-w4a4`` and ``-w2a4``)."""


def _candidate_files(root: Path, name: str) -> tuple[Path, list[str], str]:
    """(training record, W4A4 and W2A4 run names, label) of a ``vit_candidates`` entry."""
    if name == SHIPPED:
        return (root / "vit_quant" / "weights" / "embedded_vit.json",
                ["vit_quant-fmnist-vit-w4a4", "vit_quant-fmnist-vit-w2a4"], "shipped")
    return root / RESULTS / CANDIDATES / f"{name}.json", [f"{CANDIDATES}/{name}-{s}" for s in ("w4a4", "w2a4")], name


def _candidate_line(root: Path, name: str) -> str:
    path, run_names, label = _candidate_files(root, name)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DocsError(f"{path}: not a training record ({error})") from None
    recipe = record["recipe"]
    task = (f"cluttered {recipe['img_size']}² ({recipe['clutter_pieces']} pieces)" if recipe["img_size"] != 28
            else "plain 28²")
    shape = f"{recipe['depth']} × {recipe['embed_dim']}, patch {recipe['patch_size']}"
    tokens = (recipe["img_size"] // recipe["patch_size"]) ** 2
    title = f"`{record.get('candidate', label)}`" + (" (shipped)" if name == SHIPPED else "")
    cells = [title, task, shape, str(tokens), str(recipe["epochs"]), _minutes(record["train_seconds"]),
             f"{record['test_top1']:.2f}", f"{record['no_blocks_top1']:.2f}", f"{record['linear_probe_top1']:.2f}",
             f"{record['weight_noise_top1']['0.4'] - record['test_top1']:+.2f}"]
    gaps, disagreeing = [], []
    for run_name in run_names:
        run = _run(root, run_name)
        rows = {row.metric: row for row in run.records}
        top1, counts = rows["top1"].values, rows[f"{COUNT_PREFIX}disagreeing_with_{BASELINE}"].values
        outcomes = {method: data["top1"] for method, data in run.meta["per_example"][rows["top1"].setting].items()}
        interval = paired_interval("top1", outcomes["gptaq"], outcomes[BASELINE])
        images = len(outcomes[BASELINE])
        cells.append(f"{top1['rtn'] - top1['fp']:+.2f}")
        gaps.append(f"{top1['gptaq'] - top1[BASELINE]:+.2f} {interval_text(interval)}")
        disagreeing.append(f"{100 * counts['gptaq'] / images:.1f}")
    return table_line([*cells, *gaps, *disagreeing])


def vit_candidates_table(root: Path, names: Sequence[str]) -> list[str]:
    header = ["recipe", "task", "blocks × width", "tokens", "epochs", "training", "FP top-1", "no blocks",
              "linear probe", "noise 40 %", "RTN − FP W4A4", "RTN − FP W2A4", "GPTAQ − GPTQ W4A4",
              "GPTAQ − GPTQ W2A4", "disagree % W4A4", "disagree % W2A4"]
    lines = [table_line(header), table_line(["---"] * 3 + ["---:"] * (len(header) - 3))]
    return lines + [_candidate_line(root, name) for name in names]


def _numeric(rows: list[dict[str, str]], column: str) -> bool:
    try:
        for row in rows:
            float(row[column])
    except ValueError:
        return False
    return True


KINDS: dict[str, Callable[[Path, Sequence[str]], list[str]]] = {
    "runs": runs_table, "profile": profile_table, "readback": readback_table, "bench": bench_table,
    "memory": memory_table, "solver_ratios": solver_ratios_table, "vit_candidates": vit_candidates_table,
}


def render(text: str, root: Path) -> tuple[str, list[str]]:
    """``text`` with every generated block rewritten; also the specs of the blocks that changed."""
    changed: list[str] = []

    def replace(match: re.Match) -> str:
        kind, *names = match.group("spec").split()
        if kind not in KINDS:
            raise DocsError(f"unknown generated block kind {kind!r} (known: {', '.join(KINDS)})")
        body = "\n".join(KINDS[kind](root, names)) + "\n"
        if body != match.group("body"):
            changed.append(match.group("spec"))
        return f"{match.group(1)}{body}{match.group(4)}"

    return BLOCK.sub(replace, text), changed


def documents(root: Path) -> list[Path]:
    """The files that may hold generated blocks: the README and every page under ``docs/``."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="the repository's folder")
    args = parser.parse_args(argv)
    stale = []
    try:
        for path in documents(args.root):
            text = path.read_text(encoding="utf-8")
            new, changed = render(text, args.root)
            stale += [f"{path.relative_to(args.root)}: {spec}" for spec in changed]
            if changed and not args.check:
                atomic_write_text(path, new)
    except (DocsError, ReportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in stale:
        print(("stale: " if args.check else "rewrote: ") + line)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
