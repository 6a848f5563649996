"""Platform builders: a machine spec in, a booted machine out.

Booting is the same on every platform, and done once here: firmware
creates each device and places its BARs, the platform attaches it to its
IOMMU hardware, the kernel puts it in its IOMMU group, and vfio-pci binds
it.  A :class:`PlatformBuilder` subclass says only what differs: which
kernel profiles and page sizes it runs, its IOMMU hardware and IOMMU
drivers (``setup``), where its BARs go, and how a device reaches its IOMMU
(``attach_device``, ``init_group``).  ``BUILDERS`` maps each platform name
of a machine file to its builder (docs/architecture.md: adding a platform).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from .kernel.iommu.iommu import (RESV_TYPE_NAMES, IommuGroup, ResvRegion, iommu_group_set_iommudata,
                                 iommu_probe_device)
from .kernel.iommu.spapr_tce import SpaprTceIommuDriver
from .kernel.iommu.table_group import SpaprTceIommuOps
from .kernel.iommu.type1 import Type1IommuDriver
from .kernel.pci.device import BarMemory, PciDevice
from .kernel.pci.models import create_device, is_endpoint_model
from .kernel.platform.base import Platform
from .kernel.platform.pe import Pe
from .kernel.platform.powernv import PnvPe, PnvPhb, PowerNVPlatform
from .kernel.platform.pseries import PseriesPe, PseriesPlatform, SpaprPhb
from .kernel.platform.x86 import IntelIommu, X86Platform
from .kernel.vfio.pci import VfioPciDevice
from .machine_spec import HOST_DEVICE_MODELS, DeviceSpec, MachineSpec

if TYPE_CHECKING:
    from .kernel.kernel import Kernel, KernelProfile

# MAX_PAGE_ORDER of ppc64 (arch/powerpc/Kconfig ARCH_FORCE_MAX_ORDER): the
# largest contiguous allocation is 16 MiB with either page size.
_MAX_ORDER = {4096: 12, 65536: 8}


class PlatformBuilder(ABC):
    """Boots one machine spec on one kernel."""

    def __init__(self, spec: MachineSpec, kernel: "Kernel") -> None:
        self.spec = spec
        self.kernel = kernel

    @classmethod
    def check(cls, profile: "KernelProfile", page_size: int) -> None:
        """ValueError for a kernel profile or page size this platform cannot run."""

    @abstractmethod
    def setup(self) -> Platform:
        """The IOMMU hardware, the IOMMU drivers VFIO can use, the boot messages."""

    @abstractmethod
    def bar_window(self, ds: DeviceSpec) -> tuple[int, int]:
        """Where firmware places the device's BARs: (window, its first address)."""

    @abstractmethod
    def attach_device(self, dev: PciDevice, ds: DeviceSpec) -> None:
        """Put the device behind its IOMMU: its DMA path, its IOMMU driver."""

    def init_group(self, group: IommuGroup, ds: DeviceSpec) -> None:
        """A new IOMMU group, before its first device joins."""

    def bar_memory(self, mem: BarMemory) -> None:
        """A device's BAR, as memory: where the platform's bus addresses are
        host physical addresses, make it reachable by peer-to-peer DMA."""

    def build(self) -> None:
        k = self.kernel
        spec = self.spec
        k.phys.ram_pages = spec.ram >> k.page_shift         # what firmware tells the kernel it has
        k.platform = self.setup()
        cursors: dict[int, int] = {}
        for ds in spec.devices:
            dev = self.create_device(ds)
            dev.driver = ds.driver or None
            dev.reset_method = "bus" if ds.behind_bridge else None
            dev.log = k.log.warn
            window, base = self.bar_window(ds)
            cursor = cursors.get(window, base)
            for index, bar in dev.bars.items():
                cursor = (cursor + bar.size - 1) & ~(bar.size - 1)
                dev.assign_bar_address(index, cursor)
                cursor += bar.size
                self.bar_memory(dev.bar_memory(index, k.page_shift))
            cursors[window] = cursor
            self.attach_device(dev, ds)
            group = k.iommu_groups.get(ds.iommu_group)
            if group is None:
                group = k.iommu_groups[ds.iommu_group] = IommuGroup(ds.iommu_group)
                self.init_group(group, ds)
            group.add_device(dev)
            k.devices[dev.bdf] = dev
            if dev.driver == "vfio-pci":
                k.vfio.register_device(dev.bdf, group, VfioPciDevice(dev, k.log), mode=ds.group_mode,
                                       uid=ds.group_uid, gid=ds.group_gid)
        k.log.info(f"vfiosim: {spec.name} ({spec.platform}), Linux {k.profile.version} profile, "
                   f"{k.page_size // 1024} KiB pages, {len(spec.devices)} device(s)")

    @staticmethod
    def create_device(ds: DeviceSpec) -> PciDevice:
        """An endpoint model, or one of the host devices an x86 machine file may list."""
        if is_endpoint_model(ds.model):
            return create_device(ds.model, ds.bdf, dma_mask=ds.dma_mask, options=ds.options)
        vendor, device, class_code, header_type, _ = HOST_DEVICE_MODELS[ds.model]
        dev = PciDevice(ds.bdf, vendor=vendor, device=device, class_code=class_code,
                        subsystem_vendor=0x1AF4, subsystem=0x1100, interrupt_pin=0)
        dev.model = ds.model
        dev.config.set(0x0E, 1, header_type)
        dev.finish()
        return dev


class PowerBuilder(PlatformBuilder):
    """What both POWER platforms share: a device sits in a PE, one IOMMU group
    per PE, whose table group is the group's IOMMU data; firmware places BARs
    from the bottom of the PHB's 32-bit MMIO window."""

    def __init__(self, spec: MachineSpec, kernel: "Kernel") -> None:
        super().__init__(spec, kernel)
        self.pes: dict[tuple[int, int], Pe] = {}
        # 3.10 had no IOMMU API on POWER: its PEs are probed by no IOMMU driver.
        self.spapr_ops = SpaprTceIommuOps() if kernel.profile.power_iommu_api else None
        self.platform: Platform = Platform()

    @abstractmethod
    def new_pe(self, ds: DeviceSpec) -> Pe: ...

    def bar_window(self, ds: DeviceSpec) -> tuple[int, int]:
        return ds.phb, 0x80000000

    def attach_device(self, dev: PciDevice, ds: DeviceSpec) -> None:
        pe = self.pes.get((ds.phb, ds.pe))
        if pe is None:
            pe = self.pes[(ds.phb, ds.pe)] = self.new_pe(ds)
            self.platform.pes.append(pe)
        pe.add_device(dev)
        if self.spapr_ops is not None:
            iommu_probe_device(dev, self.spapr_ops)

    def init_group(self, group: IommuGroup, ds: DeviceSpec) -> None:
        pe = self.pes[(ds.phb, ds.pe)]
        iommu_group_set_iommudata(group, pe.table_group)
        pe.iommu_group = group


class PowerNVBuilder(PowerBuilder):
    """Bare-metal POWER9: PHB4s with EEH, the host kernel's TCE tables."""

    def setup(self) -> Platform:
        k = self.kernel
        self.phbs = {ps.index: PnvPhb(ps.index, model=ps.model, m32_pci_base=ps.m32_pci_base,
                                      pgsizes=ps.tce_page_sizes, page_shift=k.page_shift,
                                      max_order=ps.max_order if ps.max_order is not None else _MAX_ORDER[k.page_size],
                                      eeh=ps.eeh)
                     for ps in self.spec.phbs}
        eeh = any(p.eeh for p in self.phbs.values()) and k.profile.vfio_eeh
        self.platform = PowerNVPlatform(list(self.phbs.values()), eeh)
        if k.config.vfio_container:            # VFIO_IOMMU_SPAPR_TCE depends on VFIO_CONTAINER
            k.vfio.iommu_drivers.register(k.profile.spapr_driver(k))
        return self.platform

    def new_pe(self, ds: DeviceSpec) -> Pe:
        k = self.kernel
        pe = PnvPe(self.phbs[ds.phb], ds.pe, k.phys, k.log.info, self.spec.ram)
        if k.profile.pnv_ioda2_default_window:
            pe.setup_default_config()
        else:
            # 3.10: the PE's 32-bit table of 4 KiB pages, which VFIO reuses.
            tbl = pe.table_group.create_host_table(0, 12, pe.table_group.tce32_size, 1)
            pe.table_group.set_window(0, tbl)
        return pe


class PseriesBuilder(PowerBuilder):
    """A PAPR guest under QEMU: one PE per PHB, tables in the hypervisor."""

    @classmethod
    def check(cls, profile: "KernelProfile", page_size: int) -> None:
        if "pseries" not in profile.platforms:
            raise ValueError(f"kernel {profile.version} has no VFIO on pseries guests: its VFIO_IOMMU_SPAPR_TCE "
                             f"depends on PPC_POWERNV (drivers/vfio/Kconfig); use the powernv machine")

    def setup(self) -> Platform:
        k = self.kernel
        self.hvs = {ps.index: SpaprPhb(ps.index, dma32_start=ps.dma32_start, dma32_size=ps.dma32_size,
                                       pgsizes=ps.ddw_page_sizes, windows_supported=ps.ddw_windows,
                                       dma64_addr=ps.dma64_address, largest_block=ps.ddw_largest_block,
                                       log=k.log.info)
                    for ps in self.spec.phbs}
        self.platform = PseriesPlatform(list(self.hvs.values()))
        if k.config.vfio_container:            # VFIO_IOMMU_SPAPR_TCE depends on VFIO_CONTAINER
            k.vfio.iommu_drivers.register(SpaprTceIommuDriver(k))
        return self.platform

    def new_pe(self, ds: DeviceSpec) -> Pe:
        return PseriesPe(self.hvs[ds.phb], self.kernel.phys, self.kernel.log.info)


class X86Builder(PlatformBuilder):
    """An x86 host with one VT-d unit: every device is behind it; only the
    Type1 IOMMU driver is registered (no sPAPR, no EEH, no no-IOMMU) -- when
    the kernel configuration has the VFIO container -- and iommufd when it has
    IOMMUFD."""

    @classmethod
    def check(cls, profile: "KernelProfile", page_size: int) -> None:
        if "x86" not in profile.platforms:
            raise ValueError(f"the {profile.version} profile is the sPAPR TCE driver's first version on PowerNV; "
                             f"x86 machines run the Linux 6.12 Type1 IOMMU driver (kernel=\"6.12\")")
        if page_size != 4096:
            raise ValueError(f"x86 has 4 KiB pages only, not page_size={page_size}")

    def setup(self) -> Platform:
        k = self.kernel
        spec = self.spec
        assert spec.iommu is not None
        io = spec.iommu
        self.unit = IntelIommu(name="dmar0", model=io.model, aw_bits=io.address_width, pgsize_bitmap=io.page_sizes,
                               resv_regions=[ResvRegion(r.start, r.size, RESV_TYPE_NAMES[r.type])
                                             for r in io.reserved_regions],
                               snoop_control=io.snoop_control, interrupt_remapping=io.interrupt_remapping,
                               caching_mode=io.caching_mode, phys=k.phys, log_err=k.log.err,
                               dirty_tracking=io.dirty_tracking)
        if k.config.vfio_container:            # VFIO_IOMMU_TYPE1 is selected by VFIO_CONTAINER
            k.vfio.iommu_drivers.register(Type1IommuDriver(
                k, dma_entry_limit=spec.type1.dma_entry_limit,
                allow_unsafe_interrupts=spec.type1.allow_unsafe_interrupts))
        k.log.info(f"DMAR: Intel(R) Virtualization Technology for Directed I/O ({io.model}, "
                   f"{io.address_width}-bit, caching mode {'on' if io.caching_mode else 'off'})")
        return X86Platform([self.unit])

    def bar_window(self, ds: DeviceSpec) -> tuple[int, int]:
        return 0, 0xFE000000           # SeaBIOS places BARs below the IOAPIC

    def bar_memory(self, mem: BarMemory) -> None:
        """One PCI segment whose bus addresses are host physical addresses: a
        device's DMA to another's BAR (peer to peer) reaches it through
        the IOMMU like any memory."""
        self.kernel.phys.register_mmio(mem)

    def attach_device(self, dev: PciDevice, ds: DeviceSpec) -> None:
        # pci_msix_can_alloc_dyn(): x86's MSI parent domains (the vector domain,
        # x86_vector_msi_parent_ops, and the VT-d remapping domain, dmar_msi_parent_ops)
        # support X86_VECTOR_MSI_FLAGS_SUPPORTED, which includes MSI_FLAG_PCI_MSIX_ALLOC_DYN
        # (arch/x86/include/asm/msi.h, since 6.2), with interrupt remapping or without.
        # POWER's PowerNV and pseries PCI/MSI domains do not set it: those devices keep
        # the default (False), so vfio-pci reports MSI-X as NORESIZE there.
        dev.msix_can_alloc_dyn = True
        iommu_probe_device(dev, self.unit)


BUILDERS: dict[str, type[PlatformBuilder]] = {
    "powernv": PowerNVBuilder,
    "pseries": PseriesBuilder,
    "x86": X86Builder,
}
