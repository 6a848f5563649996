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
