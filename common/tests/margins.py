"""Tests that compare a measured quantity with a bound record the quantity, so its margin can be read.

A pytest plugin (see the repository's ``conftest.py``). The fixture :func:`margin` asserts
``value > above`` and/or ``value < below`` and records ``(quantity, value, bounds)`` as a junit-XML property
of the test. Every test that uses it is marked ``numerics`` (the numerically sensitive tests, which CI runs
a second time with other CPU kernels and one thread); tests that compare float results with a tolerance
carry the mark by hand. ``python -m common.bench.margins`` runs them under several kernel settings and
prints each recorded quantity beside its bound.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest

from common.bench.margins import MARKER, PROPERTY

Margin = Callable[..., None]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}: numerically sensitive (CI reruns these with ATEN_CPU_CAPABILITY=default, 1 thread)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROPERTY in getattr(item, "fixturenames", ()):
            item.add_marker(MARKER)


@pytest.fixture
def margin(record_property: Callable[[str, object], None]) -> Margin:
    """``margin(quantity, value, above=..., below=...)``: assert the bound(s) and record the value."""

    def check(quantity: str, value: float, *, above: float | None = None, below: float | None = None) -> None:
        if above is None and below is None:
            raise ValueError("margin needs a bound: above=... and/or below=...")
        value = float(value)
        record_property(PROPERTY, json.dumps({"quantity": quantity, "value": value, "above": above, "below": below}))
        assert math.isfinite(value), f"{quantity}: {value} is not finite"
        if above is not None:
            assert value > above, f"{quantity}: {value:.6g} is not above {above:.6g}"
        if below is not None:
            assert value < below, f"{quantity}: {value:.6g} is not below {below:.6g}"

    return check
