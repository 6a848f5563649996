#!/usr/bin/env python3
"""Benchmarks of `vfiosim run` (not a test): prints the numbers and ratios of one run.

1. An ioctl round trip through the preload shim (VFIO_GET_API_VERSION: the
   shim, the socket, the daemon's dispatch, the simulated kernel) against a
   plain Unix-socket echo round trip of the same message sizes served by a
   Python echo loop (selectors, as the daemon).  Goal: <= 2x.
2. edu DMA throughput, 1 MiB transfers (256 DMA commands of 4 KiB, edu's
   buffer size, each four stores to BAR0 emulated through the SIGSEGV
   handler and the daemon) against memcpy of the same size.

    python3 benchmarks/run_bench.py [--ioctls N] [--mib N]
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(tmp: str) -> str:
    exe = os.path.join(tmp, "bench_client")
    cc = shutil.which("cc") or "gcc"
    subprocess.run([cc, "-O2", "-o", exe, str(HERE / "bench_client.c")], check=True)
    return exe


def echo_server(path: str, ready: threading.Event, stop: threading.Event) -> None:
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lsock.bind(path)
    lsock.listen(4)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    ready.set()
    reply = bytes(16)
    while not stop.is_set():
        for key, _ in sel.select(0.2):
            if key.data is None:
                conn, _ = lsock.accept()
                sel.register(conn, selectors.EVENT_READ, conn)
                continue
            conn = key.data
            msg = conn.recv(4096 + 64)
            if not msg:
                sel.unregister(conn)
                conn.close()
                continue
            conn.sendall(reply)
    lsock.close()


def run(cmd: list[str]) -> float:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout}{out.stderr}")
    return float(out.stdout.split()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ioctls", type=int, default=20000)
    ap.add_argument("--mib", type=int, default=4)
    args = ap.parse_args()
    vfiosim = [sys.executable, "-m", "vfiosim.cli", "run", "--machine", "pseries", "--"]
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(tmp)
        path = os.path.join(tmp, "echo.sock")
        ready, stop = threading.Event(), threading.Event()
        # The echo server runs in its own process, as the daemon does.
        server = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); "
                                   f"import run_bench, threading; e = threading.Event(); "
                                   f"run_bench.echo_server({path!r}, e, threading.Event())"])
        try:
            for _ in range(100):
                if os.path.exists(path):
                    break
                threading.Event().wait(0.05)
            echo_ns = run([exe, "echo", path, str(args.ioctls)])
        finally:
            server.kill()
            server.wait()
        ioctl_ns = run([*vfiosim, exe, "ioctl", str(args.ioctls)])
        dma = run([*vfiosim, exe, "dma", str(args.mib)])
        memcpy = run([exe, "memcpy", str(args.mib)])
    print(f"ioctl round trip through the shim: {ioctl_ns / 1000:8.1f} us")
    print(f"Unix-socket echo round trip:       {echo_ns / 1000:8.1f} us")
    print(f"  ratio {ioctl_ns / echo_ns:.2f}x (goal <= 2x)")
    print(f"edu DMA, 1 MiB transfers:          {dma:10.1f} MB/s")
    print(f"memcpy, 1 MiB:                     {memcpy:10.1f} MB/s")
    print(f"  ratio memcpy/DMA {memcpy / dma:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
