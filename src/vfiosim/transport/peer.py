"""Who is at the other end of a connection, and whether it still is.

The daemon acts for a process: it opens VFIO nodes with that process's
credentials and reads and writes its memory.  So before it does anything it
establishes, with the host kernel as witness, which process that is:

* ``SO_PEERCRED`` gives the pid and effective ids of the process that called
  ``connect()``, and ``SO_PEERPIDFD`` a pidfd for it (a reference that no
  other process can take over by reusing the pid).
* The hello carries ``SCM_CREDENTIALS``: the kernel checks that the pid in it
  is the sender's own and the ids among its real/effective/saved ones.  With
  ``SO_PASSPIDFD`` the kernel adds a pidfd of the sender (``SCM_PIDFD``).  A
  hello is accepted only from the process that connected: a socket passed to
  another process (or kept by a parent whose child connected and then
  exec()ed a set-uid program) cannot borrow that process's identity.
* The ids at connect time and in the hello bound what the connection may
  ever act with (:class:`Bounds`).  If the process's ids later leave that set
  (a set-uid exec) or its capabilities grow (a file-capability exec), it is
  no longer the process that connected: the connection ends.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

from . import native
from . import protocol as P

SO_PASSPIDFD = getattr(socket, "SO_PASSPIDFD", 76)       # Linux 6.5
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)       # Linux 6.5
SCM_PIDFD = getattr(socket, "SCM_PIDFD", 4)
_UCRED = struct.Struct("iII")


class Refused(Exception):
    """A connection the daemon will not serve; the message says why."""

    def __init__(self, err: int, why: str) -> None:
        super().__init__(why)
        self.errno = err


@dataclass
class Peer:
    """What the kernel says about the process that connected."""

    pid: int
    uid: int                 # effective uid at connect()
    gid: int
    pidfd: int               # ours; -1 once handed on

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:                    # before Linux 6.5: racy with pid reuse, checked again at hello
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = -1
    return Peer(pid, uid, gid, pidfd)


@dataclass
class Hello:
    op: int
    flags: int
    magic: int
    pid: int                 # SCM_CREDENTIALS, vouched for by the kernel
    uid: int
    gid: int


def receive_hello(sock: socket.socket, timeout: float) -> tuple[Hello, int]:
    """The first message on a connection: a hello (with credentials) or
    OP_INFO.  Returns it and the SCM_PIDFD of its sender (-1 if the kernel
    sent none), which the caller closes."""
    for opt in (socket.SO_PASSCRED, SO_PASSPIDFD):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 1)
        except OSError:
            pass
    sock.settimeout(timeout)
    try:
        msg, anc, _flags, _addr = sock.recvmsg(P.REQ.size + P.MAX_PAYLOAD + 1, 256)
    except (socket.timeout, OSError) as exc:
        raise Refused(errno.ETIMEDOUT, f"no hello ({exc})") from None
    creds = None
    scm_pidfd = -1
    for level, kind, data in anc:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_CREDENTIALS and len(data) >= _UCRED.size:
            creds = _UCRED.unpack_from(data)
        elif kind in (SCM_PIDFD, socket.SCM_RIGHTS):             # close what nobody else will
            fds = struct.unpack(f"{len(data) // 4}i", data[:len(data) // 4 * 4])
            for fd in fds:
                if kind == SCM_PIDFD and scm_pidfd < 0:
                    scm_pidfd = fd
                else:
                    os.close(fd)
    try:
        if not msg:
            raise Refused(errno.EPROTO, "malformed message: empty")
        if len(msg) != P.REQ.size:
            raise Refused(errno.EPROTO, f"malformed message: {len(msg)} bytes where a {P.REQ.size}-byte hello belongs")
        op, flags, _fd, _fd2, a0, *_rest, length, reserved = P.REQ.unpack_from(msg)
        if op not in (P.OP_HELLO, P.OP_INFO) or length or reserved:
            raise Refused(errno.EPROTO, f"malformed message: operation {op} before hello")
        if op == P.OP_INFO:
            return Hello(op, flags, a0, -1, -1, -1), scm_pidfd
        if creds is None:
            raise Refused(errno.EPERM, "the hello carries no SCM_CREDENTIALS")
        return Hello(op, flags, a0, *creds), scm_pidfd
    except Refused:
        if scm_pidfd >= 0:
            os.close(scm_pidfd)
        raise


def same_process(pidfd_a: int, pidfd_b: int) -> bool:
    """Two pidfds of one process (pidfs gives each process one inode)."""
    return os.fstat(pidfd_a).st_ino == os.fstat(pidfd_b).st_ino


@dataclass
class Bounds:
    """What a connection may ever act with: the ids the process had when it
    connected and said hello, and the capabilities it was permitted then."""

    uids: frozenset[int]
    gids: frozenset[int]
    caps: int

    def admits(self, c: native.Creds) -> str:
        """'' if ``c`` stays within; otherwise what left it."""
        if 0 in self.uids:
            return ""                  # root at connect: it may become anyone
        uids = {c.ruid, c.euid, c.suid, c.fsuid}
        if not uids <= self.uids:
            return f"its uids became {sorted(uids)} (it connected as {sorted(self.uids)})"
        gids = {c.rgid, c.egid, c.sgid, c.fsgid}
        if not gids <= self.gids:
            return f"its gids became {sorted(gids)} (it connected as {sorted(self.gids)})"
        if (c.cap_eff | c.cap_prm) & ~self.caps:
            return f"it gained capabilities {(c.cap_eff | c.cap_prm) & ~self.caps:#x}"
        return ""


def creds_from_status(status: str, limits: str) -> native.Creds:
    """native.Creds from /proc/<pid>/status and limits (kernels without PIDFD_GET_INFO)."""
    v: dict[str, int] = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        fields = value.split()
        if key == "Uid" and len(fields) == 4:
            v["ruid"], v["euid"], v["suid"], v["fsuid"] = (int(x) for x in fields)
        elif key == "Gid" and len(fields) == 4:
            v["rgid"], v["egid"], v["sgid"], v["fsgid"] = (int(x) for x in fields)
        elif key == "CapEff":
            v["cap_eff"] = int(value.strip(), 16)
        elif key == "CapPrm":
            v["cap_prm"] = int(value.strip(), 16)
    for line in limits.splitlines():
        if line.startswith("Max locked memory"):
            soft, hard = line.split()[3:5]
            inf = (1 << 64) - 1
            v["memlock_cur"] = inf if soft == "unlimited" else int(soft)
            v["memlock_max"] = inf if hard == "unlimited" else int(hard)
    return native.Creds(**v)
