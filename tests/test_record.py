"""`vfiosim record`: the pass-through recording shim (src/vfiosim/tracing/vfiosim_record.c).

This host has no /dev/vfio, so the shim's pass-through logic is tested against a
stand-in for the real device nodes: `vfiosim record --simulated MACHINE` preloads the
recording shim in front of `vfiosim run`'s, so every call the recorder passes on
reaches the simulated kernel exactly as a real one would reach the real kernel
(docs/trace-format.md, "What was tested where").  The recording must change nothing
the program sees, and say what the daemon's own trace of the same calls says.  The
QEMU guests of tests/test_conformance.py record against real kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import vfiosim
from runutil import C_DIR, EXAMPLES, cc
from vfiosim.tracing import open_trace
from vfiosim.tracing.diff import diff
from vfiosim.tracing.record import library_path
from vfiosim.tracing.replay import replay
from vfiosim.transport.run import run

CLI = [sys.executable, "-m", "vfiosim.cli"]


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    out = tmp_path_factory.mktemp("bin")
    return {"spapr": cc(EXAMPLES / "spapr_edu_dma.c", out), "type1": cc(EXAMPLES / "type1_edu_dma.c", out),
            "probe": cc(C_DIR / "run_probe.c", out, "-pthread")}


def record_simulated(tmp_path: Path, machine: str, *argv: str, name: str = "rec.jsonl") -> tuple[Path, str]:
    """`vfiosim record --simulated MACHINE -- argv`: (the trace, the program's output)."""
    out = tmp_path / name
    r = subprocess.run([*CLI, "record", "--simulated", machine, "-o", str(out), "--", *argv],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def record_with_daemon_trace(tmp_path: Path, machine: str, *argv: str) -> tuple[Path, Path]:
    """The same, with the daemon's own --trace of the very same calls beside it."""
    out, daemon_trace = tmp_path / "rec.jsonl", tmp_path / "daemon.jsonl"
    env = {"VFIOSIM_RECORD": str(out), "VFIOSIM_RECORD_SCENARIO": Path(argv[0]).name,
           "VFIOSIM_RECORD_PLATFORM": vfiosim.Machine.load(machine).platform, "VFIOSIM_RECORD_SOURCE": "simulator"}
    status = run(vfiosim.Machine.load(machine), list(argv), trace=str(daemon_trace), env_extra=env,
                 preload_first=[library_path()])
    assert status == 0
    return out, daemon_trace


def test_the_recording_shim_passes_every_call_through_unchanged(bins, tmp_path):
    """The program's own view (its output: results, errno, VmLck) is the same with the recorder."""
    plain = subprocess.run([*CLI, "run", "--machine", "pseries", "--", str(bins["probe"]), "badinput", "0"],
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    trace, recorded_out = record_simulated(tmp_path, "pseries", str(bins["probe"]), "badinput", "0")
    assert recorded_out == plain.stdout
    assert "set_container_bad_pointer=-1,14" in plain.stdout          # EFAULT, through the recorder too


def test_a_recording_says_what_the_daemon_saw_call_for_call(bins, tmp_path):
    """The shim decodes nothing itself: the bytes it keeps, decoded by the reader, give
    the same records as the daemon's decoded --trace of the very same calls."""
    rec, daemon_trace = record_with_daemon_trace(tmp_path, "pseries", str(bins["probe"]), "badinput", "0")
    with open_trace(rec) as a, open_trace(daemon_trace) as b:
        d = diff(a, b)
        assert a.header["source"] == "simulator" and a.header["system"]["platform"] == "pseries"
        assert {"id": 0, "devices": ["0000:00:00.0"], "type": "DMA", "reserved_regions": ""} in a.header["groups"]
    assert d.identical, "\n".join(map(str, d.divergences))
    assert d.steps > 20
    with open_trace(rec) as t:
        recs = list(t)
    by_cmd = {}
    for r in recs:
        by_cmd.setdefault(r.get("cmd") or r["call"], []).append(r)
    # A bad pointer is a fault the shim noticed without faulting itself.
    assert any(r["args"].get("fault") for r in by_cmd["VFIO_GROUP_SET_CONTAINER"])
    # A vaddr is described by the mapping it lies in: none, or a read-only one.
    maps = [r["mem"]["vaddr"] for r in by_cmd["VFIO_IOMMU_MAP_DMA"] if "mem" in r]
    assert {"vma": None, "offset": 0} in maps
    assert any(m["vma"] and m["vma"][2].startswith("r--") for m in maps)
    # The request numbers decode to names, the struct bytes to fields.
    info = next(r for r in by_cmd["VFIO_IOMMU_SPAPR_TCE_GET_INFO"] if r["args"].get("argsz") == 4)
    assert info["errno"] == 22 and info["raw"]["in"].startswith("04000000")


def test_a_recording_replays_step_for_step_and_keeps_the_programs_fds_free(bins, tmp_path):
    trace, out = record_simulated(tmp_path, "x86", str(bins["type1"]))
    assert "verified" in out
    with open_trace(trace) as t:
        first_open = next(r for r in t if r["call"] == "open")
        assert first_open["ret"] == 3           # the trace's own fd is out of the program's way
        r = replay(vfiosim.Machine.preset("x86"), t)
    assert r.counts["kernel"] == 0 and r.matched == r.steps > 20, "\n".join(map(str, r.divergences))


def test_fork_exec_and_limits_are_recorded_and_replayed(bins, tmp_path):
    """The child's calls come after the fork that made it; an exec'd image keeps
    recording on the fds it inherited; setrlimit and setresuid are taken over."""
    trace, out = record_simulated(tmp_path, "pseries", str(bins["probe"]), "fork", "0", name="fork.jsonl")
    with open_trace(trace) as t:
        recs = list(t)
    pids = []
    for r in recs:
        if r["pid"] not in pids:
            pids.append(r["pid"])
    assert len(pids) == 2
    fork = next(r for r in recs if r["call"] == "fork")
    assert fork["child"] == pids[1] and recs.index(fork) < next(i for i, r in enumerate(recs) if r["pid"] == pids[1])
    assert any(r["call"] == "exec" and r["pid"] == pids[1] for r in recs)
    exec_calls = [r for r in recs if r["pid"] == pids[1] and r.get("cmd") == "VFIO_GET_API_VERSION"]
    assert len(exec_calls) == 3                       # child_api, and after exec: the container and its dup
    with open_trace(trace) as t:
        rr = replay(vfiosim.Machine.preset("pseries"), t)
    assert rr.counts["kernel"] == 0, "\n".join(map(str, rr.divergences))

    trace, out = record_simulated(tmp_path, "pseries", str(bins["probe"]), "rlimit", "0", name="rlimit.jsonl")
    with open_trace(trace) as t:
        recs = list(t)
    lim = [r for r in recs if r["call"] == "setrlimit"]
    assert lim and lim[0]["cur"] == 512 << 10 and lim[0]["now"][0] == 512 << 10
    creds = next(r for r in recs if r["call"] == "setuid")
    assert creds["now"]["euid"] == 65534 and int(creds["now"]["cap_eff"], 16) == 0
    assert any(r.get("cmd") == "VFIO_IOMMU_SPAPR_REGISTER_MEMORY" and r["errno"] == 12 for r in recs)
    with open_trace(trace) as t:
        rr = replay(vfiosim.Machine.preset("pseries"), t)
    assert rr.counts["kernel"] == 0 and rr.matched == rr.steps, "\n".join(map(str, rr.divergences))


def test_record_without_dev_vfio_says_so(tmp_path):
    if os.path.exists("/dev/vfio/vfio"):
        pytest.skip("this host has /dev/vfio: recording would really happen")
    r = subprocess.run([*CLI, "record", "-o", str(tmp_path / "x.jsonl"), "--", "true"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 3
    assert "no /dev/vfio/vfio" in r.stderr and "--simulated" in r.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_record_names_a_program_and_a_trace_it_cannot_write(bins, tmp_path):
    r = subprocess.run([*CLI, "record", "--simulated", "pseries", "-o", str(tmp_path / "x.jsonl")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "name a program" in r.stderr
    r = subprocess.run([*CLI, "record", "--simulated", "pseries", "-o", str(tmp_path / "no" / "x.jsonl"), "--",
                        str(bins["spapr"])], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0                                       # the program ran as it would have
    assert "cannot open the trace" in r.stderr and "No such file or directory" in r.stderr


@pytest.fixture(scope="module")
def guest_programs(tmp_path_factory):
    from vfiosim.qemu.record import GUEST_DIR
    out = tmp_path_factory.mktemp("guestbin")
    return {"families": cc(GUEST_DIR / "vfio_families.c", out), "walker": cc(GUEST_DIR / "reference_walker.c", out)}


@pytest.mark.parametrize("machine, bdf", [("pseries", "0000:00:00.0"), ("x86", "0000:01:00.0")])
def test_the_device_families_program_recorded_here_replays_step_for_step(guest_programs, tmp_path, machine, bdf):
    """The scenario the QEMU guests run: ~150 calls, most of them errors, fds that are
    not eventfds or not open inside SET_IRQS, device mappings, ioeventfds, features."""
    trace, out = record_simulated(tmp_path, machine, str(guest_programs["families"]), bdf)
    assert "close_container 0 0" in out
    with open_trace(trace) as t:
        recs = list(t)
        kinds = {r["fds"][k] for r in recs if r.get("fds") for k in r["fds"]}
    assert {"anon_inode:[eventfd]", "(not open)"} <= kinds
    with open_trace(trace) as t:
        r = replay(vfiosim.Machine.preset(machine), t)
    assert r.steps > 140 and r.matched == r.steps, "\n".join(map(str, r.divergences))
    assert r.counts == {"kernel": 0, "environment": 0, "machine": 0}


def test_the_reference_walker_recorded_here_replays_step_for_step(guest_programs, tmp_path):
    """An unmapped vaddr keeps its value in the replay when it is unmapped there too
    (0xfffffffffffff000 + 8 KiB must overflow, not fault), and a dirty bitmap of size 0
    is not read."""
    from tracereplay import load_trace
    from vfiosim.qemu.record import walker_input
    steps_in = tmp_path / "steps.txt"
    steps_in.write_text(walker_input(load_trace("type1v2-x86.jsonl")))
    trace, out = record_simulated(tmp_path, "x86", "sh", "-c", f"{guest_programs['walker']} < {steps_in}")
    with open_trace(trace) as t:
        r = replay(vfiosim.Machine.preset("x86"), t)
    assert r.steps > 220 and r.matched == r.steps, "\n".join(map(str, r.divergences))
