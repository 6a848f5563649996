"""The fake sysfs under `vfiosim run`, as tools read it: lspci's driver and
IOMMU group, and the vfio-dev class device Linux 6.12 registers for every
VFIO device (drivers/vfio/vfio_main.c __vfio_register_dev(): "vfio%d")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import vfiosim
from runutil import ThreadedDaemon
from vfiosim.transport.sysfs import FakeSysfs, device_dir

LSPCI = shutil.which("lspci")


@pytest.fixture(params=["powernv", "pseries", "x86"])
def tree(request):
    t = FakeSysfs(vfiosim.Machine.preset(request.param))
    yield t
    t.close()


def test_links_resolve_in_the_tree_as_in_sysfs(tree):
    """libpci (lspci -k, -vmm) appends a device's driver and iommu_group links to
    /sys/bus/pci/devices/BDF/ and resolves the result: the tree must take the
    same path through its own links to the same places."""
    k = tree.machine.kernel
    seen = 0
    for bdf, dev in k.devices.items():
        base = tree.path(f"/sys/bus/pci/devices/{bdf}/")
        if dev.driver:
            driver = os.path.realpath(base + os.readlink(base + "driver"))
            assert driver == tree.path(f"/sys/bus/pci/drivers/{dev.driver}")
            seen += 1
        if dev.iommu_group is not None:
            group = os.path.realpath(base + os.readlink(base + "iommu_group"))
            assert group == tree.path(f"/sys/kernel/iommu_groups/{dev.iommu_group.id}")
    assert seen >= 2


def test_every_vfio_device_has_its_vfio_dev_class_device(tree):
    k = tree.machine.kernel
    vfio_devices = sorted((d.index, d.name) for g in k.vfio.groups.values() for d in g.devices)
    assert [i for i, _ in vfio_devices] == list(range(len(vfio_devices)))   # vfio.device_ida, from 0
    assert sorted(os.listdir(tree.path("/sys/class/vfio-dev"))) == sorted(f"vfio{i}" for i, _ in vfio_devices)
    for index, bdf in vfio_devices:
        vdir = tree.path(f"{device_dir(bdf)}/vfio-dev/vfio{index}")
        assert os.listdir(tree.path(f"{device_dir(bdf)}/vfio-dev")) == [f"vfio{index}"]
        # No device cdev (CONFIG_VFIO_DEVICE_CDEV=n): no dev_t, so no `dev` file and an empty uevent.
        assert sorted(os.listdir(vdir)) == ["device", "power", "subsystem", "uevent"]
        assert open(f"{vdir}/uevent").read() == ""
        assert os.readlink(f"{vdir}/device") == f"../../../{bdf}"
        assert os.path.realpath(f"{vdir}/device") == tree.path(device_dir(bdf))
        assert os.path.realpath(f"{vdir}/subsystem") == tree.path("/sys/class/vfio-dev")
        assert os.path.realpath(tree.path(f"/sys/class/vfio-dev/vfio{index}")) == vdir


def test_a_program_finds_vfio_dev_from_the_device_and_the_class(tmp_path):
    code = r"""
import json, os
out = {}
for v in sorted(os.listdir("/sys/class/vfio-dev")):
    p = "/sys/class/vfio-dev/" + v
    out[v] = [os.path.realpath(p), os.path.basename(os.path.realpath(p + "/device")), sorted(os.listdir(p))]
out["by_device"] = {b: os.listdir(f"/sys/bus/pci/devices/{b}/vfio-dev") for b in sorted(os.listdir("/sys/bus/pci/devices"))
                    if os.path.isdir(f"/sys/bus/pci/devices/{b}/vfio-dev")}
print(json.dumps(out))
"""
    d = ThreadedDaemon(vfiosim.Machine.preset("x86"), tmp_path)
    try:
        proc = d.run([sys.executable, "-c", code])
    finally:
        d.close()
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["vfio0"] == ["/sys/devices/pci0000:01/0000:01:00.0/vfio-dev/vfio0", "0000:01:00.0",
                            ["device", "power", "subsystem", "uevent"]]
    assert out["vfio1"][1] == "0000:02:00.0"
    assert out["by_device"] == {"0000:01:00.0": ["vfio0"], "0000:02:00.0": ["vfio1"]}


@pytest.mark.skipif(LSPCI is None, reason="lspci (Debian: pciutils) is not installed; .ci/run installs it as root")
@pytest.mark.parametrize("machine,bdf,group", [("powernv", "0000:01:00.0", "0"), ("pseries", "0001:00:00.0", "1")])
def test_lspci_shows_vfio_pci_and_the_iommu_group(tmp_path, machine, bdf, group):
    d = ThreadedDaemon(vfiosim.Machine.preset(machine), tmp_path)
    try:
        k = d.run([LSPCI, "-k", "-s", bdf])
        vmm = d.run([LSPCI, "-vmm", "-k", "-D", "-s", bdf])
    finally:
        d.close()
    assert k.returncode == 0 and vmm.returncode == 0, k.stderr + vmm.stderr
    assert f"{bdf[5:]} Unclassified device [00ff]: Device 1234:11e8 (rev 10)" in k.stdout
    assert "\tKernel driver in use: vfio-pci" in k.stdout.splitlines()
    fields = dict(line.split(":\t", 1) for line in vmm.stdout.splitlines() if ":\t" in line)
    assert fields["Slot"] == bdf and fields["Driver"] == "vfio-pci" and fields["IOMMUGroup"] == group


def test_debugfs_of_the_iommu_and_vfio_is_the_simulated_kernels_not_the_hosts(tmp_path):
    """/sys/kernel/debug/iommu and /sys/kernel/debug/vfio are rewritten into the
    daemon's tree like the rest of the simulated kernel's files (the kernel's
    vfio_dma_mapping_test reads /sys/kernel/debug/iommu/intel/<bdf>/...: a VT-d
    host's directory there knows no simulated device).  The tree has none, so
    they are absent; a file put there is what the program sees."""
    code = r"""
import os
for p in ("/sys/kernel/debug/iommu/marker", "/sys/kernel/debug/vfio/marker", "/sys/kernel/debug/other"):
    print(p, os.path.exists(p))
"""
    d = ThreadedDaemon(vfiosim.Machine.preset("x86"), tmp_path)
    try:
        for sub in ("iommu", "vfio"):
            os.makedirs(os.path.join(d.root, "sys/kernel/debug", sub), exist_ok=True)
        for f in ("sys/kernel/debug/iommu/marker", "sys/kernel/debug/vfio/marker", "sys/kernel/debug/other"):
            open(os.path.join(d.root, f), "w").close()
        proc = d.run([sys.executable, "-c", code])
    finally:
        d.close()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["/sys/kernel/debug/iommu/marker True", "/sys/kernel/debug/vfio/marker True",
                                           "/sys/kernel/debug/other False"]
