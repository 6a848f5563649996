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
PCI_CAP_ID_VNDR = 0x09              # vendor specific (virtio's capabilities)
PCI_CAP_ID_EXP = 0x10               # PCI Express
PCI_MSI_FLAGS = 2
PCI_MSI_FLAGS_ENABLE = 0x0001
PCI_MSI_FLAGS_QMASK = 0x000E
PCI_MSI_FLAGS_QSIZE = 0x0070
PCI_MSI_FLAGS_64BIT = 0x0080
PCI_MSI_FLAGS_MASKBIT = 0x0100

# MSI-X (include/uapi/linux/pci_regs.h)
PCI_CAP_ID_MSIX = 0x11
PCI_MSIX_FLAGS = 2                  # Message Control
PCI_MSIX_FLAGS_QSIZE = 0x07FF       # Table Size - 1 (read-only)
PCI_MSIX_FLAGS_MASKALL = 0x4000     # Function Mask
PCI_MSIX_FLAGS_ENABLE = 0x8000      # MSI-X Enable
PCI_MSIX_TABLE = 4                  # Table Offset / Table BIR
PCI_MSIX_TABLE_BIR = 0x00000007
PCI_MSIX_TABLE_OFFSET = 0xFFFFFFF8
PCI_MSIX_PBA = 8                    # PBA Offset / PBA BIR
PCI_MSIX_PBA_BIR = 0x00000007
PCI_MSIX_PBA_OFFSET = 0xFFFFFFF8
PCI_CAP_MSIX_SIZEOF = 12
PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_LOWER_ADDR = 0x0
PCI_MSIX_ENTRY_UPPER_ADDR = 0x4
PCI_MSIX_ENTRY_DATA = 0x8
PCI_MSIX_ENTRY_VECTOR_CTRL = 0xC
PCI_MSIX_ENTRY_CTRL_MASKBIT = 0x00000001
PCI_MSIX_MAX_VECTORS = 2048         # an 11-bit Table Size field

PCI_STD_HEADER_SIZEOF = 64
PCI_CFG_SPACE_SIZE = 256
PCI_CFG_SPACE_EXP_SIZE = 4096       # a PCI Express function's, with extended config space


class ConfigSpace:
    """Config space bytes; writes go through ``wmask`` (writable bits)."""

    def __init__(self, size: int = PCI_CFG_SPACE_SIZE) -> None:
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.cap_lengths: dict[int, int] = {}      # capability offset -> its length in bytes

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
        """Append a capability to the list; returns its offset.

        Without ``at`` it goes after the last capability, DWORD aligned (a
        capability pointer's low two bits are reserved).  With ``at`` it must
        be DWORD aligned, inside the standard capability area (0x40..0xff)
        and overlap no capability already there: a ValueError otherwise."""
        if at is None:
            at = PCI_STD_HEADER_SIZEOF
            for off, n in self.cap_lengths.items():
                at = max(at, (off + n + 3) & ~3)
        else:
            if not isinstance(at, int) or isinstance(at, bool):
                raise ValueError(f"capability offset {at!r} must be an integer")
            if at % 4 or at < PCI_STD_HEADER_SIZEOF:
                raise ValueError(f"capability offset {at:#x} must be DWORD aligned and at least "
                                 f"{PCI_STD_HEADER_SIZEOF:#x} (after the standard header)")
            for off, n in self.cap_lengths.items():
                if at < off + n and off < at + length:
                    raise ValueError(f"a capability at {at:#x} ({length} bytes) would overlap the capability "
                                     f"{self.data[off]:#04x} at {off:#x} ({n} bytes)")
        if at + length > PCI_CFG_SPACE_SIZE:
            raise ValueError(f"a {length}-byte capability at {at:#x} does not fit in the "
                             f"{PCI_CFG_SPACE_SIZE}-byte configuration space")
        self.cap_lengths[at] = length
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
