"""`vfiosim run` on kernels with iommufd: /dev/iommu and the device cdevs are
the simulated kernel's (routed by the preload shim), and exist exactly when
the machine's kernel configuration has them -- whatever the host has.

The iommufd example needs <linux/iommufd.h> (6.2+): it is compiled against
Debian's 6.12 uAPI headers (tests/uapi_headers.py), and the test skips with
the reason when they cannot be had.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runutil import EXAMPLES, cc
from uapi_headers import HeadersUnavailable, find_headers

CLI = [sys.executable, "-m", "vfiosim.cli"]


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    out = tmp_path_factory.mktemp("bin")
    built = {"type1": cc(EXAMPLES / "type1_edu_dma.c", out)}
    try:
        headers = find_headers()
    except HeadersUnavailable as exc:
        built["iommufd_unavailable"] = str(exc)
    else:
        built["iommufd"] = cc(EXAMPLES / "iommufd_edu_dma.c", out, *headers.cflags())
    return built


def vfiosim_run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "run", *args], capture_output=True, text=True, timeout=timeout)


def iommufd_bin(bins):
    if "iommufd" not in bins:
        pytest.skip(f"no Linux 6.12 uAPI headers for the iommufd example: {bins['iommufd_unavailable']}")
    return str(bins["iommufd"])


def test_the_iommufd_c_example_runs_unmodified_through_the_cdev(bins, tmp_path):
    trace = tmp_path / "t.jsonl"
    proc = vfiosim_run("--machine", "x86", "--kernel-config", "iommufd", "--trace", str(trace), "--",
                       iommufd_bin(bins), "0000:01:00.0", "/dev/vfio/devices/vfio0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "device 1 bound, attached to IOAS 2 through HWPT 3" in out
    assert "usable IOVA 0..0xfedfffff" in out and "usable IOVA 0xfef00000..0x7fffffffff" in out
    assert "DMA round trip of 4096 bytes: verified" in out
    assert "detached: VmPin 0 kB" in out
    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    opens = [r["path"] for r in recs if r.get("call") == "open"]
    assert opens == ["/dev/vfio/devices/vfio0", "/dev/iommu"]
    cmds = [r["cmd"] for r in recs if r.get("call") == "ioctl"]
    assert cmds[:4] == ["VFIO_DEVICE_BIND_IOMMUFD", "IOMMU_IOAS_ALLOC", "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
                        "IOMMU_IOAS_IOVA_RANGES"]
    show = subprocess.run([*CLI, "trace", "show", str(trace)], capture_output=True, text=True, check=True).stdout
    assert "<iommufd>, IOMMU_IOAS_MAP, {size=0x28, flags=0x7, ioas_id=2" in show


def test_the_example_finds_its_cdev_in_sysfs(bins):
    """No arguments: the first edu bound to vfio-pci, its cdev from the fake
    sysfs's vfio-dev/vfioN, as on Linux."""
    proc = vfiosim_run("--machine", "x86", "--kernel-config", "iommufd", "--", iommufd_bin(bins))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first in ("device 0000:01:00.0, cdev /dev/vfio/devices/vfio0",
                     "device 0000:02:00.0, cdev /dev/vfio/devices/vfio1")
    assert "DMA round trip of 4096 bytes: verified" in proc.stdout


def test_debians_kernel_has_no_dev_iommu_and_no_cdev_whatever_the_host_has(bins):
    proc = vfiosim_run("--machine", "x86", "--", iommufd_bin(bins), "0000:01:00.0", "/dev/vfio/devices/vfio0")
    assert proc.returncode == 1
    assert "/dev/vfio/devices/vfio0: No such file or directory" in proc.stderr
    proc = vfiosim_run("--machine", "x86", "--", sys.executable, "-c",
                       "import os; print(os.path.exists('/dev/iommu'), os.path.exists('/dev/vfio/devices'))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
    proc = vfiosim_run("--machine", "x86", "--kernel-config", "iommufd", "--", sys.executable, "-c",
                       "import os, stat; s = os.stat('/dev/iommu'); d = os.stat('/dev/vfio/devices/vfio1');"
                       "print(stat.S_ISCHR(s.st_mode), os.major(s.st_rdev), os.minor(s.st_rdev), "
                       "stat.S_ISCHR(d.st_mode), os.major(d.st_rdev), os.minor(d.st_rdev))")
    assert proc.returncode == 0, proc.stderr
    # Numbered as the x86-iommufd guest's 6.12.118 numbers them: a dynamic misc minor
    # from 256 up, the vfio-dev major next below the groups' (docs/conformance.md).
    assert proc.stdout.split() == ["True", "10", "257", "True", "242", "1"]


def test_the_type1_example_runs_on_the_container_iommufd_serves(bins):
    proc = vfiosim_run("--machine", "x86", "--kernel-config", "iommufd-compat", "--", str(bins["type1"]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DMA round trip of 4096 bytes: verified" in proc.stdout


@pytest.mark.parametrize("preset,config,modules", [
    ("x86", None, ["vfio", "vfio_iommu_type1", "vfio_pci", "vfio_pci_core"]),
    ("x86", "iommufd", ["iommufd", "vfio", "vfio_iommu_type1", "vfio_pci", "vfio_pci_core"]),
    # IOMMUFD_VFIO_CONTAINER turns VFIO_CONTAINER off, and Type1 is built only under it.
    ("x86", "iommufd-compat", ["iommufd", "vfio", "vfio_pci", "vfio_pci_core"]),
    ("powernv", None, ["vfio", "vfio_iommu_spapr_tce", "vfio_pci", "vfio_pci_core"]),
])
def test_sys_module_lists_the_modules_the_kernel_configuration_builds(tmp_path, preset, config, modules):
    """A program probing for iommufd by /sys/module/iommufd (as vfiosim's own
    recorder does) sees it exactly when the machine's kernel has it; the
    container's IOMMU backends only when VFIO_CONTAINER is built."""
    import vfiosim
    from runutil import ThreadedDaemon

    d = ThreadedDaemon(vfiosim.Machine.preset(preset, kernel_config=config), tmp_path)
    try:
        prog = ("import os\n"
                "names = ('iommufd', 'vfio', 'vfio_pci', 'vfio_pci_core', 'vfio_iommu_type1', 'vfio_iommu_spapr_tce')\n"
                "print(sorted(m for m in names if os.access('/sys/module/' + m, os.F_OK)))\n"
                "print(os.access('/sys/module/iommufd/parameters', os.F_OK),"
                " open('/sys/module/vfio/parameters/enable_unsafe_noiommu_mode').read().strip())\n")
        out = d.run([sys.executable, "-c", prog])
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == repr(modules)
        assert lines[1] == "False N"        # iommufd has no module parameters
    finally:
        d.close()
