"""Shared test setup: every machine a test builds must end without internal errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import vfiosim  # noqa: E402
from vfiosim.machine import Machine  # noqa: E402

_machines: list[Machine] = []
_original_init = Machine.__init__


def _recording_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
    _original_init(self, *args, **kwargs)
    _machines.append(self)


def pytest_collection_modifyitems(config, items):
    """The guest recordings (marker qemu_record, about two minutes) run only when asked
    for by name: `python3 -m pytest -m qemu_record` (docs/conformance.md).  Every run
    replays the traces they recorded (tests/test_conformance.py)."""
    if "qemu_record" in (config.getoption("markexpr", "") or ""):
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("qemu_record") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def no_internal_errors():
    """A simulated program must never hit a vfiosim bug (machine.oopses)."""
    Machine.__init__ = _recording_init  # type: ignore[method-assign]
    _machines.clear()
    yield
    Machine.__init__ = _original_init  # type: ignore[method-assign]
    oopses = [o for m in _machines for o in m.oopses]
    _machines.clear()
    assert not oopses, "vfiosim internal errors:\n" + "\n".join(oopses)


@pytest.fixture
def powernv() -> Machine:
    return vfiosim.Machine.default()


@pytest.fixture
def pseries() -> Machine:
    return vfiosim.Machine.preset("pseries")
