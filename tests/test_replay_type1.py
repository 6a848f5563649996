"""The real-kernel Type1v2 reference trace, replayed step by step on the x86 preset.

Every step's return value, errno, struct fields (the GET_INFO capability
chain and the dirty bitmaps included) and VmLck/VmPin must match what Linux
6.12 answered on QEMU's q35 machine with an emulated Intel VT-d IOMMU.
"""

from __future__ import annotations

from importlib import resources

import vfiosim
from tracereplay import load_trace, replay


def test_type1v2_x86_trace_matches_every_step():
    trace = load_trace("type1v2-x86.jsonl")
    result = replay(vfiosim.Machine.preset("x86"), trace)
    print(f"type1v2-x86 trace: {result.matched}/{result.steps} steps match")
    assert result.steps == 226
    assert not result.mismatches, "\n".join(map(str, result.mismatches))
    assert result.matched == result.steps


def test_replay_notices_a_different_iommu():
    """The comparison is real: a unit with another address width and no
    reserved MSI window answers GET_INFO and MAP_DMA differently."""
    trace = load_trace("type1v2-x86.jsonl")
    toml = resources.files("vfiosim.presets").joinpath("x86.toml").read_text()
    toml = toml.replace("address_width = 39", "address_width = 48")
    result = replay(vfiosim.Machine.from_toml(toml), trace)
    assert any(m.what == "out.caps" for m in result.mismatches)
    assert any(m.case == "map_beyond_aw39" for m in result.mismatches)
