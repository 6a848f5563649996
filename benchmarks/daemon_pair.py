#!/usr/bin/env python3
"""The daemon's share of a 4 KiB MAP_DMA + UNMAP_DMA pair under `vfiosim run` (not a test).

run_bench.py times a C program's pairs through the shim, the shared-memory
channel and the daemon; its figures move by 2x with the machine's load,
because the program and the daemon's serving thread each need a CPU to
spin on.  This measures what the daemon does for a pair, in one process,
without the channel: this process is the program (its own memory, through
/proc/self, as the daemon opens a program's), bound as the daemon binds one,
and each request is handed to ``Daemon._serve_request`` as the channel hands
it (with the 512-byte argument window the shim sends).  Then it peels the
layers off one by one, for where the time goes:

* ``serve``: the whole request (the machine lock, the task checks, the
  window, the syscall gate, the kernel);
* ``gate``: from ``SyscallGate.call_locked`` in (the window opened by hand);
* ``kernel``: from ``Kernel.sys_ioctl`` in (the VFS and VFIO dispatch);
* ``driver``: from the IOMMU driver's ioctl in;
* ``driver, creds taken``: the same, with the credentials already taken
  (Type1's MAP asks for them: three system calls);
* ``GET_API_VERSION``: a whole request that does almost nothing, the floor.

Also: one ``native.creds`` (the three system calls) and one PROCMAP_QUERY.

``--opcodes`` also counts the bytecodes and the Python calls of a whole pair
(``sys.settrace`` with ``f_trace_opcodes``, this script's own loop included):
they do not move with the machine's load as its clock does, so they compare
two trees exactly.  System calls and C (NumPy, the native modules) count
there as the one call that enters them.

    python3 benchmarks/daemon_pair.py [--pairs 3000] [--repeat 7] [--opcodes] [--json FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import vfiosim  # noqa: E402
from vfiosim.kernel import task as task_module  # noqa: E402
from vfiosim.transport import native  # noqa: E402
from vfiosim.transport import protocol as P  # noqa: E402
from vfiosim.transport.daemon import Daemon, Session  # noqa: E402
from vfiosim.transport.host import HostProcess  # noqa: E402
from vfiosim.transport.peer import Bounds, Peer  # noqa: E402
from vfiosim.uapi import vfio as uapi  # noqa: E402

CONFIGS = {"type1v2": ("x86", "4", uapi.VFIO_TYPE1v2_IOMMU), "spapr1": ("pseries", "0", uapi.VFIO_SPAPR_TCE_IOMMU),
           "spapr2": ("pseries", "0", uapi.VFIO_SPAPR_TCE_v2_IOMMU)}
WIN = P.F_WINDOW | P.F_WINDOW_WRITABLE


def bytecodes(fn: Callable[[], None], n: int = 10) -> tuple[float, float]:
    """(bytecodes, Python calls) per call of ``fn``, in its steady state."""
    counts = [0, 0]

    def tracer(frame, event, arg):  # type: ignore[no-untyped-def]
        frame.f_trace_opcodes = True
        if event == "opcode":
            counts[0] += 1
        elif event == "call":
            counts[1] += 1
        return tracer

    for _ in range(50):                 # pools, caches and pins as a long run has them
        fn()
    sys.settrace(tracer)
    try:
        for _ in range(n):
            fn()
    finally:
        sys.settrace(None)
    return counts[0] / n, counts[1] / n


def measure(iommu: str, pairs: int, repeat: int, opcodes: bool = False) -> dict[str, float]:
    platform, group, kind = CONFIGS[iommu]
    m = vfiosim.Machine.preset(platform)
    tmp = tempfile.mkdtemp()
    d = Daemon(m, os.path.join(tmp, "s.sock"))
    ours, theirs = socket.socketpair()
    pid = os.getpid()
    sess = Session(ours, Peer(pid, os.geteuid(), os.getegid(), os.pidfd_open(pid)))
    creds = d._read_creds(sess.peer.pidfd, pid)
    sess.bounds = Bounds(frozenset({os.geteuid()}), frozenset({os.getegid()}), creds.cap_prm | creds.cap_eff)
    with d.gate.lock:
        st = d._bind(sess, 0, HostProcess.open(pid), creds)
    serve = d._serve_request

    def request(op: int, fd: int, a: tuple[int, ...], payload: bytes = b"", flags: int = 0) -> int:
        ret, err, _ = serve(sess, op, flags, fd, -1, a, payload, 0)
        if ret < 0:
            raise OSError(err, f"request {op} {a}")
        return ret

    def ioctl(fd: int, cmd: int, obj: ctypes.Structure | ctypes.c_int32 | None = None, arg: int = 0) -> int:
        if obj is None:
            return request(P.OP_IOCTL, fd, (cmd, arg, 0, 0, 0))
        addr = ctypes.addressof(obj)
        return request(P.OP_IOCTL, fd, (cmd, addr, 0, 0, addr), bytes(obj), WIN)

    # Fd numbers the simulated files take (the program's own numbers under run).
    c, g = 900, 901
    request(P.OP_OPEN, c, (os.O_RDWR, 0, 0, 0, 0), b"/dev/vfio/vfio")
    request(P.OP_OPEN, g, (os.O_RDWR, 0, 0, 0, 0), f"/dev/vfio/{group}".encode())
    cfd = ctypes.c_int32(c)
    ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, cfd)
    ioctl(c, uapi.VFIO_SET_IOMMU, arg=kind)
    buf_map = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf_map.write(b"\1" * (1 << 20))
    buf = ctypes.addressof(ctypes.c_char.from_buffer(buf_map))
    if iommu == "spapr1":
        ioctl(c, uapi.VFIO_IOMMU_ENABLE)
    if iommu == "spapr2":
        ioctl(c, uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY,
              uapi.vfio_iommu_spapr_register_memory(argsz=24, vaddr=buf, size=1 << 20))
    # The structs as a C program has them (on its stack), each with the 512 bytes the shim sends.
    area = (ctypes.c_char * 1024)()
    base = ctypes.addressof(area)
    mp = uapi.vfio_iommu_type1_dma_map.from_buffer(area, 0)
    mp.argsz, mp.flags, mp.vaddr, mp.iova, mp.size = 32, 3, buf, 0, 4096
    up = uapi.vfio_iommu_type1_dma_unmap.from_buffer(area, 512)
    up.argsz, up.iova, up.size = 24, 0, 4096
    mwin, uwin = bytes(area[0:512]), bytes(area[512:1024])
    MAP, UNMAP = uapi.VFIO_IOMMU_MAP_DMA, uapi.VFIO_IOMMU_UNMAP_DMA
    am, au = (MAP, base, 0, 0, base), (UNMAP, base + 512, 0, 0, base + 512)
    task, k = st.task, d.kernel
    host = task.mm.host                                 # type: ignore[attr-defined]
    container = task.files.get(c).container             # type: ignore[attr-defined]
    drv, data = container.iommu_driver, container.iommu_data

    def whole() -> None:
        serve(sess, P.OP_IOCTL, WIN, c, -1, am, mwin, 0)
        serve(sess, P.OP_IOCTL, WIN, c, -1, au, uwin, 0)

    # (The tree before this script measured with call(), native.creds() and native.vma().)
    enter = getattr(d.gate, "call_locked", d.gate.call)
    ioctl_at = getattr(k, "sys_ioctl_at", k.sys_ioctl)     # (one function since the tree after 26920de)
    read_creds = getattr(native, "creds_tuple", native.creds)
    query = getattr(native, "vma_query", native.vma)

    # What the daemon sets when a call begins (a bool before the limits-only refresh).
    stale_all = getattr(task_module, "CREDS_STALE", True)
    fresh = getattr(task_module, "CREDS_FRESH", False)

    def gate() -> None:
        for a, win in ((am, mwin), (au, uwin)):
            task.creds_stale = stale_all
            host.open_window(a[4], win, True)
            enter(task, "ioctl", ioctl_at, c, a[0], a[1], -1)
            host.close_window()

    def kernel() -> None:
        for a, win in ((am, mwin), (au, uwin)):
            task.creds_stale = stale_all
            host.open_window(a[4], win, True)
            k.sys_ioctl(task, c, a[0], a[1])
            host.close_window()

    def driver(stale: bool) -> Callable[[], None]:
        def run() -> None:
            for a, win in ((am, mwin), (au, uwin)):
                task.creds_stale = stale_all if stale else fresh
                host.open_window(a[4], win, True)
                drv.ioctl(data, a[0], a[1], task)
                host.close_window()
        return run

    version = (uapi.VFIO_GET_API_VERSION, 0, 0, 0, 0)

    def api_version() -> None:
        serve(sess, P.OP_IOCTL, 0, c, -1, version, b"", 0)

    def creds_once() -> None:
        read_creds(st.pidfd, st.pid)

    def query_once() -> None:
        query(host.maps_fd, buf, False)

    def best(fn: Callable[[], None], n: int) -> float:
        b = float("inf")
        for _ in range(repeat):
            t = time.perf_counter_ns()
            for _ in range(n):
                fn()
            b = min(b, (time.perf_counter_ns() - t) / n)
        return b

    out = {"serve_pair_ns": best(whole, pairs), "gate_pair_ns": best(gate, pairs),
           "kernel_pair_ns": best(kernel, pairs), "driver_pair_ns": best(driver(True), pairs),
           "driver_creds_taken_pair_ns": best(driver(False), pairs),
           "get_api_version_ns": best(api_version, pairs * 4), "creds_ns": best(creds_once, pairs),
           "procmap_query_ns": best(query_once, pairs)}
    if opcodes:
        out["serve_pair_bytecodes"], out["serve_pair_python_calls"] = bytecodes(whole)
    theirs.close()
    d.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=7, help="runs of each figure; the best is kept")
    ap.add_argument("--only", action="append", choices=sorted(CONFIGS), help="only these IOMMUs (repeatable)")
    ap.add_argument("--opcodes", action="store_true", help="also count a pair's bytecodes and Python calls")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    results = {name: measure(name, args.pairs, args.repeat, args.opcodes)
               for name in CONFIGS if not args.only or name in args.only}
    for name, r in results.items():
        print(f"{name}: " + ", ".join(f"{k.removesuffix('_ns')} {v / 1000:.2f} us" if k.endswith("_ns")
                                      else f"{k} {v:.0f}" for k, v in r.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": {"python": sys.version.split()[0], "cpus": os.cpu_count(),
                                   "kernel": os.uname().release}, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
