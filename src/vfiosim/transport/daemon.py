"""The vfiosim daemon: one simulated machine serving real processes.

``vfiosim run`` and ``vfiosim serve`` start one.  Programs reach it through
the preload shim (src/vfiosim/preload/vfiosim_preload.c), one connection per
process (protocol.py).  Each real process is one simulated task
(``Kernel.attach`` with a :class:`HostMM`), whose fd numbers are the
process's own: the shim opens a real placeholder fd (a memfd named
``vfiosim:...``) and the daemon installs the simulated file at that number.

It is a privileged service: it reads and writes other processes' memory
for them, so it acts with the rights of whoever connected and no more
(docs/reliability.md has the threat model):

* a connection belongs to the process that connected, proven by the kernel
  (peer.py); the daemon opens that process's memory with that process's
  credentials, bound to the address space it had then;
* its credentials are taken again at every privileged decision (the task's
  ``refresh_creds``); if its ids leave what it connected with (a set-uid
  exec), the connection ends;
* a thread per connection serves it through a shared-memory channel (a
  request and a reply, futex wake-ups), so a client that stalls stalls only
  itself; connections per uid, eventfd handles per task and mappings per
  task are bounded, and running out of file descriptors makes the daemon
  back off, not spin.

Life cycle of a task:

* first connection (``OP_HELLO``): attached with the process's credentials;
  if its parent is a task, it was made by fork() or spawned (posix_spawn,
  clone): it gets the files of its parent it provably holds -- the very same
  open files, compared with kcmp() -- never what a memfd's name claims.
* ``OP_FORK`` from the parent right after fork(): ``Kernel.fork``.
* connection closed while the process lives: it exec()ed.  The new image's
  shim says hello again (``Kernel.exec`` and a reconciliation with
  /proc/<pid>/fd); if it never does, exec() semantics apply after a grace
  period.
* the pidfd polls readable: the process exited or was killed:
  ``Kernel.exit`` releases its groups, pins and locked memory.

Every call enters the kernel through its syscall gate (kernel/syscall.py):
the machine's lock, an errno for a kernel error, an oops (EIO) for a bug.
A malformed message is logged and its connection dropped.
"""

from __future__ import annotations

import errno
import functools
import os
import queue
import resource
import select
import selectors
import socket
import stat
import struct
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Callable

from ..kernel.cred import Cred
from ..kernel.errors import KernelError, fail
from ..kernel.fs import File
from ..kernel.task import CREDS_CAPS_STALE, CREDS_FRESH, CREDS_MEMLOCK_STALE, CREDS_STALE
from . import native
from . import protocol as P
from .host import HostEventFd, HostMM, HostProcess, parse_host_creds
from .peer import Bounds, Peer, Refused, creds_from_status, peer_of, receive_hello, same_process
from .sysfs import FakeSysfs
from .trace import Tracer

if TYPE_CHECKING:
    from ..kernel.task import Task
    from ..machine import Machine

MAX_RW = 16 << 20                      # bytes moved by one read/write request
EXEC_GRACE = 0.5                       # seconds between a lost connection and exec() semantics
HELLO_TIMEOUT = 5.0                    # seconds a new connection has to say hello
WAIT_MS = 50                           # a serving thread's sleep: posted stores wait at most this long
MAX_CONNECTIONS_PER_UID = 64
MAX_CONNECTIONS = 1024
MAX_EVENTFDS = 256                     # a task's eventfds the daemon holds handles on
DEFAULT_MAX_MAP_COUNT = 65530          # vm.max_map_count's default
PID_MAX_LIMIT = 1 << 22                # include/linux/threads.h on 64-bit
LOG_BURST = 10                         # log lines a second per kind of message
_UNTRACED = frozenset({P.OP_STATUS, P.OP_FLUSH, P.OP_MMIO})     # MMIO has its own, smaller records
# Operations after which no mapping's memory decoding can have changed (the
# PCI command register is written through config space: OP_WRITE).
_DECODING_UNCHANGED = frozenset({P.OP_MMIO, P.OP_FLUSH, P.OP_STATUS, P.OP_READ, P.OP_MMAP, P.OP_MUNMAP})
_U64 = struct.Struct("<Q")
_UNKNOWN: Any = object()                                        # a store_fns key not asked yet
_WINDOWED = frozenset({P.OP_IOCTL, P.OP_READ, P.OP_WRITE})     # operations that may carry a window
# Read by every request (a module global costs less than an attribute of a module).
_OP_NAMES = P.OP_NAMES
_OP_IOCTL = P.OP_IOCTL
_CREDS_FIRST = frozenset({P.OP_OPEN, P.OP_SETATTR})    # operations that decide with the credentials at once
_F_REFRESH_CREDS, _F_WINDOW, _F_WINDOW_WRITABLE = P.F_REFRESH_CREDS, P.F_WINDOW, P.F_WINDOW_WRITABLE
_VD_POSTS, _VD_MALFORMED = native.VD_POSTS, native.VD_MALFORMED
# Why native.creds() may fail while /proc still answers: no PIDFD_GET_INFO (before Linux 6.13), or refused.
_CREDS_FROM_PROC = (errno.ENOTTY, errno.EPERM, errno.EACCES)


def _max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return DEFAULT_MAX_MAP_COUNT


class ForeignFile(File):
    """A file of the real process that the simulated kernel does not own
    (a pipe, a socket, a regular file): enough for fdget()."""

    kind = "host-file"

    def __init__(self, name: str) -> None:
        super().__init__(name)


@dataclass
class Mapping:
    """A BAR mapping of a device file in a process (the mapping's vm_file reference)."""

    file: File
    offset: int                        # in the file's mmap space
    length: int
    slot: int = -1                     # its posted-store flag in the channel, or -1
    live: Callable[[], bool] | None = None     # with a slot: whether decoding is on (Kernel.mmap_live_check)
    vaddr: int = 0                     # where the program mapped it (0: not said)
    prot: int = 0
    # Posted stores' shortcuts by (offset, size), as the device offers them (Kernel.mmap_store_fn).
    store_fns: dict[tuple[int, int], Callable[[int], bool] | None] = field(default_factory=dict)
    # Loads' shortcuts by (offset, size) (Kernel.mmap_load_fn): a status register a driver polls.
    load_fns: dict[tuple[int, int], Callable[[], int | None] | None] = field(default_factory=dict)


@dataclass
class TaskState:
    pid: int
    task: "Task"
    pidfd: int
    procdir: int                       # /proc/<pid>, bound to the process (not to a pid number)
    session: "Session | None" = None
    mappings: dict[int, Mapping] = field(default_factory=dict)
    eventfds: dict[int, tuple[str, HostEventFd]] = field(default_factory=dict)   # by fd number
    exec_deadline: float | None = None
    exec_done: bool = False
    tracer: Tracer | None = None
    creds: native.Creds | None = None          # the credentials last taken (and adopted)
    acting: tuple[int, int] | None = None      # (uid, gid) the daemon takes to act for it; None: no switch
    revoked: str = ""                          # why it is no longer the process that connected


class Session:
    """One connection: its socket, the process at the other end, the
    channel its calls travel through, and the thread serving it."""

    def __init__(self, sock: socket.socket, peer: Peer) -> None:
        self.sock = sock
        self.peer = peer
        self.bounds = Bounds(frozenset(), frozenset(), 0)
        self.channel: native.Channel | None = None
        self.state: TaskState | None = None
        self.thread: threading.Thread | None = None
        # (native.Channel is created once the hello is verified)
        self.lock = threading.Lock()           # the channel's lifetime
        self.ended = False                     # the main thread let go of it
        self.next_slot = 0

    def stop(self) -> None:
        with self.lock:
            if self.channel is not None:
                self.channel.wake()


class Daemon:
    """Serves one machine on a Unix socket."""

    def __init__(self, machine: "Machine", sock_path: str, *, trace: str | IO[str] | None = None,
                 log: Callable[[str], None] | None = None, sysfs: FakeSysfs | None = None) -> None:
        self.machine = machine
        self.kernel = machine.kernel
        self.gate = machine.kernel.gate
        self.sock_path = sock_path
        self.log = log or (lambda text: print(f"vfiosim: {text}", file=sys.stderr, flush=True))
        self.listener, self._stamp = bind_listener(sock_path)
        self.sysfs = sysfs or FakeSysfs(machine)
        self._own_sysfs = sysfs is None
        try:
            self.tracer = Tracer(trace, machine.platform, machine=machine) if trace is not None else None
        except BaseException:
            self.listener.close()
            unlink_socket(sock_path, self._stamp)
            if self._own_sysfs:
                self.sysfs.close()
            raise
        self.states: dict[int, TaskState] = {}
        self.sessions: set[Session] = set()
        self._per_uid: dict[int, int] = {}
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, ("listen", None))
        self._listening = True
        self._accept_again = 0.0               # EMFILE back-off: when to listen again
        self._backoff = 0.05
        self._next_handle = 1
        self._stopped = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._commands: "queue.SimpleQueue[Callable[[], None]]" = queue.SimpleQueue()
        # Every task's pidfd, in one epoll set: whichever thread next enters the
        # kernel reaps the processes that exited first, so a parent's call after
        # its child's exit finds the child's files closed, as on Linux.
        self._exits = select.epoll()
        self._by_pidfd: dict[int, TaskState] = {}
        self.sel.register(self._exits.fileno(), selectors.EVENT_READ, ("exits", None))
        self.exited: list[int] = []          # pids whose tasks ended, in order (for tests)
        # Programs' eventfds we hold, and those of them the selector watches
        # because a virqfd (INTx unmask, VFIO_DEVICE_IOEVENTFD) waits on them.
        # (A set of weak references rather than a WeakSet: every request asks
        # whether it is empty, and a WeakSet answers that in Python.)
        self._host_eventfds: "set[weakref.ref[HostEventFd]]" = set()
        self._watched: dict[int, HostEventFd] = {}
        # Handles a task no longer names but a device may still use: closed once none does.
        self._retired: list[tuple["Task", HostEventFd]] = []
        self._logged: dict[str, tuple[float, int, int]] = {}
        self.max_map_count = _max_map_count()
        self._handlers: dict[int, Callable[..., tuple[int, bytes]]] = {
            P.OP_OPEN: self._op_open, P.OP_CLOSE: self._op_close, P.OP_IOCTL: self._op_ioctl,
            P.OP_READ: self._op_read, P.OP_WRITE: self._op_write, P.OP_DUP: self._op_dup,
            P.OP_SETFD: self._op_setfd, P.OP_MMAP: self._op_mmap, P.OP_MMIO: self._op_mmio,
            P.OP_MUNMAP: self._op_munmap, P.OP_STATUS: self._op_status, P.OP_FORK: self._op_fork,
            P.OP_FLUSH: self._op_flush, P.OP_SETATTR: self._op_setattr,
        }
        _raise_fd_limit()

    @property
    def root(self) -> str:
        return self.sysfs.root

    # -- the main loop: connections, process exits, eventfd wake-ups -----------------------------------

    def serve(self, until: Callable[[], bool] | None = None, poll: float = 0.2) -> None:
        """Serve until stop() is called or ``until()`` returns True."""
        while not self._stopped:
            if until is not None and until():
                break
            self.step(poll)

    def step(self, timeout: float) -> None:
        now = time.monotonic()
        deadlines = [s.exec_deadline for s in list(self.states.values()) if s.exec_deadline is not None]
        if not self._listening:
            deadlines.append(self._accept_again)
        if deadlines:
            timeout = max(0.0, min(timeout, min(deadlines) - now))
        for key, _ in self.sel.select(timeout):
            kind, obj = key.data
            try:
                if kind == "listen":
                    self._accept()
                elif kind == "sock":
                    self._socket_event(obj)
                elif kind == "exits":
                    self._reap_exits()
                elif kind == "wake":
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                # "virqfd": handled below, with every other eventfd that has data
            except Exception as exc:               # never let one client take the daemon down
                self._oops("daemon main loop", exc)
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            try:
                command()
            except Exception as exc:
                self._oops("daemon command", exc)
        self._run_virqfds()
        now = time.monotonic()
        if not self._listening and now >= self._accept_again:
            self.sel.register(self.listener, selectors.EVENT_READ, ("listen", None))
            self._listening = True
        for st in list(self.states.values()):
            if st.exec_deadline is not None and now >= st.exec_deadline:
                st.exec_deadline = None
                # The connection went and the process lives: it exec()ed a program that
                # did not say hello (yet).  Close-on-exec files go; the rest is what
                # the real process still holds.
                try:
                    self.gate.run(lambda: f"exec of pid {st.pid}", self._do_exec, st, None, True)
                except KernelError:
                    pass
        if self.tracer is not None:
            self.tracer.flush()

    def _post(self, command: Callable[[], None]) -> None:
        """Run ``command`` in the main loop (which owns the selector)."""
        self._commands.put(command)
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def stop(self) -> None:
        self._stopped = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def close(self) -> None:
        """Release every task (as if each process exited) and the socket."""
        for sess in list(self.sessions):
            self._end_session(sess, None)
        for st in list(self.states.values()):
            self._end_task(st, "daemon shut down")
        for sess in list(self.sessions):
            if sess.thread is not None:
                sess.thread.join(5)
        self._exits.close()
        try:
            self.sel.unregister(self.listener)
        except (KeyError, ValueError):
            pass
        self.listener.close()
        unlink_socket(self.sock_path, self._stamp)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self.sel.close()
        if self.tracer is not None:
            self.tracer.close()
        if self._own_sysfs:
            self.sysfs.close()

    def _log_limited(self, key: str, text: str) -> None:
        """At most LOG_BURST lines a second per kind of message; the next line
        that gets through counts the ones held back."""
        now = time.monotonic()
        start, lines, held = self._logged.get(key, (now, 0, 0))
        if now - start >= 1.0:
            start, lines = now, 0
        if lines < LOG_BURST:
            self.log(text + (f" ({held} more like it not shown)" if held else ""))
            self._logged[key] = (start, lines + 1, 0)
        else:
            self._logged[key] = (start, lines, held + 1)

    def _oops(self, what: str, exc: BaseException) -> None:
        self.gate.oops(what, exc)
        self._log_limited("internal", f"internal error during {what}: {exc!r}")

    # -- connections ----------------------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of descriptors: stop listening for a while instead of spinning.
                self.sel.unregister(self.listener)
                self._listening = False
                self._accept_again = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, 1.0)
                self._log_limited("accept", f"cannot accept connections: {exc.strerror}; waiting")
                return
            raise
        self._backoff = 0.05
        try:
            peer = peer_of(sock)
        except OSError:
            sock.close()
            return
        count = self._per_uid.get(peer.uid, 0)
        if count >= MAX_CONNECTIONS_PER_UID or len(self.sessions) >= MAX_CONNECTIONS:
            self._log_limited(f"limit{peer.uid}", f"refusing a connection of uid {peer.uid} (pid {peer.pid}): "
                                                   f"{count} connections of that uid already "
                                                   f"(at most {MAX_CONNECTIONS_PER_UID} per uid)")
            peer.close()
            sock.close()
            return
        self._per_uid[peer.uid] = count + 1
        sess = Session(sock, peer)
        self.sessions.add(sess)
        sess.thread = threading.Thread(target=self._session_main, args=(sess,), daemon=True,
                                       name=f"vfiosim-pid{peer.pid}")
        sess.thread.start()

    def _session_main(self, sess: Session) -> None:
        """The thread serving one connection: the hello, then every call."""
        try:
            if self._hello(sess):
                self._serve_channel(sess)
        except P.ProtocolError as exc:
            self._log_limited("malformed", f"dropping the connection of pid {sess.peer.pid}: malformed message: {exc}")
        except Exception as exc:
            self._oops(f"connection of pid {sess.peer.pid}", exc)
        finally:
            # Others reach the channel under the machine lock (posted stores) or
            # the session's (a wake-up): it goes under both.
            with self.gate.lock, sess.lock:
                if sess.channel is not None:
                    sess.channel.close()
                    sess.channel = None
            self._post(lambda: self._end_session(sess, None))

    def _end_session(self, sess: Session, why: str | None) -> None:
        """Let go of a connection (main loop only): its socket goes; if its
        process lives on, it exec()ed (or handed its channel on)."""
        if sess.ended:
            return
        sess.ended = True
        if why:
            self.log(f"dropping the connection of pid {sess.peer.pid}: {why}")
        with self.gate.lock:
            # Stores the program posted just before it exited (or exec()ed) reach the
            # device, whether its socket's end or its exit is seen first: below, the
            # task lets go of the session, and the session's thread of the channel.
            if sess.channel is not None and sess.state is not None and sess.state.session is sess:
                self._flush_posts(sess)
        sess.stop()
        try:
            self.sel.unregister(sess.sock)
        except (KeyError, ValueError):
            pass
        try:
            sess.sock.shutdown(socket.SHUT_RDWR)     # wakes a thread still waiting for the hello
        except OSError:
            pass
        sess.sock.close()
        sess.peer.close()
        self.sessions.discard(sess)
        n = self._per_uid.get(sess.peer.uid, 1) - 1
        if n > 0:
            self._per_uid[sess.peer.uid] = n
        else:
            self._per_uid.pop(sess.peer.uid, None)
        st = sess.state
        if st is not None and st.session is sess:
            st.session = None
            if self.states.get(st.pid) is st:
                if _alive(st.pidfd):
                    st.exec_deadline = time.monotonic() + EXEC_GRACE
                else:
                    self._end_task(st, "exited")

    def _socket_event(self, sess: Session) -> None:
        """A connection's socket carries nothing after the hello: data is a
        protocol error, end-of-file the process's exec() or exit."""
        try:
            data = sess.sock.recv(64, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._end_session(sess, "malformed message: data on the socket after the hello" if data else None)

    # -- the hello ---------------------------------------------------------------------------------------

    def _hello(self, sess: Session) -> bool:
        """Verify who connected, bind its task and hand over the channel."""
        try:
            hello, scm_pidfd = receive_hello(sess.sock, HELLO_TIMEOUT)
        except Refused as exc:
            if exc.errno == errno.EPROTO:
                raise P.ProtocolError(str(exc).removeprefix("malformed message: ")) from None
            self._log_limited("refused", f"refusing the connection of pid {sess.peer.pid}: {exc}")
            return False
        if hello.op == P.OP_INFO:
            if scm_pidfd >= 0:
                os.close(scm_pidfd)
            _send(sess.sock, P.pack_reply(0, 0, self.root.encode()))
            return False
        try:
            if hello.magic != P.MAGIC_VERSION:
                raise Refused(errno.EPROTO, f"protocol version {hello.magic:#x}, not {P.MAGIC_VERSION:#x} "
                                            f"(a shim of another vfiosim?)")
            self._verify(sess, hello, scm_pidfd)
            host, creds = self._open_process(sess)
        except Refused as exc:
            self._log_limited("refused", f"refusing the connection of pid {sess.peer.pid}: {exc}")
            _send(sess.sock, P.pack_reply(-1, exc.errno))
            return False
        finally:
            if scm_pidfd >= 0:
                os.close(scm_pidfd)
        channel = native.Channel()
        try:
            with self.gate.lock:
                st = self._bind(sess, hello.flags, host, creds)
        except BaseException as exc:
            host.close()
            channel.close()
            if not isinstance(exc, KernelError):
                raise
            _send(sess.sock, P.pack_reply(-1, exc.errno))
            return False
        with sess.lock:
            sess.channel = channel
        ok = _send(sess.sock, P.pack_reply(0, 0, self.root.encode()), fds=[channel.fd])
        channel.close_fd()
        if not ok:
            return False
        self._post(lambda: self._watch_session(sess))
        return True

    def _verify(self, sess: Session, hello: Any, scm_pidfd: int) -> None:
        peer = sess.peer
        if hello.pid != peer.pid:
            raise Refused(errno.EPERM, f"the hello came from pid {hello.pid}, not from pid {peer.pid} that connected")
        if peer.pidfd < 0 or not _alive(peer.pidfd):
            raise Refused(errno.ESRCH, "the process that connected is gone")
        if scm_pidfd >= 0 and not same_process(scm_pidfd, peer.pidfd):
            raise Refused(errno.EPERM, "the hello came from another process than the one that connected")
        if os.geteuid() != 0 and (peer.uid != os.geteuid() or hello.uid != os.geteuid()):
            raise Refused(errno.EACCES, f"this daemon runs as uid {os.geteuid()} and cannot act for uid {peer.uid}")
        sess.bounds = Bounds(frozenset({peer.uid, hello.uid}), frozenset({peer.gid, hello.gid}), 0)

    def _read_creds(self, pidfd: int, pid: int, procdir: int = -1) -> native.Creds:
        try:
            return native.creds(pidfd, pid)
        except OSError as exc:
            if exc.errno not in _CREDS_FROM_PROC:
                raise
        return self._proc_creds(pid, procdir)

    @staticmethod
    def _proc_creds(pid: int, procdir: int) -> native.Creds:
        """The credentials from /proc/<pid>/status and limits (before Linux 6.13)."""
        path = f"/proc/{pid}" if procdir < 0 else None
        if path is not None:
            with open(f"{path}/status") as f, open(f"{path}/limits") as g:
                return creds_from_status(f.read(), g.read())
        return creds_from_status(_read_at(procdir, "status"), _read_at(procdir, "limits"))

    def _open_process(self, sess: Session) -> tuple[HostProcess, native.Creds]:
        """Open the process's memory and /proc views with its own credentials,
        so the host kernel refuses what the process itself may not reach (a
        set-uid image is not dumpable); make sure nothing changed meanwhile."""
        peer = sess.peer
        try:
            before = self._read_creds(peer.pidfd, peer.pid)
        except OSError:
            raise Refused(errno.ESRCH, "the process that connected is gone") from None
        sess.bounds.caps = before.cap_prm | before.cap_eff
        why = sess.bounds.admits(before)
        if why:
            raise Refused(errno.EPERM, f"the process changed since it connected: {why}")
        acting = _acting_ids(before)
        try:
            if acting is None:
                host = HostProcess.open(peer.pid)
            else:
                with native.acting_as(acting[0], acting[1], ()):
                    host = HostProcess.open(peer.pid)
        except OSError as exc:
            raise Refused(errno.EACCES, f"its memory is out of reach for uid {before.euid} ({exc.strerror}): "
                                        f"a set-uid or otherwise privileged image?") from None
        try:
            after = self._read_creds(peer.pidfd, peer.pid, host.procdir)
        except OSError:
            host.close()
            raise Refused(errno.ESRCH, "the process that connected is gone") from None
        if after != before or not _alive(peer.pidfd):
            host.close()
            raise Refused(errno.EPERM, "the process changed while its hello was checked")
        return host, after

    def _bind(self, sess: Session, flags: int, host: HostProcess, creds: native.Creds) -> TaskState:
        """The task of the process that said hello (under the machine lock)."""
        pid = sess.peer.pid
        k = self.kernel
        st = self.states.get(pid)
        if st is not None:
            old = st.session
            if old is not None and old is not sess:
                old.state = None                    # the old image's connection: it answers EIO now
                self._post(lambda: self._end_session(old, None))
            st.exec_deadline = None
            if not flags & P.HELLO_FORK or st.task.mm.host.bound:   # type: ignore[attr-defined]
                self._do_exec(st, host, True)          # a new image in a known process: exec()
            else:
                st.task.mm.bind(host)                  # type: ignore[attr-defined]   # a fork child's own hello
                self._reconcile(st)
        else:
            ppid = _ppid(host.procdir)
            parent = self.states.get(ppid)
            procdir = os.dup(host.procdir)
            pidfd, sess.peer.pidfd = sess.peer.pidfd, -1
            if parent is not None:
                # Made without our fork() wrapper (posix_spawn, clone), or before the
                # parent's OP_FORK arrived: it shares the parent's files it provably holds.
                inherit = self._prove_inherited(parent, pid, host)
                task = k.fork(parent.task, pid, HostMM(pid, k.phys, host), inherit)
                st = self._new_state(pid, task, pidfd, procdir)
                if flags & P.HELLO_FORK:
                    self._copy_mappings(parent, st)
            else:
                task = k.attach(pid, _comm(procdir), Cred(), HostMM(pid, k.phys, host), (0, 0))
                st = self._new_state(pid, task, pidfd, procdir)
            self._watch_task(st)
        st.task.comm = _comm(st.procdir)
        st.session = sess
        sess.state = st
        self._set_creds(st, creds)
        return st

    def _prove_inherited(self, parent: TaskState, child_pid: int, host: HostProcess) -> dict[int, int]:
        """The child's fds that are the very open files of the parent's simulated
        ones (kcmp(KCMP_FILE)): child fd -> parent fd.  A memfd merely named
        ``vfiosim:...`` proves nothing."""
        out: dict[int, int] = {}
        pfds = parent.task.files.fds()
        for n in host.fd_numbers():
            if not host.fd_link(n).startswith("/memfd:vfiosim:"):
                continue
            for p in sorted(pfds, key=lambda x: x != n):           # the same number first
                try:
                    if native.kcmp_file(parent.pid, child_pid, p, n) == 0:
                        out[n] = p
                        break
                except OSError:
                    continue
        return out

    def _watch_session(self, sess: Session) -> None:
        if sess.ended:
            return
        try:
            self.sel.register(sess.sock, selectors.EVENT_READ, ("sock", sess))
        except (KeyError, ValueError, OSError):
            pass

    def _watch_task(self, st: TaskState) -> None:
        """Hear of the task's exit (machine lock held)."""
        self._by_pidfd[st.pidfd] = st
        self._exits.register(st.pidfd, select.EPOLLIN)

    def _reap_exits(self) -> None:
        """End the tasks whose processes have exited (any thread)."""
        with self.gate.lock:
            for fd, _events in self._exits.poll(0):
                st = self._by_pidfd.get(fd)
                if st is not None:
                    self._end_task(st, "exited")

    # -- serving calls ----------------------------------------------------------------------------------

    def _serve_channel(self, sess: Session) -> None:
        channel = sess.channel
        assert channel is not None
        serve = self._serve_request
        while not self._stopped:
            # Requests are served inside (the channel's loop in C hands each to
            # _serve_request and publishes its reply); what comes back brought none.
            seen = channel.serve(serve, sess, WAIT_MS)
            if seen & native.VD_STOPPED:
                return
            if seen & native.VD_POSTS or channel.has_posts():
                with self.gate.lock:
                    self._flush_posts(sess)

    def handle(self, sess: Session, raw: Any, seen: int = 0) -> bytes:
        """One request (a private copy of it, as bytes) from ``sess``; returns
        the reply.  ``seen`` is what the channel noticed before it
        (native.VD_*).  A malformed request raises ProtocolError: its
        connection is dropped."""
        op, flags, fd, fd2, a, payload = P.unpack_request(raw)
        ret, err, out = self._serve_request(sess, op, flags, fd, fd2, a, payload, seen)
        return P.pack_reply(ret, err, out)

    def _serve_request(self, sess: Session, op: int, flags: int, fd: int, fd2: int, a: tuple[int, ...],
                       payload: bytes, seen: int) -> tuple[int, int, bytes]:
        """One request: (ret, errno, reply payload).  Every call pays for what
        is written here (the round trip of issue 13's goals): constants are
        module globals, what is rare is asked once behind one test, and the
        kernel is entered once under the lock taken here
        (SyscallGate.call_locked)."""
        lock = self.gate.lock                   # the machine's lock
        lock.acquire()                          # (a with statement costs 70 ns more)
        try:
            if seen or op != _OP_IOCTL:         # the usual request: a plain ioctl, nothing else to see
                handler = self._handlers.get(op)
                if handler is None or seen & _VD_MALFORMED:
                    if op in (P.OP_HELLO, P.OP_INFO):
                        raise P.ProtocolError(f"{P.OP_NAMES[op]} on the channel")
                    raise P.ProtocolError(f"unknown operation {op}" if handler is None
                                          else "impossible request header")
                if seen & _VD_POSTS:
                    self._flush_posts(sess)
            if len(self.states) > 1:
                self._reap_exits()
            st = sess.state
            if st is None or st.session is not sess or not st.task.alive:
                return -1, errno.EIO, b""
            if self._host_eventfds:
                # A program that wrote an ioeventfd or unmask eventfd and then makes a
                # call sees the write's effect, as the kernel acts inside the write.
                self._run_virqfds_locked()
            task = st.task
            if flags & _F_REFRESH_CREDS or op in _CREDS_FIRST:
                task.creds_stale = CREDS_FRESH
                self._fresh_creds(st)           # these decide with the credentials: take them first
            else:
                task.creds_stale = CREDS_STALE  # taken when the call first consults them
            if st.revoked:
                return self._revoke(sess, st)
            host = None
            if flags & _F_WINDOW and op in _WINDOWED:
                # The program sent a copy of the memory its pointer argument names
                # (host.open_window(), without its frame).
                host = getattr(task.mm, "host", None)
                if host is not None:
                    host.window = host.arg_window.open(a[4], payload, flags & _F_WINDOW_WRITABLE)
                payload = b""
            try:
                tracer = st.tracer
                if tracer is None:
                    try:
                        if op == _OP_IOCTL:
                            # gate.call_locked(task, "ioctl", _op_ioctl, ...), two frames fewer for the usual call
                            if not task.alive:
                                raise fail(errno.ESRCH, f"process {task.pid} has exited")
                            try:
                                ret = self.kernel.sys_ioctl(task, fd, a[0], a[1], fd2)
                            except KernelError:
                                raise
                            except Exception as exc:    # a bug in the simulator
                                raise self.gate.oops("ioctl", exc) from None
                            out = b""
                        else:
                            ret, out = self.gate.call_locked(task, _OP_NAMES[op], self._handlers[op], st, flags,
                                                             fd, fd2, a, payload)
                        err = 0
                    except KernelError as exc:
                        ret, err, out = -1, exc.errno, b""
                else:
                    ret, err, out = self._traced(tracer, task, st, op, self._handlers[op], flags, fd, fd2, a,
                                                 payload)
            finally:
                if host is not None:
                    host.window = None              # (host.close_window(), without its frame)
                    back = host.arg_window.close_reply()
                    if back is not None:             # what copy_to_user wrote: the program stores it
                        out = back
            if st.revoked:
                return self._revoke(sess, st)
            if st.mappings and op not in _DECODING_UNCHANGED:
                self._update_live(sess, st)
            return ret, err, out
        finally:
            lock.release()

    def _traced(self, tracer: Tracer, task: "Task", st: TaskState, op: int, handler: Callable[..., tuple[int, bytes]],
                flags: int, fd: int, fd2: int, a: tuple[int, ...], payload: bytes) -> tuple[int, int, bytes]:
        """The call of _serve_request() with --trace: its record made around it."""
        rec = tracer.begin(task, op, flags, fd, fd2, a, payload) if op not in _UNTRACED else None
        reason = ""
        try:
            ret, out = self.gate.call_locked(task, _OP_NAMES[op], handler, st, flags, fd, fd2, a, payload)
            err = 0
        except KernelError as exc:
            ret, err, out, reason = -1, exc.errno, b"", exc.reason
            if rec is not None:
                rec["reason"] = reason
        if rec is not None:
            tracer.end(rec, task, ret, err)
        elif op == P.OP_MMIO:
            written = bool(flags & P.MMIO_WRITE)
            value = a[3] if written else (struct.unpack("<Q", out)[0] if len(out) == 8 else None)
            tracer.mmio(st.pid, a[0], a[1], a[2], value, written, ret, err, reason)
        return ret, err, out

    def _revoke(self, sess: Session, st: TaskState) -> tuple[int, int, bytes]:
        """The process is no longer the one that connected: EIO, and the connection goes."""
        why = st.revoked
        self._post(lambda: self._end_session(sess, f"it is no longer the process that connected: {why}"))
        sess.state = None
        return -1, errno.EIO, b""

    # -- the operations (each: (task, state, flags, fd, fd2, a, payload) -> (ret, reply payload)) ------

    def _op_open(self, task: "Task", st: TaskState, flags: int, fd: int, fd2: int, a: tuple[int, ...],
                 payload: bytes) -> tuple[int, bytes]:
        path = payload.decode("utf-8", "surrogateescape")
        return self.kernel.sys_open(task, path, _s32(a[0]), a[1] & 0xFFFF, at_fd=fd), b""

    def _op_close(self, task: "Task", st: TaskState, flags: int, fd: int, fd2: int, a: tuple[int, ...],
                  payload: bytes) -> tuple[int, bytes]:
        self.kernel.sys_close(task, fd)
        return 0, b""

    def _op_ioctl(self, task: "Task", st: TaskState, flags: int, fd: int, fd2: int, a: tuple[int, ...],
                  payload: bytes) -> tuple[int, bytes]:
        return self.kernel.sys_ioctl(task, fd, a[0], a[1], fd2), b""

    def _op_read(self, task: "Task", st: TaskState, flags: int, fd: int, fd2: int, a: tuple[int, ...],
                 payload: bytes) -> tuple[int, bytes]:
        return self.kernel.sys_read_user(task, fd, a[0], min(a[1], MAX_RW),
                                         _s64(a[2]) if flags & P.RW_POSITIONAL else None), b""

    def _op_write(self, task: "Task", st: TaskState, flags: int, fd: int, fd2: int, a: tuple[int, ...],
                  payload: bytes) -> tuple[int, bytes]:
        return self.kernel.sys_write_user(task, fd, a[0], min(a[1], MAX_RW),
                                          _s64(a[2]) if flags & P.RW_POSITIONAL else None), b""

    def _op_dup(self, task: "Task", st: TaskState, flags: int, fd: int, fd2: int, a: tuple[int, ...],
                payload: bytes) -> tuple[int, bytes]:
        if fd2 < 0:
            raise fail(errno.EBADF, f"bad new fd {fd2}")
        return self.kernel.sys_dup2(task, fd, fd2, cloexec=bool(a[0])), b""

    def _op_setfd(self, task: "Task", st: TaskState, flags: int, fd: int, fd2: int, a: tuple[int, ...],
                  payload: bytes) -> tuple[int, bytes]:
        self.kernel.sys_fcntl_setfd(task, fd, bool(a[0]))
        return 0, b""

    def _op_mmap(self, task: "Task", st: TaskState, flags: int, fd: int, fd2: int, a: tuple[int, ...],
                 payload: bytes) -> tuple[int, bytes]:
        return self._mmap(st, fd, a)

    def _op_mmio(self, task: "Task", st: TaskState, flags: int, fd: int, fd2: int, a: tuple[int, ...],
                 payload: bytes) -> tuple[int, bytes]:
        m = st.mappings.get(a[0])
        if m is None:
            raise fail(errno.EFAULT, f"no device mapping {a[0]}")
        if flags & P.MMIO_WRITE:
            value = a[3]
        else:
            key = (a[1], a[2])
            load = m.load_fns.get(key, _UNKNOWN)
            if load is _UNKNOWN:
                load = m.load_fns[key] = self.kernel.mmap_load_fn(m.file, m.offset + a[1], a[2])
            if load is not None:
                ret = load()
                if ret is not None:
                    return 0, _U64.pack(ret & 0xFFFFFFFFFFFFFFFF)
            value = None                        # no shortcut, or it declined: mmap_access() says how
        ret = self.kernel.mmap_access(task, m.file, m.offset + a[1], a[2], value)
        return 0, _U64.pack(ret & 0xFFFFFFFFFFFFFFFF)

    def _op_munmap(self, task: "Task", st: TaskState, flags: int, fd: int, fd2: int, a: tuple[int, ...],
                   payload: bytes) -> tuple[int, bytes]:
        m = st.mappings.pop(a[0], None)
        if m is not None:
            self.kernel.munmap_file(task, m.file)
            if isinstance(task.mm, HostMM):
                task.mm.device_vmas.pop(a[0], None)
        return 0, b""

    def _op_status(self, task: "Task", st: TaskState, flags: int, fd: int, fd2: int, a: tuple[int, ...],
                   payload: bytes) -> tuple[int, bytes]:
        mm = task.mm
        kb = mm.page_size // 1024
        return 0, struct.pack("<QQ", mm.locked_vm * kb, mm.pinned_vm * kb)

    def _op_fork(self, task: "Task", st: TaskState, flags: int, fd: int, fd2: int, a: tuple[int, ...],
                 payload: bytes) -> tuple[int, bytes]:
        self._fork(st, a[0])
        return 0, b""

    def _op_flush(self, task: "Task", st: TaskState, flags: int, fd: int, fd2: int, a: tuple[int, ...],
                  payload: bytes) -> tuple[int, bytes]:
        return 0, b""

    def _op_setattr(self, task: "Task", st: TaskState, flags: int, fd: int, fd2: int, a: tuple[int, ...],
                    payload: bytes) -> tuple[int, bytes]:
        k = self.kernel
        path = payload.decode("utf-8", "surrogateescape")
        if flags & P.SETATTR_OWNER:
            k.sys_chown(task, path, _s32(a[0]), _s32(a[1]))
        if flags & P.SETATTR_MODE:
            k.sys_chmod(task, path, a[2] & 0o7777)
        self.sysfs.update_node(os.path.normpath(path))
        return 0, b""

    def _mmap(self, st: TaskState, fd: int, a: tuple[int, ...]) -> tuple[int, bytes]:
        if len(st.mappings) >= self.max_map_count:
            # do_mmap(): "Too many mappings?"
            raise fail(errno.ENOMEM, f"{len(st.mappings)} device mappings already (vm.max_map_count)")
        k = self.kernel
        file = k.sys_mmap_host(st.task, fd, a[0], a[1], a[2] & 0xFFFFFFFF, bool(a[3]))
        handle = self._next_handle
        self._next_handle += 1
        m = Mapping(file, a[0], a[1], vaddr=a[4], prot=a[2] & 0xFFFFFFFF)
        self._add_mapping(st, handle, m)
        # Where the program may post its stores: the device model's declared
        # registers (those with side effects kick the daemon), while decoding
        # is on (a flag in the channel).
        layout = P.vmap(slot=0xFFFFFFFF)
        sess = st.session
        posted = k.mmap_posted_writes(file, a[0], a[1])[:P.VMAP_MAX_POSTED]
        if posted and sess is not None and sess.channel is not None and sess.next_slot < P.VLIVE:
            m.slot = sess.next_slot
            sess.next_slot += 1
            layout.slot = m.slot
            layout.nposted = len(posted)
            for i, (off, n, effect) in enumerate(posted):
                entry = layout.posted[i]
                entry.offset, entry.length, entry.flags = off, n, P.VPOST_KICK if effect else 0
            m.live = k.mmap_live_check(file)
            sess.channel.set_live(m.slot, m.live())
        return handle, bytes(layout)

    def _add_mapping(self, st: TaskState, handle: int, m: Mapping) -> None:
        """The task maps a device: its address space shows the kernel a
        VM_PFNMAP mapping there (peer-to-peer DMA maps it)."""
        st.mappings[handle] = m
        mm = st.task.mm
        if m.vaddr and isinstance(mm, HostMM):
            mm.device_vmas[handle] = self.kernel.host_device_vma(st.task, m.file, m.offset, m.vaddr, m.length,
                                                                 m.prot)

    def _drop_mappings(self, st: TaskState) -> None:
        """The task's device mappings go (exit_mm(), exec_mmap())."""
        for m in st.mappings.values():
            self.kernel.munmap_file(st.task, m.file)
        st.mappings.clear()
        mm = st.task.mm
        if isinstance(mm, HostMM):
            mm.device_vmas.clear()

    def _flush_posts(self, sess: Session) -> None:
        """Perform the stores the program posted, in order (machine lock held)."""
        channel, st = sess.channel, sess.state
        if channel is None or st is None:
            return
        posts = channel.take_posts()
        if posts is None:
            self._post(lambda: self._end_session(sess, "malformed message: the posted-store ring's head is "
                                                       "out of range"))
            return
        if len(posts) > 1:
            posts = _coalesce(posts)
        if not posts:
            return
        try:
            self.gate.call_locked(st.task, "posted stores", self._posted_stores, st, posts)
        except KernelError as exc:             # the process is gone: its stores with it
            if st.tracer is not None:
                for handle, offset, size, value, _kick in posts:
                    st.tracer.mmio(st.pid, handle, offset, size, value, True, -1, exc.errno, exc.reason, posted=True)

    def _posted_stores(self, task: "Task", st: TaskState, posts: list[tuple[int, int, int, int, int]]) -> None:
        """Perform posted stores, in order, as one system call of the task (the
        gate's checks once for the batch, not once a store)."""
        access = self.kernel.mmap_access
        mappings = st.mappings
        tracer = st.tracer
        done: list[tuple[int, int, int, int, int, int, str]] | None = [] if tracer is not None else None
        for handle, offset, size, value, _kick in posts:
            m = mappings.get(handle)
            ret, err, reason = 0, 0, ""
            try:
                if m is None:
                    raise fail(errno.EFAULT, f"no device mapping {handle}")
                key = (offset, size)
                store = m.store_fns.get(key, _UNKNOWN)
                if store is _UNKNOWN:
                    store = m.store_fns[key] = self.kernel.mmap_store_fn(m.file, m.offset + offset, size)
                if store is None or not store(value):
                    access(task, m.file, m.offset + offset, size, value)
            except KernelError as exc:
                # A posted write has no completion: a failed one is dropped, as a bus drops it.
                ret, err, reason = -1, exc.errno, exc.reason
            except Exception as exc:           # a bug in the simulator: recorded; the store is dropped
                oops = self.gate.oops("posted store", exc)
                ret, err, reason = -1, oops.errno, oops.reason
            if done is not None:
                done.append((handle, offset, size, value, ret, err, reason))
        if tracer is not None and done:               # their records, in one go
            tracer.posted_stores(st.pid, done)

    def _update_live(self, sess: Session, st: TaskState) -> None:
        """Which of the program's mappings may post stores now (decoding on)."""
        channel = sess.channel
        if channel is None:
            return
        for m in st.mappings.values():
            if m.live is not None:
                channel.set_live(m.slot, m.live())

    def _fresh_creds(self, st: TaskState) -> None:
        """The process's credentials, taken again (the task's refresh_creds):
        its simulated credentials follow its real ones, unless it left what it
        connected with -- then it keeps those it had, and ``st.revoked`` says
        why its call fails and its connection goes."""
        try:
            # The usual case, nothing changed since the last call, costs the
            # three system calls and a comparison (a Creds is a tuple).
            raw = native.creds_tuple(st.pidfd, st.pid)
            if raw == st.creds:
                return
            c = native.Creds._make(raw)
        except OSError as exc:
            if exc.errno not in _CREDS_FROM_PROC:
                return                  # it is exiting: its pidfd will say so
            try:
                c = self._proc_creds(st.pid, st.procdir)
            except OSError:
                return
        if c == st.creds:
            return
        sess = st.session
        why = sess.bounds.admits(c) if sess is not None else ""
        if why:
            st.revoked = why
            return
        self._set_creds(st, c)

    def _set_creds(self, st: TaskState, c: native.Creds) -> None:
        try:
            full = parse_host_creds(_read_at(st.procdir, "status"), _read_at(st.procdir, "limits"))
        except OSError:
            return
        st.task.set_creds(Cred(full.uid, full.euid, full.suid, full.gid, full.egid, full.groups, full.caps),
                          full.memlock)
        self._keep_creds(st, c)
        st.acting = _acting_ids(c)

    @staticmethod
    def _keep_creds(st: TaskState, c: native.Creds) -> None:
        """``c`` is what the task's process has now.  A decision that consults
        only its capabilities or RLIMIT_MEMLOCK (Type1's MAP_DMA) asks
        whether that part is still so (Task.limits_same: one system call, in
        C); changed, or unreadable: everything is taken again, as
        _fresh_creds() takes it (with the pidfd's check that the pid was not
        reused, and the session's bounds)."""
        st.creds = c
        st.task.limits_same = native.LimitsCheck(st.pid, c, CREDS_CAPS_STALE, CREDS_MEMLOCK_STALE)

    # -- tasks ----------------------------------------------------------------------------------------------

    def _new_state(self, pid: int, task: "Task", pidfd: int, procdir: int) -> TaskState:
        st = TaskState(pid, task, pidfd, procdir, tracer=self.tracer)
        task.files.foreign = lambda n, st=st: self._foreign(st, n)
        task.refresh_creds = functools.partial(self._fresh_creds, st)
        self._take_files(st)
        self.states[pid] = st
        return st

    def _take_files(self, st: TaskState) -> None:
        """Let the task's address space map the program's shared memory files
        where it pins them (transport/host.py's SharedFiles), taking them as
        the program: what the host kernel lets the program's credentials
        stat through /proc/<pid>/fd and take with pidfd_getfd, and no more."""
        mm = st.task.mm
        if isinstance(mm, HostMM):
            mm.files.opener = lambda dev, ino, hint, st=st: self._shared_file(st, dev, ino, hint)

    def _shared_file(self, st: TaskState, dev: int, ino: int, hint: int) -> tuple[int, int] | None:
        mm = st.task.mm
        if not isinstance(mm, HostMM):
            return None
        st.task.take_creds()                     # act with the rights the program has now
        try:
            if st.acting is None:
                return mm.host.file_fd(dev, ino, lambda n: native.pidfd_getfd(st.pidfd, n), hint)
            with native.acting_as(st.acting[0], st.acting[1], ()):
                return mm.host.file_fd(dev, ino, lambda n: native.pidfd_getfd(st.pidfd, n), hint)
        except OSError as exc:
            self._log_limited("getfile", f"cannot take the memory file {dev:#x}:{ino} of pid {st.pid}: {exc}")
            return None

    def _copy_mappings(self, parent: TaskState, child: TaskState) -> None:
        for handle, m in parent.mappings.items():
            self._add_mapping(child, handle, Mapping(m.file.get(), m.offset, m.length, vaddr=m.vaddr, prot=m.prot))

    def _fork(self, st: TaskState, child_pid: int) -> None:
        """OP_FORK: the parent's fork() made ``child_pid``; it shares every file."""
        if child_pid in self.states:
            return                              # the child said hello first
        if not 0 < child_pid <= PID_MAX_LIMIT:
            raise fail(errno.ESRCH, f"there is no pid {child_pid}")
        k = self.kernel
        try:
            pidfd = os.pidfd_open(child_pid)
        except OSError:
            return                              # it is gone already: nothing to give it
        try:
            procdir = os.open(f"/proc/{child_pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            os.close(pidfd)
            return
        if _ppid(procdir) != st.pid or not _alive(pidfd):
            os.close(pidfd)
            os.close(procdir)
            raise fail(errno.ESRCH, f"pid {child_pid} is not a child of {st.pid}")
        # Its memory is out of reach until it says hello itself.
        task = k.fork(st.task, child_pid, HostMM(child_pid, k.phys))
        child = self._new_state(child_pid, task, pidfd, procdir)
        if st.creds is not None:
            self._keep_creds(child, st.creds)
        self._copy_mappings(st, child)
        self._watch_task(child)

    def _do_exec(self, st: TaskState, host: HostProcess | None, reconcile: bool) -> None:
        if not st.exec_done:
            # exec_mmap(): the old image's mappings (BARs included) go with its
            # mm, before the close-on-exec files do.
            self._drop_mappings(st)
            old = st.task.mm
            self.kernel.exec(st.task, HostMM(st.pid, self.kernel.phys, host))
            self._take_files(st)
            self._note_orphaned(st, old, "exec()ed")
            st.exec_done = True
            st.task.comm = _comm(st.procdir)
        elif host is not None:
            st.task.mm.bind(host)          # type: ignore[attr-defined]
        if reconcile:
            self._reconcile(st)
            st.exec_done = False

    def _reconcile(self, st: TaskState) -> None:
        """Drop simulated files whose fd the real process no longer holds."""
        for n in st.task.files.fds():
            if not _fd_link(st.procdir, n).startswith("/memfd:vfiosim:"):
                self.kernel.sys_close(st.task, n)

    def _foreign(self, st: TaskState, n: int) -> File | None:
        link = _fd_link(st.procdir, n)
        if not link:
            return None
        if link != "anon_inode:[eventfd]":
            return ForeignFile(link)
        eid = ""
        try:
            for line in _read_at(st.procdir, f"fdinfo/{n}").splitlines():
                if line.startswith("eventfd-id:"):
                    eid = line.split(":", 1)[1].strip()
        except OSError:
            return None
        cached = st.eventfds.get(n)
        if cached is not None:
            if cached[0] == eid:
                return cached[1]
            self._retire_eventfd(st, n)          # that number names another eventfd now
        self._sweep_eventfds()
        if len(st.eventfds) >= MAX_EVENTFDS:
            for m in list(st.eventfds):
                self._retire_eventfd(st, m)
            self._sweep_eventfds()
            if len(st.eventfds) + len(self._retired) >= MAX_EVENTFDS:
                raise fail(errno.EMFILE, f"the daemon holds {MAX_EVENTFDS} eventfds of pid {st.pid} "
                                         f"that devices still use")
        st.task.take_creds()                     # act with the rights the program has now
        try:
            if st.acting is None:
                dup = native.pidfd_getfd(st.pidfd, n)
            else:
                with native.acting_as(st.acting[0], st.acting[1], ()):
                    dup = native.pidfd_getfd(st.pidfd, n)
        except OSError as exc:
            self._log_limited("getfd", f"cannot take eventfd {n} of pid {st.pid}: {exc}")
            return ForeignFile(link)
        try:
            same = os.readlink(f"/proc/self/fd/{dup}") == "anon_inode:[eventfd]"
        except OSError:
            same = False
        if not same:
            os.close(dup)                       # it changed under us
            return ForeignFile(link)
        efd = HostEventFd(dup)
        # The main loop closes it, after it stops watching it (it owns the selector).
        efd.closer = lambda fd: self._post(lambda: self._close_watched(fd))
        st.eventfds[n] = (eid, efd)
        self._host_eventfds.add(weakref.ref(efd, self._host_eventfds.discard))
        return efd

    def _retire_eventfd(self, st: TaskState, n: int) -> None:
        """Our handle on the eventfd at ``n`` is no longer the task's: it closes
        as soon as no device signals or waits on it (a trigger replaced later)."""
        entry = st.eventfds.pop(n, None)
        if entry is not None:
            self._retired.append((st.task, entry[1]))

    def _sweep_eventfds(self) -> None:
        keep = []
        for task, efd in self._retired:
            if self.kernel.eventfd_in_use(efd):
                keep.append((task, efd))
            else:
                efd.release(task)
        self._retired = keep

    def _close_watched(self, fd: int) -> None:
        self._unwatch(fd)
        os.close(fd)

    def _unwatch(self, fd: int) -> None:
        if self._watched.pop(fd, None) is not None:
            try:
                self.sel.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass

    def _run_virqfds(self) -> None:
        """The kernel's virqfd wake-ups for programs' eventfds (main loop):
        run the handler of each that has been written to, and watch exactly
        those that have one."""
        with self.gate.lock:
            # Stores posted before the eventfd was written reach the device first.
            for sess in list(self.sessions):
                if sess.state is not None and sess.channel is not None:
                    self._flush_posts(sess)
            live = self._run_virqfds_locked()
        for fd in [fd for fd, efd in self._watched.items() if live.get(fd) is not efd]:
            self._unwatch(fd)
        for fd, efd in live.items():
            if fd not in self._watched:
                try:
                    self.sel.register(fd, selectors.EVENT_READ, ("virqfd", efd))
                    self._watched[fd] = efd
                except (KeyError, ValueError, OSError):
                    pass

    def _run_virqfds_locked(self) -> dict[int, HostEventFd]:
        live = {}
        for ref in list(self._host_eventfds):
            efd = ref()
            if efd is not None and efd.fd >= 0 and efd.waiters:
                live[efd.fd] = efd
                try:
                    self.gate.run("ioeventfd/virqfd handler", efd.take_signal)
                except KernelError:
                    pass
        return live

    def _end_task(self, st: TaskState, why: str) -> None:
        """The process is gone (or the daemon shuts down): release its task
        (any thread; what belongs to the main loop is posted to it)."""
        with self.gate.lock:
            if self.states.get(st.pid) is not st:
                return
            sess = st.session
            if sess is not None:
                self._flush_posts(sess)        # stores it posted before it died reach the device
            try:
                self.gate.run(f"exit of pid {st.pid}", self._exit_task, st)
            except KernelError:
                pass
            del self.states[st.pid]
            if self._by_pidfd.pop(st.pidfd, None) is not None:
                try:
                    self._exits.unregister(st.pidfd)
                except OSError:
                    pass
            os.close(st.pidfd)
            os.close(st.procdir)
            st.session = None
            if sess is not None:
                sess.state = None
                self._post(lambda: self._end_session(sess, None))
            if st.tracer is not None:
                st.tracer.event(st.pid, "exit", why)
            self.exited.append(st.pid)

    def _exit_task(self, st: TaskState) -> None:
        # exit_mm() before exit_files(): the device mappings go first.
        self._drop_mappings(st)
        self.kernel.exit(st.task)
        self._note_orphaned(st, st.task.mm, "exited")
        for n in list(st.eventfds):
            self._retire_eventfd(st, n)
        self._sweep_eventfds()

    def _note_orphaned(self, st: TaskState, mm: Any, why: str) -> None:
        """Pages of an image that is gone and that DMA mappings still pin (in a
        container the new image, or another process, still holds): say what a
        device sees there."""
        pages = mm.pinned_pages() if isinstance(mm, HostMM) else 0
        if pages:
            self.kernel.log.warn(f"vfiosim: pid {st.pid} {why} with {pages} of its pages still pinned by DMA "
                                 f"mappings: Linux keeps those pages; vfiosim can no longer read them, so a "
                                 f"device reads zeros there and never reaches the pid's new memory")

    # -- introspection for tests ---------------------------------------------------------------------------

    def pids(self) -> list[int]:
        return sorted(self.states)


# -- helpers ----------------------------------------------------------------------------------------------


def _coalesce(posts: list[tuple[int, int, int, int, int]]) -> list[tuple[int, int, int, int, int]]:
    """Of stores to the same bytes with no side-effecting store between them,
    keep the last, in order.  Every byte ends with the value of the last store
    to it either way, and a store without side effects shows nothing until
    the next load or side-effecting store: nobody can tell the difference, and
    a driver filling a register in a loop costs the device one store.  A
    side-effecting store (kick) is never dropped, nor moved across."""
    if len({post[1] for post in posts}) == len(posts):
        return posts                       # no two at the same offset, so none to the same bytes (the usual batch)
    kept: list[tuple[int, int, int, int, int]] = []
    seen: set[tuple[int, int, int]] = set()
    for post in reversed(posts):
        if post[4]:
            seen.clear()                   # what the command saw stays as it was
            kept.append(post)
            continue
        key = post[:3]
        if key not in seen:
            seen.add(key)
            kept.append(post)
    kept.reverse()
    return kept


def bind_listener(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening socket at ``path``.  Only a stale socket of ours is
    replaced: anything else there -- a file, a directory, a live daemon's
    socket, another user's socket -- is refused with a message."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a symlink" if stat.S_ISLNK(st.st_mode) \
                else "a regular file" if stat.S_ISREG(st.st_mode) else "not a socket"
            raise OSError(errno.EEXIST, f"{path} exists and is {kind}: refusing to replace it")
        if st.st_uid != os.geteuid():
            raise OSError(errno.EEXIST, f"{path} is a socket of uid {st.st_uid}: refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.settimeout(1)
            probe.connect(path)
        except OSError as exc:
            if exc.errno != errno.ECONNREFUSED:
                raise OSError(errno.EEXIST, f"{path}: cannot tell whether a daemon still serves there "
                                            f"({exc.strerror})") from None
            os.unlink(path)                       # stale: nobody listens any more
        else:
            raise OSError(errno.EADDRINUSE, f"a vfiosim daemon already serves on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        st = os.lstat(path)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


def unlink_socket(path: str, stamp: tuple[int, int] | None) -> None:
    """Remove our socket file, and nothing that replaced it."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stamp is None or (st.st_dev, st.st_ino) == stamp:
        try:
            os.unlink(path)
        except OSError:
            pass


def _send(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> bool:
    """Send without ever blocking on the client."""
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        sock.sendmsg([data], anc, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        return True
    except OSError:
        return False


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _alive(pidfd: int) -> bool:
    import select
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return not p.poll(0)


def _acting_ids(c: native.Creds) -> tuple[int, int] | None:
    """The (uid, gid) a root daemon takes to act for a process, or None when it
    acts as itself: the daemon is not root (it serves its own uid only) or the
    process can be root (a uid of it is 0)."""
    if os.geteuid() != 0 or 0 in (c.ruid, c.euid, c.suid):
        return None
    return c.euid, c.egid


def _read_at(dirfd: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        return os.read(fd, 1 << 16).decode(errors="replace")
    finally:
        os.close(fd)


def _fd_link(procdir: int, n: int) -> str:
    try:
        return os.readlink(f"fd/{n}", dir_fd=procdir)
    except OSError:
        return ""


def _ppid(procdir: int) -> int:
    try:
        return int(_read_at(procdir, "stat").rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _comm(procdir: int) -> str:
    try:
        return _read_at(procdir, "comm").strip()
    except OSError:
        return "?"


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _s64(v: int) -> int:
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= 1 << 63 else v
