"""PCI configuration space: a byte array with per-byte write and clear masks."""

from __future__ import annotations

# Standard type 0 header offsets (include/uapi/linux/pci_regs.h).
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CLASS_DEVICE = 0x0A
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_INTX_DISABLE = 0x400

PCI_STATUS_INTERRUPT = 0x08
PCI_STATUS_CAP_LIST = 0x10

PCI_BASE_ADDRESS_SPACE_IO = 0x1
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x8

PCI_CAP_ID_MSI = 0x05
PCI_MSI_FLAGS = 2
PCI_MSI_FLAGS_ENABLE = 0x0001
PCI_MSI_FLAGS_QMASK = 0x000E
PCI_MSI_FLAGS_QSIZE = 0x0070
PCI_MSI_FLAGS_64BIT = 0x0080
PCI_MSI_FLAGS_MASKBIT = 0x0100

PCI_CFG_SPACE_SIZE = 256


class ConfigSpace:
    """Config space bytes; writes go through ``wmask`` (writable bits)."""

    def __init__(self, size: int = PCI_CFG_SPACE_SIZE) -> None:
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)

    def read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > self.size:
            return (1 << (8 * size)) - 1
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > self.size:
            return
        for i in range(size):
            b = (value >> (8 * i)) & 0xFF
            m = self.wmask[offset + i]
            self.data[offset + i] = (self.data[offset + i] & ~m & 0xFF) | (b & m)

    def set(self, offset: int, size: int, value: int, wmask: int = 0) -> None:
        """Initialise a field (bypassing the write mask) and its writable bits."""
        self.data[offset:offset + size] = value.to_bytes(size, "little")
        self.wmask[offset:offset + size] = wmask.to_bytes(size, "little")

    def add_capability(self, cap_id: int, length: int, at: int | None = None) -> int:
        """Append a capability to the list; returns its offset."""
        if at is None:
            at = 0x40
            cur = self.data[PCI_CAPABILITY_LIST]
            while cur:
                at = max(at, cur + 8)
                cur = self.data[cur + 1]
        self.data[at] = cap_id
        self.data[at + 1] = 0
        # Link it at the end of the chain.
        if not self.data[PCI_CAPABILITY_LIST]:
            self.data[PCI_CAPABILITY_LIST] = at
        else:
            cur = self.data[PCI_CAPABILITY_LIST]
            while self.data[cur + 1]:
                cur = self.data[cur + 1]
            self.data[cur + 1] = at
        status = self.read(PCI_STATUS, 2) | PCI_STATUS_CAP_LIST
        self.data[PCI_STATUS:PCI_STATUS + 2] = status.to_bytes(2, "little")
        return at

    def find_capability(self, cap_id: int) -> int:
        cur = self.data[PCI_CAPABILITY_LIST]
        seen = 0
        while cur and seen < 48:
            if self.data[cur] == cap_id:
                return cur
            cur = self.data[cur + 1]
            seen += 1
        return 0
