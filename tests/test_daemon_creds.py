"""The daemon takes a program's credentials again at each privileged decision
(Daemon._fresh_creds): the three system calls of native.creds(), compared
as a tuple with those last taken, /proc/<pid>/status and limits where the
kernel has no PIDFD_GET_INFO, nothing when the process is gone.  The test
process is the program, bound as the daemon binds one."""

from __future__ import annotations

import errno
import os
import socket

import pytest

import vfiosim
from vfiosim.kernel import task as task_mod
from vfiosim.kernel.cred import CAP_IPC_LOCK
from vfiosim.transport import daemon as daemon_mod
from vfiosim.transport import native
from vfiosim.transport.daemon import Daemon, Session
from vfiosim.transport.host import HostProcess
from vfiosim.transport.peer import Bounds, Peer


@pytest.fixture
def bound(tmp_path):
    m = vfiosim.Machine.preset("x86")
    d = Daemon(m, str(tmp_path / "s.sock"))
    a, b = socket.socketpair()
    pid = os.getpid()
    sess = Session(a, Peer(pid, os.geteuid(), os.getegid(), os.pidfd_open(pid)))
    creds = d._read_creds(sess.peer.pidfd, pid)
    # What _verify() and _open_process() let it act with: what it has now.
    sess.bounds = Bounds(frozenset({os.geteuid()}), frozenset({os.getegid()}), creds.cap_prm | creds.cap_eff)
    host = HostProcess.open(pid)
    with d.gate.lock:
        st = d._bind(sess, 0, host, creds)
    yield d, st
    b.close()
    d.close()


def test_unchanged_credentials_are_kept(bound, monkeypatch):
    d, st = bound
    before = st.creds
    monkeypatch.setattr(Daemon, "_set_creds", lambda *a: pytest.fail("nothing changed"))
    d._fresh_creds(st)
    assert st.creds is before and not st.revoked


def test_changed_credentials_are_taken(bound, monkeypatch):
    d, st = bound
    changed = tuple(st.creds[:10]) + (st.creds.memlock_cur - 4096, st.creds.memlock_max)
    monkeypatch.setattr(native, "creds_tuple", lambda pidfd, pid: changed)
    d._fresh_creds(st)
    assert st.creds == changed and isinstance(st.creds, native.Creds) and not st.revoked


def test_without_pidfd_get_info_proc_answers(bound, monkeypatch):
    d, st = bound

    def enotty(pidfd: int, pid: int) -> tuple[int, ...]:
        raise OSError(errno.ENOTTY, "no PIDFD_GET_INFO")

    monkeypatch.setattr(native, "creds_tuple", enotty)
    asked = []
    real = Daemon._proc_creds
    monkeypatch.setattr(Daemon, "_proc_creds", staticmethod(lambda pid, procdir: asked.append(pid) or
                                                            real(pid, procdir)))
    d._fresh_creds(st)
    assert asked == [st.pid] and not st.revoked
    assert st.creds == daemon_mod.creds_from_status(open(f"/proc/{st.pid}/status").read(),
                                                    open(f"/proc/{st.pid}/limits").read())


def test_a_process_that_is_gone_changes_nothing(bound, monkeypatch):
    d, st = bound
    before = st.creds

    def esrch(pidfd: int, pid: int) -> tuple[int, ...]:
        raise OSError(errno.ESRCH, "gone")

    monkeypatch.setattr(native, "creds_tuple", esrch)
    monkeypatch.setattr(Daemon, "_proc_creds", staticmethod(lambda pid, procdir: pytest.fail("not from /proc")))
    d._fresh_creds(st)
    assert st.creds is before and not st.revoked


def test_leaving_what_it_connected_with_revokes(bound, monkeypatch):
    d, st = bound
    st.session.bounds = Bounds(frozenset({1000}), frozenset({1000}), 0)      # as if it had connected as uid 1000
    changed = (1000, 2000, 1000, 1000, 1000, 1000, 1000, 1000, 0, 0, 1 << 16, 1 << 16)
    monkeypatch.setattr(native, "creds_tuple", lambda pidfd, pid: changed)
    before = st.creds
    d._fresh_creds(st)
    assert "2000" in st.revoked and st.creds is before


# -- the capabilities and RLIMIT_MEMLOCK only (Task.limits_same, Type1's MAP_DMA) ---------------------


def test_limits_same_reads_the_capabilities_and_memlock_of_the_process(bound):
    d, st = bound
    assert native.limits_same(st.pid, st.creds)
    assert not native.limits_same(st.pid, tuple(st.creds[:10]) + (st.creds.memlock_cur - 4096, st.creds.memlock_max))
    assert not native.limits_same(st.pid, tuple(st.creds[:8]) + (st.creds.cap_eff ^ 1,) + tuple(st.creds[9:]))
    # The ids are not its business: a caller that needs them takes creds().
    assert native.limits_same(st.pid, (12345,) * 8 + tuple(st.creds[8:]))
    # One part at a time: the capabilities alone, RLIMIT_MEMLOCK alone.
    lower = tuple(st.creds[:10]) + (st.creds.memlock_cur - 4096, st.creds.memlock_max)
    other_caps = tuple(st.creds[:8]) + (st.creds.cap_eff ^ 1,) + tuple(st.creds[9:])
    assert native.limits_same(st.pid, lower, native.LIMITS_CAPS)
    assert not native.limits_same(st.pid, other_caps, native.LIMITS_CAPS)
    assert native.limits_same(st.pid, other_caps, native.LIMITS_MEMLOCK)
    assert not native.limits_same(st.pid, lower, native.LIMITS_MEMLOCK)
    with pytest.raises(OSError) as e:
        native.limits_same(2 ** 22 + 1, st.creds)          # past any pid_max: nobody
    assert e.value.errno == errno.ESRCH


def test_a_limits_check_asks_for_the_parts_it_is_given(bound):
    """native.LimitsCheck, the task's limits_same: the part bits say what it reads."""
    d, st = bound
    caps, memlock = task_mod.CREDS_CAPS_STALE, task_mod.CREDS_MEMLOCK_STALE
    lower = tuple(st.creds[:10]) + (st.creds.memlock_cur - 4096, st.creds.memlock_max)
    other_caps = tuple(st.creds[:8]) + (st.creds.cap_eff ^ 1,) + tuple(st.creds[9:])
    same = native.LimitsCheck(st.pid, st.creds, caps, memlock)
    assert same(caps) and same(memlock) and same(caps | memlock) and same(0)
    check = native.LimitsCheck(st.pid, lower, caps, memlock)
    assert check(caps) and not check(memlock) and not check(caps | memlock)
    check = native.LimitsCheck(st.pid, other_caps, caps, memlock)
    assert not check(caps) and check(memlock) and not check(caps | task_mod.CREDS_IDS_STALE)
    # The process gone (a pid nobody has): changed, not an exception inside the kernel's decision.
    assert not native.LimitsCheck(2 ** 22 + 1, st.creds, caps, memlock)(caps)
    with pytest.raises(ValueError):
        native.LimitsCheck(st.pid, st.creds[:4], caps, memlock)


def test_a_map_with_unchanged_limits_takes_nothing_else(bound, monkeypatch):
    d, st = bound
    task = st.task
    monkeypatch.setattr(Daemon, "_fresh_creds", lambda *a: pytest.fail("everything taken"))
    monkeypatch.setattr(task, "refresh_creds", lambda: pytest.fail("everything taken"))
    parts = []
    real = task.limits_same
    assert isinstance(real, native.LimitsCheck) and real.pid == st.pid
    monkeypatch.setattr(task, "limits_same", lambda part: parts.append(part) or real(part))
    task.creds_stale = task_mod.CREDS_STALE
    assert task.capable(CAP_IPC_LOCK) == bool(st.creds.cap_eff >> CAP_IPC_LOCK & 1)
    assert parts == [task_mod.CREDS_CAPS_STALE]
    assert task.creds_stale == task_mod.CREDS_IDS_STALE | task_mod.CREDS_MEMLOCK_STALE
    assert task.rlimit_memlock_soft() == st.creds.memlock_cur
    assert parts == [task_mod.CREDS_CAPS_STALE, task_mod.CREDS_MEMLOCK_STALE]
    assert task.creds_stale == task_mod.CREDS_IDS_STALE
    task.capable(CAP_IPC_LOCK)                  # taken once a call
    assert len(parts) == 2


def test_the_ids_are_taken_when_something_consults_them_after_the_limits(bound, monkeypatch):
    d, st = bound
    task = st.task
    taken = []
    real = task.refresh_creds
    monkeypatch.setattr(task, "refresh_creds", lambda: taken.append(st) or real())
    task.creds_stale = task_mod.CREDS_STALE
    task.capable(CAP_IPC_LOCK)
    assert taken == []
    assert task.cred.euid == os.geteuid()
    assert taken == [st] and task.creds_stale == task_mod.CREDS_FRESH


def test_changed_limits_take_everything(bound, monkeypatch):
    d, st = bound
    task = st.task
    changed = tuple(st.creds[:10]) + (st.creds.memlock_cur - 4096, st.creds.memlock_max)
    monkeypatch.setattr(task, "limits_same", lambda part: False)         # the limit changed
    monkeypatch.setattr(native, "creds_tuple", lambda pidfd, pid: changed)
    task.creds_stale = task_mod.CREDS_STALE
    task.rlimit_memlock_soft()
    # The full take, with its checks (the task's values then come from /proc, as _set_creds() reads them).
    assert st.creds == changed and not st.revoked and task.creds_stale == task_mod.CREDS_FRESH
    # The next decision asks against what was taken now.
    assert isinstance(task.__dict__["limits_same"], native.LimitsCheck)
