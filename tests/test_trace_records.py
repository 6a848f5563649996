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

_TIME = re.compile(r'^\{"time": (-?[0-9]+\.[0-9]{6}), ')


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
    lines = out.getvalue().splitlines()
    assert len(t._mmio_parts) <= T._MMIO_PARTS
    for i in range(n):
        assert _untimed(lines[2 * i]) == json.dumps(_expected(2 * i, 7, 1, i * 4, 4, i, True, 0, 0, "", False))
        assert _untimed(lines[2 * i + 1]) == json.dumps(_expected(2 * i + 1, 7, 1, i * 4, 4, None, False, 0, 0, "",
                                                                  False))


def test_a_failed_access_reaches_the_observer_and_a_good_one_does_not():
    t, out = _tracer()
    seen: list[dict] = []
    t.observer = seen.append
    t.posted_stores(9, [(1, 0x80, 8, 5, 0, 0, ""), (2, 0x88, 8, 6, -1, E.EFAULT, "no device mapping 2")])
    t.mmio(9, 1, 0x98, 8, 1, False, 0, 0)
    assert [(r["offset"], r["errno"], r["reason"]) for r in seen] == [(0x88, E.EFAULT, "no device mapping 2")]
    assert [json.loads(x)["seq"] for x in out.getvalue().splitlines()] == [0, 1, 2]
