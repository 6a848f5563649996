"""Per-user accounting (``struct user_struct``, kernel/user.c).

Some locked-memory charges are per user, not per address space: io_uring's
and iommufd's (the default IOPT_PAGES_ACCOUNT_USER mode) add to
``user->locked_vm``, shared by every process of the same real uid, and check
the total against the RLIMIT_MEMLOCK of the process that pins.  Nothing in
/proc shows it; ``Machine.user_locked_vm(uid)`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class UserStruct:
    uid: int
    locked_vm: int = 0          # pages, atomic_long_t locked_vm


@dataclass
class UserTable:
    """uid -> user_struct; alloc_uid() creates it at the first get_uid()."""

    _users: dict[int, UserStruct] = field(default_factory=dict)

    def get(self, uid: int) -> UserStruct:
        user = self._users.get(uid)
        if user is None:
            user = self._users[uid] = UserStruct(uid)
        return user

    def locked_vm(self, uid: int) -> int:
        user = self._users.get(uid)
        return user.locked_vm if user is not None else 0

    def all(self) -> list[UserStruct]:
        return [u for _, u in sorted(self._users.items())]
