"""The side-by-side benchmark refuses folders that do not hold the official code, before any work."""

from pathlib import Path

from common.bench.official import main


def test_a_folder_without_the_official_code_is_named(tmp_path: Path, capsys) -> None:
    output = tmp_path / "bench_official.csv"
    assert main(["--gptq-repo", str(tmp_path), "--gptaq-repo", str(tmp_path), "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path} has no gptq.py" in error and "checkout of the official code" in error
    assert not output.exists()
