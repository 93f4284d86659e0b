"""The cross-tree comparison report on small CSV/JSON fixtures written in a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.results import report as report_module
from common.results.report import ReportError, main, write_report
from common.results.runs import MetricRow, write_run
from common.results.style import png_writer as real_png_writer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMMIT = "7aa080d" + "0" * 33
SETTINGS = {"seed": 0, "nsamples": 32, "seqlen": 512, "w_bits": 4, "a_bits": 4, "methods": ["fp", "gptq", "gptaq"]}


def write_csv(path: Path, lines: list[str]) -> Path:
    """``lines`` (already comma-joined) as the file's content."""
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_result(
    folder: Path,
    name: str,
    rows: list[tuple[str, bool, dict[str, float]]],
    *,
    model: str = "embedded",
    setting: str = "W4A4",
    settings: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    json_sidecar: bool = True,
) -> None:
    """A run in the writer's layout: fixed columns, methods present in ``rows``, then ``model`` + settings."""
    settings = {"model": model, **(settings if settings is not None else SETTINGS)}
    methods = [m for m in ("fp", "rtn", "gptq", "gptaq", "gptaq_official") if any(m in v for _, _, v in rows)]
    columns = [str(v) if not isinstance(v, list) else "+".join(v) for v in settings.values()]
    lines = [",".join(["model", "setting", "metric", "higher_is_better", *methods, *settings])]
    for metric, higher, values in rows:
        cells = [model, setting, metric, str(higher), *(f"{values[m]:.6g}" if m in values else "" for m in methods)]
        lines.append(",".join([*cells, *columns]))
    write_csv(folder / f"{name}.csv", lines)
    if json_sidecar:
        payload = {
            "name": name, "model": model, "setting": setting, "settings": settings, "git_commit": COMMIT,
            "versions": {"python": "3.11.2", "torch": "2.5.1"}, "tree": name.split("-")[0], "seed": 0,
            "device": "cpu (test)", "seconds": {"data": 1.25, "quantize gptq": 10.0}, "layers": {},
            "data_sha256": {"wiki_embedded": "ab" * 32}, **(meta or {}),
        }
        (folder / f"{name}.json").write_text(json.dumps(payload, indent=2, sort_keys=True), encoding="utf-8")


def table_line(report: str, *cells: str) -> str:
    """The one table line of ``report`` that starts with ``cells``."""
    prefix = "| " + " | ".join(cells) + " |"
    matches = [line for line in report.splitlines() if line.startswith(prefix)]
    assert len(matches) == 1, (prefix, report)
    return matches[0]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip("|").split("|")]


def section(report: str, tree: str) -> str:
    """The text of ``## tree`` up to the next ``## `` heading."""
    return report.split(f"## {tree}\n", 1)[1].split("\n## ", 1)[0]


def report_of(folder: Path) -> str:
    output, _ = write_report(folder)
    return output.read_text(encoding="utf-8")


def test_values_bolding_and_difference_for_both_metric_directions(tmp_path: Path) -> None:
    write_result(tmp_path, "fake_quant-a", [
        ("wiki_embedded_ppl", False, {"fp": 17.4017, "rtn": 77.1721, "gptq": 35.2755, "gptaq": 42.4995}),
        ("piqa_acc", True, {"fp": 0.71, "rtn": 0.55, "gptq": 0.61, "gptaq": 0.63}),
    ])
    write_result(tmp_path, "vit_quant-deit", [("top1", True, {"fp": 79.8, "gptq": 72.5, "gptaq": 70.25})],
                 model="deit_s")
    report = report_of(tmp_path)
    header = "| Model | Setting | Metric | FP | RTN | GPTQ | GPTAQ | GPTAQ − GPTQ | Run |"
    assert header in section(report, "fake_quant") and header in section(report, "vit_quant")
    ppl = cells(table_line(report, "embedded", "W4A4", "wiki_embedded_ppl ↓"))
    assert ppl[3:9] == ["17.40", "77.17", "**35.28**", "42.50", "+7.22", "`fake_quant-a`"]
    acc = cells(table_line(report, "embedded", "W4A4", "piqa_acc ↑"))
    assert acc[5:8] == ["0.6100", "**0.6300**", "+0.0200"]
    top1 = cells(table_line(report, "deit_s", "W4A4", "top1 ↑"))
    assert top1[3:8] == ["79.80", "—", "**72.50**", "70.25", "-2.25"]
    assert "top1" in section(report, "vit_quant") and "top1" not in section(report, "fake_quant")
    assert "No results for this tree." in section(report, "spinquant")
    assert "⚠" not in section(report, "fake_quant")


def test_missing_method_columns_and_official_column(tmp_path: Path) -> None:
    write_result(tmp_path, "fake_quant-a", [("wiki_embedded_ppl", False, {"gptq": 30.0})])
    write_result(tmp_path, "fake_quant-b", [("wiki_embedded_ppl", False, {"gptq": 20.0, "gptaq": 19.0,
                                                                             "gptaq_official": 19.5})],
                 setting="W2A4")
    report = report_of(tmp_path)
    assert "| GPTQ | GPTAQ | GPTAQ (official) | GPTAQ − GPTQ | GPTAQ (official) − GPTQ | Run |" in report
    only_gptq = cells(table_line(report, "embedded", "W4A4", "wiki_embedded_ppl ↓"))
    assert only_gptq[3:11] == ["—", "—", "30.00", "—", "—", "—", "—", "`fake_quant-a`"]
    official = cells(table_line(report, "embedded", "W2A4", "wiki_embedded_ppl ↓"))
    assert official[5:10] == ["20.00", "**19.00**", "19.50", "-1.00", "-0.50"]


def test_mismatched_configuration_is_flagged_and_same_configuration_is_not(tmp_path: Path) -> None:
    rows = [("wiki_embedded_ppl", False, {"gptq": 30.0, "gptaq": 29.0})]
    write_result(tmp_path, "fake_quant-a", rows)
    write_result(tmp_path, "fake_quant-b", rows, settings={**SETTINGS, "seed": 1},
                 meta={"git_commit": "1" * 40, "data_sha256": {"wiki_embedded": "cd" * 32}})
    write_result(tmp_path, "fake_quant-c", rows, setting="W2A4")
    # Bookkeeping settings (run name, batch sizes, methods) do not make a configuration differ.
    write_result(tmp_path, "fake_quant-d", rows, setting="W2A4",
                 settings={**SETTINGS, "eval_batch_size": 8, "methods": ["gptq", "gptaq"]})
    report = report_of(tmp_path)
    for run in ("fake_quant-a", "fake_quant-b"):
        assert f"| embedded | W4A4 | wiki_embedded_ppl ↓ | — | — | 30.00 | **29.00** | -1.00 | `{run}` ⚠1 |" in report
    for run in ("fake_quant-c", "fake_quant-d"):
        assert f"`{run}` |" in report
    note = next(line for line in report.splitlines() if line.startswith("- ⚠1:"))
    assert "model `embedded`, setting `W4A4`" in note
    assert "seed (`fake_quant-a`: 0; `fake_quant-b`: 1)" in note
    assert "git_commit (`fake_quant-a`: 7aa080d00000…; `fake_quant-b`: 111111111111…)" in note
    assert "data_sha256[wiki_embedded]" in note
    assert "nsamples" not in note and "eval_batch_size" not in report.split("### Runs")[0]
    assert "- ⚠2" not in report


def test_missing_json_is_reported_with_a_note_and_tree_from_the_file_name(tmp_path: Path) -> None:
    write_result(tmp_path, "vit_quant-deit", [("top1", True, {"gptq": 70.0, "gptaq": 71.0})], json_sidecar=False)
    write_result(tmp_path, "vit_quant-eva", [("top1", True, {"gptq": 80.0, "gptaq": 81.0})], model="eva")
    report = report_of(tmp_path)
    vit = section(report, "vit_quant")
    assert "`vit_quant-deit` ⚠1 |" in vit and "`vit_quant-eva` |" in vit
    assert "- ⚠1: run `vit_quant-deit`: no sidecar JSON" in vit
    assert "- Files: `vit_quant-deit.csv` (no JSON)" in vit
    assert "- Wall time: data 1.2 s, quantize gptq 10.0 s; total 11.2 s" in vit


def test_benchmark_tables_beside_the_runs_are_not_runs(tmp_path: Path) -> None:
    write_csv(tmp_path / "bench_solver.csv", ["device,rows,columns,method,seconds", "cpu,576,576,gptq,0.1"])
    write_csv(tmp_path / "bench_gptqmodel.csv", ["method,implementation,quantize_seconds", "gptq,ours,65.7"])
    write_csv(tmp_path / "bench_official.csv", ["rows,columns,method,official_seconds", "576,576,gptq,0.03"])
    write_result(tmp_path, "vit_quant-deit", [("top1", True, {"gptq": 70.0, "gptaq": 71.0})])
    report = report_of(tmp_path)
    assert "`vit_quant-deit` |" in section(report, "vit_quant")
    assert "bench_solver" not in report and "bench_gptqmodel" not in report and "bench_official" not in report


def test_duplicated_header_names_take_the_first_occurrence(tmp_path: Path) -> None:
    write_csv(tmp_path / "spinquant-x.csv", [
        "model,setting,metric,higher_is_better,gptq,gptaq,model,setting,seed",
        "llama,W4A4,wiki_ppl,False,10.5,9.5,other-model,other-setting,0",
    ])
    report = report_of(tmp_path)
    line = cells(table_line(report, "llama", "W4A4", "wiki_ppl ↓"))
    assert line[5:8] == ["10.50", "**9.50**", "-1.00"]
    assert "model `other-model`" in section(report, "spinquant")


def test_writer_round_trip_has_no_notes(tmp_path: Path) -> None:
    rows = [MetricRow("wiki_embedded_ppl", False, {"fp": 17.4, "rtn": 77.2, "gptq": 35.3, "gptaq": 42.5})]
    write_run(tmp_path, "fake_quant-smoke", model="embedded", setting="W4A4", rows=rows,
              settings={"model": "embedded", "seed": 0, "eval_datasets": ["wiki_embedded"], "eval_max_windows": None},
              metadata={"tree": "fake_quant", "seed": 0, "device": "cpu", "seconds": {"data": 1.0}})
    report = report_of(tmp_path)
    assert "⚠" not in section(report, "fake_quant")
    assert cells(table_line(report, "embedded", "W4A4", "wiki_embedded_ppl ↓"))[3:8] == [
        "17.40", "77.20", "**35.30**", "42.50", "+7.20"]


@pytest.mark.parametrize(("lines", "line_number", "message"), [
    (["model,setting,metric,gptq", "m,s,x,1"], 1, r"missing column\(s\) higher_is_better"),
    (["model,setting,metric,higher_is_better,gptq", "m,s,x,False,1", "m,s,y,False,1,2"], 3, "6 fields"),
    (["model,setting,metric,higher_is_better,gptq", "m,s,x,False,abc"], 2, "column 'gptq'"),
    (["model,setting,metric,higher_is_better,gptq", "m,s,x,maybe,1"], 2, "higher_is_better"),
    ([""], 1, "no header row"),
])
def test_malformed_csv_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           lines: list[str], line_number: int, message: str) -> None:
    path = write_csv(tmp_path / "fake_quant-bad.csv", lines)
    with pytest.raises(ReportError, match=message) as error:
        write_report(tmp_path)
    assert str(error.value).startswith(f"{path}:{line_number}: ")
    assert main(["--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and f"{path}:{line_number}" in err
    assert not (tmp_path / "REPORT.md").exists()


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    write_result(tmp_path, "fake_quant-a", [("wiki_embedded_ppl", False, {"gptq": 1.0})])
    (tmp_path / "fake_quant-a.json").write_text('{\n  "name": "fake_quant-a",\n  oops\n}\n')
    with pytest.raises(ReportError, match=r"fake_quant-a\.json:3: invalid JSON"):
        write_report(tmp_path)


def test_empty_or_missing_results_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--results-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: no result files (*.csv) in {tmp_path} (run an experiment first)\n"
    assert main(["--results-dir", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_writes_are_atomic_and_replace_the_old_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_result(tmp_path, "fake_quant-a", [("wiki_embedded_ppl", False, {"fp": 10.0, "gptq": 12.0, "gptaq": 11.0})])
    old = "stale report line\n" * 10_000
    (tmp_path / "REPORT.md").write_text(old)
    assert main(["--results-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'REPORT.md'}")
    report = (tmp_path / "REPORT.md").read_text()
    assert "stale" not in report and report.startswith("# Error-correcting quantization methods")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "REPORT.md", "fake_quant-a.csv", "fake_quant-a.json", "report_fake_quant.png"]


def test_png_per_tree_is_valid_and_linked(tmp_path: Path) -> None:
    write_result(tmp_path, "fake_quant-a", [
        ("wiki_embedded_ppl", False, {"fp": 17.0, "gptq": 3000.0, "gptaq": 1200.0}),
        ("piqa_acc", True, {"gptq": 0.6, "gptaq": 0.7}),
    ])
    write_result(tmp_path, "vit_quant-deit", [("top1", True, {"fp": 80.0, "gptq": 70.0, "gptaq": 72.0})])
    output = tmp_path / "out" / "summary.md"
    _, figures = write_report(tmp_path, output)
    assert [p.name for p in figures] == ["report_fake_quant.png", "report_vit_quant.png"]
    for figure in figures:
        assert figure.parent == output.parent and figure.read_bytes()[:8] == PNG_SIGNATURE
    report = output.read_text()
    assert "![fake_quant: every method against GPTQ](report_fake_quant.png)" in report
    assert "![vit_quant: every method against GPTQ](report_vit_quant.png)" in report
    assert not (tmp_path / "out" / "report_spinquant.png").exists()


def test_same_inputs_give_byte_identical_report(tmp_path: Path) -> None:
    write_result(tmp_path, "fake_quant-b", [("wiki_embedded_ppl", False, {"gptq": 30.0, "gptaq": 29.0})],
                 settings={**SETTINGS, "seed": 3})
    write_result(tmp_path, "fake_quant-a", [("wiki_embedded_ppl", False, {"gptq": 31.0, "gptaq": 28.0})])
    write_result(tmp_path, "vit_quant-x", [("top1", True, {"gptq": 70.0, "gptaq": 71.0})], json_sidecar=False)
    output, _ = write_report(tmp_path)
    first = output.read_bytes()
    write_report(tmp_path)
    assert output.read_bytes() == first
    rows = [line for line in first.decode().splitlines() if line.startswith("| embedded |")]
    assert ["`fake_quant-a`" in rows[0], "`fake_quant-b`" in rows[1]] == [True, True]


def test_tree_from_json_overrides_the_file_name_and_unknown_trees_get_a_section(tmp_path: Path) -> None:
    write_result(tmp_path, "custom-run", [("wiki_ppl", False, {"gptq": 5.0, "gptaq": 4.0})],
                 meta={"tree": "spinquant"})
    write_result(tmp_path, "adhoc-run", [("wiki_ppl", False, {"gptq": 6.0, "gptaq": 7.0})], json_sidecar=False)
    report = report_of(tmp_path)
    assert "`custom-run` |" in section(report, "spinquant")
    assert report.index("## vit_quant") < report.index("## other") and "`adhoc-run` ⚠1 |" in section(report, "other")


def _ablation(folder: Path, name: str, alpha: float, values: dict[str, float], **settings: Any) -> None:
    write_result(folder, name, [("wiki_embedded_ppl", False, values)],
                 settings={**SETTINGS, "alpha": alpha, "lazy_update": "exact", **settings})


def test_ablation_sections_alpha_sweep_and_lazy_update(tmp_path: Path) -> None:
    write_result(tmp_path, "fake_quant-main", [("wiki_embedded_ppl", False, {"gptq": 30.0, "gptaq": 29.0})])
    ablations = tmp_path / "ablations"
    ablations.mkdir()
    _ablation(ablations, "ablation-lazy-update", 0.25, {"gptq": 30.0, "gptaq": 29.0, "gptaq_official": 29.4})
    _ablation(ablations, "ablation-alpha-0", 0.0, {"gptaq": 29.8})
    _ablation(ablations, "ablation-alpha-1", 1.0, {"gptaq": 31.5})
    output, figures = write_report(tmp_path)
    report = output.read_text(encoding="utf-8")
    ablation = report.split("## Ablations\n", 1)[1]
    assert "(GPTQ: 30.00)" in ablation
    assert cells(table_line(ablation, "0"))[1:3] == ["29.80", "-0.20"]
    assert cells(table_line(ablation, "0.25"))[1:4] == ["**29.00**", "-1.00", "`ablation-lazy-update`"]
    assert cells(table_line(ablation, "1"))[1:3] == ["31.50", "+1.50"]
    lazy = cells(table_line(ablation, "embedded", "W4A4", "wiki_embedded_ppl ↓", "0.25"))
    assert lazy[4:7] == ["29.00", "29.40", "+0.40"]
    assert "⚠" not in ablation
    assert (tmp_path / "report_ablation_alpha.png").read_bytes().startswith(PNG_SIGNATURE)
    assert tmp_path / "report_ablation_alpha.png" in figures
    assert "![GPTAQ against α](report_ablation_alpha.png)" in ablation
    assert "ablation-alpha" not in section(report, "fake_quant")  # ablation runs stay out of the main tables


def test_ablation_runs_differing_in_more_than_alpha_are_flagged(tmp_path: Path) -> None:
    write_result(tmp_path, "fake_quant-main", [("wiki_embedded_ppl", False, {"gptq": 30.0})])
    (tmp_path / "ablations").mkdir()
    _ablation(tmp_path / "ablations", "ablation-alpha-0", 0.0, {"gptaq": 29.8})
    _ablation(tmp_path / "ablations", "ablation-alpha-1", 1.0, {"gptaq": 31.5}, nsamples=64)
    report = report_of(tmp_path)
    assert "the ablation runs differ in more than α" in report and "nsamples" in report
    assert "No ablation run computed both forms" in report


def test_ablation_run_without_alpha_names_the_file_and_writes_nothing(tmp_path: Path) -> None:
    write_result(tmp_path, "fake_quant-main", [("wiki_embedded_ppl", False, {"gptq": 30.0})])
    (tmp_path / "ablations").mkdir()
    write_result(tmp_path / "ablations", "ablation-x", [("wiki_embedded_ppl", False, {"gptaq": 29.0})])
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ReportError, match=r"ablation-x\.csv \(an ablation run\): its alpha setting must be a number"):
        write_report(tmp_path)
    assert sorted(tmp_path.rglob("*")) == before  # not the main tree's figure either


EDITED_SIDECARS = [  # (key, hand-edited value, what the message says it must be)
    ("seconds", {"total": "n/a"}, "'seconds' must be an object of stage names to numbers of seconds"),
    ("seconds", {"data": True}, "'seconds' must be an object of stage names to numbers of seconds"),
    ("seconds", [1.0, 2.0], "'seconds' must be an object"),
    ("settings", "w_bits=4", "'settings' must be an object of settings"),
    ("versions", ["torch 2.5"], "'versions' must be an object of package versions"),
    ("data_sha256", "abc", "'data_sha256' must be an object of data hashes"),
    ("per_example", {"W4A4": {"gptq": [1.0, 2.0]}}, "'per_example' must be an object setting → method → metric"),
    ("per_example", {"W4A4": "none"}, "'per_example' must be an object"),
    ("tree", 3, "'tree' must be a string"),
    ("name", ["fake_quant-a"], "'name' must be a string"),
]


@pytest.mark.parametrize(("key", "value", "message"), EDITED_SIDECARS, ids=lambda v: str(v)[:20])
def test_a_hand_edited_sidecar_is_an_error_naming_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               key: str, value: Any, message: str) -> None:
    write_result(tmp_path, "fake_quant-a", [("wiki_embedded_ppl", False, {"gptq": 12.0, "gptaq": 11.0})])
    path = tmp_path / "fake_quant-a.json"
    meta = json.loads(path.read_text())
    meta[key] = value
    path.write_text(json.dumps(meta))
    before = sorted(tmp_path.iterdir())
    assert main(["--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and message in err and err.count("\n") == 1
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("output", ["a_folder", "a_file/sub/REPORT.md"])
def test_an_output_that_cannot_be_written_is_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], output: str) -> None:
    write_result(tmp_path, "fake_quant-a", [("wiki_embedded_ppl", False, {"gptq": 12.0, "gptaq": 11.0})])
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("")
    before = sorted(tmp_path.rglob("*"))
    assert main(["--results-dir", str(tmp_path), "--output", str(tmp_path / output)]) == 2
    assert capsys.readouterr().err.startswith("error: --output: ")
    assert sorted(tmp_path.rglob("*")) == before


def test_a_failing_write_leaves_neither_report_nor_figures(tmp_path: Path, monkeypatch) -> None:
    """The report and its figures are one set: a figure that cannot be written leaves none of them."""
    write_result(tmp_path, "fake_quant-a", [("wiki_embedded_ppl", False, {"gptq": 12.0, "gptaq": 11.0})])
    write_result(tmp_path, "vit_quant-b", [("top1", True, {"gptq": 70.0, "gptaq": 71.0})])
    before = sorted(tmp_path.iterdir())

    def failing(fig):
        return lambda path: (_ for _ in ()).throw(OSError(28, "No space left on device"))

    monkeypatch.setattr(report_module, "png_writer", lambda fig: failing(fig) if "vit" in fig.get_suptitle()
                        else real_png_writer(fig))
    with pytest.raises(ReportError, match=r"--output: cannot write .* \(No space left on device\); nothing was"):
        write_report(tmp_path)
    assert sorted(tmp_path.iterdir()) == before


def test_standard_errors_show_beside_their_values_not_as_rows(tmp_path: Path) -> None:
    write_result(tmp_path, "fake_quant-zs", [
        ("cloze_embedded_acc", True, {"fp": 80.1, "gptq": 70.2, "gptaq": 72.3}),
        ("cloze_embedded_acc_stderr", False, {"fp": 1.26, "gptq": 1.45, "gptaq": 1.42}),
        ("last_word_embedded_acc", True, {"fp": 30.0, "gptq": 20.0}),
    ])
    report = report_of(tmp_path)
    cloze = cells(table_line(report, "embedded", "W4A4", "cloze_embedded_acc ↑"))
    assert cloze[3:8] == ["80.10 ± 1.26", "—", "70.20 ± 1.45", "**72.30** ± 1.42", "+2.10"]
    last_word = cells(table_line(report, "embedded", "W4A4", "last_word_embedded_acc ↑"))
    assert last_word[3:6] == ["30.00", "—", "20.00"]  # one quantized value: nothing to bold
    assert "_stderr" not in section(report, "fake_quant")


def test_paired_intervals_mark_significant_differences_only(tmp_path: Path) -> None:
    gptq = "1" * 700 + "0" * 300
    per_example = {"W4A4": {
        "gptq": {"top1": gptq, "wiki_embedded_ppl": [3.0, 3.2, 3.1, 2.9]},
        "gptaq": {"top1": "1" * 702 + "0" * 298, "wiki_embedded_ppl": [2.9, 3.1, 3.0, 2.8]},  # 2 images: noise
        "fp": {"top1": "1" * 900 + "0" * 100},  # 200 more images right: significant
    }}
    write_result(tmp_path, "vit_quant-a", [("top1", True, {"fp": 90.0, "gptq": 70.0, "gptaq": 70.2}),
                                           ("wiki_embedded_ppl", False, {"gptq": 21.1153, "gptaq": 19.106})],
                 meta={"per_example": per_example})
    report = report_of(tmp_path)
    top1 = cells(table_line(report, "embedded", "W4A4", "top1 ↑"))
    difference = top1[-2]
    assert difference.startswith("+0.20 [") and not difference.endswith("\\*")
    low, high = (float(v) for v in difference.removeprefix("+0.20 [").removesuffix("]").split(", "))
    assert low <= 0 < high  # two discordant images, both for GPTAQ: McNemar p = 0.5
    ppl = cells(table_line(report, "embedded", "W4A4", "wiki_embedded_ppl ↓"))
    assert ppl[-2].startswith("-2.01 (×0.905 [0.905, 0.905])") and ppl[-2].endswith("\\*")
    assert "significant" in report and "⚠" not in section(report, "vit_quant")


def test_per_example_data_that_do_not_reproduce_the_value_get_a_note_not_an_interval(tmp_path: Path) -> None:
    per_example = {"W4A4": {"gptq": {"top1": "1100", "wiki_embedded_ppl": [1500.0, 1600.0]},  # sums, not means
                            "gptaq": {"top1": "1110", "wiki_embedded_ppl": [1400.0, 1500.0]}}}
    write_result(tmp_path, "fake_quant-a", [("top1", True, {"gptq": 50.0, "gptaq": 75.0}),
                                            ("wiki_embedded_ppl", False, {"gptq": 21.0, "gptaq": 19.0})],
                 meta={"per_example": per_example})
    report = report_of(tmp_path)
    ppl = cells(table_line(report, "embedded", "W4A4", "wiki_embedded_ppl ↓"))
    assert ppl[-2:] == ["-2.00", "`fake_quant-a` ⚠1"]  # no interval, and the note
    assert "+25.00 [" in table_line(report, "embedded", "W4A4", "top1 ↑")
    note = next(line for line in report.splitlines() if line.startswith("- ⚠1:"))
    assert "do not reproduce the table's value of" in note
    assert "W4A4/gptq/wiki_embedded_ppl" in note and "W4A4/gptaq/wiki_embedded_ppl" in note and "top1" not in note


def test_interval_rows_are_written_and_hidden_from_the_table(tmp_path: Path) -> None:
    per_example = {"W4A4": {"gptq": {"top1": "1100"}, "gptaq": {"top1": "1110"}}}
    write_run(tmp_path, "vit_quant-b", model="m", setting="W4A4",
              rows=[MetricRow("top1", True, {"gptq": 50.0, "gptaq": 75.0})], settings={}, metadata={},
              per_example=per_example)
    text = (tmp_path / "vit_quant-b.csv").read_text()
    for bound in ("low", "high", "p"):
        assert f"top1_vs_gptq_{bound}" in text
    report = report_of(tmp_path)
    assert "top1_vs_gptq" not in report and "+25.00 [" in report


def test_interval_rows_of_ablation_runs_are_not_ablations(tmp_path: Path) -> None:
    write_result(tmp_path, "fake_quant-main", [("wiki_embedded_ppl", False, {"gptq": 30.0, "gptaq": 29.0})])
    ablations = tmp_path / "ablations"
    ablations.mkdir()
    write_result(ablations, "ablation-alpha-1", [
        ("wiki_embedded_ppl", False, {"gptq": 30.0, "gptaq": 31.5}),
        ("wiki_embedded_ppl_vs_gptq_low", False, {"gptaq": 1.01}),
        ("wiki_embedded_ppl_stderr", False, {"gptaq": 0.1}),
    ], settings={**SETTINGS, "alpha": 1.0})
    ablation = report_of(tmp_path).split("## Ablations\n", 1)[1]
    assert "_vs_gptq" not in ablation and "_stderr" not in ablation


def test_a_run_table_shows_means_with_intervals_and_counts_as_plain_integers(tmp_path: Path) -> None:
    nll = {"fp": [0.5, 0.25, 1.0, 0.75], "gptq": [0.75, 0.5, 1.25, 1.0], "gptaq": [0.5, 0.5, 1.0, 1.0]}
    csv_path, _ = write_run(
        tmp_path, "vit", model="embedded", setting="W4A4", settings={}, metadata={"tree": "vit_quant"},
        rows=[MetricRow("test_nll", False, {m: sum(v) / 4 for m, v in nll.items()}),
              MetricRow("images_disagreeing_with_gptq", False, {"fp": 3, "gptq": 0, "gptaq": 2})],
        per_example={"W4A4": {m: {"test_nll": v} for m, v in nll.items()}})
    lines = {line.split(" | ")[2]: line for line in report_module.run_table_markdown(csv_path).splitlines()[2:]}
    assert lines["test_nll ↓"].startswith(
        "| embedded | W4A4 | test_nll ↓ | 0.6250 | — | 0.8750 | **0.7500** | -0.1250 [")
    assert lines["images_disagreeing_with_gptq"].startswith(
        "| embedded | W4A4 | images_disagreeing_with_gptq | 3 | — | 0 | 2 | — |")
