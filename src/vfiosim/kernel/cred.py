"""Credentials and capabilities (include/uapi/linux/capability.h numbers)."""

from __future__ import annotations

from dataclasses import dataclass, field

CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_SETGID = 6
CAP_SETUID = 7
CAP_IPC_LOCK = 14
CAP_SYS_RAWIO = 17
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
CAP_LAST_CAP = 40

ALL_CAPS = frozenset(range(CAP_LAST_CAP + 1))

CAP_NAMES = {
    CAP_DAC_OVERRIDE: "CAP_DAC_OVERRIDE",
    CAP_SETUID: "CAP_SETUID",
    CAP_IPC_LOCK: "CAP_IPC_LOCK",
    CAP_SYS_RAWIO: "CAP_SYS_RAWIO",
    CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
    CAP_SYS_RESOURCE: "CAP_SYS_RESOURCE",
}


@dataclass
class Cred:
    """Real/effective/saved/filesystem ids and the effective capability set.

    As for a process without file capabilities or securebits: uid 0 holds
    every capability, and a transition away from euid 0 clears them; the
    permitted set is the effective one, nothing is inheritable or ambient,
    and the bounding set is full.  ``sgid``, ``fsuid`` and ``fsgid`` default
    to the effective ids (the filesystem ids follow them on every set*id).
    """

    uid: int = 0
    euid: int = 0
    suid: int = 0
    gid: int = 0
    egid: int = 0
    groups: tuple[int, ...] = ()
    caps: frozenset[int] = field(default_factory=lambda: ALL_CAPS)
    sgid: int | None = None
    fsuid: int | None = None
    fsgid: int | None = None

    def __post_init__(self) -> None:
        if self.sgid is None:
            self.sgid = self.egid
        if self.fsuid is None:
            self.fsuid = self.euid
        if self.fsgid is None:
            self.fsgid = self.egid

    def proc_status(self) -> dict[str, object]:
        """The Uid/Gid/Cap* lines of /proc/<pid>/status (fs/proc/array.c task_cap(),
        render_cap_t(): 16 hex digits per set)."""
        eff = sum(1 << c for c in self.caps)

        def hexcaps(mask: int) -> str:
            return f"{mask:016x}"
        return {"Uid": (self.uid, self.euid, self.suid, self.fsuid),
                "Gid": (self.gid, self.egid, self.sgid, self.fsgid),
                "Groups": self.groups,
                "CapInh": hexcaps(0), "CapPrm": hexcaps(eff), "CapEff": hexcaps(eff),
                "CapBnd": hexcaps(sum(1 << c for c in ALL_CAPS)), "CapAmb": hexcaps(0)}

    @classmethod
    def for_user(cls, uid: int, gid: int, groups: tuple[int, ...] = ()) -> "Cred":
        return cls(uid, uid, uid, gid, gid, groups, ALL_CAPS if uid == 0 else frozenset())

    def capable(self, cap: int) -> bool:
        return cap in self.caps
