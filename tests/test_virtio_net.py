"""The virtio-net device model, driven through vfiosim.client as a userspace driver would.

tests/virtio_driver.py is the driver: it finds the virtio capabilities,
negotiates features, sets up split virtqueues in memory it maps through the
container, and moves frames.  Every ring and buffer access of the device is
a DMA through the machine's IOMMU (sPAPR TCE on POWER, VT-d on x86).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

import vfiosim
from vfiosim import client
from vfiosim.kernel.pci import virtio as V
from vfiosim.kernel.pci.net_backends import Loopback, Pcap, PcapWriter, read_pcap
from vfiosim.kernel.pci.virtio_net import (VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC,
                                           VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VirtioNet)
from vfiosim.machine_spec import MachineFileError
from virtio_driver import BUF_SIZE, DEFAULT_FEATURES, TX_HDR, VirtioNetDriver, frame

NIC = "0000:01:00.0"


def machine_toml(platform: str, extra: str = "") -> str:
    if platform == "x86":
        return f"""
[machine]
name = "nic-x86"
platform = "x86"
[[device]]
bdf = "0000:00:01.0"
model = "pcie-root-port"
iommu_group = 0
[[device]]
bdf = "{NIC}"
model = "virtio-net"
iommu_group = 1
behind_bridge = true
{extra}
"""
    return f"""
[machine]
name = "nic-{platform}"
platform = "{platform}"
[[phb]]
index = 0
[[device]]
bdf = "{NIC}"
model = "virtio-net"
phb = 0
pe = 1
iommu_group = 0
behind_bridge = true
{extra}
"""


PLATFORMS = ["powernv", "pseries", "x86"]


@pytest.fixture(params=PLATFORMS)
def rig(request):
    m = vfiosim.Machine.from_toml(machine_toml(request.param))
    p = m.spawn(uid=0)
    dev = client.open_device("1af4:1041", p)
    drv = VirtioNetDriver(dev)
    yield m, drv
    drv.close()
    dev.close()
    assert not m.oopses, m.oopses


def nic(m: vfiosim.Machine) -> VirtioNet:
    dev = m.device(NIC)
    assert isinstance(dev, VirtioNet)
    return dev


# -- identity and capabilities -----------------------------------------------------------------------------


def test_identity_capabilities_and_bars_are_a_modern_virtio_net(rig):
    """§4.1.2: 1af4:1041, revision 1, Ethernet class; the common, ISR, device
    and notify structures in BAR4 (QEMU's layout), a PCI cfg access capability,
    and MSI-X with 4 vectors in BAR1."""
    m, drv = rig
    cfg = drv.cfg
    assert (cfg.read16(0), cfg.read16(2), cfg.read8(8)) == (0x1AF4, 0x1041, 1)
    assert cfg.read32(8) >> 8 == 0x020000
    assert (cfg.read16(0x2C), cfg.read16(0x2E)) == (0x1AF4, 0x1100)
    c = drv.caps
    assert (c.common, c.isr, c.device, c.notify, c.notify_mult) == (0x0000, 0x1000, 0x2000, 0x3000, 4)
    assert c.pci_cfg > 0
    assert drv.dev.irq_info("msix").count == 4
    assert drv.dev.bar(4).size == 0x4000 and drv.dev.bar(1).size == 0x1000
    assert drv.dev.bar(0).size == 0



def test_only_the_notification_area_may_be_posted_and_it_is_a_doorbell():
    """A queue notification is a posted PCIe write that starts work: a
    transport may post it (the program does not wait for the device) and
    performs it at once.  The common configuration (queue set-up, status,
    reset), the ISR (read-to-clear) and the device configuration stay
    undeclared, reached at once and waited for."""
    dev = VirtioNet("0000:01:00.0")
    assert dev.doorbell_ranges(V.MODERN_BAR) == [(V.NOTIFY_OFFSET, V.REGION_SIZE)]
    # Nothing of BAR4 is a store without side effects (only MSI-X's table words are, in BAR1).
    assert dev.posted_write_ranges(V.MODERN_BAR) == []
    assert dev.doorbell_ranges(V.MSIX_BAR) == [(16 * v + 12, 4) for v in range(4)]
    # Through vfio-pci, a mapping of the whole BAR: the area, as a doorbell (performed at once).
    m = vfiosim.Machine.from_toml(machine_toml("x86"))
    p = m.spawn(uid=0)
    d = client.open_device("1af4:1041", p)
    file = p.task.files.get(d.fd)
    bar4 = V.MODERN_BAR << 40
    assert m.kernel.mmap_posted_writes(file, bar4, 0x4000) == [(0x3000, 0x1000, True)]
    assert m.kernel.mmap_posted_writes(file, bar4, 0x3000) == []        # a mapping without it
    d.close()

def test_offered_features(rig):
    _m, drv = rig
    f = drv.device_features()
    for bit in (V.VIRTIO_F_VERSION_1, V.VIRTIO_F_ACCESS_PLATFORM, V.VIRTIO_F_INDIRECT_DESC, VIRTIO_NET_F_MAC,
                VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MTU, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_CTRL_RX):
        assert f >> bit & 1, bit
    assert not f >> V.VIRTIO_F_EVENT_IDX & 1
    # §4.1.4.3.1: 0 for any feature select other than 0 and 1.
    drv.w32(V.COMMON_DFSELECT, 2)
    assert drv.r32(V.COMMON_DF) == 0


def test_device_config_has_the_mac_link_up_and_mtu(rig):
    _m, drv = rig
    raw = drv.device_config(0, 12)
    assert raw[:6] == bytes.fromhex("525400123456")
    assert struct.unpack("<HHH", raw[6:]) == (1, 1, 1500)
    # Past the structure: all ones, as QEMU's virtio_config_modern_read*.
    assert drv.bar.read32(drv.caps.device + 0x100) == 0xFFFFFFFF


# -- feature negotiation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop", [V.VIRTIO_F_ACCESS_PLATFORM, V.VIRTIO_F_VERSION_1])
def test_features_ok_needs_version_1_and_access_platform(rig, drop):
    """§3.1.1: the driver re-reads the status; FEATURES_OK stays clear when the
    device cannot work with the features (QEMU's virtio_validate_features)."""
    m, drv = rig
    assert not drv.negotiate(DEFAULT_FEATURES & ~(1 << drop))
    assert drv.status() == V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER
    assert any("not accepted" in line for line in m.dmesg())
    assert drv.negotiate(DEFAULT_FEATURES)


def test_features_ok_refuses_features_that_were_not_offered(rig):
    _m, drv = rig
    assert not drv.negotiate(DEFAULT_FEATURES | 1 << V.VIRTIO_F_EVENT_IDX)
    # driver_feature mirrors what the driver wrote, as QEMU's (§4.1.4.3.1 allows it).
    drv.w32(V.COMMON_GFSELECT, 0)
    assert drv.r32(V.COMMON_GF) == (DEFAULT_FEATURES | 1 << V.VIRTIO_F_EVENT_IDX) & 0xFFFFFFFF


def test_features_cannot_change_after_features_ok(rig):
    m, drv = rig
    assert drv.negotiate(DEFAULT_FEATURES)
    drv.w32(V.COMMON_GFSELECT, 0)
    drv.w32(V.COMMON_GF, 0)
    assert nic(m).guest_features == DEFAULT_FEATURES


# -- queue set-up ---------------------------------------------------------------------------------------------


def test_queue_setup(rig):
    """Three queues (receiveq1, transmitq1, controlq) of 256, 256 and 64; a
    size the driver may lower to a power of 2; the addresses take effect at
    queue_enable; an absent queue reads size 0."""
    m, drv = rig
    assert drv.negotiate()
    assert drv.r16(V.COMMON_NUMQ) == 3
    sizes = []
    for q in range(3):
        drv.w16(V.COMMON_Q_SELECT, q)
        sizes.append(drv.r16(V.COMMON_Q_SIZE))
        assert drv.r16(V.COMMON_Q_NOFF) == q
        assert drv.r16(V.COMMON_Q_ENABLE) == 0
        assert drv.r16(V.COMMON_Q_MSIX) == V.VIRTIO_MSI_NO_VECTOR
    assert sizes == [256, 256, 64]
    drv.w16(V.COMMON_Q_SELECT, 5)
    assert drv.r16(V.COMMON_Q_SELECT) == 5 and drv.r16(V.COMMON_Q_SIZE) == 0
    drv.w16(V.COMMON_Q_SELECT, 1)
    for bad in (0, 100, 512):
        drv.w16(V.COMMON_Q_SIZE, bad)
        assert drv.r16(V.COMMON_Q_SIZE) == 256
    ring = drv.setup_queue(1, size=64)
    assert ring.size == 64
    q = nic(m).queues[1]
    assert (q.enabled, q.num, q.desc, q.avail, q.used) == (True, 64, ring.desc, ring.avail, ring.used)
    assert drv.r16(V.COMMON_Q_ENABLE) == 1
    drv.w32(V.COMMON_Q_DESCLO, 0x1234000)
    assert drv.r32(V.COMMON_Q_DESCLO) == 0x1234000
    assert q.desc == ring.desc, "a ring address changes only at the next enable"


def test_msix_vector_out_of_range_reads_back_no_vector(rig):
    """§4.1.5.1.2: the driver verifies the mapping by reading it back."""
    _m, drv = rig
    drv.w16(V.COMMON_MSIX, 3)
    assert drv.r16(V.COMMON_MSIX) == 3
    drv.w16(V.COMMON_MSIX, 4)
    assert drv.r16(V.COMMON_MSIX) == V.VIRTIO_MSI_NO_VECTOR
    drv.w16(V.COMMON_Q_SELECT, 0)
    drv.w16(V.COMMON_Q_MSIX, 9)
    assert drv.r16(V.COMMON_Q_MSIX) == V.VIRTIO_MSI_NO_VECTOR


# -- frames ------------------------------------------------------------------------------------------------------


def test_a_frame_round_trip_through_the_loopback(rig):
    """Frames the driver sends come back on receive, byte for byte, with a
    virtio_net_hdr of num_buffers 1; the used rings say which buffers and how
    much was written."""
    m, drv = rig
    drv.start(rx_buffers=16)
    sent = [frame(n, size) for n, size in enumerate((60, 64, 1514, 200, 64))]
    for f in sent:
        drv.send(f)
    assert drv.tx.reap() == [(i, 0) for i in range(len(sent))]
    got = drv.received()
    assert got == sent
    dev = nic(m)
    assert dev.stats["tx_frames"] == dev.stats["rx_frames"] == len(sent)
    assert dev.stats["tx_bytes"] == sum(map(len, sent))
    lo = dev.backend
    assert isinstance(lo, Loopback)
    assert (lo.sent, lo.new, lo.returned) == (5, 5, 0)
    # The driver sends back what it received: the loopback counts round trips.
    for f in got:
        drv.send(f)
    assert drv.received() == sent
    assert (lo.new, lo.returned) == (5, 5)


def test_chained_and_indirect_transmit_descriptors(rig):
    """A frame may be split over chained descriptors (header alone, then the
    data), or put in an indirect table (VIRTIO_F_INDIRECT_DESC)."""
    m, drv = rig
    drv.start(features=DEFAULT_FEATURES | 1 << V.VIRTIO_F_INDIRECT_DESC)
    tx, buf = drv.tx, drv.tx_bufs
    f1, f2 = frame(1), frame(2, 100)
    # Chained: descriptor 0 the header, 1 the first half, 2 the rest.
    buf.write(0, TX_HDR)
    buf.write(BUF_SIZE, f1[:20])
    buf.write(2 * BUF_SIZE, f1[20:])
    tx.set_desc(0, buf.iova, len(TX_HDR), V.VRING_DESC_F_NEXT, 1)
    tx.set_desc(1, buf.iova + BUF_SIZE, 20, V.VRING_DESC_F_NEXT, 2)
    tx.set_desc(2, buf.iova + 2 * BUF_SIZE, len(f1) - 20)
    tx.make_available(0)
    # Indirect: a table of two descriptors in DMA memory.
    buf.write(3 * BUF_SIZE, TX_HDR + f2)
    table = struct.pack("<QIHH", buf.iova + 3 * BUF_SIZE, len(TX_HDR), V.VRING_DESC_F_NEXT, 1) + \
        struct.pack("<QIHH", buf.iova + 3 * BUF_SIZE + len(TX_HDR), len(f2), 0, 0)
    buf.write(4 * BUF_SIZE, table)
    tx.set_desc(3, buf.iova + 4 * BUF_SIZE, len(table), V.VRING_DESC_F_INDIRECT)
    tx.make_available(3)
    assert tx.reap() == [(0, 0), (3, 0)]
    assert drv.received() == [f1, f2]
    assert not nic(m).broken


def test_indirect_descriptor_without_the_feature_is_a_device_error(rig):
    m, drv = rig
    drv.start()
    buf = drv.tx_bufs
    buf.write(0, struct.pack("<QIHH", buf.iova + BUF_SIZE, 76, 0, 0))
    drv.tx.set_desc(0, buf.iova, 16, V.VRING_DESC_F_INDIRECT)
    drv.tx.make_available(0)
    assert drv.status() & V.STATUS_DEVICE_NEEDS_RESET
    assert "VIRTIO_F_INDIRECT_DESC" in nic(m).errors[0]


def test_receive_notifications_are_asked_for_only_while_frames_wait(rig):
    """As QEMU's virtio-net: VRING_USED_F_NO_NOTIFY on the receive queue while
    nothing waits; with no receive buffers the loopback holds frames, asks to
    be notified, and the transmit queue waits for room; posting buffers
    (and notifying) delivers them all."""
    m, drv = rig
    drv.start(rx_buffers=2, queue_size=16)
    assert drv.rx.used_flags() & V.VRING_USED_F_NO_NOTIFY
    sent = [frame(n) for n in range(6)]
    for f in sent:
        drv.send(f)
    assert drv.received() == sent[:2]
    assert not drv.rx.used_flags() & V.VRING_USED_F_NO_NOTIFY, "frames wait: the device wants a notification"
    lo = nic(m).backend
    assert lo.pending() == 4
    for i in range(2, 6):
        drv.post_rx(i)
    drv.rx.kick()
    assert drv.received() == sent[2:]
    assert drv.rx.used_flags() & V.VRING_USED_F_NO_NOTIFY
    assert [h for h, _ in drv.tx.reap()] == list(range(6))


def test_loopback_flow_control_holds_transmit_until_there_is_room():
    m = vfiosim.Machine.from_toml(machine_toml("powernv"))
    nic(m).set_backend(Loopback(capacity=2))
    with client.open_device("1af4:1041", m.spawn(uid=0)) as dev:
        drv = VirtioNetDriver(dev)
        drv.start(rx_buffers=0, queue_size=16)
        for n in range(5):
            drv.send(frame(n))
        assert [h for h, _ in drv.tx.reap()] == [0, 1], "two frames wait for room; three stay in the ring"
        for i in range(5):
            drv.post_rx(i)
        drv.rx.kick()
        assert drv.received() == [frame(n) for n in range(5)]
        assert [h for h, _ in drv.tx.reap()] == [2, 3, 4]
        drv.close()


def test_a_frame_larger_than_the_receive_buffer_is_dropped_and_the_buffer_kept(rig):
    """Without mergeable buffers a frame must fit one chain; QEMU drops it and
    gives the buffer back (virtqueue_unpop)."""
    m, drv = rig
    drv.start(rx_buffers=0)
    drv.rx.set_desc(0, drv.rx_bufs.iova, 64, V.VRING_DESC_F_WRITE)
    drv.rx.make_available(0)
    drv.send(frame(0, 100))
    drv.send(frame(1, 40))
    assert drv.received() == [frame(1, 40)]
    assert nic(m).stats["rx_dropped"] == 1
    assert not nic(m).broken


# -- interrupts -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("platform", PLATFORMS)
def test_msix_used_buffer_and_configuration_notifications(platform):
    """Each queue signals its own vector unless the driver set
    VRING_AVAIL_F_NO_INTERRUPT; a link change signals the configuration
    vector, bumps config_generation and shows in the ISR."""
    m = vfiosim.Machine.from_toml(machine_toml(platform))
    with client.open_device("1af4:1041", m.spawn(uid=0)) as dev:
        irqs = dev.enable_irqs("msix", count=3)
        drv = VirtioNetDriver(dev)
        drv.start(vectors=(1, 2))
        drv.w16(V.COMMON_MSIX, 0)
        drv.send(frame(0))
        assert [irq.wait(0) for irq in irqs] == [0, 1, 1]
        drv.tx.set_avail_flags(V.VRING_AVAIL_F_NO_INTERRUPT)
        drv.rx.set_avail_flags(V.VRING_AVAIL_F_NO_INTERRUPT)
        drv.send(frame(1))
        assert [irq.wait(0) for irq in irqs] == [0, 0, 0]
        assert len(drv.received()) == 2
        gen = drv.r8(V.COMMON_CFGGENERATION)
        nic(m).set_link(False)
        assert [irq.wait(0) for irq in irqs] == [1, 0, 0]
        assert drv.r8(V.COMMON_CFGGENERATION) == (gen + 1) & 0xFF
        assert struct.unpack("<H", drv.device_config(6, 2))[0] == 0
        assert drv.read_isr() == 3 and drv.read_isr() == 0, "reading the ISR clears it"
        drv.close()


def test_intx_follows_the_isr_when_msix_is_off():
    """Without MSI-X, a used buffer notification sets ISR bit 0 and asserts
    INTx; reading the ISR clears it and deasserts (§4.1.4.5)."""
    m = vfiosim.Machine.from_toml(machine_toml("x86"))
    with client.open_device("1af4:1041", m.spawn(uid=0)) as dev:
        intx = dev.irq("intx")
        drv = VirtioNetDriver(dev)
        drv.start()
        drv.send(frame(0))
        assert intx.wait(0) == 1
        assert nic(m).intx_level == 1
        assert drv.read_isr() == 1
        assert nic(m).intx_level == 0
        drv.close()


# -- faults ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("platform", PLATFORMS)
def test_a_bad_descriptor_address_faults_in_the_iommu(platform):
    """A transmit descriptor pointing where nothing is mapped: the IOMMU
    refuses the DMA (on PowerNV the PE freezes: EEH; on x86 VT-d records a
    fault), nothing is sent, and the device sets DEVICE_NEEDS_RESET."""
    m = vfiosim.Machine.from_toml(machine_toml(platform))
    with client.open_device("1af4:1041", m.spawn(uid=0)) as dev:
        drv = VirtioNetDriver(dev)
        drv.start()
        bad = drv.tx_bufs.iova + BUF_SIZE * drv.tx.size + (64 << 20)
        drv.tx.set_desc(0, bad, 76)
        drv.tx.make_available(0)
        n = nic(m)
        assert n.broken and n.status & V.STATUS_DEVICE_NEEDS_RESET
        assert n.stats["tx_frames"] == 0 and drv.tx.used_idx() == 0
        assert f"{bad:#x}" in n.errors[0]
        if platform == "powernv":
            pe = m.pe_of(NIC)
            assert pe.eeh.mmio_stopped and pe.eeh.dma_stopped
            assert drv.status() == 0xFF, "a frozen PE answers loads with all ones"
        else:
            assert drv.status() & V.STATUS_DEVICE_NEEDS_RESET
            if platform == "x86":
                assert m.iommu_units[0].faults
        # Further notifications do nothing until a reset.
        drv.send(frame(0))
        assert n.stats["tx_frames"] == 0
        drv.close()


def test_a_bad_ring_address_faults_at_the_first_notification():
    m = vfiosim.Machine.from_toml(machine_toml("x86"))
    with client.open_device("1af4:1041", m.spawn(uid=0)) as dev:
        drv = VirtioNetDriver(dev)
        drv.dev.enable_bus_master()
        assert drv.negotiate()
        drv.w16(V.COMMON_Q_SELECT, 1)
        for off in (V.COMMON_Q_DESCLO, V.COMMON_Q_AVAILLO, V.COMMON_Q_USEDLO):
            drv.w32(off, 0x7000_0000)
        drv.w16(V.COMMON_Q_ENABLE, 1)
        drv.w8(V.COMMON_STATUS, drv.status() | V.STATUS_DRIVER_OK)
        drv.bar.write16(drv.caps.notify + 4, 1)
        assert drv.status() & V.STATUS_DEVICE_NEEDS_RESET
        assert "0x70000000" in nic(m).errors[0]


def test_driver_rule_violations_need_a_reset(rig):
    """A descriptor index past the queue, a looped chain, a readable
    descriptor after a writable one, and 0 written to queue_enable (§4.1.4.3.2,
    QEMU: "wrong value for queue_enable") each put the device in
    DEVICE_NEEDS_RESET."""
    m, drv = rig
    cases = []
    for case in ("head", "loop", "order", "enable0"):
        drv.start()
        tx = drv.tx
        if case == "head":
            tx.make_available(300 % 0x10000)
        elif case == "loop":
            tx.set_desc(0, drv.tx_bufs.iova, 76, V.VRING_DESC_F_NEXT, 1)
            tx.set_desc(1, drv.tx_bufs.iova, 76, V.VRING_DESC_F_NEXT, 0)
            tx.make_available(0)
        elif case == "order":
            tx.set_desc(0, drv.tx_bufs.iova, 76, V.VRING_DESC_F_WRITE | V.VRING_DESC_F_NEXT, 1)
            tx.set_desc(1, drv.tx_bufs.iova, 76, 0)
            tx.make_available(0)
        else:
            drv.w16(V.COMMON_Q_SELECT, 1)
            drv.w16(V.COMMON_Q_ENABLE, 0)
        cases.append((case, bool(drv.status() & V.STATUS_DEVICE_NEEDS_RESET), nic(m).errors[-1]))
        drv.close()
        drv.rings.clear()
        drv.rx_bufs = drv.tx_bufs = None
    assert [c[:2] for c in cases] == [("head", True), ("loop", True), ("order", True), ("enable0", True)]
    assert "descriptor 300" in cases[0][2] and "looped" in cases[1][2]
    assert "after a device-writable" in cases[2][2] and "queue_enable" in cases[3][2]


# -- reset -----------------------------------------------------------------------------------------------------------


def test_reset_by_status_zero_and_by_vfio_device_reset(rig):
    """§4.1.4.3.1: writing 0 to device_status resets the device (status,
    features, queues, vectors) and it reads back 0; VFIO_DEVICE_RESET does the
    same (a function-level reset).  After either the driver
    starts again and frames flow."""
    m, drv = rig
    for how in ("status", "vfio"):
        drv.start()
        drv.send(frame(1))
        assert drv.received() == [frame(1)]
        drv.w16(V.COMMON_MSIX, 1)
        if how == "status":
            drv.reset()
        else:
            drv.dev.reset()           # the PCI core restores COMMAND and MSI-X around the reset
        n = nic(m)
        assert (n.status, n.guest_features, n.config_vector) == (0, 0, V.VIRTIO_MSI_NO_VECTOR)
        assert not any(q.enabled for q in n.queues)
        drv.w16(V.COMMON_Q_SELECT, 1)
        assert drv.r16(V.COMMON_Q_ENABLE) == 0 and drv.r16(V.COMMON_Q_SIZE) == 256
        drv.close()
        drv.rings.clear()
    drv.start()
    drv.send(frame(2))
    assert drv.received() == [frame(2)]


def test_reset_after_a_fault_and_eeh_recovery_brings_the_device_back():
    """On PowerNV: the freeze is recovered with VFIO_EEH_PE_OP (unfreeze MMIO
    and DMA), then a reset clears DEVICE_NEEDS_RESET and frames flow again."""
    from vfiosim.uapi import vfio as uapi
    m = vfiosim.Machine.from_toml(machine_toml("powernv"))
    with client.open_device("1af4:1041", m.spawn(uid=0)) as dev:
        drv = VirtioNetDriver(dev)
        drv.start()
        drv.tx.set_desc(0, 0x7FFF_0000, 76)
        drv.tx.make_available(0)
        assert m.pe_of(NIC).eeh.mmio_stopped
        c = dev.container
        op = uapi.vfio_eeh_pe_op(argsz=ctypes_sizeof(uapi.vfio_eeh_pe_op), flags=0)
        for code in (uapi.VFIO_EEH_PE_UNFREEZE_IO, uapi.VFIO_EEH_PE_UNFREEZE_DMA):
            op.op = code
            c.ioctl(uapi.VFIO_EEH_PE_OP, op)
        assert not m.pe_of(NIC).eeh.mmio_stopped
        assert drv.status() & V.STATUS_DEVICE_NEEDS_RESET
        drv.close()
        drv.rings.clear()
        drv.start()
        assert not nic(m).broken
        drv.send(frame(3))
        assert drv.received() == [frame(3)]
        drv.close()


def ctypes_sizeof(t) -> int:
    import ctypes
    return ctypes.sizeof(t)


# -- control queue, filters -----------------------------------------------------------------------------------------


def control(drv: VirtioNetDriver, ring, cls: int, cmd: int, data: bytes) -> int:
    buf = drv.tx_bufs
    off = BUF_SIZE * (drv.tx.size - 1)
    buf.write(off, bytes([cls, cmd]) + data)
    buf.write(off + 1024, b"\xaa")
    ring.set_desc(0, buf.iova + off, 2 + len(data), V.VRING_DESC_F_NEXT, 1)
    ring.set_desc(1, buf.iova + off + 1024, 1, V.VRING_DESC_F_WRITE)
    ring.make_available(0)
    assert ring.reap() == [(0, 1)]
    return buf.read(off + 1024, 1)[0]


def test_control_queue_promiscuous_mode_filters_what_the_loopback_returns(rig):
    """VIRTIO_NET_CTRL_RX_PROMISC off: only broadcast, our address and the MAC
    table get in (QEMU's receive_filter); unknown commands answer VIRTIO_NET_ERR."""
    m, drv = rig
    feats = DEFAULT_FEATURES | 1 << VIRTIO_NET_F_CTRL_VQ | 1 << VIRTIO_NET_F_CTRL_RX
    drv.start(features=feats)
    ctrl = drv.setup_queue(2)
    assert control(drv, ctrl, 0, 0, b"\x00") == 0                 # PROMISC off
    ours = bytes.fromhex("525400123456") + frame(0)[6:]
    other = bytes.fromhex("020000000001") + frame(1)[6:]
    bcast = frame(2)
    for f in (other, ours, bcast):
        drv.send(f)
    assert drv.received() == [ours, bcast]
    assert nic(m).stats["rx_filtered"] == 1
    table = struct.pack("<I", 1) + other[:6] + struct.pack("<I", 0)
    assert control(drv, ctrl, 1, 0, table) == 0                   # MAC_TABLE_SET
    drv.send(other)
    assert drv.received() == [other]
    assert control(drv, ctrl, 2, 0, b"\x00\x01") == 1             # VLAN: not negotiated
    assert control(drv, ctrl, 0, 7, b"\x01") == 1


# -- the PCI configuration access capability through vfio-pci --------------------------------------------------------


def test_pci_cfg_access_capability_reaches_the_bars_through_vfio_config_space(rig):
    """§4.1.4.9: a driver without BAR access writes bar/offset/length in the
    capability, then reads or writes pci_cfg_data.  vfio-pci passes writes to
    vendor capabilities to the device (cap_perms[PCI_CAP_ID_VNDR].writefn =
    vfio_raw_config_write)."""
    m, drv = rig
    cfg, cap = drv.cfg, drv.caps.pci_cfg
    cfg.write8(cap + 4, V.MODERN_BAR)
    cfg.write32(cap + 8, V.DEVICE_OFFSET)
    cfg.write32(cap + 12, 4)
    assert cfg.read32(cap + 16) == 0x12005452                     # the MAC's first four bytes
    cfg.write32(cap + 8, V.COMMON_OFFSET + V.COMMON_STATUS)
    cfg.write32(cap + 12, 1)
    cfg.write32(cap + 16, V.STATUS_ACKNOWLEDGE)
    assert nic(m).status == V.STATUS_ACKNOWLEDGE
    assert drv.status() == V.STATUS_ACKNOWLEDGE


# -- machine files and the pcap backend ------------------------------------------------------------------------------


def test_pcap_backend_replays_one_file_and_captures_to_another(tmp_path):
    frames_in = [frame(n, 60 + n) for n in range(4)]
    w = PcapWriter(str(tmp_path / "in.pcap"))
    for f in frames_in:
        w.write(f)
    w.close()
    extra = 'backend = "pcap"\npcap_rx = "in.pcap"\npcap_tx = "out.pcap"\nmac = "02:11:22:33:44:55"'
    path = tmp_path / "m.toml"
    path.write_text(machine_toml("powernv", extra))
    m = vfiosim.Machine.from_file(path)
    assert isinstance(nic(m).backend, Pcap) and nic(m).mac == bytes.fromhex("021122334455")
    with client.open_device("1af4:1041", m.spawn(uid=0)) as dev:
        drv = VirtioNetDriver(dev)
        drv.start(rx_buffers=3)
        assert drv.received() == frames_in[:3], "delivered at DRIVER_OK"
        drv.post_rx(3, notify=True)
        assert drv.received() == frames_in[3:]
        sent = [frame(10), frame(11, 300)]
        for f in sent:
            drv.send(f)
        drv.close()
    assert read_pcap(str(tmp_path / "out.pcap")) == sent
    assert nic(m).backend.stats() == {"sent": 2, "received": 4, "waiting": 0}


@pytest.mark.parametrize("extra,key", [
    ('backend = "tap"', "device[0].backend"),
    ('pcap_rx = "x.pcap"', "device[0].pcap_rx"),
    ('backend = "pcap"\npcap_rx = "missing.pcap"', "device[0].pcap_rx"),
    ('mac = "01:00:00:00:00:01"', "device[0].mac"),
    ('mac = "52:54:00"', "device[0].mac"),
])
def test_machine_file_errors_for_the_nic_keys(tmp_path, extra, key):
    path = tmp_path / "m.toml"
    path.write_text(machine_toml("powernv", extra))
    with pytest.raises(MachineFileError) as exc:
        vfiosim.Machine.from_file(path)
    assert exc.value.key == key


def test_nic_keys_are_refused_for_other_models():
    text = machine_toml("powernv").replace('model = "virtio-net"', 'model = "edu"') + 'backend = "loopback"\n'
    with pytest.raises(MachineFileError) as exc:
        vfiosim.Machine.from_toml(text)
    assert exc.value.key == "device[0].backend" and "virtio-net" in str(exc.value)


def test_the_nic_drives_64_address_bits_unless_the_machine_file_says_otherwise():
    m = vfiosim.Machine.from_toml(machine_toml("powernv"))
    assert nic(m).dma_mask == (1 << 64) - 1
    m = vfiosim.Machine.from_toml(machine_toml("powernv", "dma_mask = 0xffffffff"))
    assert nic(m).dma_mask == 0xFFFFFFFF
    edu = vfiosim.Machine.default().device("0000:01:00.0")
    assert edu.dma_mask == (1 << 28) - 1


def test_frames_survive_a_large_burst_across_the_ring_wrap(rig):
    """More frames than the queue holds, in bursts: indexes wrap modulo the
    queue size and every frame comes back in order."""
    _m, drv = rig
    drv.start(rx_buffers=16, queue_size=16)
    got = []
    sent = [frame(n, 64 + n % 50) for n in range(100)]
    for i, f in enumerate(sent):
        drv.send(f)
        drv.tx.reap()
        for fr in drv.received():
            got.append(fr)
        drv.post_rx((drv.rx.avail_idx) % 16)
    assert got == sent
    assert np.array_equal(np.frombuffer(b"".join(got), np.uint8), np.frombuffer(b"".join(sent), np.uint8))


# -- the daemon's shortcut for a posted notification (Kernel.mmap_store_fn) ---------------------------------------


@pytest.mark.parametrize("platform", PLATFORMS)
def test_a_notification_stores_shortcut_does_what_the_store_does(platform):
    """The daemon performs a posted store through the shortcut the device
    offers (Kernel.mmap_store_fn: one function per mapping and offset) instead
    of mmap_access()'s layers.  Against mmap_access on the same NIC: the same
    notification, frame and count; memory decoding off (the shortcut declines
    and mmap_access faults), the platform or the device itself not decoding
    (both drop it); and no shortcut where the layers do more than notify."""
    import errno

    from vfiosim.kernel.errors import KernelError
    from vfiosim.kernel.pci.config import PCI_COMMAND, PCI_COMMAND_MEMORY
    m = vfiosim.Machine.from_toml(machine_toml(platform))
    p = m.spawn(uid=0)
    d = client.open_device("1af4:1041", p)
    drv = VirtioNetDriver(d)
    drv.start(rx_buffers=8)
    dev, k, task = nic(m), m.kernel, p.task
    file = task.files.get(d.fd)
    bar4 = V.MODERN_BAR << 40
    txq = bar4 + drv.caps.notify + drv.tx.notify_off * drv.caps.notify_mult
    shortcut = k.mmap_store_fn(file, txq, 2)
    assert shortcut is not None

    def general(value: int) -> bool:
        k.mmap_access(task, file, txq, 2, value)
        return True

    for i, store in enumerate([general, shortcut, general, shortcut]):
        before = dev.notifications
        drv.send(frame(i), notify=False)
        assert store(1) is True
        assert dev.notifications == before + 1 and drv.received() == [frame(i)]
    # The platform (an EEH freeze) or the device's own decoding off: both drop the store.
    for off in ("platform", "device"):
        if off == "platform":
            dev.mmio_enabled_by_platform = lambda: False
        else:
            dev.config.data[PCI_COMMAND] &= ~PCI_COMMAND_MEMORY
        drv.send(frame(9), notify=False)
        before = dev.notifications
        assert general(1) is True and shortcut(1) is True
        assert dev.notifications == before and drv.received() == []
        dev.mmio_enabled_by_platform = lambda: True
        dev.config.data[PCI_COMMAND] |= PCI_COMMAND_MEMORY
        general(1)
        assert drv.received() == [frame(9)]
    # Memory decoding off as the user set it: mmap_access faults; the shortcut declines, changing nothing.
    cmd = drv.cfg.read16(PCI_COMMAND)
    drv.cfg.write16(PCI_COMMAND, cmd & ~PCI_COMMAND_MEMORY)
    before = dev.notifications
    assert shortcut(1) is False and dev.notifications == before
    with pytest.raises(KernelError) as e:
        general(1)
    assert e.value.errno == errno.EIO
    drv.cfg.write16(PCI_COMMAND, cmd)
    # No shortcut: an 8-byte store (two notifications), the rest of BAR4, the MSI-X table, past the BAR.
    assert k.mmap_store_fn(file, txq, 8) is None
    assert k.mmap_store_fn(file, txq, 3) is None
    assert k.mmap_store_fn(file, bar4 + V.COMMON_OFFSET + V.COMMON_STATUS, 1) is None
    assert k.mmap_store_fn(file, bar4 + V.ISR_OFFSET, 4) is None
    assert k.mmap_store_fn(file, bar4 + V.NOTIFY_OFFSET - 2, 4) is None         # starts in the device config
    assert k.mmap_store_fn(file, (V.MSIX_BAR << 40) + 12, 4) is None
    assert k.mmap_store_fn(file, bar4 + V.MODERN_BAR_SIZE - 2, 4) is None
    assert k.mmap_store_fn(p.task.files.get(d.container.fd), 0, 4) is None     # not a device file
    drv.close()
    d.close()
    assert not m.oopses, m.oopses
