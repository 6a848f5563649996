"""``vfiosim record -- PROGRAM``: a VFIO session on this host's real kernel, as a trace.

PROGRAM runs with ``libvfiosim_record.so`` preloaded (``vfiosim_record.c``): a
pass-through shim that makes every call exactly as the program asked and writes
what it was and what the kernel answered to the trace.  The trace's header, written
by the first process, describes the machine from sysfs (groups, devices and their
drivers, the IOMMU drivers loaded, the platform's DMA windows) so that
``vfiosim replay`` can choose or check the matching simulated machine.

``--simulated MACHINE`` records a simulated machine instead: the recording shim is
preloaded in front of ``vfiosim run``'s, so every call it passes through reaches
the simulator.  That is how the recorder is tested on a host without /dev/vfio
(tests/test_record.py), and a way to compare its traces with ``--trace``'s.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from ..cachedir import user_cache
from ..preload import ShimBuildError, compile_shim

SOURCE = Path(__file__).resolve().parent / "vfiosim_record.c"


class RecordUnavailable(RuntimeError):
    """Recording cannot happen here; the message says why and what to do."""


def _cache_dirs() -> list[Path]:
    return [user_cache(), Path(tempfile.gettempdir()) / f"vfiosim-{os.getuid()}"]


def library_path() -> str:
    """The recording shim, built by pip install next to this file or on first use
    into a cache (keyed by the source's hash)."""
    here = SOURCE.parent
    installed = any(part in ("site-packages", "dist-packages") for part in here.parts)
    built = sorted(here.glob("_vfiosim_record*.so"))
    if built and (installed or not SOURCE.exists() or built[0].stat().st_mtime >= SOURCE.stat().st_mtime):
        return str(built[0])
    if not SOURCE.exists():
        raise RecordUnavailable(f"the recording shim is missing from {here}")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    name = f"libvfiosim_record-{digest}.so"
    for cache in _cache_dirs():
        out = cache / name
        if out.exists():
            return str(out)
        try:
            compile_shim(SOURCE, out)
        except OSError:
            continue
        except ShimBuildError as exc:
            raise RecordUnavailable(f"cannot build the recording shim {SOURCE.name}: {exc}") from None
        return str(out)
    raise RecordUnavailable(f"no writable directory to build the recording shim in ({_cache_dirs()[0]})")


def recording_env(output: str, scenario: str, *, append: bool = False,
                  base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["VFIOSIM_RECORD"] = os.path.abspath(output)
    env["VFIOSIM_RECORD_SCENARIO"] = scenario
    if append:
        env["VFIOSIM_RECORD_APPEND"] = "1"
    else:
        env.pop("VFIOSIM_RECORD_APPEND", None)
    return env


def record(argv: Sequence[str], output: str, *, scenario: str | None = None, simulated: str | None = None,
           append: bool = False, kernel_config: str | None = None) -> tuple[int, str]:
    """Run ``argv`` recorded into ``output``; returns (its exit status, a summary line).
    ``kernel_config``: the simulated machine's kernel options (``simulated`` only)."""
    lib = library_path()
    scenario = scenario or os.path.basename(argv[0])
    if simulated is None and kernel_config is not None:
        raise ValueError("--kernel-config describes a simulated machine (--simulated NAME): a real "
                                "kernel's configuration is what it was built with")
    if simulated is None and not os.path.exists("/dev/vfio/vfio") and not os.path.exists("/dev/iommu"):
        raise RecordUnavailable("this host has no /dev/vfio/vfio and no /dev/iommu: nothing to record (load "
                                "vfio-pci and bind a device to it; or record a simulated machine with "
                                "--simulated NAME)")
    if os.path.exists(output) and not append:
        os.unlink(output)                   # a new trace: the first process writes its header
    env = recording_env(output, scenario, append=append)
    if simulated is not None:
        from ..machine import Machine
        from ..transport.run import run
        from .format import kernel_config_items
        machine = Machine.load(simulated, kernel_config=kernel_config)
        env_extra = {k: v for k, v in env.items() if k.startswith("VFIOSIM_RECORD")}
        env_extra["VFIOSIM_RECORD_PLATFORM"] = machine.platform
        env_extra["VFIOSIM_RECORD_KERNEL_CONFIG"] = ",".join(kernel_config_items(machine.kernel.config))
        env_extra["VFIOSIM_RECORD_SOURCE"] = "simulator"
        status = run(machine, list(argv), env_extra=env_extra, preload_first=[lib])
    else:
        pre = env.get("LD_PRELOAD", "")
        env["LD_PRELOAD"] = lib + (":" + pre if pre else "")
        try:
            status = subprocess.run(list(argv), env=env).returncode
        except OSError as exc:
            print(f"vfiosim record: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
            return 127, "nothing recorded"
        status = 128 - status if status < 0 else status
    return status, summarize(output)


def summarize(path: str) -> str:
    """"recorded N calls (F failed) of P processes into FILE"."""
    from .format import TraceError, open_trace
    try:
        with open_trace(path) as t:
            n = failed = 0
            pids = set()
            for rec in t:
                if rec.get("call") in ("exit", "fork"):
                    continue
                n += 1
                failed += bool(rec.get("errno"))
                pids.add(rec.get("pid"))
    except TraceError as exc:
        return f"no usable trace: {exc}"
    return f"recorded {n} calls ({failed} failed) of {len(pids)} process(es) into {path}"
