"""Simulated processes (``struct task_struct``): credentials, limits, files, mm."""

from __future__ import annotations

import resource
from errno import EINVAL, EPERM
from typing import Callable

from .cred import CAP_SETUID, CAP_SYS_RESOURCE, Cred
from .errors import fail
from .fs import FdTable
from .mm import AddressSpace

RLIM_INFINITY = resource.RLIM_INFINITY

# Task.creds_stale: which parts of a real process's credentials this call has
# yet to take (bits; the parts are taken one at a time as they are consulted).
CREDS_FRESH = 0             # all taken (or the task is simulated only)
CREDS_IDS_STALE = 1         # the ids (and groups)
CREDS_CAPS_STALE = 2        # the capabilities
CREDS_MEMLOCK_STALE = 4     # RLIMIT_MEMLOCK
CREDS_STALE = CREDS_IDS_STALE | CREDS_CAPS_STALE | CREDS_MEMLOCK_STALE   # a call began


class Task:
    """One simulated process: an mm, an fd table, credentials and rlimits.

    Where the task stands for a real process (``vfiosim run``), the
    credentials and RLIMIT_MEMLOCK are the real process's: the transport
    sets ``creds_stale`` (CREDS_STALE) when a call begins and ``refresh_creds``
    takes them again the first time the call consults them -- at every
    privileged decision, and only then.  A decision that consults only the
    capabilities, or RLIMIT_MEMLOCK (every Type1 MAP_DMA asks for
    CAP_IPC_LOCK, and for the limit only when the process lacks it) asks
    ``limits_same(part)`` whether just that part (CREDS_CAPS_STALE or
    CREDS_MEMLOCK_STALE) is unchanged, when the transport can tell more
    cheaply than it takes everything; the ids stay stale until something
    consults them.  Changed (False): everything is taken again."""

    def __init__(self, pid: int, comm: str, cred: Cred, mm: AddressSpace,
                 rlimit_memlock: tuple[int, int]) -> None:
        self.pid = pid
        self.comm = comm
        self._cred = cred
        self.mm = mm
        self.files = FdTable()
        self.files.owner = self
        self._rlimits: dict[int, tuple[int, int]] = {resource.RLIMIT_MEMLOCK: rlimit_memlock}
        self.alive = True
        self.creds_stale = CREDS_FRESH
        self.refresh_creds: Callable[[], None] | None = None
        self.limits_same: Callable[[int], bool] | None = None

    def _refresh(self) -> None:
        self.creds_stale = CREDS_FRESH
        if self.refresh_creds is not None:
            self.refresh_creds()

    def _refresh_part(self, part: int) -> None:
        self.creds_stale &= ~part
        same = self.limits_same
        if same is None or not same(part):
            self._refresh()

    def take_creds(self) -> None:
        """Take the real process's credentials now, if a call began since they were last taken."""
        if self.creds_stale:
            self._refresh()

    @property
    def cred(self) -> Cred:
        if self.creds_stale:
            self._refresh()
        return self._cred

    @cred.setter
    def cred(self, cred: Cred) -> None:
        self._cred = cred

    @property
    def rlimits(self) -> dict[int, tuple[int, int]]:
        if self.creds_stale & CREDS_MEMLOCK_STALE:
            self._refresh_part(CREDS_MEMLOCK_STALE)
        return self._rlimits

    def capable(self, cap: int) -> bool:
        # Capabilities do not depend on the ids here (no user namespaces): the
        # capabilities' refresh is enough (every Type1 MAP_DMA asks).
        if self.creds_stale & CREDS_CAPS_STALE:
            self._refresh_part(CREDS_CAPS_STALE)
        return cap in self._cred.caps       # Cred.capable(), without its frame (every Type1 MAP_DMA asks)

    def rlimit(self, resource_id: int) -> tuple[int, int]:
        return self.rlimits.get(resource_id, (RLIM_INFINITY, RLIM_INFINITY))

    def rlimit_memlock_soft(self) -> int:
        soft = self.rlimit(resource.RLIMIT_MEMLOCK)[0]
        return (1 << 64) - 1 if soft == RLIM_INFINITY else soft

    def setrlimit(self, resource_id: int, limits: tuple[int, int]) -> None:
        """setrlimit(2): soft <= hard; raising hard needs CAP_SYS_RESOURCE."""
        soft, hard = limits

        def norm(v: int) -> int:
            return (1 << 64) - 1 if v == RLIM_INFINITY or v < 0 else v

        if norm(soft) > norm(hard):
            raise fail(EINVAL, f"soft limit {soft} above hard limit {hard}")
        old_hard = norm(self.rlimit(resource_id)[1])
        if norm(hard) > old_hard and not self.capable(CAP_SYS_RESOURCE):
            raise fail(EPERM, f"raising the hard limit from {old_hard} to {hard} needs CAP_SYS_RESOURCE")
        self.rlimits[resource_id] = (soft, hard)

    def set_creds(self, cred: Cred, rlimit_memlock: tuple[int, int]) -> None:
        """Take credentials and RLIMIT_MEMLOCK from outside (a real process's
        /proc/<pid>, read by the transport before a call)."""
        self._cred = cred
        self._rlimits[resource.RLIMIT_MEMLOCK] = rlimit_memlock

    def setuid(self, uid: int) -> None:
        """setuid(2): privileged sets all ids; otherwise only to ruid/suid.

        Leaving euid 0 clears the capability sets, as Linux does without
        SECBIT_KEEP_CAPS.
        """
        c = self.cred
        if self.capable(CAP_SETUID):
            c.uid = c.euid = c.suid = c.fsuid = uid
        elif uid in (c.uid, c.suid):
            c.euid = c.fsuid = uid
        else:
            raise fail(EPERM, f"uid {c.euid} may not become uid {uid} without CAP_SETUID")
        if c.euid != 0:
            c.caps = frozenset()
