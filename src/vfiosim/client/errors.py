"""Errors that teach: the kernel's errno, plus the likely cause and the fix.

Every failing system call of the client raises :class:`VfioError`, an
``OSError`` subclass, so ``except OSError`` and ``exc.errno`` keep working.
On top of the errno it names the object and the call that failed and, where
the combination of call and errno has a well-known reason, says what it
probably is and how to fix it, with the numbers that matter (the window
size and RLIMIT_MEMLOCK for a failing VFIO_IOMMU_ENABLE, for example).

Misuse of the client itself (mapping after close, overlapping mappings, a
buffer from another backend) raises :class:`VfioUsageError`, a
``VfioError`` with the errno the nearest kernel check would give.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any, Callable, Mapping

__all__ = ["VfioError", "VfioUsageError", "explain", "format_size"]


class VfioError(OSError):
    """A failed VFIO operation: errno, object, call, likely cause and fix.

    ``errno`` and ``strerror`` are those of the system call; ``obj`` names
    the client object (``Container(/dev/vfio/vfio)``, ``Group(7)``,
    ``Device(0000:01:00.0)``), ``call`` the operation (an ioctl name, or a
    method such as ``map()``); ``detail`` is the kernel's (or the
    simulator's) own message, ``cause`` and ``fix`` the explanation.
    """

    def __init__(self, errno: int, obj: str, call: str, *, detail: str | None = None,
                 cause: str | None = None, fix: str | None = None) -> None:
        super().__init__(errno, os.strerror(errno))
        self.obj = obj
        self.call = call
        self.detail = detail
        self.cause = cause
        self.fix = fix

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno or 0, str(self.errno))
        text = f"{self.obj}: {self.call} failed with {name} ({self.strerror})"
        if self.detail:
            text += f": {self.detail}"
        if self.cause:
            text += f"\n  likely cause: {self.cause}"
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.errno, self.obj, self.call, self.detail, self.cause, self.fix))


def _rebuild(cls: type[VfioError], errno: int, obj: str, call: str, detail: str | None, cause: str | None,
             fix: str | None) -> VfioError:
    return cls(errno, obj, call, detail=detail, cause=cause, fix=fix)


class VfioUsageError(VfioError):
    """The client was used wrongly; nothing was left mapped or locked."""


def format_size(n: int) -> str:
    """``2 GiB (2147483648 bytes)``: a size people read and a number they paste."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit} ({n} bytes)"
    return f"{n} bytes"


_Explainer = Callable[[Mapping[str, Any]], "tuple[str, str] | None"]


def _memlock(what: str) -> _Explainer:
    def explain_memlock(ctx: Mapping[str, Any]) -> tuple[str, str] | None:
        need = ctx.get("lock_bytes")
        limit = ctx.get("memlock_limit")
        locked = ctx.get("locked_bytes")
        pid = ctx.get("pid", "$PID")
        if need is None or limit is None:
            cause = f"{what} must lock memory, and RLIMIT_MEMLOCK" + (
                f" ({format_size(limit)}{f', {format_size(locked)} already locked' if locked else ''})"
                if limit is not None else "") + " is too small"
        else:
            already = f", {format_size(locked)} of it already locked" if locked else ""
            cause = (f"{what} must lock {format_size(need)}, but RLIMIT_MEMLOCK is "
                     f"{format_size(limit)}{already}")
        want = (need or 0) + (locked or 0)
        if need is not None:
            target, kb, amount = f"to at least {want} bytes", str(want // 1024), str(want)
        else:
            target, kb, amount = "", "unlimited", "unlimited"
        fix = (f"raise the locked-memory limit{' ' + target if target else ''} before starting the program "
               f"(`ulimit -l {kb}` in its shell, a `memlock` line in /etc/security/limits.conf, LimitMEMLOCK= in "
               f"its systemd unit, or `prlimit --memlock={amount}:{amount} --pid {pid}` while it runs), or run it "
               f"with CAP_IPC_LOCK (as root)")
        note = ctx.get("memlock_note")
        if note:
            cause += f" ({note})"
        extra = ctx.get("memlock_hint")
        if extra:
            fix += f"; {extra}"
        return cause, fix
    return explain_memlock


def _static(cause: str, fix: str) -> _Explainer:
    def explain_static(ctx: Mapping[str, Any]) -> tuple[str, str] | None:
        return cause.format_map(_Defaults(ctx)), fix.format_map(_Defaults(ctx))
    return explain_static


class _Defaults(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "?"


_BIND = ("bind every device of the group to vfio-pci: for each BDF, `echo vfio-pci > "
         "/sys/bus/pci/devices/BDF/driver_override; echo BDF > /sys/bus/pci/devices/BDF/driver/unbind; "
         "echo BDF > /sys/bus/pci/drivers_probe`")

# (call, errno) -> explanation.  ``call`` is the client's name for the step.
_TABLE: dict[tuple[str, int], _Explainer] = {
    ("open container", _errno.ENOENT): _static(
        "there is no /dev/vfio/vfio: the vfio module is not loaded, or this is not a VFIO host",
        "`modprobe vfio-pci` (it loads vfio and the IOMMU backend), or run on the simulator "
        "with VFIOSIM_BACKEND=sim"),
    ("open container", _errno.EACCES): _static(
        "/dev/vfio/vfio is not accessible to this user", "check its mode (normally 0666) or run as root"),
    ("open group", _errno.ENOENT): _static(
        "/dev/vfio/{group} does not exist: IOMMU group {group} is unknown or none of its devices is bound to "
        "vfio-pci", _BIND),
    ("open group", _errno.EACCES): _static(
        "/dev/vfio/{group} belongs to root (mode 0600 by default)",
        "`chown $USER /dev/vfio/{group}` (or a udev rule), or run as root"),
    ("open group", _errno.EBUSY): _static(
        "group {group} is already open: a group has one open file at a time (another program, e.g. QEMU, "
        "or another Container of this one has it)", "close the other user of /dev/vfio/{group}"),
    ("VFIO_GROUP_SET_CONTAINER", _errno.EPERM): _static(
        "group {group} is not viable: a device in it is still bound to a host driver ({devices})", _BIND),
    ("VFIO_GROUP_SET_CONTAINER", _errno.EBUSY): _static(
        "the container's IOMMU takes no more groups (a sPAPR v1 container takes exactly one)",
        "use one Container per group, or the sPAPR v2 IOMMU (iommu='spapr-v2'), which shares windows"),
    ("VFIO_SET_IOMMU", _errno.ENODEV): _static(
        "no IOMMU driver of this kernel supports IOMMU type {iommu}",
        "load the backend (`modprobe vfio_iommu_type1` on x86/arm, `vfio_iommu_spapr_tce` on POWER) or "
        "leave iommu=None so the client picks one the kernel offers"),
    ("VFIO_SET_IOMMU", _errno.EPERM): _static(
        "the IOMMU cannot isolate the devices' MSIs (no interrupt remapping), so vfio_iommu_type1 refuses the group",
        "enable interrupt remapping (firmware, intremap=on), or accept the risk with `modprobe vfio_iommu_type1 "
        "allow_unsafe_interrupts=1`"),
    ("VFIO_SET_IOMMU", _errno.EBUSY): _static(
        "the IOMMU type takes only one group per container (sPAPR v1)",
        "use one Container per group, or the sPAPR v2 IOMMU (iommu='spapr-v2')"),
    ("VFIO_IOMMU_ENABLE", _errno.ENOMEM): _memlock("VFIO_IOMMU_ENABLE (sPAPR v1) charges the whole DMA window and"),
    ("VFIO_IOMMU_ENABLE", _errno.EPERM): _memlock("VFIO_IOMMU_ENABLE (sPAPR v1) charges the whole DMA window and"),
    ("VFIO_IOMMU_SPAPR_REGISTER_MEMORY", _errno.ENOMEM): _memlock("preregistering the buffer (sPAPR v2)"),
    ("VFIO_IOMMU_SPAPR_TCE_CREATE", _errno.ENOMEM): _memlock("creating the DMA window's TCE table"),
    ("VFIO_IOMMU_MAP_DMA", _errno.ENOMEM): _memlock("VFIO_IOMMU_MAP_DMA pins the buffer and"),
    ("VFIO_IOMMU_MAP_DMA", _errno.EPERM): _static(
        "the container is not enabled, or the buffer's pages are smaller than the IOMMU page of the window",
        "let the client set the container up (auto=True), or call enable() / register the memory first; for "
        "windows with large IOMMU pages allocate the buffer with page_size= (huge pages)"),
    ("VFIO_IOMMU_MAP_DMA", _errno.ENXIO): _static(
        "IOVA {iova} is in no DMA window of the container ({windows})",
        "map inside a window (leave iova=None so the client allocates one) or create a window first"),
    ("VFIO_IOMMU_MAP_DMA", _errno.EEXIST): _static(
        "IOVA range {iova}+{size} overlaps an existing mapping", "unmap it first or choose another IOVA"),
    ("VFIO_IOMMU_MAP_DMA", _errno.ENOSPC): _static(
        "the container has as many mappings as vfio_iommu_type1's dma_entry_limit allows",
        "map fewer, larger buffers, or raise the module parameter dma_entry_limit"),
    ("VFIO_IOMMU_MAP_DMA", _errno.EFAULT): _static(
        "the buffer is not mapped (or not writable) in this process", "map memory the process owns"),
    ("open iommufd", _errno.ENOENT): _static(
        "there is no /dev/iommu: the kernel is built without CONFIG_IOMMUFD (Debian's 6.12 is), or the iommufd "
        "module is not loaded",
        "`modprobe iommufd`, or use the VFIO container: iommu=None (automatic) or a VFIO type ('type1v2')"),
    ("open iommufd", _errno.EACCES): _static(
        "/dev/iommu is not accessible to this user (root's, mode 0660, by default)",
        "a udev rule giving the user /dev/iommu (and /dev/vfio/devices/vfioN), or run as root"),
    ("VFIO_DEVICE_BIND_IOMMUFD", _errno.EPERM): _static(
        "the IOMMU cannot isolate the device's MSIs (no interrupt remapping), so iommufd refuses to bind it",
        "enable interrupt remapping (firmware, intremap=on), or accept the risk with `modprobe iommufd "
        "allow_unsafe_interrupts=1`"),
    ("VFIO_DEVICE_BIND_IOMMUFD", _errno.EBUSY): _static(
        "group {group} is open through /dev/vfio/{group} (by this program or another): a device is used through "
        "its group or through its cdev, not both", "close the group (or open the device through it)"),
    ("VFIO_DEVICE_BIND_IOMMUFD", _errno.EOPNOTSUPP): _static(
        "the device's IOMMU driver gives iommufd no paging domain (POWER's sPAPR TCE IOMMU in Linux 6.12)",
        "use /dev/vfio/vfio with the sPAPR IOMMU (iommu=None or 'spapr-v2')"),
    ("VFIO_DEVICE_BIND_IOMMUFD", _errno.EINVAL): _static(
        "the device's IOMMU cannot do cache-coherent DMA, which iommufd requires",
        "use /dev/vfio/vfio (iommu='type1v2')"),
    ("VFIO_DEVICE_ATTACH_IOMMUFD_PT", _errno.EADDRINUSE): _static(
        "a mapping of the IOAS lies in a region the device's IOMMU reserves (the MSI window 0xfee00000-0xfeefffff "
        "on x86)", "unmap it and map elsewhere (leave iova=None), or attach devices before mapping"),
    ("IOMMU_IOAS_MAP", _errno.ENOMEM): _memlock("IOMMU_IOAS_MAP pins the buffer for the attached devices and"),
    ("IOMMU_IOAS_MAP", _errno.EEXIST): _static(
        "IOVA range {iova}+{size} overlaps an existing mapping of the IOAS", "unmap it first or choose another IOVA"),
    ("IOMMU_IOAS_MAP", _errno.EINVAL): _static(
        "IOVA {iova}+{size} is not usable in the IOAS: not aligned to its IOVA alignment, or in a region an "
        "attached device's IOMMU reserves (usable: {windows})",
        "map inside a range, aligned (leave iova=None so the client allocates one)"),
    ("IOMMU_IOAS_MAP", _errno.EFAULT): _static(
        "the buffer is not mapped (or not writable) in this process", "map memory the process owns"),
    ("VFIO_GROUP_GET_DEVICE_FD", _errno.ENODEV): _static(
        "group {group} has no device {name!r}; it has: {devices}", "use one of those names (the PCI address)"),
    ("VFIO_GROUP_GET_DEVICE_FD", _errno.EBUSY): _static(
        "the device is already open", "close the other device handle first"),
    ("VFIO_DEVICE_RESET", _errno.EINVAL): _static(
        "the device has no reset method (no FLR, no PM reset, and not alone behind a bridge)",
        "reset it another way (a hot reset of its bus) or do without"),
    ("pread", _errno.EIO): _static(
        "the device does not answer: memory decoding is off in its COMMAND register, or it is frozen by EEH",
        "enable memory decoding (Device.enable_bus_master() sets MEMORY and MASTER) or recover the PE"),
    ("pwrite", _errno.EIO): _static(
        "the device does not answer: memory decoding is off in its COMMAND register, or it is frozen by EEH",
        "enable memory decoding (Device.enable_bus_master() sets MEMORY and MASTER) or recover the PE"),
    ("VFIO_DEVICE_SET_IRQS", _errno.EINVAL): _static(
        "another interrupt type is enabled on the device, or the vectors exceed what it has ({count})",
        "close the other Irq objects (which disables that type) first, and ask for at most {count} vectors"),
}


def explain(call: str, errno: int, ctx: Mapping[str, Any] | None = None) -> tuple[str | None, str | None]:
    """(likely cause, fix) for ``call`` failing with ``errno``, or (None, None)."""
    entry = _TABLE.get((call, errno))
    if entry is None:
        return None, None
    result = entry(ctx or {})
    return result if result is not None else (None, None)
