"""The IOMMU API: domains, groups and DMA ownership (drivers/iommu/iommu.c,
include/linux/iommu.h, as of Linux 6.12).

An *IOMMU domain* (:class:`IommuDomain`, ``struct iommu_domain`` with its
``iommu_domain_ops``) is a translation context: identity, blocking, the
platform's own (POWER), or a paging domain, an IO page table that users
fill with :func:`iommu_map` and :func:`iommu_unmap`.  An *IOMMU driver*
(:class:`IommuOps`, ``struct iommu_ops`` of one ``struct iommu_device``: a
VT-d unit, POWER's sPAPR TCE glue) allocates domains for the devices it
translates.

An *IOMMU group* (:class:`IommuGroup`) is the unit of isolation: every
device in it is attached to the same domain at once.  It starts in its
default domain (the host kernel's DMA); a user that claims its DMA
ownership (VFIO) moves it to the blocking domain, and from there may
attach a domain of its own.  ``iommu_data`` is the platform's opaque
per-group data (``iommu_group_get_iommudata()``: POWER's table group).

Consumers (the Type1 VFIO driver, iommufd) use only the functions of this
module and the :class:`IommuDomain` interface: a new IOMMU driver plugs in
by implementing :class:`IommuOps` and :class:`IommuDomain`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from errno import EBUSY, EINVAL, ENODEV, EOPNOTSUPP, EPERM
from typing import TYPE_CHECKING

from ..errors import KernelBug, KernelError, fail

if TYPE_CHECKING:
    from ..pci.device import PciDevice

# IOMMU_* protection flags (include/linux/iommu.h).
IOMMU_READ = 1 << 0
IOMMU_WRITE = 1 << 1
IOMMU_CACHE = 1 << 2

# enum iommu_cap (include/linux/iommu.h)
IOMMU_CAP_CACHE_COHERENCY = 0
IOMMU_CAP_NOEXEC = 1
IOMMU_CAP_PRE_BOOT_PROTECTION = 2
IOMMU_CAP_ENFORCE_CACHE_COHERENCY = 3
IOMMU_CAP_DEFERRED_FLUSH = 4
IOMMU_CAP_DIRTY_TRACKING = 5

# read_and_clear_dirty() flags (include/linux/iommu.h)
IOMMU_DIRTY_NO_CLEAR = 1 << 0

# Domain types (include/linux/iommu.h: IOMMU_DOMAIN_*), by name.
IOMMU_DOMAIN_BLOCKED = "blocked"
IOMMU_DOMAIN_IDENTITY = "identity"
IOMMU_DOMAIN_PAGING = "paging"          # IOMMU_DOMAIN_UNMANAGED: a page table a user fills
IOMMU_DOMAIN_PLATFORM = "platform"      # the platform's own DMA (POWER's TCE windows)

# enum iommu_resv_type (include/linux/iommu.h).
IOMMU_RESV_DIRECT = 0
IOMMU_RESV_DIRECT_RELAXABLE = 1
IOMMU_RESV_RESERVED = 2
IOMMU_RESV_MSI = 3
IOMMU_RESV_SW_MSI = 4
RESV_TYPE_NAMES = {"direct": IOMMU_RESV_DIRECT, "direct-relaxable": IOMMU_RESV_DIRECT_RELAXABLE,
                   "reserved": IOMMU_RESV_RESERVED, "msi": IOMMU_RESV_MSI, "sw-msi": IOMMU_RESV_SW_MSI}
RESV_TYPE_BY_NUMBER = {v: k for k, v in RESV_TYPE_NAMES.items()}


@dataclass(frozen=True)
class ResvRegion:
    """``struct iommu_resv_region``: a range no IOVA may use."""

    start: int
    length: int
    type: int

    @property
    def end(self) -> int:
        return self.start + self.length - 1

    @property
    def type_name(self) -> str:
        return RESV_TYPE_BY_NUMBER.get(self.type, str(self.type))


@dataclass(frozen=True)
class DirtyRange:
    """A dirty IOPTE as the driver records it (iommu_dirty_bitmap_record()):
    [iova, iova+length), length the PTE's size."""

    iova: int
    length: int


class IommuDomain(ABC):
    """``struct iommu_domain`` and its ``iommu_domain_ops``.

    Every domain can be attached to a device.  A paging domain also maps:
    ``map_pages``, ``unmap_pages`` and ``iova_to_phys`` work on its IO page
    table, within ``aperture_start``..``aperture_end`` (``domain->geometry``)
    in the sizes of ``pgsize_bitmap``.  Dirty tracking (``iommu_dirty_ops``)
    is optional: ``dirty_tracking_supported`` says whether the hardware can.
    """

    def __init__(self, owner: "IommuOps", type: str, *, domain_id: int = 0, pgsize_bitmap: int = 0,
                 aperture_start: int = 0, aperture_end: int = 0) -> None:
        self.owner = owner                  # domain->owner: the driver that made it
        self.type = type
        self.id = domain_id                 # the driver's number for it (introspection: dmesg, topology)
        self.pgsize_bitmap = pgsize_bitmap
        self.aperture_start = aperture_start
        self.aperture_end = aperture_end
        # The groups whose devices are attached now (kept by the core, for
        # introspection and to catch freeing a domain still in use).
        self.groups: list["IommuGroup"] = []
        self.freed = False

    @property
    def ops(self) -> object:
        """``domain->ops``: what Type1 compares to decide whether two groups
        can share a domain (the same driver's paging ops)."""
        return type(self)

    @property
    def is_paging(self) -> bool:
        return self.type == IOMMU_DOMAIN_PAGING

    @abstractmethod
    def attach_dev(self, dev: "PciDevice") -> None:
        """Point ``dev``'s translation at this domain (may refuse: EINVAL)."""

    # -- paging domains; the core refuses these on other domains -----------------------------

    def map_pages(self, iova: int, paddr: int, size: int, prot: int) -> None:
        raise KernelBug(f"map_pages on {self!r}, which has no IO page table")

    def unmap_pages(self, iova: int, size: int) -> int:
        raise KernelBug(f"unmap_pages on {self!r}, which has no IO page table")

    def iova_to_phys(self, iova: int) -> int:
        return 0

    def enforce_cache_coherency(self) -> bool:
        """``enforce_cache_coherency``: force DMA to snoop; False when it cannot."""
        return False

    def enable_nesting(self) -> None:
        """iommu_enable_nesting(): EINVAL when the driver has no such op."""
        raise fail(EINVAL, f"the IOMMU driver of {self!r} cannot enable nesting (iommu_enable_nesting: no "
                           f"enable_nesting op)")

    # -- iommu_dirty_ops ------------------------------------------------------------------------

    @property
    def dirty_tracking_supported(self) -> bool:
        return False

    def set_dirty_tracking(self, enabled: bool) -> None:
        raise fail(EOPNOTSUPP, f"{self!r} cannot track dirty pages")

    def read_and_clear_dirty(self, iova: int, size: int, flags: int = 0, bitmap: bool = True) -> list[DirtyRange]:
        """The dirty IOPTEs of [iova, iova+size), cleared unless
        IOMMU_DIRTY_NO_CLEAR; ``bitmap`` False only clears (nothing recorded)."""
        raise fail(EOPNOTSUPP, f"{self!r} cannot track dirty pages")

    def free(self) -> None:
        """``ops->free``"""

    def mapped_bytes(self) -> int:
        return 0


class IommuOps(ABC):
    """``struct iommu_ops`` of one IOMMU instance (``struct iommu_device``)."""

    name = "iommu"
    # Static domains (ops->identity_domain, ops->blocked_domain) and the
    # default domain of the devices it probes; None where the driver has none.
    identity_domain: IommuDomain | None = None
    blocked_domain: IommuDomain | None = None

    def probe_device(self, dev: "PciDevice") -> None:
        """``ops->probe_device``: the driver sets up its per-device state."""

    @abstractmethod
    def default_domain(self, dev: "PciDevice") -> IommuDomain:
        """The domain the host kernel's DMA uses (iommu_get_def_domain_type())."""

    def domain_alloc_paging(self, dev: "PciDevice") -> IommuDomain:
        """``ops->domain_alloc_paging``; drivers without paging domains: EOPNOTSUPP."""
        raise fail(EOPNOTSUPP, f"{self.name} has no paging domains")

    def get_resv_regions(self, dev: "PciDevice") -> list[ResvRegion]:
        """``ops->get_resv_regions``"""
        return []

    def isolated_msi(self, dev: "PciDevice") -> bool:
        """Whether the device's MSI parent domain isolates MSIs
        (IRQ_DOMAIN_FLAG_ISOLATED_MSI: interrupt remapping on x86)."""
        return False

    def capable(self, dev: "PciDevice", cap: int) -> bool:
        """``ops->capable`` (IOMMU_CAP_*); none by default."""
        return False

    #: whether the driver has ``ops->domain_alloc_user`` (iommufd's allocations)
    has_domain_alloc_user = False

    def domain_alloc_user(self, dev: "PciDevice", *, nest_parent: bool, dirty_tracking: bool) -> IommuDomain:
        """``ops->domain_alloc_user`` without a parent or user data."""
        raise fail(EOPNOTSUPP, f"{self.name} has no domain_alloc_user")

    def hw_info(self, dev: "PciDevice") -> tuple[bytes, int] | None:
        """``ops->hw_info``: the driver's struct and its IOMMU_HW_INFO_TYPE_*;
        None for a driver without one."""
        return None


def dev_iommu_ops(dev: "PciDevice") -> IommuOps | None:
    """dev_iommu_ops(): the IOMMU driver that probed ``dev``, or None."""
    return dev.iommu_ops


def iommu_probe_device(dev: "PciDevice", ops: IommuOps) -> None:
    """__iommu_probe_device(): the driver takes the device; it joins its group's domain later."""
    dev.iommu_ops = ops
    ops.probe_device(dev)


class IommuGroup:
    """``struct iommu_group``: devices that share one domain, and who owns their DMA."""

    def __init__(self, group_id: int) -> None:
        self.id = group_id
        self.devices: list["PciDevice"] = []
        self.iommu_data: object | None = None
        self.default_domain: IommuDomain | None = None
        self.blocking_domain: IommuDomain | None = None
        self.domain: IommuDomain | None = None        # group->domain: attached now
        self.owner: object | None = None
        self.owner_cnt = 0

    def __repr__(self) -> str:
        return f"<IommuGroup {self.id} devices={[d.bdf for d in self.devices]}>"

    def add_device(self, dev: "PciDevice") -> None:
        """iommu_group_add_device() (and, for the group's first device with an
        IOMMU driver, iommu_setup_default_domain())."""
        self.devices.append(dev)
        dev.iommu_group = self
        ops = dev_iommu_ops(dev)
        if ops is None:
            return
        if self.default_domain is None:
            self.default_domain = ops.default_domain(dev)
            self.blocking_domain = ops.blocked_domain
            self._set_domain(self.default_domain)
        else:
            assert self.domain is not None
            self.domain.attach_dev(dev)

    # -- DMA ownership (iommu_group_claim_dma_owner and co.) -----------------------------------

    def host_driver_owned(self) -> bool:
        """A device bound to a DMA-using host driver owns the group's DMA."""
        return any(d.driver not in (None, "vfio-pci", "pcieport") for d in self.devices)

    def dma_owner_claimed(self) -> bool:
        """iommu_group_dma_owner_claimed()"""
        return self.owner_cnt > 0 or self.host_driver_owned()

    def claim_dma_owner(self, owner: object) -> None:
        """iommu_group_claim_dma_owner(): EBUSY if anybody else owns it; then
        __iommu_take_dma_ownership() blocks DMA until a domain is attached."""
        if self.owner_cnt or self.host_driver_owned():
            raise fail(EBUSY, f"IOMMU group {self.id} is owned by another user or a host driver")
        if self.blocking_domain is not None:
            if self.domain is not self.default_domain:
                raise fail(EBUSY, f"IOMMU group {self.id} is attached to another domain")
            self._set_domain(self.blocking_domain)
        self.owner = owner
        self.owner_cnt = 1

    def release_dma_owner(self) -> None:
        """iommu_group_release_dma_owner(): back to the default domain."""
        if self.default_domain is not None:
            self._set_domain(self.default_domain)
        self.owner = None
        self.owner_cnt = 0

    def claim_device_dma_owner(self, owner: object) -> None:
        """iommu_device_claim_dma_owner(): per device, as iommufd binds them.
        Devices of one group may share an owner (owner_cnt counts them); any
        other owner, or a host driver using the default domain, is EPERM."""
        if self.owner_cnt or self.host_driver_owned():
            if self.host_driver_owned() or self.owner is not owner:
                raise fail(EPERM, f"IOMMU group {self.id} is owned by another user or a host driver")
            self.owner_cnt += 1
            return
        self.claim_dma_owner(owner)

    def release_device_dma_owner(self) -> None:
        """iommu_device_release_dma_owner()"""
        if self.owner_cnt > 1:
            self.owner_cnt -= 1
            return
        self.release_dma_owner()

    # -- attaching domains -------------------------------------------------------------------

    def _set_domain(self, new: IommuDomain) -> None:
        """__iommu_group_set_domain(): every device, in order; on a refusal the
        devices already moved go back to the old domain."""
        old = self.domain
        if new is old:
            return
        done: list["PciDevice"] = []
        try:
            for dev in self.devices:
                if dev_iommu_ops(dev) is not None:
                    new.attach_dev(dev)
                    done.append(dev)
        except KernelError:
            if old is not None:
                for dev in done:
                    old.attach_dev(dev)
            raise
        if old is not None and self in old.groups:
            old.groups.remove(self)
        self.domain = new
        new.groups.append(self)


def iommu_group_get_iommudata(group: IommuGroup) -> object | None:
    return group.iommu_data


def iommu_group_set_iommudata(group: IommuGroup, data: object) -> None:
    group.iommu_data = data


def _first_dev(group: IommuGroup) -> "PciDevice":
    if not group.devices:
        raise fail(ENODEV, f"IOMMU group {group.id} has no devices")
    return group.devices[0]


def iommu_paging_domain_alloc(dev: "PciDevice") -> IommuDomain:
    """iommu_paging_domain_alloc(): ENODEV for a device behind no IOMMU."""
    ops = dev_iommu_ops(dev)
    if ops is None:
        raise fail(ENODEV, f"{dev.bdf} is behind no IOMMU that supports the IOMMU API")
    return ops.domain_alloc_paging(dev)


def iommu_group_paging_domain_alloc(group: IommuGroup) -> IommuDomain:
    """A paging domain for the group's devices (iommu_paging_domain_alloc() of its first)."""
    return iommu_paging_domain_alloc(_first_dev(group))


def iommu_domain_free(domain: IommuDomain) -> None:
    """iommu_domain_free()"""
    if domain.groups:
        raise KernelBug(f"freeing {domain!r} with groups {[g.id for g in domain.groups]} attached")
    domain.freed = True
    domain.free()


def iommu_attach_group(domain: IommuDomain, group: IommuGroup) -> None:
    """iommu_attach_group() -> __iommu_attach_group(): only from the default
    or blocking domain (EBUSY), only a domain of the devices' driver (EINVAL)."""
    if group.domain is not None and group.domain not in (group.default_domain, group.blocking_domain):
        raise fail(EBUSY, f"IOMMU group {group.id} is already attached to {group.domain!r}")
    ops = dev_iommu_ops(_first_dev(group))
    if ops is None or type(ops) is not type(domain.owner):
        raise fail(EINVAL, f"{domain!r} is not a domain of IOMMU group {group.id}'s IOMMU driver")
    group._set_domain(domain)


def iommu_replace_group(group: IommuGroup, domain: IommuDomain) -> None:
    """iommu_replace_group_handle() -> __iommu_group_set_domain(): from the
    attached domain straight to the next, with no blocked DMA in between."""
    ops = dev_iommu_ops(_first_dev(group))
    if ops is None or type(ops) is not type(domain.owner):
        raise fail(EINVAL, f"{domain!r} is not a domain of IOMMU group {group.id}'s IOMMU driver")
    group._set_domain(domain)


def iommu_detach_group(domain: IommuDomain, group: IommuGroup) -> None:
    """iommu_detach_group() -> __iommu_group_set_core_domain(): the blocking
    domain while a user owns the group, else the default one."""
    core = group.blocking_domain if group.owner_cnt else group.default_domain
    if core is not None:
        group._set_domain(core)


def iommu_map(domain: IommuDomain, iova: int, paddr: int, size: int, prot: int) -> None:
    """iommu_map(): a paging domain, ranges aligned to its smallest page size."""
    if not domain.is_paging:
        raise fail(EINVAL, f"iommu_map into {domain!r}, which is not a paging domain")
    min_pagesz = domain.pgsize_bitmap & -domain.pgsize_bitmap
    if (iova | paddr | size) & (min_pagesz - 1):
        raise fail(EINVAL, f"unaligned: iova {iova:#x} pa {paddr:#x} size {size:#x} min_pagesz {min_pagesz:#x}")
    if size:
        domain.map_pages(iova, paddr, size, prot)


def iommu_unmap(domain: IommuDomain, iova: int, size: int) -> int:
    """iommu_unmap(): the bytes unmapped."""
    if not domain.is_paging:
        return 0
    return domain.unmap_pages(iova, size)


def iommu_iova_to_phys(domain: IommuDomain, iova: int) -> int:
    """iommu_iova_to_phys(): an identity domain translates to itself; 0 = unmapped."""
    if domain.type == IOMMU_DOMAIN_IDENTITY:
        return iova
    return domain.iova_to_phys(iova)


def iommu_get_group_resv_regions(group: IommuGroup) -> list[ResvRegion]:
    """iommu_get_group_resv_regions(): the union over the group's devices,
    sorted, overlapping or adjacent regions of one type merged
    (iommu_insert_resv_region)."""
    regions: list[ResvRegion] = []
    for dev in group.devices:
        ops = dev_iommu_ops(dev)
        if ops is not None:
            regions.extend(ops.get_resv_regions(dev))
    out: list[ResvRegion] = []
    for r in sorted(regions, key=lambda r: (r.start, r.type)):
        if out and out[-1].type == r.type and r.start <= out[-1].end + 1:
            last = out[-1]
            out[-1] = ResvRegion(last.start, max(last.end, r.end) - last.start + 1, r.type)
        else:
            out.append(r)
    return out


def iommu_get_resv_regions(dev: "PciDevice") -> list[ResvRegion]:
    """iommu_get_resv_regions(): one device's reserved regions."""
    ops = dev_iommu_ops(dev)
    return ops.get_resv_regions(dev) if ops is not None else []


def device_iommu_capable(dev: "PciDevice", cap: int) -> bool:
    """device_iommu_capable()"""
    ops = dev_iommu_ops(dev)
    return ops is not None and ops.capable(dev, cap)


def iommu_group_has_isolated_msi(group: IommuGroup) -> bool:
    """iommu_group_has_isolated_msi(): every device's MSIs are isolated."""
    return all((ops := dev_iommu_ops(dev)) is not None and ops.isolated_msi(dev) for dev in group.devices)


def iommu_set_dirty_tracking(domain: IommuDomain, enabled: bool) -> None:
    """``domain->dirty_ops->set_dirty_tracking``: EOPNOTSUPP without dirty ops."""
    if not domain.dirty_tracking_supported:
        raise fail(EOPNOTSUPP, f"{domain!r} cannot track dirty pages")
    domain.set_dirty_tracking(enabled)


def iommu_read_and_clear_dirty(domain: IommuDomain, iova: int, size: int, flags: int = 0,
                               bitmap: bool = True) -> list[DirtyRange]:
    """``domain->dirty_ops->read_and_clear_dirty``: the IOPTEs written since the
    last read, as the driver records them."""
    if not domain.dirty_tracking_supported:
        raise fail(EOPNOTSUPP, f"{domain!r} cannot track dirty pages")
    return domain.read_and_clear_dirty(iova, size, flags, bitmap)
