"""The numerically sensitive tests under several CPU kernel settings, and the margin of every bound they check.

``python -m common.bench.margins [--output FILE] [pytest args ...]`` runs ``pytest -m numerics`` once per
setting of :data:`SETTINGS`, one after the other (never two torch processes at once), and prints a Markdown
table: each quantity a test recorded through the ``margin`` fixture (:mod:`common.tests.margins`), its bound,
its value under each setting and the worst margin (distance to the bound, relative to the bound). The exit
status is 1 when a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

MARKER = "numerics"
"""The pytest mark of the numerically sensitive tests."""
PROPERTY = "margin"
"""The junit-XML property a test records a measured quantity and its bounds under."""

SETTINGS: dict[str, dict[str, str]] = {
    "native": {},
    "default": {"ATEN_CPU_CAPABILITY": "default"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "default, 1 thread": {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"},
}
"""Environment overrides per column (``native``: the machine's best kernels, all threads)."""

Key = tuple[str, str, float | None, float | None]


def run_setting(env: dict[str, str], extra: list[str]) -> tuple[int, dict[Key, float]]:
    """Run the marked tests with ``env`` added; returns the exit status and ``{(test, quantity, bounds): value}``."""
    with tempfile.TemporaryDirectory() as folder:
        xml_path = Path(folder) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", MARKER,
                   "-o", "junit_family=legacy", f"--junitxml={xml_path}", *extra]
        status = subprocess.run(command, env={**os.environ, **env}, check=False).returncode
        values: dict[Key, float] = {}
        if xml_path.is_file():
            for case in ElementTree.parse(xml_path).iter("testcase"):
                module = str(case.get("classname")).rpartition(".tests.")[2]
                test = f"{module}::{case.get('name')}"
                for prop in case.iter("property"):
                    if prop.get("name") == PROPERTY:
                        record = json.loads(prop.get("value", "{}"))
                        values[(test, record["quantity"], record["above"], record["below"])] = record["value"]
    return status, values


def _bound_text(above: float | None, below: float | None) -> str:
    parts = ([f"> {above:.3g}"] if above is not None else []) + ([f"< {below:.3g}"] if below is not None else [])
    return " and ".join(parts)


def _relative_margin(value: float, above: float | None, below: float | None) -> float:
    """Distance of ``value`` to its nearer bound, relative to that bound (negative: the bound is violated)."""
    margins = []
    if above is not None:
        margins.append((value - above) / abs(above) if above else value)
    if below is not None:
        margins.append((below - value) / abs(below) if below else -value)
    return min(margins)


def table(results: dict[str, dict[Key, float]]) -> str:
    """The Markdown table of every recorded quantity across the settings' columns."""
    keys = sorted(set().union(*(values.keys() for values in results.values())))
    header = ["test", "quantity", "bound", *results, "worst margin"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        test, quantity, above, below = key
        values = [results[name].get(key) for name in results]
        present = [v for v in values if v is not None]
        worst = min(_relative_margin(v, above, below) for v in present) if present else float("nan")
        cells = [f"{v:.4g}" if v is not None else "—" for v in values]
        lines.append("| " + " | ".join([test, quantity, _bound_text(above, below), *cells,
                                         f"{worst:+.0%}"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="also write the table to this file")
    args, extra = parser.parse_known_args(argv)
    results: dict[str, dict[Key, float]] = {}
    failed = []
    for name, env in SETTINGS.items():
        print(f"== {name}: {env or 'no overrides'}", flush=True)
        status, results[name] = run_setting(env, extra)
        if status != 0:
            failed.append(name)
    text = table(results)
    print(text)
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    if failed:
        print(f"failed under: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
