"""The trace format of record and its tools: `vfiosim trace show|convert|diff` and `vfiosim replay`.

Traces come from `vfiosim run --trace` (the simulator answering real programs) and
from the real-kernel reference traces (converted on the fly); the replay re-issues
their calls on a simulated machine and must find every difference a different
machine or kernel makes, and none where there is none.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import vfiosim
from runutil import C_DIR, EXAMPLES, cc
from vfiosim.cli import main as cli_main
from vfiosim.tracing import TraceError, open_trace
from vfiosim.tracing.diff import diff
from vfiosim.tracing.replay import replay

CLI = [sys.executable, "-m", "vfiosim.cli"]
REF = Path(__file__).parent / "data" / "reference_traces"


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    out = tmp_path_factory.mktemp("bin")
    return {"spapr": cc(EXAMPLES / "spapr_edu_dma.c", out), "type1": cc(EXAMPLES / "type1_edu_dma.c", out),
            "probe": cc(C_DIR / "run_probe.c", out, "-pthread")}


def run_traced(tmp_path: Path, machine: str, *argv: str, name: str = "t.jsonl") -> Path:
    trace = tmp_path / name
    r = subprocess.run([*CLI, "run", "--machine", machine, "--trace", str(trace), "--", *argv],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return trace


# -- the reader -------------------------------------------------------------------------------------------


def test_the_reader_says_which_file_and_line_is_wrong(tmp_path):
    with pytest.raises(TraceError, match=r"nothere\.jsonl: No such file or directory"):
        open_trace(tmp_path / "nothere.jsonl")
    bad = tmp_path / "notes.txt"
    bad.write_text("hello, world\n")
    with pytest.raises(TraceError, match=r"notes\.txt:1: not a trace: the first line is not JSON"):
        open_trace(bad)
    other = tmp_path / "other.jsonl"
    other.write_text('{"name": "x", "value": 1}\n')
    with pytest.raises(TraceError, match=r"other\.jsonl:1: not a vfiosim trace"):
        open_trace(other)
    newer = tmp_path / "newer.jsonl"
    newer.write_text('{"format": "vfiosim-trace", "version": 99}\n')
    with pytest.raises(TraceError, match="version 99 is newer"):
        open_trace(newer)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"format": "vfiosim-trace", "version": 1, "source": "kernel"}\n'
                      '{"seq": 0, "pid": 1, "call": "open", "path": "/dev/vfio/vfio", "ret": 3}\n'
                      '{"seq": 1, "pid": 1, "call": "ioct\n')
    with open_trace(broken) as t:
        with pytest.raises(TraceError, match=r"broken\.jsonl:3: not JSON"):
            list(t)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(TraceError, match="empty"):
        open_trace(tmp_path / "empty.jsonl")
    with pytest.raises(TraceError, match="is a directory"):
        open_trace(tmp_path)


def test_trace_show_names_the_file_and_line_and_exits_1(tmp_path, capsys):
    assert cli_main(["trace", "show", str(tmp_path / "missing.jsonl")]) == 1
    assert "vfiosim trace show: " in capsys.readouterr().err
    p = tmp_path / "x.jsonl"
    p.write_text('{"format": "vfiosim-trace", "version": 1}\n{"pid": 1}\n')
    assert cli_main(["trace", "show", str(p)]) == 1
    assert f'{p}:2: a record needs "call"' in capsys.readouterr().err


def test_trace_show_reads_the_reference_traces(capsys):
    assert cli_main(["trace", "show", str(REF / "v2.jsonl")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# vfiosim trace v1: answers from a real kernel (reference trace), Linux 6.12")
    assert any("ioctl(3<vfio-container>, VFIO_IOMMU_SPAPR_TCE_CREATE, {argsz=40" in line and
               "=> {start_addr=0x800000000000000}" in line for line in out)
    # close(device) closes both device fds the recording program held: two calls, one step.
    closes = [line for line in out if "close(" in line and "vfio-device" in line]
    assert len(closes) == 2


def test_convert_writes_the_format_of_record_and_it_reads_back_the_same(tmp_path, capsys):
    out = tmp_path / "v1.jsonl"
    assert cli_main(["trace", "convert", str(REF / "v1.jsonl"), str(out)]) == 0
    head = json.loads(out.read_text().splitlines()[0])
    assert head["format"] == "vfiosim-trace" and head["version"] == 1 and head["source"] == "reference"
    assert head["memory"][0] == {"name": "buf", "size": 64 << 20, "prot": "rw", "fill": 0x5A}
    with open_trace(REF / "v1.jsonl") as a, open_trace(out) as b:
        assert list(a) == list(b)
    mp = next(json.loads(line) for line in out.read_text().splitlines()
              if '"VFIO_IOMMU_MAP_DMA"' in line and '"mem"' in line)
    assert mp["mem"]["vaddr"]["map"] in ("buf", "robuf", "unmapped")
    assert cli_main(["trace", "convert", str(out), str(tmp_path / "again.jsonl")]) == 2
    assert "already in the format of record" in capsys.readouterr().err


def test_an_older_trace_without_a_header_still_reads(tmp_path):
    old = tmp_path / "old.jsonl"
    old.write_text('{"time": 0.1, "pid": 7, "call": "open", "fd": 3, "path": "/dev/vfio/vfio", "flags": 2, '
                   '"ret": 3, "errno": 0, "err": "", "seq": 0}\n'
                   '{"time": 0.2, "pid": 7, "call": "ioctl", "fd": 3, "fd_kind": "vfio-container", '
                   '"cmd": "VFIO_GET_API_VERSION", "ret": 0, "errno": 0, "err": "", "seq": 1}\n')
    with open_trace(old) as t:
        assert t.kind == "legacy" and t.header["version"] == 0
        recs = list(t)
    assert [r["call"] for r in recs] == ["open", "ioctl"]
    r = replay(vfiosim.Machine.preset("pseries"), open_trace(old))
    assert (r.matched, r.steps) == (2, 2)


# -- replay -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("machine, prog", [("pseries", "spapr"), ("powernv", "spapr"), ("x86", "type1")])
def test_a_trace_of_vfiosim_run_replays_step_for_step_on_its_machine(bins, tmp_path, machine, prog):
    trace = run_traced(tmp_path, machine, str(bins[prog]))
    with open_trace(trace) as t:
        r = replay(vfiosim.Machine.preset(machine), t, output=str(tmp_path / "sim.jsonl"))
    assert r.steps > 30
    assert r.counts == {"kernel": 0, "environment": 0, "machine": 0}, "\n".join(map(str, r.divergences))
    assert r.matched == r.steps
    # The BAR stores that start the edu's DMA were replayed: the replay's edu did them too.
    fams = r.families
    assert fams["region access"].steps >= 10 and fams["interrupts"].matched == fams["interrupts"].steps
    # The replay's own answers are a trace, and no different from the recording.
    with open_trace(trace) as a, open_trace(tmp_path / "sim.jsonl") as b:
        d = diff(a, b)
    assert d.identical and d.steps == r.steps


def test_replay_finds_what_a_different_machine_answers_and_says_where(bins, tmp_path, capsys):
    trace = run_traced(tmp_path, "pseries", str(bins["spapr"]))
    assert cli_main(["replay", str(trace), "--machine", "powernv", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "on the simulated machine powernv (--machine)" in out
    assert "machine check: 0000:00:00.0 (group 0) is not on the replay's machine" in out
    # PowerNV's default window is 2 GiB, pseries' 1 GiB: GET_INFO says so, and the
    # group the program opened by number is another device there.
    assert "out.dma32_window_size: recorded 1073741824, got 2147483648" in out
    assert "recorded: [pid" in out and "replayed: [pid" in out and "(before)" in out
    last = out.rstrip().splitlines()[-1]
    assert "steps match; divergences: kernel" in last and "kernel 0" not in last


def test_replay_json_and_the_trace_machine_chosen_from_the_header(bins, tmp_path, capsys):
    trace = run_traced(tmp_path, "x86", str(bins["type1"]))
    assert cli_main(["replay", str(trace), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["header"]["system"]["platform"] == "x86"
    assert doc["counts"]["kernel"] == 0 and doc["matched"] == doc["steps"] > 20
    assert doc["families"]["IOMMU (Type1)"]["matched"] >= 3


def test_replay_of_the_reference_traces_on_the_command_line(capsys):
    assert cli_main(["replay", str(REF / "type1v2-x86.jsonl"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "226/226 steps match; divergences: kernel 0, environment 0, machine 0" in out
    assert cli_main(["replay", str(REF / "v2.jsonl"), "--no-progress"]) == 0
    assert "218/218 steps match (12 recorded as not run)" in capsys.readouterr().out


def test_a_replay_without_a_platform_asks_for_a_machine(tmp_path, capsys):
    p = tmp_path / "t.jsonl"
    p.write_text('{"format": "vfiosim-trace", "version": 1, "source": "kernel"}\n')
    assert cli_main(["replay", str(p)]) == 2
    assert "choose one with --machine" in capsys.readouterr().err


# -- diff ------------------------------------------------------------------------------------------------


def test_diff_of_two_machines_puts_the_first_divergence_of_each_scenario_first(bins, tmp_path, capsys):
    a = run_traced(tmp_path, "pseries", str(bins["spapr"]), name="a.jsonl")
    b = run_traced(tmp_path, "powernv", str(bins["spapr"]), name="b.jsonl")
    assert cli_main(["trace", "diff", str(a), str(a)]) == 0
    assert "paired steps match; divergences: kernel 0" in capsys.readouterr().out
    assert cli_main(["trace", "diff", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    first = out.index("first divergence of each scenario:")
    assert "out.dma32_window_size: recorded 1073741824, got 2147483648" in out[first:]
    assert cli_main(["trace", "diff", "--json", str(a), str(b)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert not doc["identical"] and doc["counts"]["kernel"] >= 1
    assert doc["divergences"][0]["what"] == "out.dma32_window_size"
    assert doc["divergences"][0]["step"].startswith("[pid")


def test_diff_resynchronises_after_a_call_only_one_side_made(tmp_path):
    head = '{"format": "vfiosim-trace", "version": 1, "source": "kernel", "system": {"platform": "pseries"}}\n'

    def rec(seq: int, cmd: str, ret: int = 0) -> str:
        return json.dumps({"seq": seq, "pid": 1, "call": "ioctl", "fd": 3, "fd_kind": "vfio-container", "cmd": cmd,
                           "ret": ret, "errno": 0}) + "\n"
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text(head + rec(0, "VFIO_GET_API_VERSION") + rec(1, "VFIO_IOMMU_ENABLE") + rec(2, "VFIO_IOMMU_DISABLE"))
    b.write_text(head + rec(0, "VFIO_GET_API_VERSION") + rec(1, "VFIO_IOMMU_DISABLE", ret=1))
    with open_trace(a) as ta, open_trace(b) as tb:
        r = diff(ta, tb)
    assert (r.steps, r.only_a, r.only_b) == (2, 1, 0)
    assert [d.what for d in r.divergences] == ["call", "result"]
    assert r.divergences[0].expected == "ioctl VFIO_IOMMU_ENABLE" and r.divergences[1].expected == "0"


def test_config_space_bits_firmware_sets_are_the_machine_not_the_kernel():
    """A pseries guest's SLOF and an x86 guest's SeaBIOS leave I/O, PARITY and SERR enables,
    BAR addresses and the interrupt line in config space: labelled, not counted."""
    from vfiosim.tracing.compare import compare
    cfg = 7 << 40

    def read(offset: int, data: str) -> dict:
        return {"seq": 1, "pid": 1, "call": "read", "fd": 5, "offset": cfg + offset, "count": len(data) // 2,
                "data": data, "ret": len(data) // 2, "errno": 0}
    (d,) = compare(read(4, "0301"), read(4, "0200"))           # command: IO and SERR set by firmware
    assert d.label == "machine" and "firmware" in d.why
    (d,) = compare(read(0x3C, "0a01"), read(0x3C, "0001"))     # interrupt line
    assert d.label == "machine"
    (d,) = compare(read(4, "0600"), read(4, "0200"))           # bus master: vfio-pci's own business
    assert d.label == "kernel"
    (d,) = compare(read(0, "3412e811"), read(0, "3412e810"))   # device id
    assert d.label == "kernel"
    bar = dict(read(0, "010000ed"), offset=0)                  # BAR0: the device model's registers
    (d,) = compare(bar, dict(bar, data="ed000001"))
    assert d.label == "machine"


class _Generated:
    """A long trace made on the fly: nothing of it is ever held whole."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.header = {"format": "vfiosim-trace", "version": 1, "source": "kernel",
                       "system": {"platform": "pseries", "page_size": 4096}}
        self.size = self.bytes_read = 0

    def __iter__(self):
        yield {"seq": 0, "pid": 1, "call": "open", "path": "/dev/vfio/vfio", "flags": 2, "ret": 3, "errno": 0}
        for i in range(1, self.n):
            yield {"seq": i, "pid": 1, "call": "ioctl", "fd": 3, "fd_kind": "vfio-container",
                   "cmd": "VFIO_CHECK_EXTENSION", "args": {"extension": 7}, "ret": 1, "errno": 0,
                   "vmlck_kb": 0, "vmpin_kb": 0}


def test_replay_and_diff_keep_memory_flat_however_long_the_trace():
    """A QEMU boot makes hundreds of thousands of calls: replay and diff hold a step and
    a few of context, not the trace (Python's own allocations, counted by tracemalloc)."""
    import tracemalloc

    def peak(fn) -> int:
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    small = peak(lambda: replay(vfiosim.Machine.preset("pseries"), _Generated(2000)))
    large = peak(lambda: replay(vfiosim.Machine.preset("pseries"), _Generated(20000)))
    assert large < small * 1.5 + (256 << 10), (small, large)
    small = peak(lambda: diff(_Generated(2000), _Generated(2000)))
    large = peak(lambda: diff(_Generated(20000), _Generated(20000)))
    assert large < small * 1.5 + (256 << 10), (small, large)


def test_a_refusal_the_environment_explains_is_labelled_environment(tmp_path, capsys):
    """Root in a container without CAP_IPC_LOCK and CAP_SYS_RESOURCE cannot raise its
    RLIMIT_MEMLOCK: its MAP_DMA fails with ENOMEM where an unrestricted root's succeeds.
    The diff says why and does not count it; the same failure without such a header does."""
    def trace(path: Path, cap_eff: str, ret: int, err: int, setrlimit_refused: bool = True) -> Path:
        head = {"format": "vfiosim-trace", "version": 1, "source": "kernel", "system": {"platform": "x86"},
                "process": {"uid": 0, "cap_eff": cap_eff, "rlimit_memlock": [65536, 65536]}}
        recs = [{"seq": 0, "pid": 1, "call": "setrlimit", "resource": 8, "cur": -1, "max": -1,
                 "now": [65536, 65536], "ret": -1 if setrlimit_refused else 0,
                 "errno": 1 if setrlimit_refused else 0},
                {"seq": 1, "pid": 1, "call": "ioctl", "fd": 3, "fd_kind": "vfio-container", "cmd": "VFIO_IOMMU_MAP_DMA",
                 "ret": ret, "errno": err}]
        path.write_text("\n".join(json.dumps(x) for x in [head, *recs]) + "\n")
        return path
    full = "000001ffffffffff"
    boxed = f"{int(full, 16) & ~(1 << 14) & ~(1 << 24):016x}"
    a = trace(tmp_path / "container.jsonl", boxed, -1, 12)
    b = trace(tmp_path / "host.jsonl", full, 0, 0, setrlimit_refused=False)
    with open_trace(a) as ta, open_trace(b) as tb:
        r = diff(ta, tb)
    (d,) = r.divergences
    assert d.label == "environment" and "without CAP_IPC_LOCK and CAP_SYS_RESOURCE" in d.why
    assert "could not set RLIMIT_MEMLOCK" in d.why and r.identical
    assert cli_main(["trace", "diff", str(a), str(b)]) == 0
    assert "environment: A ran as root without CAP_IPC_LOCK" in capsys.readouterr().out
    c = trace(tmp_path / "plain.jsonl", full, -1, 12, setrlimit_refused=False)
    with open_trace(c) as tc, open_trace(b) as tb:
        (d,) = diff(tc, tb).divergences
    assert d.label == "kernel"
