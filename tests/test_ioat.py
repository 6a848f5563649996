"""The Intel I/OAT DMA engine model (src/vfiosim/kernel/pci/ioat.py), driven through
vfiosim.client as the kernel's VFIO selftests drive it (tools/testing/selftests/vfio/
lib/drivers/ioat/ioat.c): channel reset, one descriptor at CHAINADDR, DMACOUNT, CHANSTS
polled, MSI-X vector 0 for a descriptor with int_en."""

from __future__ import annotations

import struct

import pytest

import vfiosim
from vfiosim import client
from vfiosim.kernel.pci import ioat as I

BDF = "0000:00:04.0"
CH = I.CHANNEL_BASE


def desc(size: int, src: int, dst: int, nxt: int, ctl: int = 0) -> bytes:
    return struct.pack("<IIQQQ", size, ctl, src, dst, nxt) + bytes(32)


class Rig:
    """A userspace IOAT driver: what the selftests' ioat.c does, in Python."""

    def __init__(self, m: vfiosim.Machine) -> None:
        self.m = m
        self.dev = client.open_device("8086:2021", m.spawn(uid=0))
        self.bar = self.dev.bar(0)
        self.cfg = self.dev.config
        self.mem = self.dev.container.dma_alloc(1 << 20)       # descriptors at 0, data from 64 KiB
        self.cfg.write16(0x04, 0x0406)                         # MEMORY | MASTER | INTX_DISABLE
        self.channel_reset()
        self.bar.write8(I.INTRCTRL, I.INTRCTRL_MSIX_VECTOR_CONTROL)
        self.irq = self.dev.enable_irqs("msix", 1)[0]

    @property
    def model(self) -> I.IoatDevice:
        d = self.m.device(BDF)
        assert isinstance(d, I.IoatDevice)
        return d

    def iova(self, off: int) -> int:
        return self.mem.iova + off

    def status(self) -> int:
        return self.bar.read64(CH + I.CHANSTS)

    def channel_reset(self) -> None:
        self.bar.write8(CH + I.CHANCMD, I.CHANCMD_RESET)
        assert not self.bar.read8(CH + I.CHANCMD) & I.CHANCMD_RESET
        assert self.status() & 7 == I.CHANSTS_HALTED

    def start(self, chain: int, count: int, ctrl: int = I.CHANCTRL_INT_REARM | I.CHANCTRL_ANY_ERR_ABORT_EN) -> None:
        self.bar.write64(CH + I.CHAINADDR, chain)
        self.bar.write16(CH + I.CHANCTRL, ctrl)
        self.bar.write16(CH + I.DMACOUNT, count)

    def close(self) -> None:
        self.irq.close()
        self.mem.close()
        self.dev.close()


@pytest.fixture
def rig():
    r = Rig(vfiosim.Machine.preset("x86-ioat"))
    yield r
    r.close()
    assert not r.m.oopses, r.m.oopses


def test_identity_registers_and_capabilities(rig):
    """What ioat_probe()/ioat_init() read: 8086:2021, CBVER 3.3, one channel, XFERCAP; one
    MSI-X vector in BAR0; a PCI Express function with 4 KiB of config space."""
    cfg = rig.cfg
    assert (cfg.read16(0), cfg.read16(2), cfg.read32(8) >> 8) == (0x8086, 0x2021, 0x088000)
    assert (rig.bar.read8(I.CBVER), rig.bar.read8(I.CHANCNT), rig.bar.read8(I.XFERCAP)) == (0x33, 1, 20)
    assert rig.dev.irq_info("msix").count == 1
    assert rig.dev.bar(0).size == 0x4000
    assert rig.cfg.size == 4096
    assert rig.bar.read16(CH + I.DMA_COMP) == I.DMA_COMP_V2


def test_a_copy_through_the_iommu_completes_without_an_interrupt(rig):
    src, dst = rig.iova(0x10000), rig.iova(0x20000)
    rig.mem.write(0x10000, bytes(range(256)) * 16)
    rig.mem.write(0x20000, b"y" * 4096)
    rig.mem.write(0, desc(4096, src, dst, rig.iova(0)))
    rig.start(rig.iova(0), 1)
    assert rig.status() == rig.iova(0) | I.CHANSTS_DONE
    assert rig.mem.read(0x20000, 4096) == bytes(range(256)) * 16
    assert rig.irq.wait(0) == 0
    # memcpy_wait() then suspends the channel.
    rig.bar.write8(CH + I.CHANCMD, I.CHANCMD_SUSPEND)
    assert rig.status() & 7 == I.CHANSTS_SUSPENDED
    # A new chain from the suspended channel: CHAINADDR restarts the count, DMACOUNT 1 runs one more.
    rig.mem.write(0x30000, b"z" * 16)
    rig.mem.write(0x40, desc(16, rig.iova(0x30000), dst, rig.iova(0x40)))
    rig.start(rig.iova(0x40), 1)
    assert rig.status() == rig.iova(0x40) | I.CHANSTS_DONE
    assert rig.mem.read(0x20000, 17) == b"z" * 16 + bytes([16])


def test_a_chain_of_descriptors_runs_in_order_and_writes_completions(rig):
    """Three linked descriptors, each overwriting part of the last's data; CHANCMP gets the
    status (completed descriptor address | state) of those with compl_write."""
    cmp = 0x8000
    rig.bar.write64(CH + I.CHANCMP, rig.iova(cmp))
    for i in range(3):
        rig.mem.write(0x10000 + 0x1000 * i, bytes([0x41 + i]) * (64 - 16 * i))
        rig.mem.write(64 * i, desc(64 - 16 * i, rig.iova(0x10000 + 0x1000 * i), rig.iova(0x20000),
                                   rig.iova(64 * (i + 1)), ctl=I.CTL_COMPL_WRITE if i != 2 else 0))
    rig.start(rig.iova(0), 3)
    assert rig.mem.read(0x20000, 64) == b"C" * 32 + b"B" * 16 + b"A" * 16
    assert rig.status() == rig.iova(128) | I.CHANSTS_DONE
    # The second descriptor wrote the last completion (the third has no compl_write): ACTIVE then.
    assert struct.unpack("<Q", rig.mem.read(cmp, 8))[0] == rig.iova(64) | I.CHANSTS_ACTIVE
    assert rig.bar.read64(CH + I.CDAR) == rig.iova(128)
    # DMACOUNT counts on: two more descriptors run from where the chain stopped.
    for i in (3, 4):
        rig.mem.write(64 * i, desc(8, rig.iova(0x10000), rig.iova(0x28000 + 8 * i), rig.iova(64 * (i + 1)),
                                   ctl=I.CTL_COMPL_WRITE))
    rig.bar.write16(CH + I.DMACOUNT, 5)
    assert rig.mem.read(0x28000 + 24, 16) == b"A" * 16
    assert struct.unpack("<Q", rig.mem.read(cmp, 8))[0] == rig.iova(256) | I.CHANSTS_DONE
    assert rig.model.descriptors_completed == 5


def test_int_en_raises_msix_once_per_rearm(rig):
    """send_msi(): a descriptor with int_en raises vector 0; without a new INT_REARM in
    CHANCTRL the next does not (ioat_cleanup_event() rearms)."""
    rig.mem.write(0x10000, b"12345678")
    rig.mem.write(0, desc(8, rig.iova(0x10000), rig.iova(0x20000), rig.iova(0), ctl=I.CTL_INT_EN))
    rig.start(rig.iova(0), 1)
    assert rig.irq.wait(0) == 1
    rig.start(rig.iova(0), 1, ctrl=I.CHANCTRL_ANY_ERR_ABORT_EN)
    assert rig.irq.wait(0) == 0
    rig.start(rig.iova(0), 1)
    assert rig.irq.wait(0) == 1
    assert rig.mem.read(0x20000, 8) == b"12345678"


def test_a_self_linked_descriptor_run_many_times(rig):
    """memcpy_storm: one descriptor linked to itself, DMACOUNT 65535: the channel
    completes 65535 copies, the data is the source's, one interrupt at most."""
    rig.mem.write(0x10000, bytes(range(256)) * 256)
    rig.bar.write64(CH + I.CHANCMP, rig.iova(0x8000))
    rig.mem.write(0, desc(0x10000, rig.iova(0x10000), rig.iova(0x40000), rig.iova(0),
                          ctl=I.CTL_INT_EN | I.CTL_COMPL_WRITE))
    rig.start(rig.iova(0), 65535)
    assert rig.status() == rig.iova(0) | I.CHANSTS_DONE
    assert rig.model.descriptors_completed == 65535
    assert rig.mem.read(0x40000, 0x10000) == bytes(range(256)) * 256
    assert struct.unpack("<Q", rig.mem.read(0x8000, 8))[0] == rig.iova(0) | I.CHANSTS_DONE
    assert rig.irq.wait(0) == 1


def test_a_self_linked_descriptor_whose_copy_feeds_itself_is_run_each_time(rig):
    """Where a run's writes change what the next reads (dst overlaps src), every run is done:
    the byte pattern slides one byte per run."""
    rig.mem.write(0x10000, b"a" + bytes(15))
    rig.mem.write(0, desc(15, rig.iova(0x10000), rig.iova(0x10001), rig.iova(0)))
    rig.start(rig.iova(0), 4)
    assert rig.mem.read(0x10000, 16) == b"a" * 5 + bytes(11)


@pytest.mark.parametrize("bad", ["src", "dst", "desc"])
def test_an_unmapped_iova_faults_in_the_iommu_and_halts_the_channel(rig, bad):
    """memcpy_from/to_unmapped_iova: the IOMMU refuses the DMA (a DMAR fault), nothing moves,
    the channel halts with CHANERR (and CHANERR_INT in config space) naming the cause and
    raises no interrupt; ioat_reset() (clear errors, CHANCMD RESET) brings it back."""
    unmapped = rig.mem.iova + (64 << 20)
    rig.mem.write(0x10000, b"x" * 64)
    rig.mem.write(0x20000, b"y" * 64)
    src = unmapped if bad == "src" else rig.iova(0x10000)
    dst = unmapped if bad == "dst" else rig.iova(0x20000)
    rig.mem.write(0, desc(64, src, dst, rig.iova(0), ctl=I.CTL_INT_EN))
    rig.start(unmapped if bad == "desc" else rig.iova(0), 1)
    assert rig.status() & 7 == I.CHANSTS_HALTED
    want = {"src": I.CHANERR_READ_DATA_ERR, "dst": I.CHANERR_WRITE_DATA_ERR,
            "desc": I.CHANERR_CHAIN_ADDR_VALUE_ERR}[bad]
    assert rig.bar.read32(CH + I.CHANERR) == want
    assert rig.cfg.read32(I.PCI_CHANERR_INT) == want
    assert rig.mem.read(0x20000, 64) == b"y" * 64
    assert rig.irq.wait(0) == 0
    assert rig.m.iommu_units[0].faults
    assert any(f"{unmapped:#x}" in line for line in rig.m.dmesg() if "ioat" in line)
    # A halted channel takes no work until its errors are cleared.
    rig.start(rig.iova(0x40), 1)
    assert rig.status() & 7 == I.CHANSTS_HALTED
    # ioat_clear_errors(): write 1s back to clear, in config space and in the channel.
    rig.cfg.write32(I.PCI_CHANERR_INT, rig.cfg.read32(I.PCI_CHANERR_INT))
    assert rig.cfg.read32(I.PCI_CHANERR_INT) == 0
    rig.bar.write32(CH + I.CHANERR, rig.bar.read32(CH + I.CHANERR))
    assert rig.bar.read32(CH + I.CHANERR) == 0
    rig.channel_reset()
    rig.mem.write(0, desc(64, rig.iova(0x10000), rig.iova(0x20000), rig.iova(0)))
    rig.start(rig.iova(0), 1)
    assert rig.status() & 7 == I.CHANSTS_DONE
    assert rig.mem.read(0x20000, 64) == b"x" * 64


def test_errors_can_write_a_completion_and_interrupt(rig):
    """ERR_COMPLETION_EN writes the halted status to CHANCMP; ERR_INT_EN raises the vector."""
    rig.bar.write64(CH + I.CHANCMP, rig.iova(0x8000))
    rig.mem.write(0, desc(64, rig.mem.iova + (64 << 20), rig.iova(0x20000), rig.iova(0)))
    rig.start(rig.iova(0), 1, ctrl=I.CHANCTRL_INT_REARM | I.CHANCTRL_ERR_INT_EN | I.CHANCTRL_ERR_COMPLETION_EN
              | I.CHANCTRL_ANY_ERR_ABORT_EN)      # IOAT_CHANCTRL_RUN, as the upstream driver writes
    assert struct.unpack("<Q", rig.mem.read(0x8000, 8))[0] & 7 == I.CHANSTS_HALTED
    assert rig.irq.wait(0) == 1


def test_bad_descriptors_halt_with_their_cause(rig):
    xfercap = 1 << rig.bar.read8(I.XFERCAP)
    cases = [(desc(xfercap + 1, rig.iova(0x10000), rig.iova(0x20000), rig.iova(0)), 0, I.CHANERR_LENGTH_ERR),
             (desc(8, rig.iova(0x10000), rig.iova(0x20000), rig.iova(0), ctl=0x87 << 24), 0, I.CHANERR_CONTROL_ERR),
             (desc(8, rig.iova(0x10000), rig.iova(0x20000), rig.iova(0)), 0x20, I.CHANERR_NEXT_DESC_ALIGN_ERR)]
    for raw, at, err in cases:
        rig.channel_reset()
        rig.mem.write(0, raw)
        rig.start(rig.iova(at), 1)
        assert rig.bar.read32(CH + I.CHANERR) == err
        rig.bar.write32(CH + I.CHANERR, err)


def test_reset_returns_the_channel_to_halted_with_nothing_pending(rig):
    rig.mem.write(0, desc(8, rig.iova(0x10000), rig.iova(0x20000), rig.iova(0)))
    rig.bar.write64(CH + I.CHANCMP, rig.iova(0x8000))
    rig.start(rig.iova(0), 1)
    assert rig.status() & 7 == I.CHANSTS_DONE
    rig.channel_reset()
    assert (rig.bar.read64(CH + I.CHAINADDR), rig.bar.read64(CH + I.CHANCMP), rig.bar.read16(CH + I.DMACOUNT)) \
        == (0, 0, 0)
    # The device's own reset (a function-level reset) does the same and clears INTRCTRL.
    rig.model.reset()
    assert rig.model.intrctrl == 0 and rig.model.chansts == I.CHANSTS_HALTED


def test_unassigned_config_space_is_raw_read_write_through_vfio_pci(rig):
    """vfio-pci's unassigned_perms: bytes outside every capability, the extended space
    included, reach the device (IOAT's CHANERRMASK_INT at 0x184 keeps what is written)."""
    rig.cfg.write32(I.PCI_CHANERRMASK_INT, 0x1234)
    assert rig.cfg.read32(I.PCI_CHANERRMASK_INT) == 0x1234
    assert rig.model.config.read(I.PCI_CHANERRMASK_INT, 4) == 0x1234
