"""Helpers for the `vfiosim run` tests: build C programs, run a daemon in a thread."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Sequence

import vfiosim
from vfiosim.transport.daemon import Daemon
from vfiosim.transport.run import program_env

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
C_DIR = Path(__file__).resolve().parent / "c"


def cc(source: Path, out_dir: Path, *extra: str) -> Path:
    """Compile a C program with the system gcc against <linux/vfio.h>."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "a C compiler is needed"
    exe = out_dir / source.stem
    subprocess.run([compiler, "-O2", "-Wall", "-o", str(exe), str(source), *extra], check=True)
    return exe


class ThreadedDaemon:
    """A daemon serving ``machine`` from a background thread, for tests that
    inspect the machine while programs run."""

    def __init__(self, machine: vfiosim.Machine, tmp: Path, trace: str | None = None) -> None:
        self.machine = machine
        self.sock = str(tmp / "vfiosim.sock")
        self.logs: list[str] = []
        self.daemon = Daemon(machine, self.sock, trace=trace, log=self.logs.append)
        self.thread = threading.Thread(target=self.daemon.serve, kwargs={"poll": 0.05}, daemon=True)
        self.thread.start()

    @property
    def root(self) -> str:
        return self.daemon.root

    def env(self, **extra: str) -> dict[str, str]:
        env = program_env(self.sock, self.daemon.root)
        env.update(extra)
        return env

    def run(self, argv: Sequence[str], input: str | None = None, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env(), input=input, capture_output=True, text=True,
                              timeout=timeout, **kw)

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(list(argv), env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, **kw)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no process holds a task on the machine."""
        import time
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.daemon.states:
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self.daemon.stop()
        self.thread.join(10)
        self.daemon.close()


def python() -> str:
    return sys.executable
