"""A request as the daemon serves it (Daemon._serve_request, the channel left
out): the kernel is entered under the lock the daemon already holds
(SyscallGate.call_locked) and an ioctl goes straight to Kernel.sys_ioctl;
a kernel error's errno is the answer, a bug in the simulator is an oops
answered with EIO, and a task that has exited is refused.  The test process
is the program, bound as the daemon binds one."""

from __future__ import annotations

import ctypes
import errno

import pytest
from test_daemon_creds import bound  # noqa: F401  (the fixture)

from vfiosim.kernel.errors import KernelError, fail
from vfiosim.kernel.syscall import SyscallGate
from vfiosim.transport import protocol as P
from vfiosim.uapi import vfio as uapi

CONTAINER = 900


def open_container(d, sess) -> None:
    ret, err, _ = d._serve_request(sess, P.OP_OPEN, 0, CONTAINER, -1, (2, 0, 0, 0, 0), b"/dev/vfio/vfio", 0)
    assert (ret, err) == (CONTAINER, 0)


def ioctl(d, sess, cmd: int, arg: int = 0) -> tuple[int, int, bytes]:
    return d._serve_request(sess, P.OP_IOCTL, 0, CONTAINER, -1, (cmd, arg, 0, 0, 0), b"", 0)


def test_an_ioctl_answers_through_the_kernel(bound):  # noqa: F811
    d, st = bound
    open_container(d, st.session)
    assert ioctl(d, st.session, uapi.VFIO_GET_API_VERSION) == (uapi.VFIO_API_VERSION, 0, b"")
    # No IOMMU set yet: vfio_fops_unl_ioctl()'s EINVAL, the kernel's errno as the answer.
    assert ioctl(d, st.session, uapi.VFIO_IOMMU_MAP_DMA)[:2] == (-1, errno.EINVAL)


def test_a_bug_in_the_kernel_is_an_oops_answered_with_eio(bound, monkeypatch):  # noqa: F811
    d, st = bound
    open_container(d, st.session)

    def broken(self, current, cmd, arg):
        raise RuntimeError("a bug")

    container_file = type(st.task.files.get(CONTAINER))
    monkeypatch.setattr(container_file, "ioctl", broken)
    before = len(d.machine.oopses)
    assert ioctl(d, st.session, uapi.VFIO_GET_API_VERSION)[:2] == (-1, errno.EIO)
    assert len(d.machine.oopses) == before + 1 and d.machine.oopses[-1].startswith("ioctl: ")
    d.machine.oopses.clear()                 # (conftest: this oops was made on purpose)


def test_a_task_that_has_exited_gets_eio(bound):  # noqa: F811
    d, st = bound
    open_container(d, st.session)
    st.task.alive = False
    try:
        assert ioctl(d, st.session, uapi.VFIO_GET_API_VERSION)[:2] == (-1, errno.EIO)
    finally:
        st.task.alive = True


def test_call_locked_checks_as_call_does(bound):  # noqa: F811
    d, st = bound
    gate: SyscallGate = d.gate
    with gate.lock:
        assert gate.call_locked(st.task, "x", lambda task, v: v + 1, 41) == 42
        with pytest.raises(KernelError) as kerr:
            gate.call_locked(st.task, "x", lambda task: (_ for _ in ()).throw(fail(errno.ENOENT, "none")))
        assert kerr.value.errno == errno.ENOENT
        st.task.alive = False
        try:
            with pytest.raises(KernelError) as dead:
                gate.call_locked(st.task, "x", lambda task: 0)
            assert dead.value.errno == errno.ESRCH
        finally:
            st.task.alive = True


def test_get_device_fd_installs_the_file_at_the_programs_number_or_nowhere(bound):  # noqa: F811
    """Kernel.sys_ioctl with ``newfd`` (the daemon's only way in): the device
    file goes to the number the program holds for it; a request naming none
    (-1) is EIO and leaves no file behind."""
    d, st = bound
    sess, files = st.session, st.task.files
    group = 901
    ret, err, _ = d._serve_request(sess, P.OP_OPEN, 0, group, -1, (2, 0, 0, 0, 0), b"/dev/vfio/4", 0)
    assert (ret, err) == (group, 0)
    open_container(d, sess)
    cfd = ctypes.c_int32(CONTAINER)
    assert d._serve_request(sess, P.OP_IOCTL, 0, group, -1, (uapi.VFIO_GROUP_SET_CONTAINER,
                                                             ctypes.addressof(cfd), 0, 0, 0), b"", 0)[:2] == (0, 0)
    assert d._serve_request(sess, P.OP_IOCTL, 0, CONTAINER, -1, (uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU,
                                                                 0, 0, 0), b"", 0)[:2] == (0, 0)
    name = ctypes.create_string_buffer(b"0000:01:00.0")
    before = sorted(files.fds())
    get_fd = (uapi.VFIO_GROUP_GET_DEVICE_FD, ctypes.addressof(name), 0, 0, 0)
    assert d._serve_request(sess, P.OP_IOCTL, 0, group, -1, get_fd, b"", 0)[:2] == (-1, errno.EIO)
    assert sorted(files.fds()) == before
    assert d._serve_request(sess, P.OP_IOCTL, 0, group, 950, get_fd, b"", 0)[:2] == (950, 0)
    assert sorted(files.fds()) == sorted(before + [950]) and files.get(950).kind == "vfio-device"
