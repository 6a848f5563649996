"""What the two model-based tests (test_model_stateful.py for sPAPR,
test_model_type1.py for Type1) share: simulated processes driven by random
calls, whose errors must be real errnos, and the physical memory each
address space owns, for the invariant that no mapping reaches memory of
another address space."""

from __future__ import annotations

import errno

from hypothesis import event
from hypothesis.stateful import RuleBasedStateMachine

ERRNOS = set(errno.errorcode) - {errno.EIO}       # EIO would be a vfiosim internal error


class ProcessModel(RuleBasedStateMachine):
    BUF = 16 << 20                                 # each process's first buffer

    def __init__(self) -> None:
        super().__init__()
        self.procs: list[dict] = []
        # mm -> physical memory of its mappings; an mm outlives its image's
        # exec while a container holds it.
        self.mem_of: dict = {}

    def call(self, fn, *args):
        """A call that may fail, but only with an errno the kernel uses."""
        try:
            return fn(*args)
        except OSError as exc:
            assert exc.errno in ERRNOS, f"unexpected errno {exc.errno}: {exc}"
            return None

    def proc(self, i: int) -> dict | None:
        live = [p for p in self.procs if p["p"].alive]
        return live[i % len(live)] if live else None

    def note_memory(self, pr: dict) -> None:
        mm = pr["p"].mm
        self.mem_of.setdefault(mm, set()).update(v.obj.phys_base for v in mm.vmas() if v.kind == "anon")

    def exec_process(self, i: int) -> None:
        """execve(): a new address space with a fresh buffer; the files stay
        open (the models open none O_CLOEXEC)."""
        pr = self.proc(i)
        if not pr:
            return
        pr["p"].exec()
        event("exec")
        pr["buf"] = pr["p"].mmap(self.BUF)
        pr["p"].write_memory(pr["buf"], b"\x5b" * self.BUF)
        pr["maps"] = []
        self.note_memory(pr)

    def exit_process(self, i: int) -> bool:
        """exit(): the task is gone from the machine at once."""
        pr = self.proc(i)
        if not pr:
            return False
        pid = pr["p"].pid
        pr["p"].exit()
        assert pid not in self.m.processes()
        return True
