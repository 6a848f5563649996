"""A C program walks the real-kernel reference traces under `vfiosim run`.

src/vfiosim/qemu/guest/reference_walker.c performs each step of tests/data/reference_traces
as the recording program did, through the preload shim, and prints the
return value, errno, struct fields and its own VmLck/VmPin from
/proc/self/status.  Every answer must be the one Linux gave.
"""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest

import vfiosim
from runutil import ThreadedDaemon, cc
from tracereplay import load_trace, type1_info_fields
from vfiosim.qemu.record import GUEST_DIR, walker_input


def compare(trace: list[dict[str, Any]], output: str) -> tuple[int, list[str]]:
    got: dict[int, dict[str, Any]] = {}
    for line in output.splitlines():
        parts = line.split()
        assert parts[1] != "UNKNOWN", line
        seq, ret, err, lck, pin = (int(x) for x in parts[:5])
        fields = dict(p.split("=", 1) for p in parts[5:])
        out: dict[str, Any] = {}
        for key, value in fields.items():
            if key == "info":                    # the GET_INFO buffer and its capability chain
                out.update(type1_info_fields(bytes.fromhex(value)))
            elif key == "bitmap":                # a dirty bitmap's 64-bit words
                raw = bytes.fromhex(value)
                words = struct.unpack(f"<{len(raw) // 8}Q", raw)
                out["dirty_pages"] = sum(bin(w).count("1") for w in words)
                out["bitmap_head"] = [hex(w) for w in words]
            else:
                out[key] = int(value)
        got[seq] = {"ret": ret, "errno": err, "vmlck": lck, "vmpin": pin, "out": out}
    matched, bad = 0, []
    steps = [s for s in trace[1:] if "seq" in s]
    for step in steps:
        g = got.get(step["seq"])
        if g is None:
            bad.append(f"step {step['seq']} {step['case']}: no answer")
            continue
        problems = []
        if step["ret"] == -1:
            if g["ret"] != -1 or g["errno"] != step["errno"]:
                problems.append(f"result: expected -1 {errno.errorcode.get(step['errno'])}, got {g['ret']} "
                                f"{errno.errorcode.get(g['errno'], g['errno'])}")
        elif g["ret"] != step["ret"]:
            problems.append(f"ret: expected {step['ret']}, got {g['ret']} {errno.errorcode.get(g['errno'], '')}")
        for key, value in (step.get("out") or {}).items():
            if g["out"].get(key) != value:
                problems.append(f"out.{key}: expected {value}, got {g['out'].get(key)}")
        if g["vmlck"] != step["vmlck_kb"]:
            problems.append(f"VmLck: expected {step['vmlck_kb']} kB, got {g['vmlck']}")
        if g["vmpin"] != step["vmpin_kb"]:
            problems.append(f"VmPin: expected {step['vmpin_kb']} kB, got {g['vmpin']}")
        if problems:
            bad.append(f"step {step['seq']} {step['case']}: " + "; ".join(problems))
        else:
            matched += 1
    return matched, bad


@pytest.fixture(scope="module")
def walker(tmp_path_factory):
    return cc(GUEST_DIR / "reference_walker.c", tmp_path_factory.mktemp("walker"))


@pytest.mark.parametrize("name, machine, steps", [("v1.jsonl", "pseries", 157), ("v2.jsonl", "pseries", 218),
                                                   ("type1v2-x86.jsonl", "x86", 226)])
def test_c_program_under_vfiosim_run_answers_as_the_kernel_did(walker, tmp_path, name, machine, steps):
    trace = load_trace(name)
    m = vfiosim.Machine.preset(machine)
    d = ThreadedDaemon(m, tmp_path)
    try:
        proc = d.run([str(walker)], input=walker_input(trace), timeout=120)
        assert proc.returncode == 0, proc.stderr
        matched, bad = compare(trace, proc.stdout)
        print(f"{name} under vfiosim run: {matched}/{steps} steps answer as Linux did")
        assert not bad, "\n".join(bad)
        assert matched == steps
        assert d.wait_idle()
        assert m.pinned_pages() == 0
    finally:
        d.close()
