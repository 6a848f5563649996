"""The text of --trace records: the fast ways of writing them (BAR accesses
from a template, a flush of posted stores in one go) write exactly what the
plain way, a dict through the JSON encoder, writes."""

from __future__ import annotations

import errno as E
import io
import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from vfiosim.transport import trace as T
from vfiosim.transport.trace import Tracer

_TIME = re.compile(r'^\{"time": ([-+.e0-9]+), ')


def _tracer() -> tuple[Tracer, io.StringIO]:
    out = io.StringIO()
    t = Tracer(out, "pseries")
    out.seek(0)
    out.truncate()
    return t, out


def _expected(seq: int, pid: int, mapping: int, offset: int, size: int, value: int | None, written: bool,
              ret: int, err: int, reason: str, posted: bool) -> dict:
    """The record as docs/trace-format.md describes it, keys in their order (without its time)."""
    rec: dict = {"pid": pid, "call": "mmio", "mapping": mapping, "offset": offset, "size": size, "write": written}
    if value is not None:
        rec["value"] = value
    if posted:
        rec["posted"] = True
    if reason:
        rec["reason"] = reason
    rec.update(ret=ret, errno=err, err=E.errorcode.get(err, "") if err else "", seq=seq)
    return rec


def _untimed(line: str) -> str:
    m = _TIME.match(line)
    assert m, line
    return "{" + line[m.end():]


accesses = st.tuples(
    st.integers(1, 1 << 22),                                  # pid
    st.integers(0, 40),                                       # mapping
    st.integers(0, (1 << 32) - 1),                            # offset
    st.sampled_from([1, 2, 4, 8]),                            # size
    st.none() | st.integers(0, (1 << 64) - 1),                # value
    st.booleans(),                                            # written
    st.sampled_from([0, 0, 0, -1, 1]),                        # ret
    st.sampled_from([0, 0, 0, E.EFAULT, E.EIO, 4095]),        # errno (4095: no name)
    st.sampled_from(["", "", 'a "quoted" reason', "ünïcode \\ \n"]),
    st.booleans(),                                            # posted
)


@settings(max_examples=300, deadline=None)
@given(st.lists(accesses, min_size=1, max_size=20))
def test_a_bar_access_record_is_the_json_of_its_fields(calls):
    t, out = _tracer()
    for args in calls:
        t.mmio(*args[:8], reason=args[8], posted=args[9])
    lines = out.getvalue().splitlines()
    assert len(lines) == len(calls)
    for seq, (line, args) in enumerate(zip(lines, calls)):
        want = _expected(seq, *args)
        assert _untimed(line) == json.dumps(want)                       # byte for byte
        assert list(json.loads(line)) == ["time", *want]              # the time first


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 1 << 22),
       st.lists(st.tuples(st.integers(0, 8), st.integers(0, 1 << 20), st.sampled_from([1, 2, 4, 8]),
                          st.integers(0, (1 << 64) - 1), st.sampled_from([0, 0, 0, -1]),
                          st.sampled_from([0, 0, 0, E.EFAULT]), st.sampled_from(["", "", "no such mapping"])),
                min_size=1, max_size=12))
def test_a_flush_of_posted_stores_writes_what_one_record_each_writes(pid, done):
    one_by_one, out1 = _tracer()
    for mapping, offset, size, value, ret, err, reason in done:
        one_by_one.mmio(pid, mapping, offset, size, value, True, ret, err, reason, posted=True)
    batch, out2 = _tracer()
    batch.posted_stores(pid, done)
    a, b = out1.getvalue().splitlines(), out2.getvalue().splitlines()
    assert [_untimed(x) for x in b] == [_untimed(x) for x in a]
    assert batch.seq == one_by_one.seq == len(done)
    if not any(ret or err or reason for *_, ret, err, reason in done):
        # performed together, as one system call of the task: one time for all
        assert len({_TIME.match(x).group(1) for x in b}) == 1


def test_records_stay_right_past_the_templates_kept():
    """A program sweeping a BAR uses more registers than the tracer keeps
    templates for: the records of every one stay right."""
    t, out = _tracer()
    n = T._MMIO_PARTS * 2 + 5
    for i in range(n):
        t.mmio(7, 1, i * 4, 4, i, True, 0, 0)
        t.mmio(7, 1, i * 4, 4, None, False, 0, 0)
        t.posted_stores(7, [(1, i * 4, 4, i, 0, 0, "")])
    lines = out.getvalue().splitlines()
    assert len(t._mmio_parts) <= T._MMIO_PARTS and len(t._posted_heads) <= T._MMIO_PARTS
    for i in range(n):
        j = 3 * i
        assert _untimed(lines[j]) == json.dumps(_expected(j, 7, 1, i * 4, 4, i, True, 0, 0, "", False))
        assert _untimed(lines[j + 1]) == json.dumps(_expected(j + 1, 7, 1, i * 4, 4, None, False, 0, 0, "", False))
        assert _untimed(lines[j + 2]) == json.dumps(_expected(j + 2, 7, 1, i * 4, 4, i, True, 0, 0, "", True))


def test_a_failed_access_reaches_the_observer_and_a_good_one_does_not():
    t, out = _tracer()
    seen: list[dict] = []
    t.observer = seen.append
    t.posted_stores(9, [(1, 0x80, 8, 5, 0, 0, ""), (2, 0x88, 8, 6, -1, E.EFAULT, "no device mapping 2")])
    t.mmio(9, 1, 0x98, 8, 1, False, 0, 0)
    assert [(r["offset"], r["errno"], r["reason"]) for r in seen] == [(0x88, E.EFAULT, "no device mapping 2")]
    assert [json.loads(x)["seq"] for x in out.getvalue().splitlines()] == [0, 1, 2]


# -- ioctl records: decoded once, their text kept -------------------------------------------------------


def _ioctl_rig():
    """An x86 Type1v2 container and the calls of a map/unmap loop, on the in-process machine."""
    import ctypes

    import vfiosim
    from vfiosim.uapi import vfio as uapi

    m = vfiosim.Machine.preset("x86")
    p = m.spawn(uid=0, rlimit_memlock=(1 << 40, 1 << 40))
    c = p.open("/dev/vfio/vfio")
    g = p.open("/dev/vfio/4")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    return m, p, c, uapi


def _traced_call(m, task, tracers, fd, cmd, arg):
    from vfiosim.kernel.errors import KernelError
    from vfiosim.transport import protocol as P

    recs = [t.begin(task, P.OP_IOCTL, 0, fd, 0, (cmd, arg, 0, 0, 0), b"") for t in tracers]
    try:
        ret, err, reason = m.kernel.gate.call(task, "ioctl", m.kernel.sys_ioctl, fd, cmd, arg), 0, None
    except KernelError as exc:
        ret, err, reason = -1, exc.errno, exc.reason
    for t, rec in zip(tracers, recs):
        if reason is not None:
            rec["reason"] = reason
        t.end(rec, task, ret, err)


def test_an_ioctl_record_kept_as_text_is_what_encoding_it_writes():
    """The same calls traced twice: once the plain way (a dict through the JSON
    encoder: an observer turns the shortcuts off) and once with the decoded
    arguments and the records' text kept.  Same records, byte for byte, also
    where the same bytes meet another mapping, an error, a changed result,
    an argument that faults."""
    m, p, c, uapi = _ioctl_rig()
    plain, out1 = _tracer()
    plain.observer = lambda rec: None
    fast, out2 = _tracer()
    task = p.task
    buf = p.mmap(1 << 16)
    p.write_memory(buf, b"\1" * (1 << 16))
    args = p.mmap(4096)
    p.write_memory(args, bytes(uapi.vfio_iommu_type1_dma_map(argsz=32, flags=3, vaddr=buf, iova=0, size=4096)))
    p.write_memory(args + 64, bytes(uapi.vfio_iommu_type1_dma_unmap(argsz=24, iova=0, size=8192)))
    p.write_memory(args + 128, bytes(uapi.vfio_iommu_type1_info(argsz=16)))
    p.write_memory(args + 2048, bytes(uapi.vfio_iommu_type1_info(argsz=1024)))    # too big to keep
    MAP, UNMAP, INFO = uapi.VFIO_IOMMU_MAP_DMA, uapi.VFIO_IOMMU_UNMAP_DMA, uapi.VFIO_IOMMU_GET_INFO
    tracers = [plain, fast]
    calls = 0
    for _ in range(5):
        _traced_call(m, task, tracers, c, MAP, args)          # mapped
        _traced_call(m, task, tracers, c, MAP, args)          # EEXIST, with its reason
        _traced_call(m, task, tracers, c, INFO, args + 128)   # fields only after the call
        _traced_call(m, task, tracers, c, INFO, args + 2048)
        _traced_call(m, task, tracers, c, UNMAP, args + 64)   # "out": the size unmapped
        p.write_memory(args + 64, bytes(uapi.vfio_iommu_type1_dma_unmap(argsz=24, iova=0, size=8192)))
        _traced_call(m, task, tracers, c, UNMAP, args + 64)   # the same bytes in, 0 unmapped out
        p.write_memory(args + 64, bytes(uapi.vfio_iommu_type1_dma_unmap(argsz=24, iova=0, size=8192)))
        p.write_memory(args + 2048, bytes(uapi.vfio_iommu_type1_info(argsz=1024)))
        calls += 6
    _traced_call(m, task, tracers, c, MAP, args)
    _traced_call(m, task, tracers, c, UNMAP, args + 64)
    p.munmap(buf + (1 << 15), 1 << 15)                        # the same bytes, a mapping half as long
    _traced_call(m, task, tracers, c, MAP, args)
    _traced_call(m, task, tracers, c, UNMAP, args + 64)
    calls += 4
    p.munmap(buf, 1 << 15)                                    # the same bytes, no mapping now
    _traced_call(m, task, tracers, c, MAP, args)
    buf2 = p.mmap(1 << 20)                                    # and maybe another one there
    _traced_call(m, task, tracers, c, MAP, args)
    _traced_call(m, task, tracers, c, MAP, 16)                # the argument faults
    _traced_call(m, task, tracers, 99, MAP, args)             # no such fd
    calls += 4
    a, b = out1.getvalue().splitlines(), out2.getvalue().splitlines()
    assert len(a) == len(b) == calls
    assert [_untimed(x) for x in b] == [_untimed(x) for x in a]
    recs = [json.loads(x) for x in b]
    assert [r.get("err") for r in recs[:6]] == ["", "EEXIST", "", "", "", ""]
    assert recs[4]["out"] == {"size": 4096} and recs[5]["out"] == {"size": 0}
    assert recs[3]["args"]["argsz"] == 1024 and "out" in recs[3]
    assert recs[-8]["mem"]["vaddr"]["vma"][1] - recs[-6]["mem"]["vaddr"]["vma"][1] == 1 << 15
    assert recs[-8]["err"] == recs[-6]["err"] == ""
    assert recs[1]["reason"] and "out" in recs[2]
    assert recs[-4]["mem"]["vaddr"]["vma"] is None and recs[-4]["err"] == "EFAULT"
    assert recs[-2]["args"] == {"ptr": 16, "fault": True}
    assert buf2 and len(fast._texts) < calls                  # the loop's records were kept, not encoded again
    assert all(len(raw) <= T._KEPT_ARG for _name, raw in fast._decoded)
    assert all(len(key[5]) <= T._KEPT_ARG for key in fast._texts)


# -- a trace is whole: after the program is killed, after the daemon stops ----------------------------


def _check_whole(path, pid: int) -> list[dict]:
    lines = path.read_text().splitlines()
    assert lines and lines[-1]                                # (no torn last line)
    recs = [json.loads(x) for x in lines[1:]]                 # (the first line is the header)
    assert [r["seq"] for r in recs] == list(range(len(recs)))
    return recs


def test_a_trace_is_whole_after_the_program_is_killed_and_after_the_daemon_stops(tmp_path):
    """The edu DMA loop of the benchmarks, killed (SIGKILL) while it makes its
    posted stores and loads: once the daemon has seen it go, the trace holds
    every record up to its exit, in order, ending with the exit; stopping the
    daemon leaves it so."""
    import time

    import vfiosim
    from runutil import ROOT, ThreadedDaemon, cc

    exe = cc(ROOT / "benchmarks" / "bench_client.c", tmp_path, "-pthread")
    m = vfiosim.Machine.preset("pseries")
    trace = tmp_path / "t.jsonl"
    d = ThreadedDaemon(m, tmp_path, trace=str(trace))
    try:
        proc = d.popen([str(exe), "dma", "256", "spapr2", "0", "0000:00:00.0"])
        end = time.monotonic() + 30
        while trace.read_text().count('"posted": true') < 2000 and proc.poll() is None:
            assert time.monotonic() < end, "the DMA loop made no stores"
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        assert proc.returncode == -9                          # killed in its loop, not finished
        assert d.wait_idle()
        end = time.monotonic() + 10
        while '"call": "exit"' not in trace.read_text():      # the daemon's loop flushes now and then
            assert time.monotonic() < end, "the exit never reached the trace"
            time.sleep(0.02)
        recs = _check_whole(trace, proc.pid)
        assert recs[-1]["call"] == "exit" and recs[-1]["pid"] == proc.pid
        mmio = [r for r in recs if r["call"] == "mmio"]
        # Stores and loads succeed, up to the kill; the DMA command the daemon
        # performed as the process died may fail (its memory went first).
        failed = [r for r in mmio if r["errno"]]
        assert len(mmio) > 2000 and len(failed) <= 1
        assert all(r["offset"] == 0x98 and r["err"] == "EFAULT" and "DMA" in r["reason"] for r in failed)
        # Each transfer's registers, stored in order, before its command is polled.
        stores = [r["offset"] for r in mmio if r.get("posted")]
        assert stores[:8] == [0x80, 0x88, 0x90, 0x98] * 2
        before_stop = trace.read_text()
    finally:
        d.close()
    assert trace.read_text() == before_stop                   # nothing torn or added by the shutdown


def test_a_trace_is_whole_when_the_daemon_stops_under_a_running_program(tmp_path):
    import time

    import vfiosim
    from runutil import ROOT, ThreadedDaemon, cc

    exe = cc(ROOT / "benchmarks" / "bench_client.c", tmp_path, "-pthread")
    m = vfiosim.Machine.preset("pseries")
    trace = tmp_path / "t.jsonl"
    d = ThreadedDaemon(m, tmp_path, trace=str(trace))
    proc = d.popen([str(exe), "dma", "256", "spapr2", "0", "0000:00:00.0"])
    try:
        end = time.monotonic() + 30
        while trace.read_text().count('"posted": true') < 2000 and proc.poll() is None:
            assert time.monotonic() < end, "the DMA loop made no stores"
            time.sleep(0.02)
        assert proc.poll() is None
        d.close()
        recs = _check_whole(trace, proc.pid)
        assert recs[-1] == {**recs[-1], "call": "exit", "pid": proc.pid, "detail": "daemon shut down"}
        assert sum(r["call"] == "mmio" for r in recs) > 2000
    finally:
        proc.kill()
        proc.wait()
