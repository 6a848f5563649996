"""The host's MSI and MSI-X for one device (drivers/pci/msi/, Linux 6.12).

What a driver of the device (vfio-pci) calls: pci_alloc_irq_vectors(),
pci_msix_alloc_irq_at() for a vector added while MSI-X is enabled,
request_irq()/free_irq() (which unmask and mask an MSI-X vector),
pci_free_irq_vectors() and, after a reset, pci_restore_msi_state().  The
PCI core programs the device through its own config writes and MSI-X table
stores; a message the device sends reaches the handler requested for its
vector, and one with no handler is masked again by the flow handler.  Also
pci_intx() (drivers/pci/pci.c), which MSI uses to silence INTx.
"""

from __future__ import annotations

from dataclasses import dataclass
from errno import EINVAL, ERANGE
from typing import Callable

from ..errors import fail
from .config import (PCI_CAP_ID_MSI, PCI_CAP_ID_MSIX, PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, PCI_MSI_FLAGS,
                     PCI_MSI_FLAGS_ENABLE, PCI_MSI_FLAGS_QMASK, PCI_MSIX_ENTRY_CTRL_MASKBIT, PCI_MSIX_ENTRY_DATA,
                     PCI_MSIX_ENTRY_LOWER_ADDR, PCI_MSIX_ENTRY_SIZE, PCI_MSIX_ENTRY_UPPER_ADDR,
                     PCI_MSIX_ENTRY_VECTOR_CTRL, PCI_MSIX_FLAGS, PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_MASKALL,
                     PCI_MSIX_FLAGS_QSIZE)
from .device import PciDevice

# The MSI message the simulated host composes for the interrupt of MSI-X vector
# ``v``: the x86 interrupt address window and a per-vector data value.  Real
# hosts compose platform-specific messages (an IRTE handle with interrupt
# remapping, the PHB's MSI window on POWER); userspace can only see them by
# reading the table through an mmap of its BAR, and nothing depends on them.
MSIX_HOST_MSG_ADDRESS = 0xFEE00000
MSIX_HOST_MSG_DATA_BASE = 0x4000


@dataclass
class MsiDesc:
    """``struct msi_desc`` of an allocated MSI-X vector: the message the host
    composed and the vector control word it caches (pci.msix_ctrl)."""

    address: int
    data: int
    ctrl: int


def pci_intx(pdev: PciDevice, enable: bool) -> None:
    """pci_intx(): the Interrupt Disable bit of Command, written by the host."""
    cmd = pdev.config.read(PCI_COMMAND, 2)
    cmd = cmd & ~PCI_COMMAND_INTX_DISABLE if enable else cmd | PCI_COMMAND_INTX_DISABLE
    pdev.host_config_write(PCI_COMMAND, 2, cmd)


def pci_msi_vec_count(pdev: PciDevice) -> int:
    """pci_msi_vec_count(): the vectors the MSI capability can request (0 without one)."""
    msi = pdev.config.find_capability(PCI_CAP_ID_MSI)
    if not msi:
        return 0
    return 1 << ((pdev.config.read(msi + PCI_MSI_FLAGS, 2) & PCI_MSI_FLAGS_QMASK) >> 1)


def pci_msix_vec_count(pdev: PciDevice) -> int:
    """pci_msix_vec_count(): the MSI-X table size (0 without the capability)."""
    msix = pdev.config.find_capability(PCI_CAP_ID_MSIX)
    return (pdev.config.read(msix + PCI_MSIX_FLAGS, 2) & PCI_MSIX_FLAGS_QSIZE) + 1 if msix else 0


class PciMsi:
    """The MSI/MSI-X interrupts the host allocated for one device."""

    def __init__(self, pdev: PciDevice, log: Callable[[str], None]) -> None:
        self.pdev = pdev
        self.log = log
        # Allocated vectors (pci_irq_vector() > 0) and, for MSI-X, their msi_desc.
        self.irqs: dict[int, MsiDesc | None] = {}
        self.handlers: dict[int, Callable[[], None]] = {}       # request_irq()
        self.enabled: str | None = None                          # "msi" or "msix" (dev->msi/msix_enabled)

    # -- allocation -----------------------------------------------------------------------------

    def alloc_irq_vectors(self, min_vecs: int, max_vecs: int, msix: bool) -> int:
        """pci_alloc_irq_vectors(pdev, min, max, PCI_IRQ_MSIX or PCI_IRQ_MSI):
        the number of vectors allocated, or KernelError."""
        p = self.pdev
        if msix:
            # __pci_enable_msix_range()
            if max_vecs < min_vecs:
                raise fail(ERANGE, f"pci_alloc_irq_vectors({min_vecs}, {max_vecs}): no vectors asked for")
            if p.msi_enabled():
                raise fail(EINVAL, f"{p.bdf}: can't enable MSI-X (MSI already enabled)")
            nvec = min(max_vecs, pci_msix_vec_count(p))
            self._msix_capability_init(nvec)
            self.enabled = "msix"
            return nvec
        # __pci_enable_msi_range()
        if p.msix_enabled():
            raise fail(EINVAL, f"{p.bdf}: can't enable MSI (MSI-X already enabled)")
        if max_vecs < min_vecs:
            raise fail(ERANGE, f"pci_alloc_irq_vectors({min_vecs}, {max_vecs}): no vectors asked for")
        msi = p.config.find_capability(PCI_CAP_ID_MSI)
        if not msi:
            raise fail(EINVAL, "the device has no MSI capability")
        nvec = min(max_vecs, pci_msi_vec_count(p))
        self._msi_set_enable(msi, True)
        pci_intx(p, False)                         # pci_intx_for_msi(dev, 0)
        self.irqs = {v: None for v in range(nvec)}
        p.on_msi = self._msi_message
        self.enabled = "msi"
        return nvec

    def _msi_set_enable(self, msi: int, enable: bool) -> None:
        """pci_msi_set_enable()"""
        flags = self.pdev.config.read(msi + PCI_MSI_FLAGS, 2)
        flags = flags | PCI_MSI_FLAGS_ENABLE if enable else flags & ~PCI_MSI_FLAGS_ENABLE
        self.pdev.host_config_write(msi + PCI_MSI_FLAGS, 2, flags)

    def _msix_capability_init(self, nvec: int) -> None:
        """msix_capability_init(): enable with the function masked, set up the
        vectors' messages, mask every table entry, then unmask the function."""
        p = self.pdev
        p.msix_host_set_control(0, PCI_MSIX_FLAGS_ENABLE)
        p.msix_host_set_control(PCI_MSIX_FLAGS_MASKALL | PCI_MSIX_FLAGS_ENABLE)
        p.on_msix = self._msix_message
        for vector in range(nvec):
            self.msix_alloc_irq_at(vector)
        pci_intx(p, False)                         # pci_intx_for_msi(dev, 0)
        assert p.msix is not None
        for vector in range(p.msix.vectors):     # msix_mask_all()
            p.msix_table_write(vector * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL, 4,
                               PCI_MSIX_ENTRY_CTRL_MASKBIT)
        p.msix_host_set_control(0, PCI_MSIX_FLAGS_MASKALL)

    def msix_alloc_irq_at(self, vector: int) -> None:
        """msix_prepare_msi_desc() (the cached control word is read from the
        device) and the message write of the interrupt's activation; also
        pci_msix_alloc_irq_at() for a vector added while MSI-X is enabled."""
        p = self.pdev
        assert p.msix is not None
        self.irqs[vector] = MsiDesc(MSIX_HOST_MSG_ADDRESS, MSIX_HOST_MSG_DATA_BASE + vector, p.msix.ctrl(vector))
        self.write_msg(vector)

    def free_irq_vectors(self, msix: bool) -> None:
        """pci_free_irq_vectors(): pci_msix_shutdown() masks every allocated vector
        and clears MSI-X Enable (pci_msi_shutdown() clears MSI Enable); INTx is
        allowed again (pci_intx_for_msi(dev, 1)).  The table keeps its messages."""
        p = self.pdev
        if msix:
            for vector, desc in self.irqs.items():
                assert desc is not None
                desc.ctrl |= PCI_MSIX_ENTRY_CTRL_MASKBIT
                self._write_ctrl(vector, desc.ctrl)
            p.msix_host_set_control(0, PCI_MSIX_FLAGS_ENABLE)
            p.on_msix = None
        else:
            msi = p.config.find_capability(PCI_CAP_ID_MSI)
            if msi:
                self._msi_set_enable(msi, False)
            p.on_msi = None
        pci_intx(p, True)
        self.irqs = {}
        self.handlers = {}
        self.enabled = None

    # -- the interrupts -------------------------------------------------------------------------

    def request_irq(self, vector: int, handler: Callable[[], None], msix: bool) -> None:
        """request_irq(): the handler is in place before starting the interrupt
        unmasks an MSI-X vector (pci_msix_unmask()), so a message pending in
        the device's PBA reaches it at once."""
        self.handlers[vector] = handler
        desc = self.irqs[vector]
        if msix and desc is not None:
            desc.ctrl &= ~PCI_MSIX_ENTRY_CTRL_MASKBIT
            self._write_ctrl(vector, desc.ctrl)

    def free_irq(self, vector: int, msix: bool) -> None:
        """free_irq(): shutting the interrupt down masks an MSI-X vector (pci_msix_mask())."""
        self.handlers.pop(vector, None)
        desc = self.irqs.get(vector)
        if msix and desc is not None:
            desc.ctrl |= PCI_MSIX_ENTRY_CTRL_MASKBIT
            self._write_ctrl(vector, desc.ctrl)

    def write_msg(self, vector: int) -> None:
        """__pci_write_msi_msg() for MSI-X: the entry is masked while its message changes."""
        desc = self.irqs[vector]
        assert desc is not None
        unmasked = not desc.ctrl & PCI_MSIX_ENTRY_CTRL_MASKBIT
        if unmasked:
            self._write_ctrl(vector, desc.ctrl | PCI_MSIX_ENTRY_CTRL_MASKBIT)
        base = vector * PCI_MSIX_ENTRY_SIZE
        self.pdev.msix_table_write(base + PCI_MSIX_ENTRY_LOWER_ADDR, 4, desc.address & 0xFFFFFFFF)
        self.pdev.msix_table_write(base + PCI_MSIX_ENTRY_UPPER_ADDR, 4, desc.address >> 32)
        self.pdev.msix_table_write(base + PCI_MSIX_ENTRY_DATA, 4, desc.data)
        if unmasked:
            self._write_ctrl(vector, desc.ctrl)

    def _write_ctrl(self, vector: int, ctrl: int) -> None:
        """pci_msix_write_vector_ctrl()"""
        self.pdev.msix_table_write(vector * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL, 4, ctrl)

    def restore_state(self) -> None:
        """pci_restore_msi_state() after a reset: __pci_restore_msi_state() turns
        MSI back on; __pci_restore_msix_state() enables MSI-X with the function
        masked, rewrites every allocated vector's message and control word, then
        unmasks the function.  What the device had pending is lost with the reset."""
        p = self.pdev
        if self.enabled == "msi":
            msi = p.config.find_capability(PCI_CAP_ID_MSI)
            self._msi_set_enable(msi, True)
            pci_intx(p, False)
        elif self.enabled == "msix":
            pci_intx(p, False)
            p.msix_host_set_control(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
            for vector, desc in self.irqs.items():
                assert desc is not None
                self.write_msg(vector)
                self._write_ctrl(vector, desc.ctrl)
            p.msix_host_set_control(0, PCI_MSIX_FLAGS_MASKALL)

    def _msi_message(self, vector: int) -> None:
        """An MSI message from the device: its vector's handler runs."""
        handler = self.handlers.get(vector) if vector in self.irqs else None
        if handler is not None:
            handler()

    def _msix_message(self, address: int, data: int) -> None:
        """An MSI-X message from the device: the host interrupt it names, then its handler."""
        vector = data - MSIX_HOST_MSG_DATA_BASE
        desc = self.irqs.get(vector)
        if address != MSIX_HOST_MSG_ADDRESS or desc is None or desc.data != data:
            self.log(f"vfio-pci {self.pdev.bdf}: MSI-X message {data:#x} to {address:#x} is no "
                     f"interrupt of the host: dropped")
            return
        handler = self.handlers.get(vector)
        if handler is None:
            # An interrupt with no handler (the user unmasked the entry through an
            # mmap of the table): the flow handler masks it again.
            desc.ctrl |= PCI_MSIX_ENTRY_CTRL_MASKBIT
            self._write_ctrl(vector, desc.ctrl)
            return
        handler()
