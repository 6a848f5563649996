"""examples/edu_driver.py and the tutorial's code, run on every simulated machine."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import vfiosim
from vfiosim import client
from vfiosim.client.testing import SimulatedHost

ROOT = Path(__file__).resolve().parent.parent
MACHINES = ["powernv", "pseries"] + (["x86"] if "x86" in vfiosim.preset_names() else [])
machines = pytest.mark.parametrize("vfio_machine", MACHINES, indirect=True)


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("edu_driver", ROOT / "examples" / "edu_driver.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tutorial_blocks(info: str = "python") -> list[str]:
    text = (ROOT / "docs" / "tutorial.md").read_text()
    return [m.group(2) for m in re.finditer(r"^```([^\n]*)\n(.*?)^```", text, re.S | re.M) if m.group(1) == info]


@machines
def test_edu_driver_on_the_simulator(vfio_machine, vfio_process):
    out = io.StringIO()
    assert load_example().run(out=out) == 0
    text = out.getvalue()
    assert "liveness check: ok" in text and "10! = 3628800" in text and "DMA round trip of 4096 bytes: ok" in text
    assert text.rstrip().endswith("OK")
    edu = vfio_machine.device(client.find_devices(ids="1234:11e8")[0].bdf)
    assert edu.dma_count == 2                                   # both transfers went through the IOMMU
    assert vfio_machine.pinned_pages() == 0 and vfio_process.status()["VmLck"] == 0
    assert len(vfio_process.task.files.fds()) == 3


@pytest.mark.parametrize("kernel,page_size", [("3.10", 4096), ("6.12", 65536)])
def test_edu_driver_on_other_kernels(kernel, page_size):
    m = vfiosim.Machine.default(kernel=kernel, page_size=page_size)
    out = io.StringIO()
    assert load_example().run(backend=client.SimBackend(m), out=out) == 0, out.getvalue()
    assert ("IOMMU spapr," if kernel == "3.10" else "IOMMU spapr-v2") in out.getvalue()


@machines
def test_edu_driver_through_the_real_backend(vfio_machine):
    """The production code path (os/fcntl/mmap/select through HostOs), against the fake kernel boundary."""
    host = SimulatedHost(vfio_machine.spawn(), region_mmap=False)
    out = io.StringIO()
    assert load_example().run(backend=client.RealBackend(host), out=out) == 0, out.getvalue()
    assert "real backend" in out.getvalue()
    assert {"open", "ioctl", "pread", "pwrite", "eventfd", "read", "mmap", "munmap"} <= set(host.names())
    assert vfio_machine.pinned_pages() == 0


@pytest.mark.parametrize("machine", MACHINES)
def test_edu_driver_command_line(machine):
    env = {**os.environ, "VFIOSIM_BACKEND": "sim", "VFIOSIM_MACHINE": machine,
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "edu_driver.py")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.rstrip().endswith("OK")
    bad = subprocess.run([sys.executable, str(ROOT / "examples" / "edu_driver.py"), "0000:7f:00.0"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no PCI device matches" in bad.stderr and "fix:" in bad.stderr


def test_edu_driver_reports_a_missing_dev_vfio():
    env = {**os.environ, "VFIOSIM_BACKEND": "real",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "edu_driver.py")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "/dev/vfio/vfio" in out.stderr and "modprobe vfio-pci" in out.stderr


@machines
def test_the_tutorial_runs_top_to_bottom(vfio_machine, vfio_process, capsys):
    blocks = tutorial_blocks()
    assert len(blocks) >= 8
    namespace: dict[str, object] = {"__name__": "tutorial"}
    for block in blocks:
        exec(compile(block, "docs/tutorial.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "10! = 3628800" in printed and "DMA round trip ok" in printed and "fix: use one of those" in printed
    assert vfio_machine.pinned_pages() == 0 and vfio_process.status()["VmLck"] == 0
    assert len(vfio_process.task.files.fds()) == 3               # the tutorial closed everything it opened
