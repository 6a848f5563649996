"""``vfiosim run`` and ``vfiosim serve``: real programs on a simulated machine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Callable, Iterator, Sequence, cast

from . import protocol as P
from .daemon import Daemon
from .sysfs import FakeSysfs
from .verbose import DiscardedTrace, FailureReporter

if TYPE_CHECKING:
    from ..machine import Machine


def program_env(sock_path: str, root: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a program runs with: the shim preloaded, the daemon's socket and fake root."""
    from ..preload import library_path
    env = dict(os.environ if base is None else base)
    lib = library_path()
    pre = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = lib + (":" + pre if pre else "")
    env["VFIOSIM_SOCKET"] = sock_path
    env["VFIOSIM_ROOT"] = root
    return env


def start_reaper(paths: Sequence[str]) -> int:
    """Fork a small process that removes ``paths`` (the fake sysfs tree, the
    socket) once this process is gone, however it goes -- SIGKILL included,
    when no ``finally`` runs.  It waits for end-of-file on a pipe whose write
    end only this process holds (close-on-exec: programs never inherit it),
    in a session of its own so that a Ctrl-C for the program does not reach
    it.  Returns the write end; closing it (or dying) sets the reaper off.
    A socket is removed only if it is still the one that was there."""
    import shutil
    stamps = {}
    for path in paths:
        try:
            st = os.lstat(path)
            stamps[path] = (st.st_dev, st.st_ino)
        except OSError:
            pass
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                              # the reaper
        try:
            os.setsid()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
                signal.signal(sig, signal.SIG_IGN)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, r)
            os.closerange(r + 1, 65536)
            while True:
                try:
                    if not os.read(r, 64):
                        break
                except InterruptedError:
                    continue
            for path, stamp in stamps.items():
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) != stamp:
                    continue                                  # somebody else's now
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
        finally:
            os._exit(0)
    os.close(r)
    return w


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def _new_daemon(machine: "Machine", sock_path: str | None, trace: str | IO[str] | None, verbose: bool,
                err: IO[str], log: Callable[[str], None] | None = None) -> Daemon:
    """A daemon with a fake tree of its own (``sock_path`` None: a socket in
    it), or nothing left behind when it cannot start (a trace file that cannot
    be opened, a socket that cannot be bound).  ``verbose``: failing calls and
    kernel log lines go to ``err`` (verbose.py)."""
    sysfs = FakeSysfs(machine)
    try:
        reporter = FailureReporter(machine, err) if verbose else None
        if trace is None and reporter is not None:
            trace = cast(IO[str], DiscardedTrace())
        daemon = Daemon(machine, sock_path or os.path.join(sysfs.root, "vfiosim.sock"), trace=trace, sysfs=sysfs,
                        log=log)
    except BaseException as exc:
        sysfs.close()
        if isinstance(exc, OSError) and exc.filename is None and sock_path:
            exc.filename = sock_path                # bind() says what failed but not where
        raise
    daemon._own_sysfs = True
    if reporter is not None and daemon.tracer is not None:
        reporter.attach(daemon.tracer)
    return daemon


@contextmanager
def private_daemon(machine: "Machine", trace: str | IO[str] | None, err: IO[str],
                   verbose: bool = False) -> Iterator[tuple[Daemon, dict[str, str]]]:
    """A daemon for ``machine`` with its own fake tree and socket, and the
    environment a program needs to reach it.  The tree and socket go when the
    block ends, or, through the reaper, when this process dies without ending it."""
    daemon = _new_daemon(machine, None, trace, verbose, err,
                         log=lambda text: print(f"vfiosim: {text}", file=err, flush=True))
    reaper = start_reaper([daemon.root])
    try:
        yield daemon, program_env(daemon.sock_path, daemon.root)
    finally:
        daemon.close()
        _last_kernel_lines(daemon)
        os.close(reaper)


def _last_kernel_lines(daemon: Daemon) -> None:
    """-v: the kernel log lines the shutdown printed (releases of what programs left open)."""
    observer = daemon.tracer.observer if daemon.tracer is not None else None
    if isinstance(observer, FailureReporter):
        observer.flush_dmesg()


def run(machine: "Machine", argv: Sequence[str], *, trace: str | IO[str] | None = None,
        stderr: IO[str] | None = None, verbose: bool = False, env_extra: dict[str, str] | None = None,
        preload_first: Sequence[str] = ()) -> int:
    """Start a daemon for ``machine``, run ``argv`` under the shim, serve until it
    and every process that holds simulated files have exited.  Returns its exit code.
    ``verbose``: print failing calls with the simulated kernel's reason, and its log.
    ``preload_first``: libraries preloaded before the shim (`vfiosim record --simulated`
    puts its recording shim there, so that it sees the calls the shim serves)."""
    err = stderr or sys.stderr
    with private_daemon(machine, trace, err, verbose) as (daemon, env):
        env.update(env_extra or {})
        if preload_first:
            env["LD_PRELOAD"] = ":".join([*preload_first, env["LD_PRELOAD"]])
        try:
            proc = subprocess.Popen(list(argv), env=env)
        except OSError as exc:
            print(f"vfiosim: cannot run {argv[0]}: {exc.strerror}", file=err)
            return 127
        # Ctrl-C goes to the program (same process group); the daemon waits for it.
        old_int = signal.signal(signal.SIGINT, lambda *_: None)
        old_term = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
        try:
            daemon.serve(until=lambda: proc.poll() is not None and not daemon.states)
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
        rc = proc.wait()
    if machine.oopses:
        print(f"vfiosim: {len(machine.oopses)} internal error(s) during the run (a vfiosim bug):", file=err)
        for text in machine.oopses:
            print(text, file=err)
    return _exit_code(rc)


def serve(machine: "Machine", sock_path: str, *, trace: str | None = None, out: IO[str] | None = None,
          ready_fd: int | None = None, verbose: bool = False) -> int:
    """Serve ``machine`` on ``sock_path`` until SIGINT/SIGTERM.  Once programs
    can connect, says so on ``out`` and, if given, writes the socket's path and
    a newline to ``ready_fd`` and closes it."""
    out = out or sys.stdout
    daemon = _new_daemon(machine, sock_path, trace, verbose, sys.stderr)
    reaper = start_reaper([daemon.root, sock_path])
    print(f"vfiosim: serving {machine.name} ({machine.platform}) on {sock_path}; "
          f"run programs with: vfiosim run --connect {sock_path} -- PROGRAM", file=out, flush=True)
    if ready_fd is not None:
        try:
            os.write(ready_fd, os.path.abspath(sock_path).encode() + b"\n")
        except OSError:
            pass                # whoever waited went away: serve anyway
        finally:
            os.close(ready_fd)
    stop = lambda *_: daemon.stop()  # noqa: E731
    old_int = signal.signal(signal.SIGINT, stop)
    old_term = signal.signal(signal.SIGTERM, stop)
    try:
        daemon.serve()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        daemon.close()
        _last_kernel_lines(daemon)
        os.close(reaper)
    return 0


def fetch_root(sock_path: str) -> str:
    """Ask a running daemon for its fake sysfs root (OP_INFO)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    try:
        s.connect(sock_path)
        s.sendall(P.pack_request(P.OP_INFO))
        reply = s.recv(P.REP.size + 4096)
    finally:
        s.close()
    ret, _err, length = P.REP.unpack_from(reply)
    if ret < 0:
        raise OSError(_err, os.strerror(_err))
    return reply[P.REP.size:P.REP.size + length].decode()


def wait_for_daemon(sock_path: str, wait: float) -> str:
    """The fake root of the daemon on ``sock_path``, waiting up to ``wait``
    seconds for a ``vfiosim serve`` that is still starting (no socket yet, or
    not listening yet).  Raises the last OSError when none answers."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return fetch_root(sock_path)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def run_connected(sock_path: str, argv: Sequence[str], stderr: IO[str] | None = None, wait: float = 10.0) -> int:
    """``vfiosim run --connect SOCKET``: exec the program against a running
    daemon, waiting up to ``wait`` seconds for it to start listening."""
    err = stderr or sys.stderr
    sock_path = os.path.abspath(sock_path)
    try:
        root = wait_for_daemon(sock_path, wait)
    except OSError as exc:
        waited = f" after waiting {wait:g} s" if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)) else ""
        print(f"vfiosim: no vfiosim daemon answers on {sock_path}{waited}: {exc.strerror or exc}; "
              f"start one with: vfiosim serve --socket {sock_path}", file=err)
        return 1
    env = program_env(sock_path, root)
    try:
        os.execvpe(argv[0], list(argv), env)
    except OSError as exc:
        print(f"vfiosim: cannot run {argv[0]}: {exc.strerror}", file=err)
        return 127
    return 0  # not reached
