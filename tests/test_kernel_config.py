"""The kernel configuration as part of the machine (kernel/config.py): the
Kconfig rules, the machine-file key, and what a program finds on each kind
of kernel."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

import vfiosim
from iommufdutil import ioas_alloc, ioas_map
from vfiosim.kernel.config import DEBIAN, KernelConfig, KernelConfigError
from vfiosim.machine_spec import MachineFileError
from vfiosim.uapi import vfio as uapi
from vfioutil import open_device


def err(fn, *args):
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


def test_the_default_is_debians_build():
    assert KernelConfig.parse([]) == DEBIAN
    assert DEBIAN.symbols() == ["CONFIG_VFIO_GROUP=y", "CONFIG_VFIO_CONTAINER=y", "# CONFIG_IOMMUFD is not set",
                                "# CONFIG_VFIO_DEVICE_CDEV is not set", "# CONFIG_IOMMUFD_VFIO_CONTAINER is not set"]
    for name in ("x86", "powernv", "pseries"):
        m = vfiosim.Machine.preset(name)
        assert m.kernel.config == DEBIAN
        assert "/dev/iommu" not in m.kernel.dev_nodes


@pytest.mark.parametrize("items, rule", [
    (["VFIO_DEVICE_CDEV"], "VFIO_DEVICE_CDEV depends on IOMMUFD"),
    (["IOMMUFD_VFIO_CONTAINER"], "IOMMUFD_VFIO_CONTAINER depends on IOMMUFD"),
    (["IOMMUFD", "IOMMUFD_VFIO_CONTAINER", "VFIO_CONTAINER=y"], "depends on VFIO_GROUP && !VFIO_CONTAINER"),
    (["VFIO_CONTAINER=n"], "VFIO selects VFIO_CONTAINER if IOMMUFD=n"),
    (["VFIO_GROUP=n"], "VFIO selects VFIO_GROUP if SPAPR_TCE_IOMMU || IOMMUFD=n"),
    (["IOMMUFD", "VFIO_GROUP=n", "VFIO_DEVICE_CDEV=n"], "VFIO selects VFIO_DEVICE_CDEV if !VFIO_GROUP"),
    (["IOMMUFD=m"], "bool option"),
    (["IOMMU"], "unknown option"),
])
def test_kconfig_rules_are_enforced(items, rule):
    with pytest.raises(KernelConfigError, match=rule.replace("(", r"\(").replace("|", r"\|")):
        KernelConfig.parse(items)


def test_selects_and_defaults_follow():
    c = KernelConfig.parse(["CONFIG_IOMMUFD=y", "IOMMUFD_VFIO_CONTAINER"])
    assert c.iommufd_vfio_container and not c.vfio_container
    c = KernelConfig.parse(["IOMMUFD", "VFIO_GROUP=n"])
    assert c.vfio_device_cdev and not c.vfio_container and not c.vfio_group
    assert c.differences() == ["VFIO_GROUP=n", "VFIO_CONTAINER=n", "IOMMUFD", "VFIO_DEVICE_CDEV"]


def test_power_has_no_device_cdev():
    with pytest.raises(KernelConfigError, match="!SPAPR_TCE_IOMMU"):
        KernelConfig.parse(["IOMMUFD", "VFIO_DEVICE_CDEV"], platform="powernv")
    with pytest.raises(KernelConfigError, match="SPAPR_TCE_IOMMU"):
        KernelConfig.parse(["IOMMUFD", "VFIO_GROUP=n"], platform="pseries")
    with pytest.raises(ValueError, match="iommufd came in Linux 6.2"):
        vfiosim.Machine.default(kernel="3.10", kernel_config=["IOMMUFD"])


def test_machine_file_key_and_errors(tmp_path):
    text = """
[machine]
name = "k"
platform = "x86"
[kernel]
config = {config}
[[device]]
bdf = "0000:01:00.0"
model = "edu"
iommu_group = 1
"""
    m = vfiosim.Machine.from_toml(text.format(config='["IOMMUFD", "VFIO_DEVICE_CDEV"]'))
    assert m.kernel.config.iommufd and m.kernel.config.vfio_device_cdev
    with pytest.raises(MachineFileError, match="kernel.config.*depends on IOMMUFD"):
        vfiosim.Machine.from_toml(text.format(config='["VFIO_DEVICE_CDEV"]'))
    with pytest.raises(MachineFileError, match="kernel.config"):
        vfiosim.Machine.from_toml(text.format(config='"IOMMUFD"'))
    with pytest.raises(MachineFileError, match="kernel.debug"):
        vfiosim.Machine.from_toml(text.format(config="[]") + "\n[kernel.debug]\n")
    # The Machine's own argument adds to (or overrides) the file's list.
    m = vfiosim.Machine.from_toml(text.format(config='["IOMMUFD"]'), kernel_config=["VFIO_DEVICE_CDEV"])
    assert m.kernel.config.vfio_device_cdev


def test_preset_with_the_iommufd_shorthand():
    m = vfiosim.Machine.preset("x86", kernel_config="iommufd")
    assert m.kernel.config.differences() == ["IOMMUFD", "VFIO_DEVICE_CDEV"]
    assert {"/dev/iommu", "/dev/vfio/devices/vfio0", "/dev/vfio/devices/vfio1", "/dev/vfio/vfio",
            "/dev/vfio/4"} <= set(m.kernel.dev_nodes)
    p = m.spawn()
    assert p.open("/dev/vfio/devices", os.O_RDONLY) >= 0


def test_a_kernel_without_groups_has_only_cdevs():
    m = vfiosim.Machine.preset("x86", kernel_config=["IOMMUFD", "VFIO_GROUP=n"])
    nodes = set(m.kernel.dev_nodes)
    assert "/dev/vfio/vfio" not in nodes and "/dev/vfio/4" not in nodes
    assert {"/dev/iommu", "/dev/vfio/devices/vfio0"} <= nodes
    assert not m.kernel.vfio.iommu_drivers.names()        # no container, no Type1 module


# -- POWER with iommufd: arch/powerpc/kernel/iommu.c's spapr_tce_iommu_ops ------------------------------------


def test_power_with_iommufd_binds_nothing_by_default():
    """No isolated MSIs on POWER: a group handed an iommufd cannot open its
    devices (iommufd_device_bind: EPERM); with allow_unsafe_interrupts the
    bind works but there is no paging domain to attach (EOPNOTSUPP).  The
    sPAPR container is unchanged."""
    m = vfiosim.Machine.preset("powernv", kernel_config=["IOMMUFD"])
    assert "/dev/iommu" in m.kernel.dev_nodes and "/dev/vfio/devices/vfio0" not in m.kernel.dev_nodes
    p = m.spawn()
    fd = p.open("/dev/iommu")
    ioas = ioas_alloc(p, fd)
    buf = p.mmap(4096)
    assert ioas_map(p, fd, ioas, buf, 4096, 0x1000) == 0x1000   # a software IOAS works anywhere
    g = p.open("/dev/vfio/0")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(fd))
    bdf = m.iommu_groups()[0][0]
    assert err(open_device, p, g, bdf) == errno.EPERM
    m.kernel.iommufd_allow_unsafe_interrupts = True
    assert err(open_device, p, g, bdf) == errno.EOPNOTSUPP
    assert not m.kernel.iommu_groups[0].dma_owner_claimed()
    p.close(g)
    # The sPAPR TCE container still works on the same kernel.
    c = p.open("/dev/vfio/vfio")
    g = p.open("/dev/vfio/0")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_v2_IOMMU)
    assert open_device(p, g, bdf) >= 0
    assert not m.oopses


def test_power_iommufd_container_has_no_spapr_driver():
    m = vfiosim.Machine.preset("pseries", kernel_config=["IOMMUFD", "IOMMUFD_VFIO_CONTAINER"])
    p = m.spawn()
    c = p.open("/dev/vfio/vfio")
    assert p.ioctl(c, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_SPAPR_TCE_v2_IOMMU) == 0
    assert p.ioctl(c, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_TYPE1v2_IOMMU) == 1
    g = p.open("/dev/vfio/0")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    assert err(p.ioctl, c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_v2_IOMMU) == errno.EINVAL
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    assert err(open_device, p, g, m.iommu_groups()[0][0]) == errno.EPERM
