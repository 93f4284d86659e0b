"""The documentation's generated tables: each equals what its result files give, and staleness is caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.results import docs
from common.results.provenance import REPO_ROOT
from common.results.runs import MetricRow, write_run


def test_every_generated_table_in_the_docs_matches_its_result_files(capsys):
    code = docs.main(["--check"])
    assert code == 0, capsys.readouterr().out


def _write(root: Path, name: str, values: dict[str, float]) -> None:
    profile = {"matmul_gflops": 100.0, "stages": [
        {"stage": "quantize gptq", "seconds": 60.0, "gflop": None, "floor_seconds": None, "times_floor": None,
         "peak_rss_mb": 1000},
        {"stage": "quantize gptq: forwards", "seconds": 30.0, "gflop": 500.0, "floor_seconds": 5.0,
         "times_floor": 6.0, "peak_rss_mb": 1000}]}
    write_run(root / docs.RESULTS, name, model="embedded", setting="W4A4",
              rows=[MetricRow("wiki_ppl", higher_is_better=False, values=values)],
              settings={"methods": list(values)},
              metadata={"tree": "fake_quant", "device": "cpu (a test CPU, 2 threads)", "profile": profile})


def test_a_block_is_rewritten_from_its_files_and_a_stale_one_is_named(tmp_path: Path, capsys):
    _write(tmp_path, "run-a", {"fp": 10.0, "gptq": 12.5, "gptaq": 11.25})
    page = tmp_path / "docs" / "page.md"
    page.write_text("intro\n<!-- generated: runs run-a -->\nold\n<!-- end generated -->\n"
                    "<!-- generated: profile run-a -->\n<!-- end generated -->\nend\n", encoding="utf-8")
    (tmp_path / "README.md").write_text("no blocks\n", encoding="utf-8")
    assert docs.main(["--check", "--root", str(tmp_path)]) == 1
    assert "stale: docs/page.md: runs run-a" in capsys.readouterr().out
    assert docs.main(["--root", str(tmp_path)]) == 0
    text = page.read_text(encoding="utf-8")
    assert text.startswith("intro\n") and text.endswith("end\n")
    assert "| **11.25** |" in text and "a test CPU" in text
    assert "| quantize gptq: forwards | 30.0 | 500 | 6.00 | 1000 |" in text
    assert docs.main(["--check", "--root", str(tmp_path)]) == 0
    _write(tmp_path, "run-a", {"fp": 10.0, "gptq": 12.5, "gptaq": 11.5})  # a new result file: the page is stale
    assert docs.main(["--check", "--root", str(tmp_path)]) == 1


@pytest.mark.parametrize(("block", "message"), [
    ("<!-- generated: runs absent -->\n<!-- end generated -->\n", "absent.csv does not exist"),
    ("<!-- generated: pie run-a -->\n<!-- end generated -->\n", "unknown generated block kind 'pie'"),
])
def test_a_block_naming_a_missing_file_or_kind_is_an_error(tmp_path: Path, capsys, block, message):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(block, encoding="utf-8")
    assert docs.main(["--check", "--root", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_the_repository_documents_are_the_readme_and_the_docs_pages():
    found = docs.documents(REPO_ROOT)
    assert found[0] == REPO_ROOT / "README.md" and all(path.parent.name == "docs" for path in found[1:])


def test_solver_ratios_are_a_method_by_shape_table(tmp_path: Path):
    (tmp_path / docs.RESULTS).mkdir(parents=True)
    (tmp_path / docs.RESULTS / "bench.csv").write_text(
        "device,dtype,rows,columns,method,seconds,over_gptq\n"
        "cpu (test),float32,8,8,gptq,1.0,1.0\ncpu (test),float32,8,8,foem,1.2,1.2\n"
        "cpu (test),float32,16,8,gptq,2.0,1.0\n", encoding="utf-8")
    lines = docs.solver_ratios_table(tmp_path, ["bench"])
    assert lines[:4] == ["| method | 8 × 8 | 16 × 8 |", "| --- | ---: | ---: |", "| gptq | 1.0 | 1.0 |",
                         "| foem | 1.2 | — |"]
    assert lines[-1] == "- `bench.csv`: cpu (test), float32"


def test_long_numbers_in_bench_tables_are_cut_to_five_significant_digits():
    assert [docs._short_number(text) for text in ("90.08193951899739", "0.0433", "217.2", "-1.234567", "a.b.c",
                                                   "1e-05")] == ["90.082", "0.0433", "217.2", "-1.2346", "a.b.c",
                                                                 "1e-05"]


def test_vit_candidates_are_a_line_per_recipe_from_its_record_and_runs(tmp_path: Path):
    folder = tmp_path / docs.RESULTS / docs.CANDIDATES
    folder.mkdir(parents=True)
    recipe = {"img_size": 42, "patch_size": 7, "clutter_pieces": 4, "depth": 12, "embed_dim": 192, "epochs": 3}
    (folder / "c.json").write_text(json.dumps({"recipe": recipe, "train_seconds": 600.0, "test_top1": 80.0,
                                               "no_blocks_top1": 10.0, "linear_probe_top1": 20.0,
                                               "weight_noise_top1": {"0.4": 79.5}}))
    outcomes = {"fp": "1111", "rtn": "1100", "gptq": "1110", "gptaq": "1111"}
    for setting, drop in (("w4a4", 25.0), ("w2a4", 50.0)):
        top1 = {"fp": 100.0, "rtn": 100.0 - drop, "gptq": 75.0, "gptaq": 100.0}
        write_run(folder, f"c-{setting}", model="embedded", setting=setting.upper(),
                  rows=[MetricRow("top1", True, top1),
                        MetricRow("images_disagreeing_with_gptq", False, {"fp": 1, "rtn": 1, "gptq": 0, "gptaq": 1})],
                  settings={}, metadata={"tree": "vit_quant"},
                  per_example={setting.upper(): {m: {"top1": o} for m, o in outcomes.items()}})
    header, rule, line = docs.vit_candidates_table(tmp_path, ["c"])
    assert header.startswith("| recipe | task |") and rule.startswith("| --- | --- | --- | ---: |")
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[:12] == ["`c`", "cluttered 42² (4 pieces)", "12 × 192, patch 7", "36", "3", "10.0 min", "80.00",
                          "10.00", "20.00", "-0.50", "-25.00", "-50.00"]
    assert cells[12].startswith("+25.00 [") and cells[14:] == ["25.0", "25.0"]
