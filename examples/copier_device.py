"""A user-written device model: a DMA copy engine, and a driver for it.

The device ("copier", PCI 1b36:00f0) copies LEN bytes from bus address SRC
to bus address DST, through the IOMMU, when CMD is written, then raises its
MSI. Unlike edu, which moves at most its 4 KiB buffer, one command copies any
length, so a single transfer can be a bulk DMA. Registers (BAR0, 64-bit):

    0x00 SRC   0x08 DST   0x10 LEN   0x18 CMD (write 1: copy)
    0x20 STATUS (bit 0: the last copy was refused by the IOMMU)
    0x28 DONE (copies completed)

Run it as a program (it builds a machine holding the device, then drives it
through vfiosim.client)::

    python3 examples/copier_device.py

or give it to a machine file through the command line::

    vfiosim topology --device-module examples/copier_device.py --machine examples/copier.toml
"""

from __future__ import annotations

import numpy as np

from vfiosim import devices

COPIER_VENDOR, COPIER_DEVICE = 0x1B36, 0x00F0
SRC, DST, LEN, CMD, STATUS, DONE = 0x00, 0x08, 0x10, 0x18, 0x20, 0x28
STATUS_REFUSED = 0x1


class Copier(devices.PciDevice):
    model = "copier"

    def __init__(self, bdf: str, *, dma_mask: int = (1 << 64) - 1) -> None:
        super().__init__(bdf, vendor=COPIER_VENDOR, device=COPIER_DEVICE, class_code=0x088000, interrupt_pin=1)
        self.dma_mask = dma_mask
        self.add_bar(0, 4096)
        self.add_msi_capability(vectors=1)
        self.finish()
        self.regs = {SRC: 0, DST: 0, LEN: 0, STATUS: 0, DONE: 0}

    def reset(self) -> None:
        super().reset()
        self.regs = dict.fromkeys(self.regs, 0)

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        if bar != 0 or size not in (4, 8) or offset & (size - 1):
            return (1 << (8 * size)) - 1
        base = offset & ~7
        value = self.regs.get(base, 0) >> (8 * (offset - base))
        return value & ((1 << (8 * size)) - 1)

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != 0 or size != 8 or offset & 7:
            return                                       # 64-bit registers only
        if offset in (SRC, DST, LEN):
            self.regs[offset] = value
        elif offset == CMD and value & 1:
            self._copy()

    def _copy(self) -> None:
        n = self.regs[LEN]
        buf = np.empty(n, dtype=np.uint8)
        try:
            # Through the IOMMU: the platform checks every page of both ranges.
            self.bus_master.dma_read_into(self.regs[SRC] & self.dma_mask, buf)
            self.bus_master.dma_write(self.regs[DST] & self.dma_mask, buf)
            self.regs[STATUS] &= ~STATUS_REFUSED
            self.regs[DONE] += 1
        except devices.DmaError as exc:
            self.regs[STATUS] |= STATUS_REFUSED
            self.log(f"copier {self.bdf}: {exc}")
        self.msi_notify(0)


devices.register_model("copier", lambda bdf, *, dma_mask: Copier(bdf, dma_mask=dma_mask), replace=True)

MACHINE = """
[machine]
name = "copier-box"
platform = "powernv"

[[phb]]
index = 0

[[device]]
bdf = "0000:01:00.0"
model = "copier"
phb = 0
pe = 1
iommu_group = 0
"""


def main() -> None:
    import vfiosim
    from vfiosim import client

    machine = vfiosim.Machine.from_toml(MACHINE)
    backend = client.SimBackend(machine, rlimit_memlock=(64 << 20, 64 << 20))
    with client.open_device("1b36:00f0", backend) as dev:
        dev.enable_bus_master()
        irq = dev.irq("msi")
        bar0 = dev.bar(0)
        size = 4 << 20                                        # 4 MiB in one command
        src = dev.container.dma_alloc(size)
        dst = dev.container.dma_alloc(size)
        src.array()[:] = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8)
        bar0.write64(SRC, src.iova)
        bar0.write64(DST, dst.iova)
        bar0.write64(LEN, size)
        bar0.write64(CMD, 1)
        assert irq.wait(timeout=5.0) == 1, "no completion interrupt"
        assert bar0.read64(STATUS) == 0 and bar0.read64(DONE) == 1
        assert np.array_equal(dst.array(), src.array())
        print(f"copied {size >> 20} MiB from iova {src.iova:#x} to {dst.iova:#x} through the IOMMU: verified")
        # An address nothing maps: the IOMMU refuses it and nothing moves.
        # On POWER the refused DMA also freezes the device's PE (EEH): from
        # now on its MMIO reads return all ones until the PE is reset.
        before = dst.array().copy()
        bar0.write64(SRC, dst.iova + size + (1 << 20))
        bar0.write64(CMD, 1)
        assert np.array_equal(dst.array(), before)
        assert bar0.read64(DONE) == (1 << 64) - 1
        print("a copy from an unmapped bus address was refused and froze the PE:")
        for line in machine.dmesg()[-3:]:
            print("   ", line)


if __name__ == "__main__":
    main()
