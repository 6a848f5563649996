"""``vfiosim run -v``: why calls fail, on stderr.

A program's failing VFIO call shows only an errno; the simulated kernel knows
which check failed (the reason a ``--trace`` record carries).  With ``-v``
each failing call is printed strace-style with that reason, and the kernel
log lines (what ``dmesg`` would show on a real host) as they appear.
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING, Any

from ..kernel.log import KERN_DEBUG
from .trace import Tracer, format_record

if TYPE_CHECKING:
    from ..machine import Machine


class DiscardedTrace:
    """The trace stream of ``-v`` without ``--trace``: records are observed, not kept."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class FailureReporter:
    """A :class:`Tracer` observer printing failing calls and new kernel log lines to ``err``."""

    def __init__(self, machine: "Machine", err: IO[str] | None) -> None:
        self.log = machine.kernel.log
        self.err = err
        self.seen = self.log.seq            # only what happens from now on

    def attach(self, tracer: Tracer) -> None:
        tracer.observer = self

    def __call__(self, rec: dict[str, Any]) -> None:
        self.flush_dmesg()                  # printed during the call, so before its result
        if rec.get("errno"):
            self._say(format_record(rec))

    def flush_dmesg(self) -> None:
        if self.log.seq == self.seen:
            return
        for r in self.log.since(self.seen):
            if r.level < KERN_DEBUG:
                self._say(f"dmesg: {r.text}")
        self.seen = self.log.seq

    def _say(self, text: str) -> None:
        if self.err is None:    # started with stderr closed
            return
        try:
            print(f"vfiosim: {text}", file=self.err, flush=True)
        except (OSError, ValueError):
            pass                # stderr closed or gone: the program's calls must not fail for it
