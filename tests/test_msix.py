"""MSI-X: the device-model API, and vfio-pci's MSI-X as in Linux 6.12.

Upstream functions named in test names and docstrings are in
drivers/vfio/pci/vfio_pci_core.c (vfio_pci_ioctl_get_irq_info,
vfio_pci_ioctl_set_irqs, vfio_pci_ioctl_get_region_info, vfio_pci_core_enable,
vfio_pci_core_disable, vfio_pci_ioctl_reset, vfio_pci_core_mmap),
drivers/vfio/vfio_main.c (vfio_set_irqs_validate_and_prepare),
drivers/vfio/pci/vfio_pci_intrs.c (vfio_pci_set_irqs_ioctl,
vfio_pci_set_msi_trigger, vfio_msi_enable, vfio_msi_alloc_irq,
vfio_msi_set_vector_signal, vfio_msi_set_block, vfio_msi_disable),
drivers/vfio/pci/vfio_pci_rdwr.c (vfio_pci_bar_rw, vfio_pci_core_do_io_rw),
drivers/vfio/pci/vfio_pci_config.c (cap_perms[], vfio_direct_config_read) and
drivers/pci/msi/ (pci_alloc_irq_vectors, msix_capability_init,
pci_msix_can_alloc_dyn, pci_restore_msi_state).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

import pytest

import vfiosim
from msix_device import BADDMA, DOORBELL, ID, IDENT, LAST, MSI, PBA, TABLE, VECTORS, MsixTest, machine_toml
from vfiosim import devices, uapi
from vfioutil import CONFIG, enable_bus_master, setup_v1

MSIX = uapi.VFIO_PCI_MSIX_IRQ_INDEX
EVENTFD = uapi.VFIO_IRQ_SET_DATA_EVENTFD
NONE = uapi.VFIO_IRQ_SET_DATA_NONE
BOOL = uapi.VFIO_IRQ_SET_DATA_BOOL
TRIGGER = uapi.VFIO_IRQ_SET_ACTION_TRIGGER
MSI_CAP, MSIX_CAP = 0x40, 0x50           # MSI (64-bit, 14 bytes), then MSI-X, DWORD aligned
BAR0 = 0
BAR2 = 2 << 40
PLATFORMS = ["powernv", "pseries", "x86"]
MSG_ADDRESS, MSG_DATA = 0xFEE00000, 0x4000    # what vfio-pci's host writes into the table


def err(excinfo) -> str:
    return errno.errorcode[excinfo.value.errno]


class Rig:
    """A machine with one msix-test device, a process that opened it, and helpers."""

    def __init__(self, platform: str, model: str = "msix-test", page_size: int = 4096,
                 behind_bridge: bool = False) -> None:
        self.platform = platform
        self.m = vfiosim.Machine.from_toml(machine_toml(platform, model, behind_bridge), page_size=page_size)
        self.bdf = "0000:03:00.0" if platform == "x86" else "0000:01:00.0"
        self.dev: MsixTest = self.m.device(self.bdf)  # type: ignore[assignment]
        self.p = self.m.spawn()
        if platform == "x86":
            self.c = self.p.open("/dev/vfio/vfio", os.O_RDWR)
            self.g = self.p.open("/dev/vfio/5", os.O_RDWR)
            self.p.ioctl(self.g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(self.c))
            self.p.ioctl(self.c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
        else:
            self.c, self.g = setup_v1(self.p, 0)
        self.d = self.open()

    def open(self) -> int:
        return self.p.ioctl(self.g, uapi.VFIO_GROUP_GET_DEVICE_FD, self.bdf.encode() + b"\0")

    def set_irqs(self, index: int, start: int, count: int, flags: int, payload: bytes = b"",
                 argsz: int | None = None) -> int:
        hdr = uapi.vfio_irq_set(argsz=20 + len(payload) if argsz is None else argsz, flags=flags,
                                index=index, start=start, count=count)
        return self.p.ioctl(self.d, uapi.VFIO_DEVICE_SET_IRQS, bytearray(bytes(hdr) + payload))

    def set_eventfds(self, start: int, fds: list[int], index: int = MSIX) -> int:
        payload = b"".join(struct.pack("<i", fd) for fd in fds)
        return self.set_irqs(index, start, len(fds), EVENTFD | TRIGGER, payload)

    def disable(self, index: int = MSIX) -> int:
        return self.set_irqs(index, 0, 0, NONE | TRIGGER)

    def loopback(self, start: int, count: int) -> int:
        return self.set_irqs(MSIX, start, count, NONE | TRIGGER)

    def irq_info(self, index: int, argsz: int = 16) -> uapi.vfio_irq_info:
        info = uapi.vfio_irq_info(argsz=argsz, index=index)
        self.p.ioctl(self.d, uapi.VFIO_DEVICE_GET_IRQ_INFO, info)
        return info

    def count(self, efd: int) -> int:
        """Read and reset an eventfd's counter (0 when nothing was signalled)."""
        try:
            return int.from_bytes(self.p.read(efd, 8), "little")
        except OSError as exc:
            assert exc.errno == errno.EAGAIN
            return 0

    def eventfds(self, n: int) -> list[int]:
        return [self.p.eventfd(0, os.O_NONBLOCK) for _ in range(n)]

    def cfg(self, off: int, n: int = 2) -> int:
        return int.from_bytes(self.p.pread(self.d, n, CONFIG + off), "little")

    def cfg_write(self, off: int, value: int, n: int = 2) -> None:
        self.p.pwrite(self.d, value.to_bytes(n, "little"), CONFIG + off)

    def ring(self, vector: int) -> None:
        """The device raises ``vector`` (a store to its doorbell register)."""
        self.p.pwrite(self.d, vector.to_bytes(4, "little"), BAR0 + DOORBELL)

    def mmio(self, offset: int, size: int, value: int | None = None) -> int:
        """A load or store through an mmap of the device fd."""
        return self.p._call("mmio", self.m.kernel.sys_mmio, self.d, offset, size, value)

    def pba(self) -> int:
        """The Pending Bit Array, read through the region (it is not excluded)."""
        return int.from_bytes(self.p.pread(self.d, 8, BAR0 + PBA), "little")


@pytest.fixture(params=PLATFORMS)
def rig(request) -> Rig:
    r = Rig(request.param)
    enable_bus_master(r.p, r.d)
    return r


# -- the device-model API ----------------------------------------------------------------------------------


def dev() -> devices.PciDevice:
    d = devices.PciDevice("0000:01:00.0", vendor=0x1B36, device=0x00F4, class_code=0xFF0000)
    d.add_bar(0, 0x4000)
    d.add_bar(2, 0x100)
    return d


@pytest.mark.parametrize("kwargs, message", [
    (dict(vectors=0), "from 1 to 2048"),
    (dict(vectors=2049), "from 1 to 2048"),
    (dict(vectors=True), "from 1 to 2048"),
    (dict(vectors=2.0), "from 1 to 2048"),
    (dict(table_bar=1), "BIR 1 is not a memory BAR.*BAR0, BAR2"),
    (dict(pba_bar=4), "PBA BIR 4 is not a memory BAR"),
    (dict(table_offset=0x2004), "multiple of 8"),
    (dict(pba_offset=0x3002), "multiple of 8"),
    (dict(table_offset=-8), "multiple of 8"),
    (dict(vectors=512, table_offset=0x2008), r"table at 0x2008\+0x2000 does not fit in BAR0"),
    (dict(pba_bar=2, pba_offset=0xF8, vectors=65), r"PBA at 0xf8\+0x10 does not fit in BAR2"),
    (dict(pba_offset=0x2000 + 16 * 4 - 8), "overlap in BAR0"),
    (dict(at=0x42), "DWORD aligned"),
    (dict(at=0x20), "at least 0x40"),
    (dict(at=0xF8), "does not fit"),
])
def test_add_msix_capability_validates_its_arguments(kwargs, message):
    args = dict(vectors=4, table_bar=0, table_offset=0x2000, pba_offset=0x3000) | kwargs
    d = dev()
    before = bytes(d.config.data)
    with pytest.raises(ValueError, match=message):
        d.add_msix_capability(**args)
    assert bytes(d.config.data) == before and d.msix is None      # nothing half-added


def test_add_msix_capability_refuses_overlapping_capabilities_and_a_second_msix():
    d = dev()
    msi = d.add_msi_capability(vectors=1, is_64bit=True)           # 14 bytes at 0x40
    with pytest.raises(ValueError, match="overlap the capability 0x05 at 0x40"):
        d.add_msix_capability(4, table_bar=0, table_offset=0, pba_offset=0x40, at=0x4C)
    cap = d.add_msix_capability(4, table_bar=0, table_offset=0, pba_offset=0x40)
    assert (msi, cap) == (0x40, 0x50)                               # after the MSI's 14 bytes, aligned
    assert d.config.data[0x41] == 0x50 and d.config.data[0x51] == 0  # linked at the end of the chain
    with pytest.raises(ValueError, match="already has an MSI-X capability"):
        d.add_msix_capability(4, table_bar=2, table_offset=0, pba_offset=0x40)
    with pytest.raises(ValueError, match="holds the MSI-X table"):
        d.add_bar(0, 0x100)                                          # would move the table out of its BAR


def test_msix_capability_registers_and_their_write_masks():
    d = devices.PciDevice("0000:01:00.0", vendor=0x1B36, device=0x00F4, class_code=0xFF0000)
    d.add_bar(0, 0x8000)
    d.add_bar(2, 0x100)
    cap = d.add_msix_capability(2048, table_bar=0, table_offset=0, pba_bar=2, pba_offset=0)   # both full
    d.finish()
    c = d.config
    assert c.read(cap, 1) == 0x11 and c.read(cap + 2, 2) == 0x07FF
    assert c.read(cap + 4, 4) == 0x0 | 0 and c.read(cap + 8, 4) == 0x0 | 2
    d.config_write(cap + 2, 2, 0xFFFF)                 # QSIZE is read-only; Function Mask and Enable are not
    assert c.read(cap + 2, 2) == 0xC7FF
    d.config_write(cap + 4, 4, 0xFFFFFFFF)
    d.config_write(cap + 8, 4, 0xFFFFFFFF)
    assert c.read(cap + 4, 4) == 0 and c.read(cap + 8, 4) == 2
    d.reset()
    assert c.read(cap + 2, 2) == 0x07FF                 # reset clears Enable and Function Mask


def test_msix_notify_rejects_what_the_model_cannot_mean():
    d = dev()
    with pytest.raises(ValueError, match="no MSI-X capability"):
        d.msix_notify(0)
    d.add_msix_capability(4, table_bar=0, table_offset=0x2000, pba_offset=0x3000)
    for bad in (4, -1, "0"):
        with pytest.raises(ValueError, match="out of range"):
            d.msix_notify(bad)  # type: ignore[arg-type]


def test_device_side_masking_pending_and_delivery():
    """The table, the PBA, the Function Mask and Enable as the PCI spec has them
    (and QEMU's msix.c): no vfio, a hook records the messages the device sends."""
    d = dev()
    cap = d.add_msix_capability(4, table_bar=0, table_offset=0x2000, pba_offset=0x3000)
    sent: list[tuple[int, int]] = []
    d.on_msix = lambda address, data: sent.append((address, data))
    d.config_write(0x04, 2, 0x6)                                    # memory decode, bus master
    # Power-on: every entry masked, nothing pending; MSI-X off drops the event.
    assert d.host_mmio_read(0, 0x2000 + 12, 4) == 1 and not d.msix_enabled()
    d.msix_notify(1)
    assert sent == [] and not d.msix_pending(1)
    d.config_write(cap + 2, 2, 0x8000)                              # Enable
    d.host_mmio_write(0, 0x2010, 8, 0x1_2345_6780)                  # vector 1 address, one QWORD store
    d.host_mmio_write(0, 0x2018, 4, 0xBEEF)                         # data
    d.msix_notify(1)                                                # masked: pending
    assert sent == [] and d.msix_pending(1) and d.host_mmio_read(0, 0x3000, 8) == 0b10
    d.host_mmio_write(0, 0x201C, 4, 0xFFFFFFFE)                     # unmask (reserved bits stay 0)
    assert sent == [(0x1_2345_6780, 0xBEEF)] and not d.msix_pending(1)
    assert d.host_mmio_read(0, 0x201C, 4) == 0
    d.config_write(cap + 2, 2, 0xC000)                              # Function Mask
    d.msix_notify(1)
    assert len(sent) == 1 and d.msix_pending(1)
    d.config_write(cap + 2, 2, 0x8000)
    assert len(sent) == 2 and not d.msix_pending(1)
    d.config_write(0x04, 2, 0x2)                                    # no bus master: the message is lost
    d.msix_notify(1)
    assert len(sent) == 2 and not d.msix_pending(1)
    # Table and PBA take aligned DWORD/QWORD accesses only; the PBA is read-only.
    assert d.host_mmio_read(0, 0x2010, 2) == 0xFFFF and d.host_mmio_read(0, 0x2012, 4) == 0xFFFFFFFF
    d.host_mmio_write(0, 0x2018, 2, 0x1111)
    d.host_mmio_write(0, 0x3000, 8, ~0)
    assert d.host_mmio_read(0, 0x2018, 4) == 0xBEEF and d.host_mmio_read(0, 0x3000, 8) == 0
    # The model's own registers are untouched by all this: table and PBA are the device's.
    d.reset()
    assert d.host_mmio_read(0, 0x2010, 4) == 0 and d.host_mmio_read(0, 0x201C, 4) == 1


# -- VFIO_DEVICE_GET_IRQ_INFO ------------------------------------------------------------------------------


def test_get_irq_info_msix_count__vfio_pci_get_irq_count(rig):
    """count = (Message Control & PCI_MSIX_FLAGS_QSIZE) + 1."""
    assert rig.irq_info(MSIX).count == VECTORS


@pytest.mark.parametrize("platform, flags", [
    ("powernv", uapi.VFIO_IRQ_INFO_EVENTFD | uapi.VFIO_IRQ_INFO_NORESIZE),
    ("pseries", uapi.VFIO_IRQ_INFO_EVENTFD | uapi.VFIO_IRQ_INFO_NORESIZE),
    ("x86", uapi.VFIO_IRQ_INFO_EVENTFD),
])
def test_get_irq_info_noresize_follows_pci_msix_can_alloc_dyn(platform, flags):
    """vfio_pci_ioctl_get_irq_info(): NORESIZE unless index is MSI-X and
    vdev->has_dyn_msix; x86 MSI parent domains support MSI_FLAG_PCI_MSIX_ALLOC_DYN,
    the POWER PCI/MSI domains do not.  MSI stays NORESIZE everywhere."""
    r = Rig(platform)
    assert r.irq_info(MSIX).flags == flags
    assert r.irq_info(uapi.VFIO_PCI_MSI_IRQ_INDEX).flags == uapi.VFIO_IRQ_INFO_EVENTFD | uapi.VFIO_IRQ_INFO_NORESIZE


def test_get_irq_info_device_without_msix__has_dyn_msix_false():
    """vfio_pci_core_enable(): no MSI-X capability, has_dyn_msix = false, so an
    x86 edu reports MSI-X as NORESIZE with no vectors."""
    m = vfiosim.Machine.preset("x86")
    p = m.spawn()
    gid, bdfs = next((g, b) for g, b in m.iommu_groups().items() if m.device(b[0]).model == "edu")
    c = p.open("/dev/vfio/vfio", os.O_RDWR)
    g = p.open(f"/dev/vfio/{gid}", os.O_RDWR)
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    d = p.ioctl(g, uapi.VFIO_GROUP_GET_DEVICE_FD, bdfs[0].encode() + b"\0")
    info = uapi.vfio_irq_info(argsz=16, index=MSIX)
    p.ioctl(d, uapi.VFIO_DEVICE_GET_IRQ_INFO, info)
    assert (info.flags, info.count) == (uapi.VFIO_IRQ_INFO_EVENTFD | uapi.VFIO_IRQ_INFO_NORESIZE, 0)
    # and SET_IRQS on it fails validation (start 0 >= 0 vectors), even a disable
    hdr = uapi.vfio_irq_set(argsz=20, flags=NONE | TRIGGER, index=MSIX, start=0, count=0)
    with pytest.raises(OSError) as e:
        p.ioctl(d, uapi.VFIO_DEVICE_SET_IRQS, hdr)
    assert err(e) == "EINVAL"


def test_get_irq_info_errors__vfio_pci_ioctl_get_irq_info():
    r = Rig("powernv")
    with pytest.raises(OSError) as e:
        r.irq_info(MSIX, argsz=15)                     # argsz < minsz
    assert err(e) == "EINVAL"
    with pytest.raises(OSError) as e:
        r.irq_info(uapi.VFIO_PCI_NUM_IRQS)             # index >= VFIO_PCI_NUM_IRQS
    assert err(e) == "EINVAL"
    with pytest.raises(OSError) as e:
        r.p.ioctl(r.d, uapi.VFIO_DEVICE_GET_IRQ_INFO, bytearray(8))   # copy_from_user of 16 bytes
    assert err(e) == "EFAULT"


# -- VFIO_DEVICE_SET_IRQS: validation ----------------------------------------------------------------------


@pytest.mark.parametrize("hdr, payload", [
    (dict(argsz=19, start=0, count=1, flags=EVENTFD | TRIGGER), b"\0" * 4),        # argsz < minsz
    (dict(start=0, count=7, flags=EVENTFD | TRIGGER), b"\0" * 28),                 # start + count > 6
    (dict(start=6, count=0, flags=NONE | TRIGGER), b""),                           # start >= num_irqs
    (dict(start=1, count=0xFFFFFFFE, flags=NONE | TRIGGER), b""),                  # count >= U32_MAX - start
    (dict(start=0, count=1, flags=EVENTFD | TRIGGER | (1 << 6)), b"\0" * 4),       # unknown flag bit
    (dict(start=0, count=1, flags=NONE | BOOL | TRIGGER), b"\1"),                  # two data types
    (dict(start=0, count=1, flags=TRIGGER), b""),                                  # no data type
    (dict(argsz=24, start=0, count=2, flags=EVENTFD | TRIGGER), b"\0" * 8),        # argsz short of the data
])
def test_set_irqs_msix_validation_is_einval__vfio_set_irqs_validate_and_prepare(rig, hdr, payload):
    argsz = hdr.pop("argsz", None)
    with pytest.raises(OSError) as e:
        rig.set_irqs(MSIX, payload=payload, argsz=argsz, **hdr)
    assert err(e) == "EINVAL"
    assert not rig.dev.msix_enabled()


def test_set_irqs_data_past_the_buffer_is_efault__memdup_user(rig):
    hdr = uapi.vfio_irq_set(argsz=28, flags=EVENTFD | TRIGGER, index=MSIX, start=0, count=2)
    with pytest.raises(OSError) as e:
        rig.p.ioctl(rig.d, uapi.VFIO_DEVICE_SET_IRQS, bytearray(bytes(hdr) + b"\0\0\0\0"))
    assert err(e) == "EFAULT"


@pytest.mark.parametrize("action", [uapi.VFIO_IRQ_SET_ACTION_MASK, uapi.VFIO_IRQ_SET_ACTION_UNMASK,
                                    uapi.VFIO_IRQ_SET_ACTION_MASK | TRIGGER])
def test_set_irqs_msix_mask_and_unmask_are_enotty__vfio_pci_set_irqs_ioctl(rig, action):
    """MSI/MSI-X: "XXX Need masking support exported"; two actions match no case."""
    rig.set_eventfds(0, rig.eventfds(1))
    with pytest.raises(OSError) as e:
        rig.set_irqs(MSIX, 0, 1, NONE | action)
    assert err(e) == "ENOTTY"


# -- VFIO_DEVICE_SET_IRQS: vfio_pci_set_msi_trigger() ------------------------------------------------------


def test_loopback_and_disable_need_msix_enabled__vfio_pci_set_msi_trigger(rig):
    for start, count, flags, payload in ((0, 1, NONE | TRIGGER, b""), (0, 2, BOOL | TRIGGER, b"\1\1"),
                                         (0, 0, NONE | TRIGGER, b"")):
        with pytest.raises(OSError) as e:
            rig.set_irqs(MSIX, start, count, flags, payload)
        assert err(e) == "EINVAL"


@pytest.mark.parametrize("index", [MSIX, uapi.VFIO_PCI_MSI_IRQ_INDEX])
def test_enabling_with_no_vectors_is_erange__pci_alloc_irq_vectors(rig, index):
    """vfio_msi_enable(vdev, start + count = 0): pci_alloc_irq_vectors(pdev, 1, 0)
    fails in __pci_enable_msix_range() (and __pci_enable_msi_range()) with
    maxvec < minvec."""
    with pytest.raises(OSError) as e:
        rig.set_irqs(index, 0, 0, EVENTFD | TRIGGER)
    assert err(e) == "ERANGE"
    assert not rig.dev.msix_enabled() and not rig.dev.msi_enabled()


def test_enabling_with_count_0_at_start_3_allocates_3_vectors__vfio_msi_enable(rig):
    """start + count vectors are allocated; vfio_msi_set_block() then sets none."""
    assert rig.set_irqs(MSIX, 3, 0, EVENTFD | TRIGGER) == 0
    assert rig.cfg(MSIX_CAP + 2) == 0x8000 | (VECTORS - 1)
    assert rig.loopback(0, VECTORS) == 0                        # enabled: loopback is allowed (no triggers)
    # msix_capability_init() set up vectors 0..2 (the host's messages), masked all six
    assert [rig.dev.msix.message(v) for v in range(VECTORS)] == \
        [(MSG_ADDRESS, MSG_DATA + v) for v in range(3)] + [(0, 0)] * 3
    assert [rig.dev.msix.ctrl(v) for v in range(VECTORS)] == [1] * VECTORS


def test_msi_and_msix_exclude_each_other__vfio_pci_set_msi_trigger(rig):
    """!(irq_is(vdev, index) || is_irq_none(vdev)) is EINVAL, for every direction."""
    msi_efd, = rig.eventfds(1)
    rig.set_eventfds(0, [msi_efd], index=uapi.VFIO_PCI_MSI_IRQ_INDEX)
    with pytest.raises(OSError) as e:
        rig.set_eventfds(0, rig.eventfds(1))
    assert err(e) == "EINVAL"
    with pytest.raises(OSError) as e:
        rig.disable(MSIX)                                       # MSI-X is not what is enabled
    assert err(e) == "EINVAL"
    assert not rig.dev.msix_enabled() and rig.dev.msi_enabled()
    rig.disable(uapi.VFIO_PCI_MSI_IRQ_INDEX)
    efds = rig.eventfds(2)
    rig.set_eventfds(0, efds)
    for index in (uapi.VFIO_PCI_MSI_IRQ_INDEX, uapi.VFIO_PCI_INTX_IRQ_INDEX):
        with pytest.raises(OSError) as e:
            rig.set_eventfds(0, [msi_efd], index=index)
        assert err(e) == "EINVAL"
    with pytest.raises(OSError) as e:
        rig.disable(uapi.VFIO_PCI_MSI_IRQ_INDEX)
    assert err(e) == "EINVAL"
    rig.ring(1)
    assert rig.count(efds[1]) == 1 and not rig.dev.msi_enabled()


@pytest.mark.parametrize("bad, code", [(99, "EBADF"), ("container", "EINVAL")])
def test_a_bad_eventfd_while_enabling_leaves_msix_disabled__vfio_msi_set_vector_signal(rig, bad, code):
    """eventfd_ctx_fdget() fails for the second vector: vfio_msi_set_block() releases
    what it set, and vfio_pci_set_msi_trigger() disables MSI-X again."""
    fd = rig.c if bad == "container" else bad
    efd, = rig.eventfds(1)
    with pytest.raises(OSError) as e:
        rig.set_eventfds(0, [efd, fd])
    assert err(e) == code
    assert not rig.dev.msix_enabled() and rig.cfg(MSIX_CAP + 2) & 0x8000 == 0
    with pytest.raises(OSError) as e:
        rig.loopback(0, 1)                                      # not enabled
    assert err(e) == "EINVAL"


def test_a_failed_block_releases_start_through_the_failing_vector__vfio_msi_set_block(rig):
    """MSI-X stays enabled; vectors start..failed lose their triggers (even the one
    they had before); vectors outside the block keep theirs."""
    efds = rig.eventfds(4)
    rig.set_eventfds(0, efds)
    fresh, = rig.eventfds(1)
    with pytest.raises(OSError) as e:
        rig.set_eventfds(1, [fresh, 99])
    assert err(e) == "EBADF"
    assert rig.dev.msix_enabled()
    rig.loopback(0, 4)
    assert [rig.count(f) for f in efds] == [1, 0, 0, 1] and rig.count(fresh) == 0
    rig.ring(1)                                                 # vector 1 has no trigger: masked, pending
    assert rig.count(efds[1]) == 0 and rig.dev.msix_pending(1)


@pytest.mark.parametrize("platform", ["powernv", "pseries"])
def test_a_vector_not_allocated_at_enable_is_einval_on_power__vfio_msi_alloc_irq(platform):
    """No dynamic MSI-X (NORESIZE): pci_irq_vector() is -EINVAL for a vector past
    the start + count allocated by vfio_msi_enable()."""
    r = Rig(platform)
    enable_bus_master(r.p, r.d)
    efds = r.eventfds(2)
    r.set_eventfds(0, efds)
    late, = r.eventfds(1)
    with pytest.raises(OSError) as e:
        r.set_eventfds(4, [late])
    assert err(e) == "EINVAL"
    r.ring(0)
    assert r.count(efds[0]) == 1                                # vectors 0 and 1 keep working
    r.ring(4)
    assert r.count(late) == 0
    # QEMU's way to enable MSI-X without vectors (vector 0, fd -1) then add one: not here.
    r.disable()
    r.set_eventfds(0, [-1])
    with pytest.raises(OSError) as e:
        r.set_eventfds(5, [late])
    assert err(e) == "EINVAL"


def test_vectors_are_added_after_enable_on_x86__vfio_msi_alloc_irq():
    """has_dyn_msix: pci_msix_alloc_irq_at() allocates the vector when it is first
    given a trigger; the vectors already set are untouched."""
    r = Rig("x86")
    enable_bus_master(r.p, r.d)
    r.set_eventfds(0, [-1])                                     # QEMU's vfio_enable_msix_no_vec()
    efds = r.eventfds(2)
    assert r.set_eventfds(5, [efds[1]]) == 0
    assert r.set_eventfds(2, [efds[0]]) == 0
    r.ring(5)
    r.ring(2)
    assert [r.count(f) for f in efds] == [1, 1]
    # the allocated vectors' table entries carry the host's messages
    for v in (0, 2, 5):
        assert r.dev.msix.message(v) == (MSG_ADDRESS, MSG_DATA + v)
    assert r.dev.msix.message(1) == (0, 0)


def test_fd_minus_one_releases_a_vector_and_the_device_then_pends__vfio_msi_set_vector_signal(rig):
    efds = rig.eventfds(2)
    rig.set_eventfds(0, efds)
    rig.set_eventfds(1, [-1])
    rig.ring(1)
    assert rig.count(efds[1]) == 0
    assert rig.pba() == 0b10                                    # free_irq() masked it: the event pends
    rig.set_eventfds(1, [efds[1]])                              # request_irq() unmasks: delivered now
    assert rig.count(efds[1]) == 1 and rig.pba() == 0


def test_disable_with_count_0__vfio_msi_disable(rig):
    efds = rig.eventfds(VECTORS)
    rig.set_eventfds(0, efds)
    assert rig.cfg(MSIX_CAP + 2) == 0x8000 | (VECTORS - 1)
    assert rig.disable() == 0
    assert rig.cfg(MSIX_CAP + 2) == VECTORS - 1 and not rig.dev.msix_enabled()
    for v in range(VECTORS):
        rig.ring(v)
    assert [rig.count(f) for f in efds] == [0] * VECTORS
    # pci_msix_shutdown() masked the vectors; the messages stay in the table
    assert all(rig.dev.msix.ctrl(v) == 1 for v in range(VECTORS))
    assert rig.dev.msix.message(3) == (MSG_ADDRESS, MSG_DATA + 3)
    with pytest.raises(OSError) as e:
        rig.disable()
    assert err(e) == "EINVAL"


def test_loopback_signals_the_vectors_with_triggers__vfio_pci_set_msi_trigger(rig):
    efds = rig.eventfds(3)
    rig.set_eventfds(0, [efds[0], -1, efds[2]])
    assert rig.loopback(0, VECTORS) == 0                        # past the 3 allocated: skipped, not EINVAL
    assert [rig.count(f) for f in efds] == [1, 0, 1]
    rig.set_irqs(MSIX, 0, 3, BOOL | TRIGGER, b"\0\1\1")
    assert [rig.count(f) for f in efds] == [0, 0, 1]


# -- interrupts ----------------------------------------------------------------------------------------------


def test_each_vector_reaches_its_own_eventfd(rig):
    efds = rig.eventfds(VECTORS)
    rig.set_eventfds(0, efds)
    for v in (3, 0, 5, 3):
        rig.ring(v)
    assert [rig.count(f) for f in efds] == [1, 0, 0, 2, 0, 1]


def test_no_bus_master_no_message(rig):
    """An MSI-X message is a memory write: with PCI_COMMAND_MASTER clear it is
    not sent (and not left pending)."""
    efd, = rig.eventfds(1)
    rig.set_eventfds(0, [efd])
    rig.cfg_write(0x04, rig.cfg(0x04) & ~0x4)
    rig.ring(0)
    assert rig.count(efd) == 0 and rig.pba() == 0
    enable_bus_master(rig.p, rig.d)
    assert rig.count(efd) == 0
    rig.ring(0)
    assert rig.count(efd) == 1


def test_msix_disabled_drops_what_the_device_raises(rig):
    efd, = rig.eventfds(1)
    rig.ring(0)
    rig.set_eventfds(0, [efd])
    assert rig.count(efd) == 0 and rig.pba() == 0


def test_a_frozen_pe_drops_msix_messages():
    """PowerNV EEH: a refused DMA freezes the PE; the device's MSI-X writes are DMA too."""
    r = Rig("powernv")
    enable_bus_master(r.p, r.d)
    efd, = r.eventfds(1)
    r.set_eventfds(0, [efd])
    r.p.pwrite(r.d, b"\1\0\0\0", BAR0 + BADDMA)
    assert any("Frozen" in line or "EEH" in line for line in r.m.dmesg())
    r.dev.msix_notify(0)
    assert r.count(efd) == 0


def test_the_user_masks_and_unmasks_a_vector_through_the_mapped_table__vfio_pci_core_mmap(rig):
    """The whole BAR may be mmapped (MSIX_MAPPABLE) and stores reach the device's
    table: a masked vector pends, unmasking it sends the message."""
    rig.p._call("mmap", rig.m.kernel.sys_mmap_check, rig.d, 0, 0x4000, 3, True)
    efds = rig.eventfds(2)
    rig.set_eventfds(0, efds)
    ctrl1 = TABLE + 16 + 12
    assert rig.mmio(ctrl1, 4) == 0                              # request_irq() unmasked it
    assert rig.mmio(TABLE + 16, 8) == MSG_ADDRESS and rig.mmio(TABLE + 24, 4) == MSG_DATA + 1
    rig.mmio(ctrl1, 4, 1)
    rig.ring(1)
    assert rig.count(efds[1]) == 0 and rig.mmio(PBA, 8) == 0b10
    rig.mmio(ctrl1, 4, 0)
    assert rig.count(efds[1]) == 1 and rig.mmio(PBA, 8) == 0


def test_entries_the_user_unmasked_before_enable_are_masked_again__msix_capability_init(rig):
    """msix_mask_all() masks every table entry, allocated or not, before the
    function mask is cleared; only request_irq() unmasks."""
    rig.p._call("mmap", rig.m.kernel.sys_mmap_check, rig.d, 0, 0x4000, 3, True)
    for v in (0, 4):
        rig.mmio(TABLE + 16 * v + 12, 4, 0)
    assert rig.dev.msix.ctrl(4) == 0
    rig.set_eventfds(0, [-1, -1])
    assert [rig.mmio(TABLE + 16 * v + 12, 4) for v in range(VECTORS)] == [1] * VECTORS
    rig.ring(4)
    assert rig.mmio(PBA, 8) == 0b10000


def test_a_message_overwritten_through_the_mapping_is_refreshed__vfio_msi_set_vector_signal(rig):
    """"refresh the on-device message data before enabling in case it had been
    cleared or corrupted": a message the host did not compose is no interrupt of
    it; giving the vector its trigger again rewrites the message."""
    efd, = rig.eventfds(1)
    rig.set_eventfds(0, [efd])
    rig.mmio(TABLE + 12, 4, 1)
    rig.mmio(TABLE + 8, 4, 0x1234)
    rig.mmio(TABLE + 12, 4, 0)
    rig.ring(0)
    assert rig.count(efd) == 0
    assert any("MSI-X message 0x1234 to 0xfee00000 is no interrupt of the host" in line for line in rig.m.dmesg())
    rig.set_eventfds(0, [efd])
    rig.ring(0)
    assert rig.count(efd) == 1


# -- the MSI-X table through the region (vfio_pci_bar_rw) -------------------------------------------------


def test_pread_of_the_table_fills_0xff__vfio_pci_core_do_io_rw(rig):
    efds = rig.eventfds(2)
    rig.set_eventfds(0, efds)
    assert rig.p.pread(rig.d, 16 * VECTORS, BAR0 + TABLE) == b"\xff" * (16 * VECTORS)
    # a read across the table's start: the register below it, then 0xff
    got = rig.p.pread(rig.d, 12, BAR0 + LAST)
    assert got == (0x5A5A5A5A).to_bytes(4, "little") + b"\xff" * 8
    # past the table (msix_size covers the table only) the device answers again: the PBA
    assert rig.p.pread(rig.d, 8, BAR0 + PBA) == bytes(8)
    assert rig.p.pread(rig.d, 4, BAR0 + ID) == IDENT.to_bytes(4, "little")


def test_pwrite_to_the_table_is_dropped__vfio_pci_core_do_io_rw(rig):
    efd, = rig.eventfds(1)
    rig.set_eventfds(0, [efd])
    before = bytes(rig.dev.msix.table)
    assert rig.p.pwrite(rig.d, b"\0" * 16, BAR0 + TABLE) == 16           # all of entry 0, "written"
    assert rig.p.pwrite(rig.d, b"\1" * 20, BAR0 + TABLE - 4) == 20
    assert bytes(rig.dev.msix.table) == before
    rig.ring(0)
    assert rig.count(efd) == 1


def test_memory_decode_off_only_an_access_outside_the_table_is_eio__vfio_pci_core_ioread32(rig):
    rig.cfg_write(0x04, rig.cfg(0x04) & ~0x2)
    assert rig.p.pread(rig.d, 32, BAR0 + TABLE) == b"\xff" * 32
    assert rig.p.pwrite(rig.d, b"\0" * 32, BAR0 + TABLE) == 32
    for off, n in ((LAST, 12), (PBA, 8), (ID, 4)):
        with pytest.raises(OSError) as e:
            rig.p.pread(rig.d, n, BAR0 + off)
        assert err(e) == "EIO"


def test_region_info_of_the_table_bar_has_msix_mappable__vfio_pci_ioctl_get_region_info(rig):
    info = uapi.vfio_region_info(argsz=32, index=0)
    rig.p.ioctl(rig.d, uapi.VFIO_DEVICE_GET_REGION_INFO, info)
    rwm = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE | uapi.VFIO_REGION_INFO_FLAG_MMAP
    assert info.flags == rwm | uapi.VFIO_REGION_INFO_FLAG_CAPS
    assert (info.argsz, info.cap_offset, info.size) == (40, 0, 0x4000)      # room needed for the capability
    buf = bytearray(40)
    struct.pack_into("<II", buf, 0, 40, 0)
    struct.pack_into("<I", buf, 8, 0)
    rig.p.ioctl(rig.d, uapi.VFIO_DEVICE_GET_REGION_INFO, buf)
    argsz, flags, index, cap_offset = struct.unpack_from("<IIII", buf)
    assert (argsz, flags, cap_offset) == (40, rwm | uapi.VFIO_REGION_INFO_FLAG_CAPS, 32)
    assert struct.unpack_from("<HHI", buf, 32) == (uapi.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 1, 0)


def test_only_the_bar_holding_the_table_has_the_capability__msix_mappable_cap():
    """vdev->msix_bar is the Table BIR: the PBA's BAR gets nothing.  Without a
    capability cap_offset goes back as the caller passed it."""
    r = Rig("x86", model="msix-split")
    for index, caps in ((2, True), (0, False)):
        info = uapi.vfio_region_info(argsz=64, index=index, cap_offset=0x1234)
        buf = bytearray(bytes(info) + bytes(32))
        r.p.ioctl(r.d, uapi.VFIO_DEVICE_GET_REGION_INFO, buf)
        flags, cap_offset = struct.unpack_from("<I", buf, 4)[0], struct.unpack_from("<I", buf, 12)[0]
        assert bool(flags & uapi.VFIO_REGION_INFO_FLAG_CAPS) == caps
        assert cap_offset == (32 if caps else 0x1234)
    # the table (BAR2 0x0..0x60) is excluded from pread; the PBA in BAR0 is not
    assert r.p.pread(r.d, 8, BAR2) == b"\xff" * 8
    assert r.p.pread(r.d, 8, BAR0 + PBA) == bytes(8)


def test_no_capability_when_the_bar_cannot_be_mmapped__vfio_pci_ioctl_get_region_info():
    """MSIX_MAPPABLE is added only under bar_mmap_supported: a 16 KiB BAR on a
    64 KiB-page host is not mappable here."""
    r = Rig("powernv", page_size=65536)
    info = uapi.vfio_region_info(argsz=32, index=0)
    r.p.ioctl(r.d, uapi.VFIO_DEVICE_GET_REGION_INFO, info)
    assert info.flags == uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE
    assert info.argsz == 32


def test_the_table_bar_can_be_mmapped_whole__vfio_pci_core_mmap(rig):
    rig.p._call("mmap", rig.m.kernel.sys_mmap_check, rig.d, 0, 0x4000, 3, True)
    assert rig.mmio(ID, 4) == IDENT
    assert rig.mmio(TABLE + 12, 4) == 1                         # power-on: masked


# -- config space (vfio_pci_config.c) -------------------------------------------------------------------------


def test_config_reads_show_the_capability_as_the_device_has_it__vfio_direct_config_read(rig):
    assert rig.cfg(0x34, 1) == MSI_CAP and rig.cfg(MSI_CAP + 1, 1) == MSIX_CAP
    assert rig.cfg(MSIX_CAP, 1) == 0x11 and rig.cfg(MSIX_CAP + 1, 1) == 0
    assert rig.cfg(MSIX_CAP + 2) == VECTORS - 1
    assert rig.cfg(MSIX_CAP + 4, 4) == TABLE | 0 and rig.cfg(MSIX_CAP + 8, 4) == PBA | 0
    assert rig.cfg(MSIX_CAP, 4) == 0x11 | (VECTORS - 1) << 16
    rig.set_eventfds(0, rig.eventfds(1))
    assert rig.cfg(MSIX_CAP + 2) == 0x8000 | (VECTORS - 1)     # Enable set, Function Mask clear, by the host


def test_config_writes_to_the_capability_are_dropped__cap_perms_have_no_writefn(rig):
    for value in (0xC000, 0x4000 | 0x8000 | 0x7FF):
        rig.cfg_write(MSIX_CAP + 2, value)
        assert rig.cfg(MSIX_CAP + 2) == VECTORS - 1 and not rig.dev.msix_enabled()
    rig.cfg_write(MSIX_CAP, 0xFFFFFFFF, 4)
    rig.cfg_write(MSIX_CAP + 4, 0x1000 | 2, 4)
    assert rig.cfg(MSIX_CAP, 4) == 0x11 | (VECTORS - 1) << 16 and rig.cfg(MSIX_CAP + 4, 4) == TABLE
    efd, = rig.eventfds(1)
    rig.set_eventfds(0, [efd])
    rig.cfg_write(MSIX_CAP + 2, 0x4000)                         # neither clears Enable nor masks
    assert rig.cfg(MSIX_CAP + 2) == 0x8000 | (VECTORS - 1)
    rig.ring(0)
    assert rig.count(efd) == 1


# -- reset and close ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("platform", PLATFORMS)
def test_reset_keeps_msix_enabled__pci_restore_msix_state(platform):
    """vfio_pci_ioctl_reset() does not touch the interrupt setup: the PCI core
    restores MSI-X (Enable, messages, vector control) after the reset.  What the
    device had pending is gone with the reset."""
    r = Rig(platform, behind_bridge=True)
    enable_bus_master(r.p, r.d)
    efds = r.eventfds(3)
    r.set_eventfds(0, [efds[0], -1, efds[2]])
    r.ring(1)
    assert r.dev.msix_pending(1)
    r.p.ioctl(r.d, uapi.VFIO_DEVICE_RESET)
    assert r.dev.msix_enabled() and r.cfg(MSIX_CAP + 2) == 0x8000 | (VECTORS - 1)
    assert [r.dev.msix.ctrl(v) for v in range(VECTORS)] == [0, 1, 0, 1, 1, 1]
    assert r.dev.msix.message(2) == (MSG_ADDRESS, MSG_DATA + 2) and not r.dev.msix_pending(1)
    r.ring(2)
    r.ring(0)
    assert [r.count(f) for f in efds] == [1, 0, 1]


def test_msi_survives_reset_too__pci_restore_msi_state():
    r = Rig("powernv", behind_bridge=True)
    enable_bus_master(r.p, r.d)
    efd, = r.eventfds(1)
    r.set_eventfds(0, [efd], index=uapi.VFIO_PCI_MSI_IRQ_INDEX)
    r.p.ioctl(r.d, uapi.VFIO_DEVICE_RESET)
    r.p.pwrite(r.d, b"\0\0\0\0", BAR0 + MSI)
    assert r.count(efd) == 1


def test_close_disables_msix__vfio_pci_core_disable(rig):
    efds = rig.eventfds(2)
    rig.set_eventfds(0, efds)
    rig.p.close(rig.d)
    assert not rig.dev.msix_enabled() and rig.dev.on_msix is None
    rig.dev.config_write(0x04, 2, 0x6)
    rig.dev.msix_notify(0)
    assert [rig.count(f) for f in efds] == [0, 0]
    rig.d = rig.open()
    with pytest.raises(OSError) as e:
        rig.loopback(0, 1)                                      # a fresh open starts with nothing enabled
    assert err(e) == "EINVAL"
    enable_bus_master(rig.p, rig.d)
    rig.set_eventfds(0, efds[1:])
    rig.ring(0)
    assert [rig.count(f) for f in efds] == [0, 1]


# -- `vfiosim run`: an unmodified C program -------------------------------------------------------------------


@pytest.mark.parametrize("platform", ["x86", "powernv"])
def test_vfiosim_run_an_msix_c_program_against_a_device_module(platform, tmp_path):
    """SET_IRQS and its eventfds go through the LD_PRELOAD shim and the daemon
    unchanged: the program sees its vectors fire one by one."""
    import subprocess
    import sys
    from pathlib import Path

    from runutil import C_DIR, cc
    exe = cc(C_DIR / "msix_probe.c", tmp_path)
    machine = tmp_path / "msix.toml"
    machine.write_text(machine_toml(platform))
    module = Path(__file__).resolve().parent / "msix_device.py"
    group, bdf, iommu = ("5", "0000:03:00.0", "type1") if platform == "x86" else ("0", "0000:01:00.0", "spapr")
    proc = subprocess.run([sys.executable, "-m", "vfiosim.cli", "run", "--machine", str(machine),
                           "--device-module", str(module), "--", str(exe), group, bdf, iommu],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"msix count={VECTORS} noresize={0 if platform == 'x86' else 1}" in out
    assert f"msix cap=0x50 size={VECTORS} table=bar0+{TABLE:#x} pba=bar0+{PBA:#x}" in out
    assert "bar0 size=0x4000 mmap=1 msix_mappable=1" in out
    assert "enabled=1 maskall=0" in out
    assert "vectors verified" in out
    assert f"entry1 addr={MSG_ADDRESS:#x} data={MSG_DATA + 1:#x} ctrl=0" in out
    assert "table via pread: all ones" in out
    assert "disabled: enabled=0" in out
    assert "internal error" not in proc.stderr


@pytest.mark.parametrize("platform", ["x86", "powernv", "pseries"])
def test_the_python_client_drives_msix_vectors(platform):
    """A userspace driver written with vfiosim.client (as an NVMe driver would
    be) enables MSI-X vectors and waits on each; every vector reaches only its
    own Irq, and closing the device leaves MSI-X off."""
    from vfiosim import client
    m = vfiosim.Machine.from_toml(machine_toml(platform))
    p = m.spawn(uid=0)
    bdf = next(iter(m.iommu_groups().values()))[0]
    with client.open_device(bdf, p) as dev:
        info = dev.irq_info("msix")
        assert info.count == VECTORS
        assert bool(info.flags & uapi.VFIO_IRQ_INFO_NORESIZE) == (platform != "x86")
        dev.enable_bus_master()
        irqs = dev.enable_irqs("msix", count=4)
        bar = dev.bar(0)
        for v in (2, 0, 3):
            bar.write32(DOORBELL, v)
            assert [irq.wait(0) for irq in irqs] == [int(i == v) for i in range(4)]
        assert m.device(bdf).msix_enabled()
    assert not m.device(bdf).msix_enabled()
    assert not m.oopses
