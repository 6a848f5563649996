"""The VFIO device cdev and devices on iommufd (drivers/vfio/device_cdev.c,
vfio_main.c, group.c, iommufd.c; drivers/iommu/iommufd/device.c,
hw_pagetable.c), Linux 6.12, on an x86 machine with IOMMUFD and
VFIO_DEVICE_CDEV configured."""

from __future__ import annotations

import ctypes
import errno
import os
import struct

import pytest

import vfiosim
from iommufdutil import (KiB, MiB, attach, bind, cdev_setup, destroy, detach, hwpt_alloc, ioas_alloc, ioas_map,
                         ioas_unmap, iova_ranges, machine)
from vfioutil import CONFIG, edu_dma, enable_bus_master, open_device
from vfiosim.uapi import iommufd as iu
from vfiosim.uapi import vfio as uapi

EDU_BUF = 0x40000


@pytest.fixture
def m():
    return machine()


@pytest.fixture
def p(m):
    return m.spawn(uid=1000, gid=1000, rlimit_memlock=(64 * MiB, 64 * MiB))


def err(fn, *args):
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


def device_info(p, dfd):
    info = uapi.vfio_device_info(argsz=ctypes.sizeof(uapi.vfio_device_info))
    p.ioctl(dfd, uapi.VFIO_DEVICE_GET_INFO, info)
    return info


# -- what a program probing the kernel finds -------------------------------------------------------------------


def test_debian_kernel_has_no_iommu_node_and_no_cdev():
    """# CONFIG_IOMMUFD is not set: no /dev/iommu, no /dev/vfio/devices, and
    VFIO_DEVICE_BIND_IOMMUFD on a device fd is ENOTTY."""
    m = vfiosim.Machine.preset("x86")
    p = m.spawn()
    assert err(p.open, "/dev/iommu") == errno.ENOENT
    assert err(p.open, "/dev/vfio/devices/vfio0") == errno.ENOENT
    assert err(p.open, "/dev/vfio/devices", os.O_RDONLY) == errno.ENOENT
    c = p.open("/dev/vfio/vfio")
    g = p.open("/dev/vfio/4")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    dev = open_device(p, g, "0000:01:00.0")
    assert err(p.ioctl, dev, uapi.VFIO_DEVICE_BIND_IOMMUFD, uapi.vfio_device_bind_iommufd(argsz=16)) == errno.ENOTTY


def test_cdev_nodes_follow_the_device_index_and_owner(m):
    nodes = m.kernel.dev_nodes
    assert {"/dev/iommu", "/dev/vfio/devices/vfio0", "/dev/vfio/devices/vfio1", "/dev/vfio/1", "/dev/vfio/2",
            "/dev/vfio/vfio"} <= set(nodes)
    assert nodes["/dev/vfio/devices/vfio0"].uid == 1000 and nodes["/dev/vfio/devices/vfio0"].mode == 0o600
    assert nodes["/dev/iommu"].mode == 0o660
    assert [d.name for d in m.kernel.vfio.devices] == ["0000:01:00.0", "0000:02:00.0"]
    other = m.spawn(uid=1001)
    assert err(other.open, "/dev/vfio/devices/vfio0") == errno.EACCES
    assert err(other.open, "/dev/iommu") == errno.EACCES


# -- a cdev fd before and after VFIO_DEVICE_BIND_IOMMUFD -------------------------------------------------------


def test_an_unbound_cdev_fd_refuses_everything_but_bind(p):
    dfd = p.open("/dev/vfio/devices/vfio0")
    assert err(device_info, p, dfd) == errno.EINVAL
    assert err(p.pread, dfd, 4, CONFIG) == errno.EINVAL
    assert err(p.pwrite, dfd, b"\0\0", CONFIG + 4) == errno.EINVAL
    assert err(p.ioctl, dfd, uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, uapi.vfio_device_attach_iommufd_pt(argsz=12)) \
        == errno.EINVAL
    fd = p.open("/dev/iommu")
    devid = bind(p, dfd, fd)
    assert devid == 1
    assert device_info(p, dfd).flags & uapi.VFIO_DEVICE_FLAGS_PCI


def test_bind_argument_checks(p):
    dfd = p.open("/dev/vfio/devices/vfio0")
    fd = p.open("/dev/iommu")
    bad = [uapi.vfio_device_bind_iommufd(argsz=15, iommufd=fd),
           uapi.vfio_device_bind_iommufd(argsz=16, flags=1, iommufd=fd),
           uapi.vfio_device_bind_iommufd(argsz=16, iommufd=-1)]
    for cmd in bad:
        assert err(p.ioctl, dfd, uapi.VFIO_DEVICE_BIND_IOMMUFD, cmd) == errno.EINVAL
    assert err(p.ioctl, dfd, uapi.VFIO_DEVICE_BIND_IOMMUFD, uapi.vfio_device_bind_iommufd(argsz=16, iommufd=77)) \
        == errno.EBADF
    null = p.open("/dev/vfio/devices/vfio1")
    assert err(p.ioctl, dfd, uapi.VFIO_DEVICE_BIND_IOMMUFD, uapi.vfio_device_bind_iommufd(argsz=16, iommufd=null)) \
        == errno.EBADFD
    # The devid is written only on success; a failed bind left nothing behind.
    assert bind(p, dfd, fd) == 1
    assert err(bind, p, dfd, fd) == errno.EINVAL                # this fd is bound already
    second = p.open("/dev/vfio/devices/vfio0")                  # any number of opens...
    assert err(bind, p, second, fd) == errno.EINVAL              # ...but one binding


def test_group_and_cdev_exclude_each_other(p):
    """vfio_device_block_group() / vfio_group_fops_open(): EBUSY both ways,
    until the other side is closed."""
    g = p.open("/dev/vfio/1")
    dfd = p.open("/dev/vfio/devices/vfio0")
    fd = p.open("/dev/iommu")
    assert err(bind, p, dfd, fd) == errno.EBUSY
    p.close(g)
    bind(p, dfd, fd)
    assert err(p.open, "/dev/vfio/1") == errno.EBUSY
    assert p.open("/dev/vfio/2") >= 0                            # another group is not concerned
    p.close(dfd)
    assert p.open("/dev/vfio/1") >= 0


def test_bind_claims_dma_ownership_of_the_group(m, p):
    """iommufd_device_bind() -> iommu_device_claim_dma_owner(): devices of one
    group may be bound to one iommufd, not to two (EPERM); a device already
    bound cannot be bound again elsewhere (EINVAL, vfio_df_open)."""
    shared = vfiosim.Machine.from_toml("""
[machine]
name = "shared-group"
platform = "x86"
[kernel]
config = ["IOMMUFD", "VFIO_DEVICE_CDEV"]
[[device]]
bdf = "0000:01:00.0"
model = "edu"
iommu_group = 1
[[device]]
bdf = "0000:02:00.0"
model = "edu"
iommu_group = 1
""")
    a, b = shared.spawn(), shared.spawn()
    afd, bfd = a.open("/dev/iommu"), b.open("/dev/iommu")
    a0, a1 = a.open("/dev/vfio/devices/vfio0"), a.open("/dev/vfio/devices/vfio1")
    bind(a, a0, afd)
    b1 = b.open("/dev/vfio/devices/vfio1")
    assert err(bind, b, b1, bfd) == errno.EPERM
    assert bind(a, a1, afd) == 2                              # the same owner may
    assert shared.kernel.iommu_groups[1].owner_cnt == 2
    b0 = b.open("/dev/vfio/devices/vfio0")
    assert err(bind, b, b0, bfd) == errno.EINVAL
    a.close(a0)
    a.close(a1)
    assert not shared.kernel.iommu_groups[1].dma_owner_claimed()
    assert bind(b, b1, bfd) == 1


# -- attaching: automatic and manual HWPTs, replacement, DMA ---------------------------------------------------


def dma_roundtrip(m, p, dfd, iova, buf):
    """edu copies 8 bytes from RAM at ``iova`` into its buffer and back to iova + 8."""
    enable_bus_master(p, dfd)
    p.write_memory(buf, b"iommufd!")
    edu_dma(p, dfd, iova, EDU_BUF, 8, to_ram=False)
    edu_dma(p, dfd, EDU_BUF, iova + 8, 8, to_ram=True)
    return p.read_memory(buf + 8, 8)


def test_attach_to_an_ioas_makes_an_automatic_hwpt_and_dma_goes_through_it(m, p):
    fd, ioas, dfd, devid = cdev_setup(p)
    buf = p.mmap(64 * KiB)
    iova = ioas_map(p, fd, ioas, buf, 64 * KiB, 0x100000)
    assert m.pinned_pages() == 0                                  # no domain yet: nothing pinned
    hwpt = attach(p, dfd, ioas)
    assert hwpt not in (ioas, devid) and m.pinned_pages() == 16
    assert dma_roundtrip(m, p, dfd, iova, buf) == b"iommufd!"
    # Unmapping takes it out of the domain: the device's next DMA faults.
    ioas_unmap(p, fd, ioas, iova, 64 * KiB)
    assert m.pinned_pages() == 0
    faults = m.iommu_units[0].faults
    edu_dma(p, dfd, iova, EDU_BUF, 8, to_ram=False)
    assert m.iommu_units[0].faults == faults + 1
    assert any("DMAR: [DMA Read NO_PASID]" in line for line in m.dmesg())


def test_detach_blocks_dma_and_reattach_restores_it(m, p):
    fd, ioas, dfd, devid = cdev_setup(p)
    buf = p.mmap(4 * KiB)
    iova = ioas_map(p, fd, ioas, buf, 4 * KiB)
    hwpt = attach(p, dfd, ioas)
    detach(p, dfd)
    detach(p, dfd)                                                # detaching twice is harmless
    assert m.pinned_pages() == 0                                  # the automatic HWPT went with it
    assert err(destroy, p, fd, hwpt) == errno.ENOENT
    faults = m.iommu_units[0].faults
    enable_bus_master(p, dfd)
    edu_dma(p, dfd, iova, EDU_BUF, 8, to_ram=False)
    assert m.iommu_units[0].faults == faults + 1
    assert m.kernel.iommu_groups[1].domain.type == "blocked"
    attach(p, dfd, ioas)
    assert dma_roundtrip(m, p, dfd, iova, buf) == b"iommufd!"


def test_devices_on_one_ioas_share_its_automatic_hwpt(m, p):
    fd, ioas, d0, id0 = cdev_setup(p)
    d1 = p.open("/dev/vfio/devices/vfio1")
    id1 = bind(p, d1, fd)
    buf = p.mmap(16 * KiB)
    ioas_map(p, fd, ioas, buf, 16 * KiB)
    h0, h1 = attach(p, d0, ioas), attach(p, d1, ioas)
    assert h0 == h1 and id0 != id1
    assert m.pinned_pages() == 4                                   # one domain, pinned once
    assert len(m.iommu_units[0].domains) == 1


def test_manual_hwpt_replace_and_destroy(m, p):
    """IOMMU_HWPT_ALLOC, then ATTACH to it (replacing the automatic one, which
    goes); a manual HWPT stays until IOMMU_DESTROY, EBUSY while attached."""
    fd, ioas, dfd, devid = cdev_setup(p)
    buf = p.mmap(16 * KiB)
    iova = ioas_map(p, fd, ioas, buf, 16 * KiB)
    auto = attach(p, dfd, ioas)
    manual = hwpt_alloc(p, fd, devid, ioas)
    assert len(m.iommu_units[0].domains) == 2 and m.pinned_pages() == 4     # two domains, one set of pins
    assert attach(p, dfd, manual) == manual
    assert err(destroy, p, fd, auto) == errno.ENOENT                           # gone with its last device
    assert err(destroy, p, fd, manual) == errno.EBUSY
    assert attach(p, dfd, ioas) != manual                   # an IOAS never picks a manual HWPT
    destroy(p, fd, manual)
    assert dma_roundtrip(m, p, dfd, iova, buf) == b"iommufd!"
    assert len(m.iommu_units[0].domains) == 1


def test_attach_to_another_ioas_moves_the_reserved_regions(m, p):
    fd, a, dfd, devid = cdev_setup(p)
    b = ioas_alloc(p, fd)
    attach(p, dfd, a)
    assert len(iova_ranges(p, fd, a)[0]) == 2
    attach(p, dfd, b)                                        # replacement across IOASes
    assert iova_ranges(p, fd, a) == ([(0, (1 << 64) - 1)], 1)
    assert len(iova_ranges(p, fd, b)[0]) == 2


def test_attach_errors(p):
    fd, ioas, dfd, devid = cdev_setup(p)
    assert err(attach, p, dfd, 99) == errno.ENOENT
    assert err(attach, p, dfd, devid) == errno.EINVAL          # a device is no page table
    cmd = uapi.vfio_device_attach_iommufd_pt(argsz=11, pt_id=ioas)
    assert err(p.ioctl, dfd, uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, cmd) == errno.EINVAL
    cmd = uapi.vfio_device_attach_iommufd_pt(argsz=12, flags=1, pt_id=ioas)
    assert err(p.ioctl, dfd, uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, cmd) == errno.EINVAL
    assert err(p.ioctl, dfd, uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT, uapi.vfio_device_detach_iommufd_pt(argsz=7)) \
        == errno.EINVAL


def test_attach_pins_and_fails_cleanly_on_unmapped_memory(m, p):
    """The lazy pages of a domain-less IOAS are pinned at the first attach:
    memory unmapped since then fails the attach with EFAULT, nothing left."""
    fd, ioas, dfd, devid = cdev_setup(p)
    good, gone = p.mmap(16 * KiB), p.mmap(16 * KiB)
    ioas_map(p, fd, ioas, good, 16 * KiB, 0x100000)
    ioas_map(p, fd, ioas, gone, 16 * KiB, 0x200000)
    p.munmap(gone, 16 * KiB)
    assert err(attach, p, dfd, ioas) == errno.EFAULT
    assert m.pinned_pages() == 0 and not m.iommu_units[0].domains
    ioas_unmap(p, fd, ioas, 0x200000, 16 * KiB)
    attach(p, dfd, ioas)
    assert m.pinned_pages() == 4


def test_hwpt_alloc_checks(m, p):
    fd, ioas, dfd, devid = cdev_setup(p)
    size = ctypes.sizeof(iu.iommu_hwpt_alloc)
    cmd = iu.iommu_hwpt_alloc(size=size, dev_id=devid, pt_id=ioas, data_type=iu.IOMMU_HWPT_DATA_NONE, data_len=8)
    assert err(p.ioctl, fd, iu.IOMMU_HWPT_ALLOC, cmd) == errno.EINVAL
    cmd = iu.iommu_hwpt_alloc(size=size, dev_id=devid, pt_id=ioas, data_type=iu.IOMMU_HWPT_DATA_VTD_S1)
    assert err(p.ioctl, fd, iu.IOMMU_HWPT_ALLOC, cmd) == errno.EINVAL
    assert err(hwpt_alloc, p, fd, ioas, ioas) == errno.ENOENT           # dev_id is no device
    assert err(hwpt_alloc, p, fd, devid, 99) == errno.EINVAL            # pt_id names nothing: EINVAL
    assert err(hwpt_alloc, p, fd, devid, devid) == errno.EINVAL
    # QEMU's intel-iommu has no second-stage dirty bits and no nesting.
    assert err(hwpt_alloc, p, fd, devid, ioas, iu.IOMMU_HWPT_ALLOC_DIRTY_TRACKING) == errno.EOPNOTSUPP
    assert err(hwpt_alloc, p, fd, devid, ioas, iu.IOMMU_HWPT_ALLOC_NEST_PARENT) == errno.EOPNOTSUPP
    assert err(hwpt_alloc, p, fd, devid, ioas, iu.IOMMU_HWPT_FAULT_ID_VALID) == errno.EOPNOTSUPP
    assert err(hwpt_alloc, p, fd, devid, ioas, 1 << 9) == errno.EOPNOTSUPP
    cmd = iu.iommu_hwpt_alloc(size=size, dev_id=devid, pt_id=ioas, data_type=iu.IOMMU_HWPT_DATA_VTD_S1, data_len=24)
    assert err(p.ioctl, fd, iu.IOMMU_HWPT_ALLOC, cmd) == errno.EOPNOTSUPP   # no driver data for paging
    hwpt = hwpt_alloc(p, fd, devid, ioas)
    cmd = iu.iommu_hwpt_alloc(size=size, dev_id=devid, pt_id=hwpt, data_type=iu.IOMMU_HWPT_DATA_VTD_S1, data_len=24)
    assert err(p.ioctl, fd, iu.IOMMU_HWPT_ALLOC, cmd) == errno.EINVAL        # nested: not a nesting parent
    assert err(destroy, p, fd, ioas) == errno.EBUSY                           # the HWPT holds its IOAS
    destroy(p, fd, hwpt)
    destroy(p, fd, ioas)
    assert not m.iommu_units[0].domains


def test_get_hw_info_reports_the_vtd_registers(m, p):
    fd, ioas, dfd, devid = cdev_setup(p)
    unit = m.iommu_units[0]
    data = p.mmap(4096)
    p.write_memory(data, b"\xaa" * 64)
    cmd = iu.iommu_hw_info(size=ctypes.sizeof(iu.iommu_hw_info), dev_id=devid, data_len=64, data_uptr=data)
    p.ioctl(fd, iu.IOMMU_GET_HW_INFO, cmd)
    vtd = iu.iommu_hw_info_vtd.from_buffer_copy(p.read_memory(data, 24))
    assert cmd.out_data_type == iu.IOMMU_HW_INFO_TYPE_INTEL_VTD and cmd.data_len == 24
    assert vtd.flags == iu.IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17
    assert (vtd.cap_reg, vtd.ecap_reg) == (unit.cap_reg, unit.ecap_reg)
    assert ((vtd.cap_reg >> 16) & 0x3F) + 1 == 39 and vtd.cap_reg & (1 << 7)   # MGAW, caching mode
    assert p.read_memory(data + 24, 40) == bytes(40)                           # the rest zeroed
    assert cmd.out_capabilities == 0 and cmd.out_max_pasid_log2 == 0
    cmd = iu.iommu_hw_info(size=ctypes.sizeof(iu.iommu_hw_info), dev_id=devid, data_len=8, data_uptr=data)
    p.write_memory(data, b"\xbb" * 16)
    p.ioctl(fd, iu.IOMMU_GET_HW_INFO, cmd)
    assert cmd.data_len == 24 and p.read_memory(data + 8, 8) == b"\xbb" * 8   # only 8 bytes copied
    cmd = iu.iommu_hw_info(size=ctypes.sizeof(iu.iommu_hw_info), dev_id=devid, flags=1)
    assert err(p.ioctl, fd, iu.IOMMU_GET_HW_INFO, cmd) == errno.EOPNOTSUPP
    cmd = iu.iommu_hw_info(size=ctypes.sizeof(iu.iommu_hw_info), dev_id=ioas)
    assert err(p.ioctl, fd, iu.IOMMU_GET_HW_INFO, cmd) == errno.ENOENT


def test_hwpt_invalidate_finds_no_nested_hwpt(p):
    fd, ioas, dfd, devid = cdev_setup(p)
    hwpt = attach(p, dfd, ioas)
    cmd = iu.iommu_hwpt_invalidate(size=ctypes.sizeof(iu.iommu_hwpt_invalidate), hwpt_id=hwpt, entry_num=3)
    assert err(p.ioctl, fd, iu.IOMMU_HWPT_INVALIDATE, cmd) == errno.EINVAL     # entries without a pointer
    assert cmd.entry_num == 0                                    # written back whatever happened
    buf = bytearray(ctypes.sizeof(iu.iommu_hwpt_invalidate))
    c = iu.iommu_hwpt_invalidate.from_buffer(buf)
    c.size, c.hwpt_id, c.entry_num, c.data_uptr, c.entry_len = len(buf), hwpt, 3, 0x1000, 32
    assert err(p.ioctl, fd, iu.IOMMU_HWPT_INVALIDATE, buf) == errno.ENOENT      # a paging HWPT is not nested
    assert iu.iommu_hwpt_invalidate.from_buffer_copy(bytes(buf)).entry_num == 0


# -- MSI isolation, hot reset --------------------------------------------------------------------------------


def test_without_interrupt_remapping_bind_needs_allow_unsafe_interrupts():
    m = machine(iommu="interrupt_remapping = false")
    p = m.spawn(uid=1000, gid=1000)
    dfd = p.open("/dev/vfio/devices/vfio0")
    fd = p.open("/dev/iommu")
    assert err(bind, p, dfd, fd) == errno.EPERM
    m.kernel.iommufd_allow_unsafe_interrupts = True
    assert bind(p, dfd, fd) == 1
    assert any("MSI interrupts are not secure" in line for line in m.dmesg())


def test_hot_reset_of_a_cdev_device_uses_devids(m, p):
    """vfio_pci_ioctl_get_pci_hot_reset_info(): a cdev-opened device reports
    devids and VFIO_PCI_HOT_RESET_FLAG_DEV_ID(_OWNED); the reset itself takes
    an empty fd array (a group fd array is EINVAL)."""
    fd, ioas, dfd, devid = cdev_setup(p)
    hdr = ctypes.sizeof(uapi.vfio_pci_hot_reset_info)
    entry = ctypes.sizeof(uapi.vfio_pci_dependent_device)
    buf = bytearray(hdr + entry)
    struct.pack_into("<I", buf, 0, len(buf))
    p.ioctl(dfd, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf)
    info = uapi.vfio_pci_hot_reset_info.from_buffer_copy(bytes(buf[:hdr]))
    dep = uapi.vfio_pci_dependent_device.from_buffer_copy(bytes(buf[hdr:]))
    assert info.flags == uapi.VFIO_PCI_HOT_RESET_FLAG_DEV_ID | uapi.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED
    assert (info.count, dep.devid, dep.bus, dep.devfn) == (1, devid, 1, 0)
    reset = uapi.vfio_pci_hot_reset(argsz=ctypes.sizeof(uapi.vfio_pci_hot_reset))
    p.ioctl(dfd, uapi.VFIO_DEVICE_PCI_HOT_RESET, reset)
    withfd = bytearray(ctypes.sizeof(uapi.vfio_pci_hot_reset) + 4)
    struct.pack_into("<IIIi", withfd, 0, len(withfd), 0, 1, fd)
    assert err(p.ioctl, dfd, uapi.VFIO_DEVICE_PCI_HOT_RESET, withfd) == errno.EINVAL


# -- a group given an iommufd (VFIO_GROUP_SET_CONTAINER with /dev/iommu) --------------------------------------


def test_a_group_can_use_an_iommufd_instead_of_a_container(m, p):
    fd = p.open("/dev/iommu")
    g = p.open("/dev/vfio/1")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(fd))
    status = uapi.vfio_group_status(argsz=8)
    p.ioctl(g, uapi.VFIO_GROUP_GET_STATUS, status)
    assert status.flags == uapi.VFIO_GROUP_FLAGS_VIABLE | uapi.VFIO_GROUP_FLAGS_CONTAINER_SET
    assert err(p.ioctl, g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(fd)) == errno.EINVAL
    # The compat IOAS is an ordinary, visible object.
    vfio_ioas = iu.iommu_vfio_ioas(size=ctypes.sizeof(iu.iommu_vfio_ioas), op=iu.IOMMU_VFIO_IOAS_GET)
    p.ioctl(fd, iu.IOMMU_VFIO_IOAS, vfio_ioas)
    ioas = vfio_ioas.ioas_id
    assert ioas == 1
    buf = p.mmap(16 * KiB)
    iova = ioas_map(p, fd, ioas, buf, 16 * KiB)
    dfd = open_device(p, g, "0000:01:00.0")          # bound, and attached to the compat IOAS
    assert m.pinned_pages() == 4
    assert err(bind, p, dfd, fd) == errno.EINVAL     # group fds are never bound by hand
    assert dma_roundtrip(m, p, dfd, iova, buf) == b"iommufd!"
    # Unlike a container, the iommufd lets go with a device open; the device stays bound.
    p.ioctl(g, uapi.VFIO_GROUP_UNSET_CONTAINER)
    assert dma_roundtrip(m, p, dfd, iova, buf) == b"iommufd!"
    p.close(g)
    p.close(dfd)
    assert m.pinned_pages() == 0
    p.close(fd)
    assert not m.oopses


def test_vfio_ioas_set_clear_and_errors(p):
    fd = p.open("/dev/iommu")
    cmd = iu.iommu_vfio_ioas(size=ctypes.sizeof(iu.iommu_vfio_ioas), op=iu.IOMMU_VFIO_IOAS_GET)
    assert err(p.ioctl, fd, iu.IOMMU_VFIO_IOAS, cmd) == errno.ENODEV
    ioas = ioas_alloc(p, fd)
    p.ioctl(fd, iu.IOMMU_VFIO_IOAS, iu.iommu_vfio_ioas(size=12, ioas_id=ioas, op=iu.IOMMU_VFIO_IOAS_SET))
    p.ioctl(fd, iu.IOMMU_VFIO_IOAS, cmd)
    assert cmd.ioas_id == ioas
    destroy(p, fd, ioas)                              # destroying it clears the compat IOAS
    assert err(p.ioctl, fd, iu.IOMMU_VFIO_IOAS, cmd) == errno.ENODEV
    assert err(p.ioctl, fd, iu.IOMMU_VFIO_IOAS, iu.iommu_vfio_ioas(size=12, op=3)) == errno.EOPNOTSUPP
    assert err(p.ioctl, fd, iu.IOMMU_VFIO_IOAS, iu.iommu_vfio_ioas(size=12, op=iu.IOMMU_VFIO_IOAS_SET,
                                                                   ioas_id=42)) == errno.ENOENT


def test_fault_queue_object(p):
    """IOMMU_FAULT_QUEUE_ALLOC: an object and an fd of whole records; no
    HWPT here can take it (only nested ones can in 6.12)."""
    fd = p.open("/dev/iommu")
    cmd = iu.iommu_fault_alloc(size=ctypes.sizeof(iu.iommu_fault_alloc))
    p.ioctl(fd, iu.IOMMU_FAULT_QUEUE_ALLOC, cmd)
    ffd = cmd.out_fault_fd
    assert p.read(ffd, ctypes.sizeof(iu.iommu_hwpt_pgfault)) == b""
    assert err(p.read, ffd, 3) == errno.ESPIPE
    assert err(p.write, ffd, struct.pack("<II", 7, 0)) == errno.EINVAL       # no such cookie
    assert err(destroy, p, fd, cmd.out_fault_id) == errno.EBUSY              # its fd holds it
    p.close(ffd)
    destroy(p, fd, cmd.out_fault_id)
    assert err(p.ioctl, fd, iu.IOMMU_FAULT_QUEUE_ALLOC, iu.iommu_fault_alloc(size=16, flags=1)) == errno.EOPNOTSUPP


def test_process_exit_releases_everything(m):
    p = m.spawn(uid=1000, gid=1000, rlimit_memlock=(64 * MiB, 64 * MiB))
    fd, ioas, dfd, devid = cdev_setup(p)
    buf = p.mmap(64 * KiB)
    ioas_map(p, fd, ioas, buf, 64 * KiB)
    attach(p, dfd, ioas)
    assert m.pinned_pages() == 16
    p.exit()
    assert m.pinned_pages() == 0 and not m.oopses
    assert m.kernel.users.locked_vm(1000) == 0
    assert not m.kernel.iommu_groups[1].dma_owner_claimed()
