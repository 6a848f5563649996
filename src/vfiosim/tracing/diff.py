"""``vfiosim trace diff A B``: two traces, step by step.

Real kernel against simulator, one kernel release against another, or a trace
against the simulator's answers to it (``vfiosim replay --output``).  Steps are
paired in order; when the two sequences of calls part (one program made a call the
other did not), the diff looks a few steps ahead in both for the next call they
share, reports what lies between as present in one trace only, and goes on from
there.  Both files are streamed: memory holds the look-ahead and the divergences
kept, not the traces.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Iterator

from .compare import KERNEL, LABELS, Context, Divergence, compare, header_notes, record_note
from .format import Trace
from .replay import _steps

LOOKAHEAD = 32


@dataclass
class DiffResult:
    steps: int = 0                 # steps paired
    matched: int = 0               # paired steps without a kernel divergence
    only_a: int = 0
    only_b: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {label: 0 for label in LABELS})
    divergences: list[Divergence] = field(default_factory=list)
    first_by_scenario: dict[str, Divergence] = field(default_factory=dict)
    skipped_mmio: bool = False        # one recorder cannot see BAR loads/stores: the other's were left out
    notes: list[str] = field(default_factory=list)      # what limited a process's environment

    @property
    def identical(self) -> bool:
        return not self.counts[KERNEL] and not self.only_a and not self.only_b

    def as_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "matched": self.matched, "only_a": self.only_a, "only_b": self.only_b,
                "skipped_mmio": self.skipped_mmio, "environment": self.notes,
                "counts": self.counts, "identical": self.identical,
                "first_by_scenario": {k: v.as_json() for k, v in self.first_by_scenario.items()},
                "divergences": [d.as_json() for d in self.divergences]}


def _key(step: list[dict[str, Any]]) -> tuple[tuple[Any, ...], ...]:
    return tuple((r.get("call"), r.get("cmd")) for r in step)


#: records of what happened around the VFIO calls (a replay takes them over), not calls to pair
CONTEXT_CALLS = ("exit", "fork", "exec", "setrlimit", "setuid", "chown")


def sees_mmio(header: dict[str, Any]) -> bool:
    """Whether a trace's recorder sees loads and stores through a BAR mapping: vfiosim
    run's daemon serves them; on a real kernel they never leave the CPU."""
    return "libvfiosim_record" not in str(header.get("recorder", ""))


def _calls(trace: Trace, skip_mmio: bool, notes: list[str], side: str) -> Iterator[list[dict[str, Any]]]:
    for step in _steps(trace):
        for r in step:
            note = record_note(r, side) if r.get("call") in CONTEXT_CALLS else None
            if note and note not in notes:
                notes.append(note)
        step = [r for r in step if r.get("call") not in CONTEXT_CALLS and not (skip_mmio and r.get("call") == "mmio")]
        if step:
            yield step


def diff(a: Trace, b: Trace, *, keep: int = 1000, lookahead: int = LOOKAHEAD) -> DiffResult:
    from ..transport.trace import format_record
    pa, pb = a.header.get("process") or {}, b.header.get("process") or {}
    ctx = Context(baseline_a=(int(pa.get("vmlck_kb", 0) or 0), int(pa.get("vmpin_kb", 0) or 0)),
                  baseline_b=(int(pb.get("vmlck_kb", 0) or 0), int(pb.get("vmpin_kb", 0) or 0)))
    r = DiffResult()
    skip_mmio = not (sees_mmio(a.header) and sees_mmio(b.header))
    r.skipped_mmio = skip_mmio
    ctx.environment_notes = header_notes(a.header, "A ") + header_notes(b.header, "B ")
    ia, ib = _calls(a, skip_mmio, ctx.environment_notes, "A "), _calls(b, skip_mmio, ctx.environment_notes, "B ")
    qa: collections.deque[list[dict[str, Any]]] = collections.deque()
    qb: collections.deque[list[dict[str, Any]]] = collections.deque()
    scen_a = a.header.get("scenario") or ""

    def note(d: Divergence, rec_a: dict[str, Any] | None, rec_b: dict[str, Any] | None) -> None:
        d.step = format_record(rec_a) if rec_a else "(not in A)"
        d.other = format_record(rec_b) if rec_b else "(not in B)"
        r.counts[d.label] += 1
        scen = d.scenario or scen_a
        if d.label == KERNEL and scen not in r.first_by_scenario:
            r.first_by_scenario[scen] = d
        if len(r.divergences) < keep:
            r.divergences.append(d)

    def fill(q: collections.deque[Any], it: Iterator[Any]) -> None:
        while len(q) < lookahead:
            nxt = next(it, None)
            if nxt is None:
                return
            q.append(nxt)

    def only(step: list[dict[str, Any]], side: str) -> None:
        rec = step[0]
        if side == "a":
            r.only_a += 1
            note(Divergence(rec.get("seq", -1), rec.get("scenario", ""), "call", _name(rec), "(no such call)",
                            KERNEL, "", rec.get("case", "")), rec, None)
        else:
            r.only_b += 1
            note(Divergence(rec.get("seq", -1), rec.get("scenario", ""), "call", "(no such call)", _name(rec),
                            KERNEL, "", rec.get("case", "")), None, rec)

    while True:
        fill(qa, ia)
        fill(qb, ib)
        if not qa and not qb:
            break
        if not qa or not qb:
            for step in (qa or qb):
                only(step, "a" if qa else "b")
            (qa or qb).clear()
            continue
        if _key(qa[0]) != _key(qb[0]):
            best = None
            for total in range(1, 2 * lookahead):
                for i in range(max(0, total - len(qb) + 1), min(total, len(qa) - 1) + 1):
                    j = total - i
                    if j < len(qb) and _key(qa[i]) == _key(qb[j]):
                        best = (i, j)
                        break
                if best:
                    break
            if best is not None:
                for _ in range(best[0]):
                    only(qa.popleft(), "a")
                for _ in range(best[1]):
                    only(qb.popleft(), "b")
                continue
        sa, sb = qa.popleft(), qb.popleft()
        r.steps += 1
        bad = False
        for k in range(max(len(sa), len(sb))):
            ra = sa[k] if k < len(sa) else None
            rb = sb[k] if k < len(sb) else None
            if ra is None or rb is None:
                d = Divergence((ra or rb or {}).get("seq", -1), (ra or rb or {}).get("scenario", ""), "call",
                               _name(ra) if ra else "(no such call)", _name(rb) if rb else "(no such call)")
                note(d, ra, rb)
                bad = True
                continue
            for d in compare(ra, rb, ctx):
                note(d, ra, rb)
                bad = bad or d.label == KERNEL
        if not bad:
            r.matched += 1
    r.notes = ctx.environment_notes
    return r


def _name(rec: dict[str, Any] | None) -> str:
    if not rec:
        return "-"
    return f"ioctl {rec.get('cmd')}" if rec.get("call") == "ioctl" else str(rec.get("call"))
