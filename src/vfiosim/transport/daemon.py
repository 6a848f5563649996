"""The vfiosim daemon: one simulated machine serving real processes.

``vfiosim run`` and ``vfiosim serve`` start one.  Programs reach it through
the preload shim (src/vfiosim/preload/vfiosim_preload.c) over a Unix
socket, one connection per process (protocol.py).  Each real process is one
simulated task (``Kernel.attach`` with a :class:`HostMM`), whose fd numbers
are the process's own: the shim opens a real placeholder fd (a memfd named
``vfiosim:...``) and the daemon installs the simulated file at that number.

Life cycle of a task:

* first connection (``OP_HELLO``): attached with the process's credentials
  (from /proc) and a pidfd; if its parent is a task and the process holds
  ``vfiosim:`` memfds, it was spawned without our fork() (posix_spawn,
  clone): it gets its parent's files, then exec() semantics.
* ``OP_FORK`` from the parent right after fork(): ``Kernel.fork``.
* connection closed while the process lives: it exec()ed.  The new image's
  shim says hello again (``Kernel.exec`` and a reconciliation with
  /proc/<pid>/fd); if it never does, exec() semantics apply after a grace
  period.
* the pidfd polls readable: the process exited or was killed:
  ``Kernel.exit`` releases its groups, pins and locked memory.

The loop is single-threaded; every request runs under the machine's lock,
so the in-process API can be used on the same machine from other threads
(tests do).  A malformed message is logged and its connection dropped; a bug
in the simulator becomes EIO for that call (and an entry in
``machine.oopses``), never a dead daemon.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import selectors
import socket
import struct
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Callable

from ..kernel.cred import Cred
from ..kernel.errors import KernelError, fail
from ..kernel.fs import File
from . import protocol as P
from .host import HostEventFd, HostMM, read_host_creds
from .sysfs import FakeSysfs
from .trace import Tracer

if TYPE_CHECKING:
    from ..kernel.task import Task
    from ..machine import Machine

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_pidfd_getfd = 438
MAX_RW = 16 << 20                      # bytes moved by one read/write request
EXEC_GRACE = 0.5                       # seconds between a lost connection and exec() semantics


def pidfd_getfd(pidfd: int, fd: int) -> int:
    ret = _libc.syscall(_SYS_pidfd_getfd, pidfd, fd, 0)
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(ret)


def _proc_ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[1])


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


class ForeignFile(File):
    """A file of the real process that the simulated kernel does not own
    (a pipe, a socket, a regular file): enough for fdget()."""

    kind = "host-file"

    def __init__(self, name: str) -> None:
        super().__init__(name)


@dataclass
class TaskState:
    pid: int
    task: "Task"
    pidfd: int
    conn: "Conn | None" = None
    mappings: dict[int, tuple[File, int]] = field(default_factory=dict)
    eventfds: dict[tuple[int, str], HostEventFd] = field(default_factory=dict)
    exec_deadline: float | None = None
    exec_done: bool = False
    tracer: Tracer | None = None


@dataclass
class Conn:
    sock: socket.socket
    pid: int
    uid: int
    state: TaskState | None = None


class Daemon:
    """Serves one machine on a Unix socket."""

    def __init__(self, machine: "Machine", sock_path: str, *, trace: str | IO[str] | None = None,
                 log: Callable[[str], None] | None = None, sysfs: FakeSysfs | None = None) -> None:
        self.machine = machine
        self.kernel = machine.kernel
        self.sock_path = sock_path
        self.sysfs = sysfs or FakeSysfs(machine)
        self._own_sysfs = sysfs is None
        self.log = log or (lambda text: print(f"vfiosim: {text}", file=sys.stderr, flush=True))
        self.tracer = Tracer(trace, machine.platform, machine=machine) if trace is not None else None
        self.states: dict[int, TaskState] = {}
        self.sel = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            os.unlink(sock_path)
        except FileNotFoundError:
            pass
        self.listener.bind(sock_path)
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, ("listen", None))
        self._next_handle = 1
        self._stopped = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self.exited: list[int] = []          # pids whose tasks ended, in order (for tests)
        # Programs' eventfds we hold, and those of them the selector watches
        # because a virqfd (INTx unmask, VFIO_DEVICE_IOEVENTFD) waits on them.
        self._host_eventfds: "weakref.WeakSet[HostEventFd]" = weakref.WeakSet()
        self._watched: dict[int, HostEventFd] = {}

    @property
    def root(self) -> str:
        return self.sysfs.root

    # -- the loop ----------------------------------------------------------------------------------

    def serve(self, until: Callable[[], bool] | None = None, poll: float = 0.2) -> None:
        """Serve until stop() is called or ``until()`` returns True."""
        while not self._stopped:
            if until is not None and until():
                break
            self.step(poll)

    def step(self, timeout: float) -> None:
        deadline = min((s.exec_deadline for s in self.states.values() if s.exec_deadline is not None),
                       default=None)
        if deadline is not None:
            timeout = max(0.0, min(timeout, deadline - time.monotonic()))
        for key, _ in self.sel.select(timeout):
            kind, obj = key.data
            try:
                if kind == "listen":
                    self._accept()
                elif kind == "conn":
                    self._readable(obj)
                elif kind == "pidfd":
                    self._task_died(obj)
                elif kind == "wake":
                    try:
                        os.read(self._wake_r, 64)
                    except BlockingIOError:
                        pass
                # "virqfd": handled below, with every other eventfd that has data
            except Exception as exc:               # never let one client take the daemon down
                self.log(f"internal error: {exc!r}")
                self.machine.oopses.append(f"daemon: {exc!r}")
        self._run_virqfds()
        now = time.monotonic()
        for st in list(self.states.values()):
            if st.exec_deadline is not None and now >= st.exec_deadline:
                st.exec_deadline = None
                # The connection went and the process lives: it exec()ed a program that
                # did not say hello (yet).  Close-on-exec files go; the rest is what
                # the real process still holds.
                with self.machine._lock:
                    try:
                        self._do_exec(st, reconcile=True)
                    except Exception as exc:
                        self.machine._oops(f"exec of pid {st.pid}", exc)

    def stop(self) -> None:
        self._stopped = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def close(self) -> None:
        """Release every task (as if each process exited) and the socket."""
        for st in list(self.states.values()):
            self._end_task(st, "daemon shut down")
        try:
            self.sel.unregister(self.listener)
        except (KeyError, ValueError):
            pass
        self.listener.close()
        try:
            os.unlink(self.sock_path)
        except OSError:
            pass
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self.sel.close()
        if self.tracer is not None:
            self.tracer.close()
        if self._own_sysfs:
            self.sysfs.close()

    # -- connections ----------------------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", cred)
        sock.setblocking(True)
        sock.settimeout(5.0)                   # a reply that cannot be sent within 5 s drops the client
        conn = Conn(sock, pid, uid)
        self.sel.register(sock, selectors.EVENT_READ, ("conn", conn))

    def _drop(self, conn: Conn, why: str | None = None) -> None:
        if why:
            self.log(f"dropping the connection of pid {conn.pid}: {why}")
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        st = conn.state
        if st is not None and st.conn is conn:
            st.conn = None
            if st.pid in self.states:
                if self._pid_alive(st):
                    st.exec_deadline = time.monotonic() + EXEC_GRACE
                else:
                    self._task_died(st)

    @staticmethod
    def _pid_alive(st: TaskState) -> bool:
        import select
        p = select.poll()
        p.register(st.pidfd, select.POLLIN)
        return not p.poll(0)

    def _readable(self, conn: Conn) -> None:
        try:
            msg = conn.sock.recv(P.REQ.size + P.MAX_PAYLOAD + 1)
        except OSError:
            msg = b""
        if not msg:
            self._drop(conn)
            return
        try:
            op, flags, fd, fd2, a, payload = P.unpack_request(msg)
            if conn.state is None and op not in (P.OP_HELLO, P.OP_INFO):
                raise P.ProtocolError(f"{P.OP_NAMES[op]} before hello")
        except P.ProtocolError as exc:
            self._drop(conn, f"malformed message: {exc}")
            return
        # A program that wrote an ioeventfd or unmask eventfd and then makes a call
        # sees the write's effect, as the kernel acts inside the write.
        self._run_virqfds()
        reply = self._dispatch(conn, op, flags, fd, fd2, a, payload)
        try:
            conn.sock.sendall(reply)
        except OSError as exc:
            self._drop(conn, f"cannot reply: {exc}")

    # -- requests ---------------------------------------------------------------------------------------

    def _dispatch(self, conn: Conn, op: int, flags: int, fd: int, fd2: int, a: tuple[int, ...],
                  payload: bytes) -> bytes:
        m = self.machine
        if op == P.OP_INFO:
            return P.pack_reply(0, 0, self.root.encode())
        if op == P.OP_HELLO:
            if conn.state is not None or a[0] != P.MAGIC_VERSION:
                return P.pack_reply(-1, errno.EPROTO)
            with m._lock:
                try:
                    self._hello(conn, flags)
                except KernelError as exc:
                    return P.pack_reply(-1, exc.errno)
                except OSError as exc:               # the process went away while we looked at it
                    return P.pack_reply(-1, exc.errno or errno.ESRCH)
                except Exception as exc:
                    m._oops("hello", exc)
                    return P.pack_reply(-1, errno.EIO)
            return P.pack_reply(0, 0, self.root.encode())
        st = conn.state
        assert st is not None
        task = st.task
        tracer = st.tracer
        with m._lock:
            if not task.alive:
                return P.pack_reply(-1, errno.EIO)
            rec = tracer.begin(task, op, flags, fd, fd2, a, payload) \
                if tracer is not None and op != P.OP_STATUS else None
            out = b""
            try:
                if flags & P.F_REFRESH_CREDS:
                    self._refresh_creds(st)
                ret, out = self._call(st, op, flags, fd, fd2, a, payload)
                err = 0
            except KernelError as exc:
                ret, err = -1, exc.errno
                if rec is not None:
                    rec["reason"] = exc.reason
            except Exception as exc:
                m._oops(f"{P.OP_NAMES.get(op, op)} from pid {st.pid}", exc)
                ret, err = -1, errno.EIO
            if rec is not None:
                assert tracer is not None
                if op == P.OP_MMIO and not flags & P.MMIO_WRITE and len(out) == 8:
                    rec["value"] = struct.unpack("<Q", out)[0]
                tracer.end(rec, task, ret, err)
        return P.pack_reply(ret, err, out)

    def _call(self, st: TaskState, op: int, flags: int, fd: int, fd2: int, a: tuple[int, ...],
              payload: bytes) -> tuple[int, bytes]:
        k = self.kernel
        task = st.task
        if op == P.OP_OPEN:
            path = payload.decode("utf-8", "surrogateescape")
            return k.sys_open(task, path, _s32(a[0]), a[1] & 0xFFFF, at_fd=fd), b""
        if op == P.OP_CLOSE:
            k.sys_close(task, fd)
            return 0, b""
        if op == P.OP_IOCTL:
            return self._ioctl(st, fd, fd2, a[0] & 0xFFFFFFFF, a[1]), b""
        if op == P.OP_READ:
            count = min(a[1], MAX_RW)
            if flags & P.RW_POSITIONAL:
                data = k.sys_pread(task, fd, count, _s64(a[2]))
            else:
                data = k.sys_read(task, fd, count)
            if data:
                task.mm.write(a[0], data)
            return len(data), b""
        if op == P.OP_WRITE:
            count = min(a[1], MAX_RW)
            file = task.files.get(fd)                  # EBADF before EFAULT, as vfs_write()
            if not file.can_write:
                raise fail(errno.EBADF, f"fd {fd} was not opened for writing")
            data = task.mm.read(a[0], count)
            if flags & P.RW_POSITIONAL:
                return k.sys_pwrite(task, fd, data, _s64(a[2])), b""
            return k.sys_write(task, fd, data), b""
        if op == P.OP_DUP:
            if fd2 < 0:
                raise fail(errno.EBADF, f"bad new fd {fd2}")
            file = task.files.get(fd)
            if fd == fd2:
                return fd2, b""
            k.sys_dup2(task, fd, fd2, cloexec=bool(a[0]))
            del file
            return fd2, b""
        if op == P.OP_SETFD:
            task.files.get(fd)
            if a[0]:
                task.files.cloexec.add(fd)
            else:
                task.files.cloexec.discard(fd)
            return 0, b""
        if op == P.OP_MMAP:
            k.sys_mmap_check(task, fd, a[0], a[1], a[2] & 0xFFFFFFFF, bool(a[3]))
            file = task.files.get(fd).get()
            handle = self._next_handle
            self._next_handle += 1
            st.mappings[handle] = (file, a[0])
            return handle, b""
        if op == P.OP_MMIO:
            entry = st.mappings.get(a[0])
            if entry is None:
                raise fail(errno.EFAULT, f"no device mapping {a[0]}")
            file, base = entry
            size = a[2]
            if size not in (1, 2, 4, 8):
                raise fail(errno.EINVAL, f"MMIO access of {size} bytes")
            value = a[3] if flags & P.MMIO_WRITE else None
            mmio = getattr(file, "mmio", None)
            if mmio is None:
                raise fail(errno.ENODEV, f"{file.kind} has no mapped region")
            ret = mmio(task, base + a[1], size, value)
            return 0, struct.pack("<Q", ret & 0xFFFFFFFFFFFFFFFF)
        if op == P.OP_MUNMAP:
            entry = st.mappings.pop(a[0], None)
            if entry is not None:
                entry[0].put(task)
            return 0, b""
        if op == P.OP_STATUS:
            mm = task.mm
            kb = mm.page_size // 1024
            return 0, struct.pack("<QQ", mm.locked_vm * kb, mm.pinned_vm * kb)
        if op == P.OP_FORK:
            self._fork(st, a[0])
            return 0, b""
        raise fail(errno.EINVAL, f"operation {op} after hello")

    def _ioctl(self, st: TaskState, fd: int, placeholder: int, cmd: int, arg: int) -> int:
        task = st.task
        k = self.kernel
        before = set(task.files.fds())
        try:
            ret = k.sys_ioctl(task, fd, cmd, arg)
        finally:
            new = [n for n in task.files.fds() if n not in before]
        if not new:
            return ret
        # The kernel installed a file (VFIO_GROUP_GET_DEVICE_FD) at the lowest
        # number free in the simulated table: move it to the real placeholder.
        moved = None
        for n in new:
            cloexec = n in task.files.cloexec
            file = task.files.remove(n)
            if n == ret and placeholder >= 0 and moved is None:
                task.files.install_at(placeholder, file, cloexec=cloexec)
                moved = placeholder
            else:
                file.put(task)
        if moved is None:
            raise fail(errno.EIO, "the ioctl returned a new fd but the program has no fd for it")
        return moved

    # -- tasks ----------------------------------------------------------------------------------------------

    def _new_state(self, pid: int, task: "Task") -> TaskState:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            self.kernel.exit(task)             # drops the references a fork took
            raise fail(errno.ESRCH, f"process {pid} is gone") from None
        st = TaskState(pid, task, pidfd, tracer=self.tracer)
        task.files.foreign = lambda n, st=st: self._foreign(st, n)
        self.states[pid] = st
        self.sel.register(pidfd, selectors.EVENT_READ, ("pidfd", st))
        return st

    def _creds(self, pid: int) -> tuple[Cred, tuple[int, int]]:
        c = read_host_creds(pid)
        return Cred(c.uid, c.euid, c.suid, c.gid, c.egid, c.groups, c.caps), c.memlock

    def _refresh_creds(self, st: TaskState) -> None:
        try:
            cred, memlock = self._creds(st.pid)
        except OSError:
            return
        st.task.set_creds(cred, memlock)

    def _hello(self, conn: Conn, flags: int) -> None:
        pid = conn.pid
        st = self.states.get(pid)
        if st is not None:
            if st.conn is not None and st.conn is not conn:
                self._drop(st.conn)            # the old image's connection (exec)
                st = self.states.get(pid)
        if st is not None:
            st.exec_deadline = None
            if not flags & P.HELLO_FORK:
                # A new image in a known process: exec().
                self._do_exec(st, reconcile=True)
            st.conn = conn
            conn.state = st
            self._refresh_creds(st)
            return
        cred, memlock = self._creds(pid)
        ppid = _proc_ppid(pid)
        parent = self.states.get(ppid)
        k = self.kernel
        if parent is not None:
            # Created without our fork() wrapper (posix_spawn, clone) or before
            # the parent's OP_FORK arrived: it shares the parent's files.
            task = k.fork(parent.task, pid, HostMM(pid, k.phys))
            task.comm = _comm(pid)
            st = self._new_state(pid, task)
            self._copy_mappings(parent, st)
            if not flags & P.HELLO_FORK:
                self._do_exec(st, reconcile=True)
            else:
                self._reconcile(st)
        else:
            task = k.attach(pid, _comm(pid), cred, HostMM(pid, k.phys), memlock)
            st = self._new_state(pid, task)
        st.task.set_creds(cred, memlock)
        st.conn = conn
        conn.state = st

    def _copy_mappings(self, parent: TaskState, child: TaskState) -> None:
        for handle, (file, off) in parent.mappings.items():
            child.mappings[handle] = (file.get(), off)

    def _fork(self, st: TaskState, child_pid: int) -> None:
        if child_pid in self.states:
            return                              # the child said hello first
        if _proc_ppid(child_pid) != st.pid:
            raise fail(errno.ESRCH, f"pid {child_pid} is not a child of {st.pid}")
        k = self.kernel
        try:
            os.close(os.pidfd_open(child_pid))
        except OSError:
            return                              # it is gone already: nothing to give it
        task = k.fork(st.task, child_pid, HostMM(child_pid, k.phys))
        try:
            cred, memlock = self._creds(child_pid)
            task.set_creds(cred, memlock)
        except OSError:
            pass
        child = self._new_state(child_pid, task)
        self._copy_mappings(st, child)
        if not self._pid_alive(child):
            self._task_died(child)

    def _do_exec(self, st: TaskState, reconcile: bool) -> None:
        if not st.exec_done:
            # exec_mmap(): the old image's mappings (BARs included) go with its
            # mm, before the close-on-exec files do.
            for file, _off in st.mappings.values():
                file.put(st.task)
            st.mappings.clear()
            old = st.task.mm
            self.kernel.exec(st.task, HostMM(st.pid, self.kernel.phys))
            self._note_orphaned(st, old, "exec()ed")
            st.exec_done = True
            st.task.comm = _comm(st.pid)
        if reconcile:
            self._reconcile(st)
            st.exec_done = False

    def _reconcile(self, st: TaskState) -> None:
        """Drop simulated files whose fd the real process no longer holds."""
        task = st.task
        for n in task.files.fds():
            try:
                link = os.readlink(f"/proc/{st.pid}/fd/{n}")
            except OSError:
                link = ""
            if not link.startswith("/memfd:vfiosim:"):
                task.files.remove(n).put(task)

    def _foreign(self, st: TaskState, n: int) -> File | None:
        try:
            link = os.readlink(f"/proc/{st.pid}/fd/{n}")
        except OSError:
            return None
        if link != "anon_inode:[eventfd]":
            return ForeignFile(link)
        eid = ""
        try:
            with open(f"/proc/{st.pid}/fdinfo/{n}") as f:
                for line in f:
                    if line.startswith("eventfd-id:"):
                        eid = line.split(":", 1)[1].strip()
        except OSError:
            return None
        key = (n, eid)
        efd = st.eventfds.get(key)
        if efd is None:
            try:
                dup = pidfd_getfd(st.pidfd, n)
            except OSError as exc:
                self.log(f"cannot take eventfd {n} of pid {st.pid}: {exc}")
                return ForeignFile(link)
            efd = st.eventfds[key] = HostEventFd(dup)
            efd.before_close = lambda fd=dup: self._unwatch(fd)
            self._host_eventfds.add(efd)
        return efd

    def _unwatch(self, fd: int) -> None:
        if self._watched.pop(fd, None) is not None:
            try:
                self.sel.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass

    def _run_virqfds(self) -> None:
        """The kernel's virqfd wake-ups for programs' eventfds: run the handler of
        each that has been written to, and watch exactly those that have one."""
        live = {}
        with self.machine._lock:
            for efd in list(self._host_eventfds):
                if efd.fd >= 0 and efd.waiters:
                    live[efd.fd] = efd
                    try:
                        efd.take_signal()
                    except Exception as exc:       # a handler's bug: an oops, not a dead daemon
                        self.machine._oops("ioeventfd/virqfd handler", exc)
        for fd in [fd for fd, efd in self._watched.items() if live.get(fd) is not efd]:
            self._unwatch(fd)
        for fd, efd in live.items():
            if fd not in self._watched:
                self.sel.register(fd, selectors.EVENT_READ, ("virqfd", efd))
                self._watched[fd] = efd

    def _task_died(self, st: TaskState) -> None:
        self._end_task(st, "exited")

    def _end_task(self, st: TaskState, why: str) -> None:
        if self.states.get(st.pid) is not st:
            return
        m = self.machine
        with m._lock:
            try:
                # exit_mm() before exit_files(): the device mappings go first.
                for file, _off in st.mappings.values():
                    file.put(st.task)
                st.mappings.clear()
                self.kernel.exit(st.task)
                self._note_orphaned(st, st.task.mm, "exited")
            except Exception as exc:
                m._oops(f"exit of pid {st.pid}", exc)
            self._close_eventfds(st)
        del self.states[st.pid]
        try:
            self.sel.unregister(st.pidfd)
        except (KeyError, ValueError):
            pass
        os.close(st.pidfd)
        if st.conn is not None:
            conn, st.conn = st.conn, None
            conn.state = None
            self._drop(conn)
        if st.tracer is not None:
            st.tracer.event(st.pid, "exit", why)
        self.exited.append(st.pid)

    def _note_orphaned(self, st: TaskState, mm: object, why: str) -> None:
        """Pages of an image that is gone and that DMA mappings still pin (in a
        container the new image, or another process, still holds): say what a
        device sees there."""
        pages = mm.pinned_pages() if isinstance(mm, HostMM) else 0
        if pages:
            self.kernel.log.warn(f"vfiosim: pid {st.pid} {why} with {pages} of its pages still pinned by DMA "
                                 f"mappings: Linux keeps those pages; vfiosim can no longer read them, so a "
                                 f"device reads zeros there and never reaches the pid's new memory")

    def _close_eventfds(self, st: TaskState) -> None:
        """Close our duplicates of the task's eventfds unless a device still signals one."""
        referenced = set()
        for group in getattr(self.kernel.vfio, "groups", {}).values():
            for vdev in getattr(group, "devices", []):
                ops = getattr(vdev, "ops", None)
                for trig in [getattr(ops, "intx_trigger", None), getattr(ops, "req_trigger", None),
                             *getattr(ops, "msi_triggers", [])]:
                    if trig is not None:
                        referenced.add(id(trig))
        for key, efd in list(st.eventfds.items()):
            if id(efd) not in referenced and not efd.waiters:       # a virqfd still uses it
                efd.release(st.task)
                del st.eventfds[key]

    # -- introspection for tests ---------------------------------------------------------------------------

    def pids(self) -> list[int]:
        return sorted(self.states)


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _s64(v: int) -> int:
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= 1 << 63 else v
