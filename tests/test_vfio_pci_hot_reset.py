"""VFIO_DEVICE_GET_PCI_HOT_RESET_INFO and VFIO_DEVICE_PCI_HOT_RESET, as
drivers/vfio/pci/vfio_pci_core.c (6.12) answers them for a device opened through its
group: QEMU's vfio_pci_hot_reset() asks for the info with a bare header first (ENOSPC
and the count), then again with room, then resets with its group fds."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

import vfiosim
from vfiosim import uapi

from vfioutil import open_device, reg_read, reg_write, setup_v1

BDF = "0000:01:00.0"
HDR = ctypes.sizeof(uapi.vfio_pci_hot_reset_info)          # argsz, flags, count
ENTRY = ctypes.sizeof(uapi.vfio_pci_dependent_device)


def errname(exc: pytest.ExceptionInfo) -> str:
    return errno.errorcode[exc.value.errno]


def info_buf(argsz: int, nbytes: int | None = None) -> bytearray:
    buf = bytearray(nbytes if nbytes is not None else max(argsz, HDR))
    buf[0:4] = argsz.to_bytes(4, "little")
    buf[4:8] = (0xFFFFFFFF).to_bytes(4, "little")            # the kernel clears flags
    return buf


def reset_buf(fds: list[int], count: int | None = None, flags: int = 0, argsz: int | None = None) -> bytearray:
    n = len(fds) if count is None else count
    buf = bytearray(HDR + 4 * len(fds))
    buf[0:4] = (argsz if argsz is not None else len(buf)).to_bytes(4, "little")
    buf[4:8] = flags.to_bytes(4, "little")
    buf[8:12] = n.to_bytes(4, "little")
    for i, fd in enumerate(fds):
        buf[HDR + 4 * i:HDR + 4 * i + 4] = fd.to_bytes(4, "little", signed=True)
    return buf


@pytest.fixture
def opened(powernv):
    p = powernv.spawn()
    c, g = setup_v1(p)
    d = open_device(p, g, BDF)
    return p, c, g, d


def test_the_info_of_a_device_alone_below_a_root_port_names_just_that_device(opened):
    p, _c, _g, d = opened
    # QEMU's first call: a bare header.  ENOSPC, and the count written back.
    buf = info_buf(HDR)
    with pytest.raises(OSError) as e:
        p.ioctl(d, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf)
    assert errname(e) == "ENOSPC"
    argsz, flags, count = (int.from_bytes(buf[i:i + 4], "little") for i in (0, 4, 8))
    assert (argsz, flags, count) == (HDR, 0, 1)
    # With room for it: group 0, segment 0, bus 1, devfn 0.
    buf = info_buf(HDR + ENTRY)
    assert p.ioctl(d, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf) == 0
    assert int.from_bytes(buf[8:12], "little") == 1 and int.from_bytes(buf[4:8], "little") == 0
    dep = uapi.vfio_pci_dependent_device.from_buffer_copy(bytes(buf[HDR:HDR + ENTRY]))
    assert (dep.group_id, dep.segment, dep.bus, dep.devfn) == (0, 0, 1, 0)
    # The second machine's device: its own group, segment 1.
    g1 = p.open("/dev/vfio/1", os.O_RDWR)
    c1 = p.open("/dev/vfio/vfio", os.O_RDWR)
    p.ioctl(g1, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c1))
    p.ioctl(c1, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_v2_IOMMU)
    d1 = open_device(p, g1, "0001:01:00.0")
    buf = info_buf(HDR + 4 * ENTRY)
    assert p.ioctl(d1, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf) == 0
    dep = uapi.vfio_pci_dependent_device.from_buffer_copy(bytes(buf[HDR:HDR + ENTRY]))
    assert (dep.group_id, dep.segment, dep.bus, dep.devfn) == (1, 1, 1, 0)


def test_info_argument_checks_come_in_the_kernels_order(opened):
    p, _c, _g, d = opened
    with pytest.raises(OSError) as e:
        p.ioctl(d, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, info_buf(HDR - 1))
    assert errname(e) == "EINVAL"                       # argsz < minsz
    with pytest.raises(OSError) as e:
        p.ioctl(d, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, 0x10)
    assert errname(e) == "EFAULT"                       # the header cannot be read


def test_a_hot_reset_with_the_devices_group_resets_it(opened):
    p, _c, g, d = opened
    reg_write(p, d, 0x04, 0x12345678)
    cmd_before = int.from_bytes(p.pread(d, 2, (uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40) + 4), "little")
    assert p.ioctl(d, uapi.VFIO_DEVICE_PCI_HOT_RESET, reset_buf([g])) == 0
    # The same effect as VFIO_DEVICE_RESET on this device: the user's COMMAND is kept
    # (config space saved and restored around the bus reset) and the device still answers.
    cmd_after = int.from_bytes(p.pread(d, 2, (uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40) + 4), "little")
    assert cmd_after == cmd_before
    assert reg_read(p, d, 0x00) == 0x010000ED


def test_hot_reset_refusals(opened, powernv):
    p, c, g, d = opened
    cases = [
        (reset_buf([g], argsz=HDR - 1), "EINVAL"),         # argsz
        (reset_buf([g], flags=1), "EINVAL"),               # flags
        (reset_buf([], count=0), "EINVAL"),                # no group fds: only for cdev-opened devices
        (reset_buf([g, g]), "EINVAL"),                     # more fds than devices the reset affects
        (reset_buf([999]), "EBADF"),                       # not an open fd
        (reset_buf([c]), "EINVAL"),                        # a container, not a group
    ]
    for buf, want in cases:
        with pytest.raises(OSError) as e:
            p.ioctl(d, uapi.VFIO_DEVICE_PCI_HOT_RESET, buf)
        assert errname(e) == want, bytes(buf[:12]).hex()
    # The other device's group does not cover this device.
    g1 = p.open("/dev/vfio/1", os.O_RDWR)
    with pytest.raises(OSError) as e:
        p.ioctl(d, uapi.VFIO_DEVICE_PCI_HOT_RESET, reset_buf([g1]))
    assert errname(e) == "EINVAL"
    # The group fds cannot be read.
    hdr = reset_buf([g])
    with pytest.raises(OSError) as e:
        p.ioctl(d, uapi.VFIO_DEVICE_PCI_HOT_RESET, bytes(hdr[:HDR]))
    assert errname(e) == "EFAULT"


def test_a_device_with_neither_slot_nor_bus_reset_answers_enodev(tmp_path: Path):
    """Not alone below a bridge (behind_bridge = false): DEVICE_RESET is EINVAL (no
    reset method), and both hot reset ioctls are ENODEV."""
    text = (Path(vfiosim.__file__).parent / "presets" / "powernv.toml").read_text()
    text = text.replace("behind_bridge = true", "behind_bridge = false")
    spec = tmp_path / "no-bus-reset.toml"
    spec.write_text(text)
    m = vfiosim.Machine.from_file(spec)
    p = m.spawn()
    _c, g = setup_v1(p)
    d = open_device(p, g, BDF)
    with pytest.raises(OSError) as e:
        p.ioctl(d, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, info_buf(HDR + ENTRY))
    assert errname(e) == "ENODEV"
    with pytest.raises(OSError) as e:
        p.ioctl(d, uapi.VFIO_DEVICE_PCI_HOT_RESET, reset_buf([g]))
    assert errname(e) == "ENODEV"
    with pytest.raises(OSError) as e:
        p.ioctl(d, uapi.VFIO_DEVICE_RESET)
    assert errname(e) == "EINVAL"
