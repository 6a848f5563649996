"""The syscall gate: the one way a transport enters the simulated kernel.

Every system call from outside -- the in-process :class:`vfiosim.Process`
API, the ``vfiosim run`` daemon serving real programs -- passes through
:meth:`SyscallGate.call` (:meth:`SyscallGate.call_locked` where the
transport took the lock itself first, as the daemon does), which

* takes the machine's lock (the big kernel lock: the simulated kernel never
  blocks, so serialising whole calls gives every interleaving a sequential
  explanation; docs/reliability.md, "Concurrency");
* refuses a task that has exited (ESRCH);
* lets a :class:`KernelError` through as it is: its errno is the answer;
* turns any other exception -- a bug in the simulator -- into an oops:
  the traceback is kept in :attr:`oopses` (bounded), a line goes to the
  kernel log, and the call fails with EIO, never with a traceback in the
  program.

Transports differ only in how they hand the errno back (an ``OSError``, a
reply on the wire).
"""

from __future__ import annotations

import threading
import traceback
from errno import EIO, ESRCH
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from .errors import KernelError, fail

if TYPE_CHECKING:
    from .log import KernelLog
    from .task import Task

T = TypeVar("T")

MAX_OOPSES = 100            # tracebacks kept; later ones are counted, and logged to dmesg


class SyscallGate:
    """The machine's lock and its record of internal errors."""

    def __init__(self, log: "KernelLog") -> None:
        self.log = log
        self.lock = threading.RLock()
        self.oopses: list[str] = []
        self.oopses_dropped = 0

    def call(self, task: "Task", name: str | Callable[[], str], fn: Callable[..., T], *args: Any) -> T:
        """``fn(task, *args)`` as one system call of ``task``.  ``name`` says
        what the call was, for an oops (a callable is asked only then, keeping
        formatting off the hot path)."""
        with self.lock:
            return self.call_locked(task, name, fn, *args)

    def call_locked(self, task: "Task", name: str | Callable[[], str], fn: Callable[..., T], *args: Any) -> T:
        """call() for a caller that holds the lock already (a transport that
        did its own work under it first): the same checks and handling,
        without taking the lock again on a hot path."""
        if not task.alive:
            raise fail(ESRCH, f"process {task.pid} has exited")
        try:
            return fn(task, *args)
        except KernelError:
            raise
        except Exception as exc:          # a bug in the simulator
            raise self.oops(name if isinstance(name, str) else name(), exc) from None

    def run(self, name: str | Callable[[], str], fn: Callable[..., T], *args: Any) -> T:
        """Kernel work that is nobody's system call (a process's exit, an
        eventfd's wake-up): the same lock and oops handling."""
        with self.lock:
            try:
                return fn(*args)
            except KernelError:
                raise
            except Exception as exc:
                raise self.oops(name if isinstance(name, str) else name(), exc) from None

    def oops(self, call: str, exc: BaseException) -> KernelError:
        """Record an internal error; returns the EIO the caller answers with."""
        with self.lock:
            if len(self.oopses) < MAX_OOPSES:
                self.oopses.append(f"{call}: {''.join(traceback.format_exception(exc))}")
            else:
                self.oopses_dropped += 1
            self.log.err(f"vfiosim: internal error during {call}: {exc!r} (this is a vfiosim bug; "
                         f"machine.oopses has the traceback)")
        return KernelError(EIO, f"vfiosim internal error during {call}: {exc!r}")
