"""Credentials and capabilities (include/uapi/linux/capability.h numbers)."""

from __future__ import annotations

from dataclasses import dataclass, field

CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_FOWNER = 3
CAP_FSETID = 4
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
    """Real/effective/saved ids and the effective capability set.

    As for a process without file capabilities or securebits: uid 0 holds
    every capability, and a transition away from euid 0 clears them.
    """

    uid: int = 0
    euid: int = 0
    suid: int = 0
    gid: int = 0
    egid: int = 0
    groups: tuple[int, ...] = ()
    caps: frozenset[int] = field(default_factory=lambda: ALL_CAPS)

    @classmethod
    def for_user(cls, uid: int, gid: int, groups: tuple[int, ...] = ()) -> "Cred":
        return cls(uid, uid, uid, gid, gid, groups, ALL_CAPS if uid == 0 else frozenset())

    def capable(self, cap: int) -> bool:
        return cap in self.caps
