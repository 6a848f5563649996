"""Hostile clients of the vfiosim daemon, for tests/test_run_security.py.

Run with the system's python3 (standard library only, no vfiosim import: it
runs as an unprivileged user that cannot read the test's own interpreter),
usually as uid 65534.  It speaks the wire protocol itself, without the shim,
so it can do what the shim never would.  Each subcommand prints "key=value"
lines the test checks.

    attacker.py SOCKET borrowed-hello          # fork; the child connects and execs passwd; the parent says hello
    attacker.py SOCKET hello-then-setuid       # the child says hello, hands its channel over, execs passwd
    attacker.py SOCKET forged-fork             # memfds named vfiosim:container/group:N, HELLO_FORK
    attacker.py SOCKET stall                   # connect and say hello, never read a reply; then sleep
    attacker.py SOCKET idle                    # connect, say nothing
    attacker.py SOCKET victim N                # N calls of VFIO_GET_API_VERSION through the channel
    attacker.py SOCKET eventfd-churn N GROUP   # eventfd; dup2 to one number; SET_IRQS/SETFD on it, N times
    attacker.py SOCKET raw-setresuid GROUP     # root that drops with a raw syscall, then opens a group
    attacker.py SOCKET raw-capset GROUP        # root that drops CAP_DAC_OVERRIDE with a raw capset
    attacker.py SOCKET reserve-and-map         # 4 TiB PROT_NONE, 4 KiB of it mapped for DMA
    attacker.py SOCKET many-mmaps N            # N device mappings of one BAR
"""

from __future__ import annotations

import ctypes
import importlib.util
import mmap
import os
import socket
import struct
import sys
import time

_spec = importlib.util.spec_from_file_location(
    "vfiosim_protocol", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "vfiosim",
                                     "transport", "protocol.py"))
P = importlib.util.module_from_spec(_spec)          # protocol.py needs only ctypes and struct
_spec.loader.exec_module(P)  # type: ignore[union-attr]

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_futex, SYS_setresuid, SYS_capget, SYS_capset, SYS_memfd_create = 202, 117, 125, 126, 319
FUTEX_WAIT, FUTEX_WAKE = 0, 1
VFIO_GET_API_VERSION = 0x3B64
VFIO_GROUP_GET_STATUS = 0x3B67
VFIO_GROUP_SET_CONTAINER = 0x3B68
VFIO_SET_IOMMU = 0x3B66
VFIO_GROUP_GET_DEVICE_FD = 0x3B6A
VFIO_DEVICE_SET_IRQS = 0x3B6E
VFIO_IOMMU_MAP_DMA = 0x3B71


def say(**kv: object) -> None:
    print(" ".join(f"{k}={v}" for k, v in kv.items()), flush=True)


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    return s


def hello(s: socket.socket, flags: int = 0, creds: bool = True) -> tuple[int, int, int]:
    """Send a hello (with this process's credentials); returns (ret, errno, channel fd or -1)."""
    msg = P.pack_request(P.OP_HELLO, flags, -1, -1, (P.MAGIC_VERSION,))
    anc = [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, struct.pack("iII", os.getpid(), os.getuid(), os.getgid()))] \
        if creds else []
    try:
        s.sendmsg([msg], anc)
    except OSError as exc:
        return -1, exc.errno, -1            # the daemon closed the connection
    s.settimeout(10)
    try:
        data, anc, _f, _a = s.recvmsg(P.REP.size + 4096, socket.CMSG_SPACE(4))
    except OSError:
        return -1, 0, -1
    if len(data) < P.REP.size:
        return -1, 0, -1
    ret, err, _len = P.REP.unpack_from(data)
    fd = -1
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fd = struct.unpack("i", payload[:4])[0]
    return ret, err, fd


class Channel:
    def __init__(self, fd: int) -> None:
        self.map = mmap.mmap(fd, P.VCHAN_SIZE)
        self.v = P.vchan.from_buffer(self.map)

    def call(self, op: int, fd: int = -1, fd2: int = -1, a: tuple[int, ...] = (), payload: bytes = b"",
             flags: int = 0, timeout: float = 10) -> tuple[int, int]:
        v = self.v
        v.req.op, v.req.flags, v.req.fd, v.req.fd2 = op, flags, fd, fd2
        for i in range(5):
            v.req.a[i] = a[i] & 0xFFFFFFFFFFFFFFFF if i < len(a) else 0
        v.req.len = len(payload)
        v.req.reserved = 0
        ctypes.memmove(ctypes.addressof(v.req_payload), payload, len(payload))
        seq = (v.prog.req_seq + 1) & 0xFFFFFFFF
        v.prog.req_seq = seq
        v.prog.wake_seq = (v.prog.wake_seq + 1) & 0xFFFFFFFF          # the daemon's wake-up word
        word = ctypes.addressof(v.prog) + P.vchan_prog.wake_seq.offset
        libc.syscall(SYS_futex, ctypes.c_void_p(word), FUTEX_WAKE, 1, None, None, 0)
        end = time.monotonic() + timeout
        while v.daemon.rep_seq != seq:
            if time.monotonic() > end:
                return -1, -1                    # no answer
            time.sleep(0.0002)
        return v.rep.ret, v.rep.err


def setup(ch: Channel, group: str, bdf: str | None = None, iommu: int = 3) -> tuple[int, int, int]:
    """Container (fd 30), group (fd 31) in it, the IOMMU set; the device (fd 32) if ``bdf``."""
    assert ch.call(P.OP_OPEN, 30, -1, (os.O_RDWR, 0), b"/dev/vfio/vfio") == (30, 0)
    assert ch.call(P.OP_OPEN, 31, -1, (os.O_RDWR, 0), f"/dev/vfio/{group}".encode()) == (31, 0)
    cfd = ctypes.c_int32(30)
    assert ch.call(P.OP_IOCTL, 31, -1, (VFIO_GROUP_SET_CONTAINER, ctypes.addressof(cfd)))[0] == 0
    assert ch.call(P.OP_IOCTL, 30, -1, (VFIO_SET_IOMMU, iommu))[0] == 0
    dev = -1
    if bdf:
        name = ctypes.create_string_buffer(bdf.encode())
        dev, err = ch.call(P.OP_IOCTL, 31, 32, (VFIO_GROUP_GET_DEVICE_FD, ctypes.addressof(name)))
        assert dev == 32, (dev, err)
    return 30, 31, dev


def memfd(name: str) -> int:
    fd = libc.syscall(SYS_memfd_create, name.encode(), 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), name)
    return fd


def main() -> int:
    path, what, *args = sys.argv[1:]
    if what == "borrowed-hello":
        # The child connects (SO_PEERCRED names it), then becomes a set-uid root
        # program that stays alive; the parent, holding the same socket, says hello.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            s.connect(path)
            os.set_inheritable(s.fileno(), True)
            os.dup2(r, 0)
            os.execv("/usr/bin/passwd", ["passwd"])
        time.sleep(1.0)                                   # passwd waits on the pipe
        say(child=pid)
        ret, err, fd = hello(s, creds=True)
        say(hello_with_own_creds=f"{ret},{err}", channel=int(fd >= 0))
        ret2, err2, fd2 = hello(s, creds=False)
        say(hello_without_creds=f"{ret2},{err2}", channel2=int(fd2 >= 0))
        if fd >= 0:                                       # the attack worked: use it
            ch = Channel(fd)
            say(open_root_group=",".join(map(str, ch.call(P.OP_OPEN, 50, -1, (os.O_RDWR, 0), b"/dev/vfio/0"))))
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return 0
    if what == "hello-then-setuid":
        # The child says hello itself and hands its channel to the parent, then execs passwd.
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            s = connect(path)
            ret, err, fd = hello(s)
            a.sendmsg([struct.pack("iii", ret, err, os.getpid())],
                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))] if fd >= 0 else [])
            os.set_inheritable(s.fileno(), True)
            os.dup2(r, 0)
            os.execv("/usr/bin/passwd", ["passwd"])
        data, anc, _f, _a = b.recvmsg(64, socket.CMSG_SPACE(4))
        ret, err, _pid = struct.unpack("iii", data)
        say(child_hello=f"{ret},{err}", child=pid)
        fd = next((struct.unpack("i", d[:4])[0] for lv, k, d in anc if k == socket.SCM_RIGHTS), -1)
        time.sleep(1.0)                                   # passwd is running now
        print("passwd_running", flush=True)
        addr = int(sys.stdin.readline())                  # where passwd keeps data, from the test (root)
        if fd >= 0:
            ch = Channel(fd)
            say(open_root_group=",".join(map(str, ch.call(P.OP_OPEN, 60, -1, (os.O_RDWR, 0), b"/dev/vfio/0"))))
            say(get_status=",".join(map(str, ch.call(P.OP_IOCTL, 3, -1, (VFIO_GROUP_GET_STATUS, addr)))))
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return 0
    if what == "forged-fork":
        group = args[0]
        c, g = memfd("vfiosim:container"), memfd(f"vfiosim:group:{group}")
        os.dup2(c, 3)
        os.dup2(g, 4)
        s = connect(path)
        ret, err, fd = hello(s, flags=P.HELLO_FORK)
        say(hello=f"{ret},{err}")
        ch = Channel(fd)
        status = ctypes.create_string_buffer(struct.pack("II", 8, 0))
        say(get_status=",".join(map(str, ch.call(P.OP_IOCTL, 4, -1, (VFIO_GROUP_GET_STATUS,
                                                                   ctypes.addressof(status))))))
        say(api_version=",".join(map(str, ch.call(P.OP_IOCTL, 3, -1, (VFIO_GET_API_VERSION, 0)))))
        name = ctypes.create_string_buffer(args[1].encode())
        say(get_device_fd=",".join(map(str, ch.call(P.OP_IOCTL, 4, 9, (VFIO_GROUP_GET_DEVICE_FD,
                                                                       ctypes.addressof(name))))))
        return 0
    if what == "stall":
        s = connect(path)
        msg = P.pack_request(P.OP_HELLO, 0, -1, -1, (P.MAGIC_VERSION,))
        s.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS,
                           struct.pack("iII", os.getpid(), os.getuid(), os.getgid()))])
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        print("stalling", flush=True)
        time.sleep(3600)
        return 0
    if what == "idle":
        socks = []
        for _ in range(int(args[0]) if args else 1):
            try:
                socks.append(connect(path))
            except OSError as exc:
                say(connect_failed=exc.errno)
                break
        say(connected=len(socks))
        time.sleep(3600)
        return 0
    if what == "victim":
        s = connect(path)
        _ret, _err, fd = hello(s)
        ch = Channel(fd)
        assert ch.call(P.OP_OPEN, 70, -1, (os.O_RDWR, 0), b"/dev/vfio/vfio") == (70, 0)
        t = time.monotonic()
        ok = sum(ch.call(P.OP_IOCTL, 70, -1, (VFIO_GET_API_VERSION, 0)) == (0, 0) for _ in range(int(args[0])))
        say(calls=args[0], ok=ok, seconds=f"{time.monotonic() - t:.3f}")
        return 0
    if what == "eventfd-churn":
        n, group, bdf = int(args[0]), args[1], args[2]
        s = connect(path)
        _ret, _err, fd = hello(s)
        ch = Channel(fd)
        _c, _g, dev = setup(ch, group, bdf)
        errs: dict[int, int] = {}
        irqs: dict[int, int] = {}
        for _ in range(n):
            e = os.eventfd(0)
            os.dup2(e, 50)
            os.close(e)
            ret, err = ch.call(P.OP_SETFD, 50, -1, (1,))
            errs[err] = errs.get(err, 0) + 1
            # A call that resolves it as the kernel's fdget() would: the INTx trigger of SET_IRQS.
            irq = ctypes.create_string_buffer(struct.pack("IIIIIi", 24, 0x24, 0, 0, 1, 50))
            ret, err = ch.call(P.OP_IOCTL, dev, -1, (VFIO_DEVICE_SET_IRQS, ctypes.addressof(irq)))
            irqs[err] = irqs.get(err, 0) + 1
        say(setfd_errnos=",".join(f"{k}:{v}" for k, v in sorted(errs.items())),
            set_irqs_errnos=",".join(f"{k}:{v}" for k, v in sorted(irqs.items())))
        print("done", flush=True)
        sys.stdin.readline()
        return 0
    if what in ("raw-setresuid", "raw-capset"):
        group = args[0]
        s = connect(path)
        _ret, _err, fd = hello(s)
        ch = Channel(fd)
        node = f"/dev/vfio/{group}".encode()
        say(open_before=",".join(map(str, ch.call(P.OP_OPEN, 40, -1, (os.O_RDWR, 0), node))))
        ch.call(P.OP_CLOSE, 40)
        if what == "raw-setresuid":
            r = libc.syscall(SYS_setresuid, 65534, 65534, 65534)        # no libc wrapper, no flag
        else:
            # _LINUX_CAPABILITY_VERSION_3: what it has, less CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
            hdr = ctypes.create_string_buffer(struct.pack("Ii", 0x20080522, 0))
            data = ctypes.create_string_buffer(24)
            libc.syscall(SYS_capget, hdr, data)
            caps = list(struct.unpack("IIIIII", data.raw))
            caps[0] &= ~0x6                                               # effective, low word
            caps[1] &= ~0x6                                               # permitted, low word
            data = ctypes.create_string_buffer(struct.pack("IIIIII", *caps))
            r = libc.syscall(SYS_capset, hdr, data)
        say(raw=r)
        say(open_after=",".join(map(str, ch.call(P.OP_OPEN, 40, -1, (os.O_RDWR, 0), node))))
        return 0
    if what == "reserve-and-map":
        group = args[0]
        s = connect(path)
        _ret, _err, fd = hello(s)
        ch = Channel(fd)
        setup(ch, group)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        base = libc.mmap(None, 4 << 40, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000, -1, 0)  # NORESERVE
        page = base + (2 << 40)
        assert libc.mprotect(ctypes.c_void_p(page), 4096, 3) == 0
        ctypes.memset(page, 0x5A, 4096)
        m = ctypes.create_string_buffer(struct.pack("IIQQQ", 32, 3, page, 0, 4096))
        t = time.monotonic()
        ret, err = ch.call(P.OP_IOCTL, 30, -1, (VFIO_IOMMU_MAP_DMA, ctypes.addressof(m)), timeout=120)
        say(map=f"{ret},{err}", seconds=f"{time.monotonic() - t:.3f}")
        print("mapped", flush=True)
        sys.stdin.readline()
        return 0
    if what == "many-mmaps":
        n, group, bdf = int(args[0]), args[1], args[2]
        s = connect(path)
        _ret, _err, fd = hello(s)
        ch = Channel(fd)
        _c, _g, dev = setup(ch, group, bdf)
        done, err = 0, 0
        for _ in range(n):
            ret, err = ch.call(P.OP_MMAP, dev, -1, (0, 4096, 3, 1))
            if ret < 0:
                break
            done += 1
        say(mmaps=done, errno=err)
        return 0
    raise SystemExit(f"unknown subcommand {what}")


if __name__ == "__main__":
    sys.exit(main())
