"""A device model with MSI and MSI-X, for tests/test_msix.py and for
``vfiosim run --device-module tests/msix_device.py``.

"msix-test" (1b36:00f3, an NVMe-like class) has

  BAR0 (16 KiB): registers below 0x2000, the MSI-X table at 0x2000,
                 the Pending Bit Array at 0x3000;
  an MSI capability (1 vector) at 0x40 and an MSI-X capability (6 vectors).

"msix-split" keeps the table in BAR2 and the PBA in BAR0.

Registers (BAR0, 32-bit):
  0x000 ID        reads 0x4d534958 ("MSIX")
  0x100 DOORBELL  write v: raise MSI-X vector v (msix_notify)
  0x104 MSI       write anything: raise MSI vector 0 (msi_notify)
  0x108 BADDMA    write anything: read 4 bytes at bus address 0xdead0000
                  (nothing maps it: the IOMMU refuses, on PowerNV the PE freezes)
  0x1ffc          reads 0x5a5a5a5a (the register right below the table)
"""

from __future__ import annotations

from vfiosim import devices

ID, DOORBELL, MSI, BADDMA, LAST = 0x000, 0x100, 0x104, 0x108, 0x1FFC
IDENT = 0x4D534958
VECTORS = 6
TABLE, PBA = 0x2000, 0x3000


class MsixTest(devices.PciDevice):
    model = "msix-test"

    def __init__(self, bdf: str, *, dma_mask: int = (1 << 64) - 1, split: bool = False) -> None:
        super().__init__(bdf, vendor=0x1B36, device=0x00F3, class_code=0x010802, interrupt_pin=1)
        self.add_bar(0, 0x4000)
        if split:
            self.add_bar(2, 0x1000)
        self.add_msi_capability(vectors=1)
        if split:
            self.add_msix_capability(VECTORS, table_bar=2, table_offset=0, pba_bar=0, pba_offset=PBA)
        else:
            self.add_msix_capability(VECTORS, table_bar=0, table_offset=TABLE, pba_offset=PBA)
        self.finish()
        self.raised: list[int] = []

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1
        if bar != 0 or size != 4:
            return ones
        return {ID: IDENT, LAST: 0x5A5A5A5A}.get(offset, 0)

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != 0 or size != 4:
            return
        if offset == DOORBELL:
            self.raised.append(value)
            self.msix_notify(value)
        elif offset == MSI:
            self.msi_notify(0)
        elif offset == BADDMA:
            try:
                self.bus_master.dma_read(0xDEAD0000, 4)
            except devices.DmaError as exc:
                self.log(f"msix-test {self.bdf}: {exc}")


devices.register_model("msix-test", lambda bdf, *, dma_mask: MsixTest(bdf, dma_mask=dma_mask), replace=True)
devices.register_model("msix-split", lambda bdf, *, dma_mask: MsixTest(bdf, dma_mask=dma_mask, split=True),
                       replace=True)


def machine_toml(platform: str, model: str = "msix-test", behind_bridge: bool = False) -> str:
    """A machine with one such device, in IOMMU group 0 (POWER) or 5 (x86)."""
    bb = "behind_bridge = true\n" if behind_bridge else ""
    if platform == "x86":
        return (f'[machine]\nname = "msix"\nplatform = "x86"\n[iommu]\nmodel = "intel-iommu"\n'
                f'[[device]]\nbdf = "0000:03:00.0"\nmodel = "{model}"\niommu_group = 5\n{bb}')
    return (f'[machine]\nname = "msix"\nplatform = "{platform}"\n[[phb]]\nindex = 0\n'
            f'[[device]]\nbdf = "0000:01:00.0"\nmodel = "{model}"\nphb = 0\npe = 1\niommu_group = 0\n{bb}')
