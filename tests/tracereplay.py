"""The real-kernel reference traces (tests/data/reference_traces), for the tests.

Replaying them is vfiosim's own `vfiosim replay` (vfiosim.tracing.replay): a
reference trace is converted to the format of record on the fly
(vfiosim.tracing.convert says how its program's conventions map), and every
step's return value, errno, struct fields and VmLck/VmPin are compared with
what the simulator answers.  This module only loads the steps (some tests
change them first) and hands them over.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import vfiosim
from vfiosim.tracing.convert import reference_header, reference_records
from vfiosim.tracing.ioctls import type1_info_fields  # noqa: F401  (test_run_reference decodes GET_INFO)
from vfiosim.tracing.replay import ReplayResult, replay as replay_trace

TRACES = Path(__file__).parent / "data" / "reference_traces"


def load_trace(name: str) -> list[dict[str, Any]]:
    with open(TRACES / name) as f:
        return [json.loads(line) for line in f if line.strip()]


class Steps:
    """Reference steps (a list, perhaps edited by a test) as a trace of record."""

    def __init__(self, steps: list[dict[str, Any]]) -> None:
        assert steps[0]["op"] == "meta"
        self.header = reference_header(steps[0])
        self.steps = steps
        self.size = self.bytes_read = 0

    def __iter__(self):
        return reference_records(self.header, iter(self.steps[1:]))


def replay(machine: vfiosim.Machine, trace: list[dict[str, Any]]) -> ReplayResult:
    return replay_trace(machine, Steps(trace))
