"""Interrupts of vfio-pci (drivers/vfio/pci/vfio_pci_intrs.c, Linux 6.12).

VFIO_DEVICE_SET_IRQS for each index: INTx (automasked at the device until
unmasked, by ioctl or by an unmask eventfd), MSI and MSI-X (read from the
upstream tree after the 6.5 dynamic MSI-X series; the functions are unchanged
from 6.6 to 6.12), and the device request interrupt.  Interrupts reach the
user by signalling the eventfds it registered.  The host side of MSI (vector
allocation, masking, messages) is the PCI core's: kernel/pci/msi.py.
"""

from __future__ import annotations

from errno import EINVAL, ENODEV, ENOTTY
from typing import TYPE_CHECKING, Callable

from ....uapi import vfio as uapi
from ...errors import KernelError, fail
from ...eventfd import EventFd, eventfd_ctx_fdget
from ...pci.config import PCI_INTERRUPT_PIN
from ...pci.msi import pci_intx
from ..virqfd import virqfd_enable

if TYPE_CHECKING:
    from ...task import Task
    from .vfio_pci_core import VfioPciDevice

IRQ_NONE = -1


SetIrqs = Callable[["VfioPciDevice", "Task", int, int, int, int, bytes], int]


def vfio_pci_set_irqs_ioctl(vdev: "VfioPciDevice", current: "Task", flags: int, index: int, start: int, count: int,
                            data: bytes) -> int:
    """vfio_pci_set_irqs_ioctl(): the handler of an index and action."""
    action = flags & uapi.VFIO_IRQ_SET_ACTION_TYPE_MASK
    func: SetIrqs | None = None
    if index == uapi.VFIO_PCI_INTX_IRQ_INDEX:
        func = {uapi.VFIO_IRQ_SET_ACTION_MASK: vfio_pci_set_intx_mask,
                uapi.VFIO_IRQ_SET_ACTION_UNMASK: vfio_pci_set_intx_unmask,
                uapi.VFIO_IRQ_SET_ACTION_TRIGGER: vfio_pci_set_intx_trigger}.get(action)
    elif index in (uapi.VFIO_PCI_MSI_IRQ_INDEX, uapi.VFIO_PCI_MSIX_IRQ_INDEX):
        if action == uapi.VFIO_IRQ_SET_ACTION_TRIGGER:
            func = vfio_pci_set_msi_trigger
    elif index == uapi.VFIO_PCI_REQ_IRQ_INDEX:
        if action == uapi.VFIO_IRQ_SET_ACTION_TRIGGER:
            func = vfio_pci_set_req_trigger
    if func is None:
        raise fail(ENOTTY, f"VFIO_DEVICE_SET_IRQS: action {action:#x} is not supported for index {index}")
    return func(vdev, current, index, start, count, flags, data)


def _eventfd(current: "Task", fd: int) -> EventFd:
    return eventfd_ctx_fdget(current, fd, "VFIO_DEVICE_SET_IRQS")


def _s32(data: bytes, i: int = 0) -> int:
    return int.from_bytes(data[4 * i:4 * i + 4], "little", signed=True)


def vfio_intx_enable(vdev: "VfioPciDevice", trigger: EventFd | None) -> None:
    if vdev.irq_type != IRQ_NONE:
        raise fail(EINVAL, "another interrupt type is enabled; disable it first")
    vdev.irq_type = uapi.VFIO_PCI_INTX_IRQ_INDEX
    vdev.intx_trigger = trigger
    vdev.intx_masked = False
    vdev.pdev.on_intx = lambda level: vfio_intx_handler(vdev, level)
    if vdev.pdev.intx_level:
        vfio_intx_handler(vdev, 1)


def vfio_intx_disable(vdev: "VfioPciDevice") -> None:
    if vdev.intx_unmask is not None:           # vfio_intx_disable(): vfio_virqfd_disable(&ctx->unmask)
        vdev.intx_unmask.disable()
        vdev.intx_unmask = None
    vdev.pdev.on_intx = None
    vdev.intx_trigger = None
    vdev.intx_masked = False
    pci_intx(vdev.pdev, True)
    vdev.irq_type = IRQ_NONE


def vfio_intx_handler(vdev: "VfioPciDevice", level: int) -> None:
    """vfio_intx_handler(): mask at the device (DisINTx), then signal."""
    if vdev.intx_masked:
        return
    vdev.intx_masked = True
    pci_intx(vdev.pdev, False)
    if vdev.intx_trigger is not None:
        vdev.intx_trigger.signal()


def vfio_pci_intx_unmask(vdev: "VfioPciDevice") -> None:
    if vdev.irq_type != uapi.VFIO_PCI_INTX_IRQ_INDEX or not vdev.intx_masked:
        return
    vdev.intx_masked = False
    pci_intx(vdev.pdev, True)
    if vdev.pdev.intx_level:                # still asserted: fires again
        vfio_intx_handler(vdev, 1)


def vfio_pci_set_intx_trigger(vdev: "VfioPciDevice", current: "Task", index: int, start: int, count: int, flags: int,
                              data: bytes) -> int:
    is_intx = vdev.irq_type == uapi.VFIO_PCI_INTX_IRQ_INDEX
    if is_intx and not count and flags & uapi.VFIO_IRQ_SET_DATA_NONE:
        vfio_intx_disable(vdev)
        return 0
    if not (is_intx or vdev.irq_type == IRQ_NONE) or start != 0 or count != 1:
        raise fail(EINVAL, "VFIO_DEVICE_SET_IRQS: INTx takes start 0, count 1, with no other interrupt enabled")
    if flags & uapi.VFIO_IRQ_SET_DATA_EVENTFD:
        fd = _s32(data)
        trigger = _eventfd(current, fd) if fd >= 0 else None
        if is_intx:
            vdev.intx_trigger = trigger
        else:
            if not vdev.pdev.config.read(PCI_INTERRUPT_PIN, 1):
                raise fail(ENODEV, "the device has no INTx pin")
            vfio_intx_enable(vdev, trigger)
        return 0
    if not is_intx:
        raise fail(EINVAL, "INTx is not enabled")
    if flags & uapi.VFIO_IRQ_SET_DATA_NONE or (flags & uapi.VFIO_IRQ_SET_DATA_BOOL and data[:1] != b"\0"):
        if vdev.intx_trigger is not None:
            vdev.intx_trigger.signal()      # loopback test
    return 0


def vfio_pci_set_intx_mask(vdev: "VfioPciDevice", current: "Task", index: int, start: int, count: int, flags: int,
                           data: bytes) -> int:
    if vdev.irq_type != uapi.VFIO_PCI_INTX_IRQ_INDEX or start != 0 or count != 1:
        raise fail(EINVAL, "VFIO_DEVICE_SET_IRQS: INTx is not enabled, or start/count are not 0/1")
    if flags & uapi.VFIO_IRQ_SET_DATA_NONE or (flags & uapi.VFIO_IRQ_SET_DATA_BOOL and data[:1] != b"\0"):
        if not vdev.intx_masked:
            vdev.intx_masked = True
            pci_intx(vdev.pdev, False)
    elif flags & uapi.VFIO_IRQ_SET_DATA_EVENTFD:
        # vfio_pci_set_intx_mask(): "return -ENOTTY; /* XXX implement me */"
        raise fail(ENOTTY, "VFIO_DEVICE_SET_IRQS: masking INTx through an eventfd is not implemented (Linux neither)")
    return 0


def vfio_pci_set_intx_unmask(vdev: "VfioPciDevice", current: "Task", index: int, start: int, count: int, flags: int,
                             data: bytes) -> int:
    if vdev.irq_type != uapi.VFIO_PCI_INTX_IRQ_INDEX or start != 0 or count != 1:
        raise fail(EINVAL, "VFIO_DEVICE_SET_IRQS: INTx is not enabled, or start/count are not 0/1")
    if flags & uapi.VFIO_IRQ_SET_DATA_NONE or (flags & uapi.VFIO_IRQ_SET_DATA_BOOL and data[:1] != b"\0"):
        vfio_pci_intx_unmask(vdev)
    elif flags & uapi.VFIO_IRQ_SET_DATA_EVENTFD:
        # vfio_pci_set_intx_unmask(): an eventfd that unmasks when signalled; a
        # negative fd unregisters it.
        fd = _s32(data)
        if fd >= 0:
            vdev.intx_unmask = virqfd_enable(current, fd, lambda: vfio_pci_intx_unmask(vdev), vdev.intx_unmask,
                                             "VFIO_DEVICE_SET_IRQS (INTx unmask)")
        elif vdev.intx_unmask is not None:
            vdev.intx_unmask.disable()
            vdev.intx_unmask = None
    return 0


# MSI and MSI-X share vfio_pci_set_msi_trigger() and what it calls.  Below them,
# the host's PCI core (kernel/pci/msi.py) programs the device.

def vfio_pci_set_msi_trigger(vdev: "VfioPciDevice", current: "Task", index: int, start: int, count: int, flags: int,
                             data: bytes) -> int:
    """vfio_pci_set_msi_trigger()"""
    msix = index == uapi.VFIO_PCI_MSIX_IRQ_INDEX
    if vdev.irq_type == index and not count and flags & uapi.VFIO_IRQ_SET_DATA_NONE:
        vfio_msi_disable(vdev, msix)
        return 0
    if not (vdev.irq_type == index or vdev.irq_type == IRQ_NONE):
        raise fail(EINVAL, f"VFIO_DEVICE_SET_IRQS: {irq_name(vdev.irq_type)} is enabled; disable it "
                           f"before using {irq_name(index)}")
    if flags & uapi.VFIO_IRQ_SET_DATA_EVENTFD:
        fds = [_s32(data, i) for i in range(count)]
        if vdev.irq_type == index:
            return vfio_msi_set_block(vdev, current, start, count, fds, msix)
        ret = vfio_msi_enable(vdev, start + count, msix)
        if ret:
            return ret                 # fewer vectors than asked: their number (not an error)
        try:
            vfio_msi_set_block(vdev, current, start, count, fds, msix)
        except KernelError:
            vfio_msi_disable(vdev, msix)
            raise
        return 0
    if vdev.irq_type != index:
        raise fail(EINVAL, f"VFIO_DEVICE_SET_IRQS: {irq_name(index)} is not enabled")
    # DATA_NONE / DATA_BOOL: loopback, to the vectors that have a trigger.
    for i in range(start, start + count):
        trigger = vdev.msi_ctx.get(i)
        if trigger is None:
            continue
        if flags & uapi.VFIO_IRQ_SET_DATA_NONE or (flags & uapi.VFIO_IRQ_SET_DATA_BOOL
                                                   and data[i - start:i - start + 1] != b"\0"):
            trigger.signal()
    return 0


def irq_name(index: int) -> str:
    return {uapi.VFIO_PCI_INTX_IRQ_INDEX: "INTx", uapi.VFIO_PCI_MSI_IRQ_INDEX: "MSI",
            uapi.VFIO_PCI_MSIX_IRQ_INDEX: "MSI-X"}.get(index, f"IRQ index {index}")


def vfio_msi_enable(vdev: "VfioPciDevice", nvec: int, msix: bool) -> int:
    """vfio_msi_enable(): allocate ``nvec`` vectors; 0, or how many the host
    could allocate when fewer (a positive ioctl return, as upstream)."""
    if vdev.irq_type != IRQ_NONE:
        raise fail(EINVAL, "another interrupt type is enabled; disable it first")
    ret = vdev.msi.alloc_irq_vectors(1, nvec, msix)
    if ret < nvec:
        if ret > 0:
            vdev.msi.free_irq_vectors(msix)
        return ret
    vdev.irq_type = uapi.VFIO_PCI_MSIX_IRQ_INDEX if msix else uapi.VFIO_PCI_MSI_IRQ_INDEX
    return 0


def vfio_msi_set_block(vdev: "VfioPciDevice", current: "Task", start: int, count: int, fds: list[int] | None,
                       msix: bool) -> int:
    """vfio_msi_set_block(): on a failure, vectors start..the failed one are
    released (even ones that had a trigger before), and the error returned."""
    j = start
    for i in range(count):
        j = start + i
        try:
            vfio_msi_set_vector_signal(vdev, current, j, fds[i] if fds else -1, msix)
        except KernelError:
            for v in range(start, j + 1):
                vfio_msi_set_vector_signal(vdev, current, v, -1, msix)
            raise
    return 0


def vfio_msi_set_vector_signal(vdev: "VfioPciDevice", current: "Task | None", vector: int, fd: int,
                               msix: bool) -> None:
    """vfio_msi_set_vector_signal()"""
    irq = False
    ctx = vdev.msi_ctx.pop(vector, None)
    if ctx is not None:
        irq = True
        vdev.msi.free_irq(vector, msix)     # the interrupt stays allocated until MSI/MSI-X is disabled
    if fd < 0:
        return
    if not irq:
        vfio_msi_alloc_irq(vdev, vector, msix)
    assert current is not None                 # (only disabling passes no task, with fd -1)
    trigger = _eventfd(current, fd)
    if msix:
        # Refresh the on-device message (get_cached_msi_msg(), pci_write_msi_msg()):
        # it may have been cleared or overwritten since the host wrote it.
        vdev.msi.write_msg(vector)
    # request_irq(): the handler is in place before the vector is unmasked, so
    # a message pending in the device's PBA is delivered to this trigger now.
    vdev.msi_ctx[vector] = trigger
    vdev.msi.request_irq(vector, trigger.signal, msix)


def vfio_msi_alloc_irq(vdev: "VfioPciDevice", vector: int, msix: bool) -> None:
    """vfio_msi_alloc_irq(): the vector's host interrupt, allocated now if
    MSI-X can grow while enabled (pci_msix_alloc_irq_at())."""
    if vector in vdev.msi.irqs:
        return
    if not msix or not vdev.has_dyn_msix:
        # pci_irq_vector(): -EINVAL for a vector that was not allocated at enable
        raise fail(EINVAL, f"VFIO_DEVICE_SET_IRQS: vector {vector} was not allocated when "
                           f"{irq_name(vdev.irq_type)} was enabled, and this host cannot add "
                           f"vectors later (NORESIZE)")
    vdev.msi.msix_alloc_irq_at(vector)


def vfio_msi_disable(vdev: "VfioPciDevice", msix: bool) -> None:
    """vfio_msi_disable()"""
    for vector in sorted(vdev.msi_ctx):
        vfio_msi_set_vector_signal(vdev, None, vector, -1, msix)
    vdev.msi.free_irq_vectors(msix)
    vdev.irq_type = IRQ_NONE


def vfio_pci_set_req_trigger(vdev: "VfioPciDevice", current: "Task", index: int, start: int, count: int, flags: int,
                             data: bytes) -> int:
    """vfio_pci_set_ctx_trigger_single()"""
    if flags & uapi.VFIO_IRQ_SET_DATA_NONE:
        if vdev.req_trigger is not None:
            if count:
                vdev.req_trigger.signal()
            else:
                vdev.req_trigger = None
        return 0
    if flags & uapi.VFIO_IRQ_SET_DATA_BOOL:
        if not count:
            raise fail(EINVAL, "count must be 1")
        if data[:1] != b"\0" and vdev.req_trigger is not None:
            vdev.req_trigger.signal()
        return 0
    if not count:
        raise fail(EINVAL, "count must be 1")
    fd = _s32(data)
    if fd == -1:
        vdev.req_trigger = None
    elif fd >= 0:
        vdev.req_trigger = _eventfd(current, fd)
    return 0


def vfio_pci_disable_irqs(vdev: "VfioPciDevice") -> None:
    """vfio_pci_core_disable(): vfio_pci_set_irqs_ioctl(DATA_NONE | ACTION_TRIGGER,
    irq_type, 0, 0) turns off whatever is enabled."""
    if vdev.irq_type == uapi.VFIO_PCI_INTX_IRQ_INDEX:
        vfio_intx_disable(vdev)
    elif vdev.irq_type == uapi.VFIO_PCI_MSI_IRQ_INDEX:
        vfio_msi_disable(vdev, False)
    elif vdev.irq_type == uapi.VFIO_PCI_MSIX_IRQ_INDEX:
        vfio_msi_disable(vdev, True)
