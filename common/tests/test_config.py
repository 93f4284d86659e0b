"""Config files: a ``base`` file's settings under the file's own, and the errors of a bad chain."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, load_yaml


def test_base_settings_are_overridden_by_the_file(tmp_path: Path) -> None:
    (tmp_path / "root.yaml").write_text("w_bits: 4\nmethods: [fp, gptq]\nname: root\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "middle.yaml").write_text("base: ../root.yaml\nw_bits: 3\n")
    (tmp_path / "leaf.yaml").write_text("base: sub/middle.yaml\nname: leaf\n")
    assert load_yaml(tmp_path / "leaf.yaml") == {"w_bits": 3, "methods": ["fp", "gptq"], "name": "leaf"}


@pytest.mark.parametrize(("files", "message"), [
    ({"a.yaml": "base: a.yaml\n"}, "makes a cycle"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "makes a cycle"),
    ({"a.yaml": "base: absent.yaml\n"}, "absent.yaml does not exist"),
    ({"a.yaml": "base: [x]\n"}, "base must name a YAML file"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "w_bits: [\n"}, "b.yaml:2:1: not valid YAML"),
    ({"a.yaml": "w_bits: 4\nseed: 1\nw_bits: 2\n"},
     r"a\.yaml:3:1: not valid YAML \('w_bits' is given twice \(first on line 1\)\)"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "rotation:\n  a: 1\n  a: 2\n"}, r"b\.yaml:3:3: .*'a' is given twice"),
])
def test_bad_base_is_a_config_error(tmp_path: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_yaml(tmp_path / "a.yaml")


def test_shipped_zero_shot_configs_extend_the_main_ones() -> None:
    root = Path(__file__).resolve().parents[2]
    for tree in ("fake_quant", "spinquant"):
        main = load_yaml(root / tree / "configs" / "embedded_w4a4.yaml")
        zero_shot = load_yaml(root / tree / "configs" / "embedded_w4a4_zeroshot.yaml")
        assert zero_shot["tasks"] == ["last_word_embedded", "cloze_embedded"]
        changed = {key for key in zero_shot if zero_shot[key] != main.get(key)}
        assert changed <= {"name", "tasks", "quarot_baseline", "model_loading"}  # zero-shot needs the whole model
