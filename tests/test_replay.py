"""The real-kernel reference traces, replayed step by step on the simulator.

Every step's return value, errno, struct fields and VmLck/VmPin must match
what Linux 6.12 answered on the pseries machine the traces were recorded on.
"""

from __future__ import annotations

import pytest

import vfiosim
from tracereplay import load_trace, replay


@pytest.mark.parametrize("page_size", [4096, 65536])
def test_v1_trace_matches_every_step(page_size):
    trace = load_trace("v1.jsonl")
    result = replay(vfiosim.Machine.preset("pseries", page_size=page_size), trace)
    print(f"v1 trace, {page_size // 1024} KiB pages: {result.matched}/{result.steps} steps match")
    assert result.steps == 157
    assert not result.mismatches, "\n".join(map(str, result.mismatches))
    assert result.matched == result.steps


def test_replay_notices_a_different_kernel():
    """The comparison is real: the PowerNV machine's window differs from pseries'."""
    trace = load_trace("v1.jsonl")
    trace[0]["bdf"] = "0000:01:00.0"
    result = replay(vfiosim.Machine.default(), trace)
    assert any(m.what == "out.dma32_window_size" for m in result.mismatches)
    assert any(m.what == "VmLck kB" for m in result.mismatches)


def test_v2_trace_matches_every_step():
    trace = load_trace("v2.jsonl")
    result = replay(vfiosim.Machine.preset("pseries"), trace)
    print(f"v2 trace: {result.matched}/{result.steps} steps match ({result.skipped} recorded as skipped)")
    assert result.steps == 218
    assert not result.mismatches, "\n".join(map(str, result.mismatches))
