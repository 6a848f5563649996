"""Machine files: the TOML schema that describes a simulated machine.

The presets in ``vfiosim/presets/`` use it, and so can users
(``Machine.from_file``).  docs/machine-files.md documents every key.  Every
error names the file, the key and what was expected.
"""

from __future__ import annotations

import builtins
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

from .kernel.config import POWER_PLATFORMS

PLATFORMS = ("powernv", "pseries", "x86")
# On POWER (POWER_PLATFORMS) devices sit behind [[phb]] tables, grouped by
# PE; on any other platform in PCI domain 0000, grouped by iommu_group only.
MIN_RAM = 16 << 20

# Host devices an x86 machine file may list besides edu: (vendor, device,
# class code, header type, the Linux driver bound by default).  They exist
# for the topology and the IOMMU groups; vfio-pci does not bind them.
HOST_DEVICE_MODELS: dict[str, tuple[int, int, int, int, str | None]] = {
    "q35-host-bridge": (0x8086, 0x29C0, 0x060000, 0, None),          # 82G33/G31/P35/P31 DRAM controller
    "pcie-root-port": (0x1B36, 0x000C, 0x060400, 1, "pcieport"),      # QEMU PCIe root port
    "ich9-lpc": (0x8086, 0x2918, 0x060100, 0, "lpc_ich"),             # 82801IB (ICH9) LPC
    "ich9-ahci": (0x8086, 0x2922, 0x010601, 0, "ahci"),               # 82801IR/IO/IH (ICH9R) SATA AHCI
    "ich9-smbus": (0x8086, 0x2930, 0x0C0500, 0, "i801_smbus"),        # 82801I (ICH9) SMBus
}
RESV_REGION_TYPES = ("direct", "direct-relaxable", "reserved", "msi", "sw-msi")

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}


class MachineFileError(ValueError):
    """A machine file is not valid; the message says where and why."""

    def __init__(self, source: str, key: str, expected: str, got: Any = None) -> None:
        detail = f", got {got!r}" if got is not None else ""
        super().__init__(f"{source}: {key}: expected {expected}{detail}")
        self.source = source
        self.key = key


@dataclass
class PhbSpec:
    index: int
    model: str = "PHB4"
    # PowerNV
    m32_pci_base: int = 0x80000000
    tce_page_sizes: int = (1 << 12) | (1 << 16) | (1 << 21) | (1 << 30)
    eeh: bool = True
    max_order: int | None = None
    # pseries
    dma32_start: int = 0
    dma32_size: int = 1 << 30
    ddw_page_sizes: int = (1 << 12) | (1 << 16) | (1 << 21) | (1 << 24)
    ddw_windows: int = 2
    dma64_address: int = 1 << 59
    ddw_largest_block: int = 1 << 30


@dataclass
class DeviceSpec:
    bdf: str
    model: str
    phb: int
    iommu_group: int
    pe: int = 1
    behind_bridge: bool = False
    driver: str = "vfio-pci"
    dma_mask: int = (1 << 28) - 1
    group_uid: int = 0
    group_gid: int = 0
    group_mode: int = 0o600
    options: dict[str, Any] = field(default_factory=dict)     # the model's own keys (MODEL_OPTIONS)


@dataclass
class ResvRegionSpec:
    start: int
    size: int
    type: str = "msi"


@dataclass
class IommuSpec:
    """x86: the VT-d remapping unit, as QEMU's intel-iommu device sets it up."""

    model: str = "intel-iommu"
    address_width: int = 39
    page_sizes: int = (1 << 12) | (1 << 21) | (1 << 30)
    reserved_regions: list[ResvRegionSpec] = field(
        default_factory=lambda: [ResvRegionSpec(0xFEE00000, 0x100000, "msi")])
    snoop_control: bool = False
    interrupt_remapping: bool = True
    caching_mode: bool = True
    dirty_tracking: bool = False


@dataclass
class Type1Spec:
    """x86: the vfio_iommu_type1 module parameters."""

    dma_entry_limit: int = 0xFFFF
    allow_unsafe_interrupts: bool = False


@dataclass
class MachineSpec:
    name: str
    platform: str
    description: str = ""
    ram: int = 4 << 30
    phbs: list[PhbSpec] = field(default_factory=list)
    devices: list[DeviceSpec] = field(default_factory=list)
    source: str = "<machine>"
    iommu: IommuSpec | None = None
    type1: Type1Spec = field(default_factory=Type1Spec)
    # [kernel] config: options that differ from Debian's build (kernel/config.py)
    kernel_config: list[str] = field(default_factory=list)
    # [iommufd]: the module's parameters
    iommufd_allow_unsafe_interrupts: bool = False
    # What a platform's own tables say, for a platform without fields of its
    # own here (its PLATFORM_TABLES parser sets it; its builder reads it).
    platform_spec: Any = None


class _Reader:
    """Typed access to one TOML table, reporting errors with their key path."""

    def __init__(self, source: str, path: str, table: Any, allowed: set[str]) -> None:
        self.source, self.path = source, path
        if not isinstance(table, dict):
            raise MachineFileError(source, path, "a table", table)
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise MachineFileError(source, self.key(unknown[0]),
                                   f"one of the keys {', '.join(sorted(allowed))}", "unknown key")
        self.table = table

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return name in self.table

    def str(self, name: str, default: str | None = None, choices: tuple[str, ...] | None = None) -> str:
        if name not in self.table:
            if default is None:
                raise MachineFileError(self.source, self.key(name), "a string (this key is required)")
            return default
        value = self.table[name]
        if not isinstance(value, str):
            raise MachineFileError(self.source, self.key(name), "a string", value)
        if choices and value not in choices:
            raise MachineFileError(self.source, self.key(name), f"one of {', '.join(choices)}", value)
        return value

    # (below ``def str``, ``str`` names that method: annotations say builtins.str)
    def int(self, name: builtins.str, default: int | None = None, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
        if name not in self.table:
            if default is None:
                raise MachineFileError(self.source, self.key(name), "an integer (this key is required)")
            return default
        value = self.table[name]
        if not isinstance(value, int) or isinstance(value, bool):
            raise MachineFileError(self.source, self.key(name), "an integer", value)
        if not lo <= value <= hi:
            raise MachineFileError(self.source, self.key(name), f"an integer in {lo}..{hi:#x}", value)
        return value

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        value = self.table.get(name, default)
        if not isinstance(value, bool):
            raise MachineFileError(self.source, self.key(name), "true or false", value)
        return value

    def size(self, name: builtins.str, default: builtins.int | None = None) -> builtins.int:
        if name not in self.table:
            if default is None:
                raise MachineFileError(self.source, self.key(name), "a size (this key is required)")
            return default
        return parse_size(self.table[name], self.source, self.key(name))

    def page_sizes(self, name: builtins.str, default: builtins.int) -> builtins.int:
        if name not in self.table:
            return default
        value = self.table[name]
        if not isinstance(value, list) or not value:
            raise MachineFileError(self.source, self.key(name), 'a non-empty list of page sizes like ["4K", "64K"]',
                                   value)
        mask = 0
        for i, item in enumerate(value):
            size = parse_size(item, self.source, f"{self.key(name)}[{i}]")
            if size & (size - 1) or size < 4096:
                raise MachineFileError(self.source, f"{self.key(name)}[{i}]", "a power of two of at least 4K", item)
            mask |= size
        return mask


def parse_size(value: Any, source: str, key: str) -> int:
    """An integer, or a string like "4K", "2M", "1G" (binary units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise MachineFileError(source, key, "a non-negative size", value)
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(m.group(1)) << _UNITS[m.group(2).upper()]
    raise MachineFileError(source, key, 'a size: an integer or a string like "4K", "2M", "1G"', value)


def _parse_x86(data: dict[str, Any], spec: MachineSpec, source: str) -> None:
    """[iommu] and [vfio_iommu_type1]: the x86 machine's VT-d unit and Type1 parameters."""
    r = _Reader(source, "iommu", data.get("iommu", {}), {"model", "address_width", "page_sizes", "reserved_regions",
                                                        "snoop_control", "interrupt_remapping", "caching_mode",
                                                        "dirty_tracking"})
    d = IommuSpec()
    iommu = IommuSpec(model=r.str("model", d.model, choices=("intel-iommu",)),
                      address_width=r.int("address_width", d.address_width, lo=32, hi=64),
                      page_sizes=r.page_sizes("page_sizes", d.page_sizes),
                      snoop_control=r.bool("snoop_control", d.snoop_control),
                      interrupt_remapping=r.bool("interrupt_remapping", d.interrupt_remapping),
                      caching_mode=r.bool("caching_mode", d.caching_mode),
                      dirty_tracking=r.bool("dirty_tracking", d.dirty_tracking), reserved_regions=[])
    if not iommu.page_sizes & (1 << 12):
        raise MachineFileError(source, "iommu.page_sizes", "a list that includes 4K")
    regions = r.table.get("reserved_regions", None)
    if regions is None:
        iommu.reserved_regions = d.reserved_regions
    elif not isinstance(regions, list):
        raise MachineFileError(source, "iommu.reserved_regions", "a list of {start, size, type} tables", regions)
    else:
        for i, table in enumerate(regions):
            rr = _Reader(source, f"iommu.reserved_regions[{i}]", table, {"start", "size", "type"})
            region = ResvRegionSpec(start=rr.int("start"), size=rr.size("size"),
                                    type=rr.str("type", "reserved", choices=RESV_REGION_TYPES))
            if not region.size or region.start + region.size > 1 << 64:
                raise MachineFileError(source, f"iommu.reserved_regions[{i}].size",
                                       "a non-zero size that ends inside the 64-bit address space", region.size)
            iommu.reserved_regions.append(region)
    spec.iommu = iommu
    t = _Reader(source, "vfio_iommu_type1", data.get("vfio_iommu_type1", {}),
                {"dma_entry_limit", "allow_unsafe_interrupts"})
    spec.type1 = Type1Spec(dma_entry_limit=t.int("dma_entry_limit", 0xFFFF, hi=0xFFFFFFFF),
                           allow_unsafe_interrupts=t.bool("allow_unsafe_interrupts", False))


# A platform's own top-level tables: their names and the function that reads
# them into the spec (parse(data, spec, source)).  Another platform's machine
# file may not have them.
PlatformTables = tuple[tuple[str, ...], Callable[[dict[str, Any], "MachineSpec", str], None]]
PLATFORM_TABLES: dict[str, PlatformTables] = {"x86": (("iommu", "vfio_iommu_type1"), _parse_x86)}


def _parse_kernel(data: dict[str, Any], spec: MachineSpec, source: str) -> None:
    """[kernel] config and [iommufd]: the kernel's VFIO/iommufd options and
    iommufd's module parameters (docs/machine-files.md)."""
    from .kernel.config import KernelConfig, KernelConfigError
    r = _Reader(source, "kernel", data.get("kernel", {}), {"config"})
    items = r.table.get("config", [])
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise MachineFileError(source, "kernel.config", 'a list of kernel options like ["IOMMUFD", '
                                                        '"VFIO_DEVICE_CDEV"]', items)
    try:
        KernelConfig.parse(items, platform=spec.platform)
    except KernelConfigError as exc:
        raise MachineFileError(source, "kernel.config", f"a configuration Kconfig allows: {exc}", items) from None
    spec.kernel_config = list(items)
    i = _Reader(source, "iommufd", data.get("iommufd", {}), {"allow_unsafe_interrupts"})
    spec.iommufd_allow_unsafe_interrupts = i.bool("allow_unsafe_interrupts", False)


def parse_spec(data: dict[str, Any], source: str) -> MachineSpec:
    platform_keys = {key for keys, _ in PLATFORM_TABLES.values() for key in keys}
    top = _Reader(source, "", data, {"machine", "phb", "device", "kernel", "iommufd", *platform_keys})
    if "machine" not in data:
        raise MachineFileError(source, "machine", "a [machine] table")
    m = _Reader(source, "machine", data["machine"], {"name", "description", "platform", "ram"})
    spec = MachineSpec(name=m.str("name"), platform=m.str("platform", choices=PLATFORMS),
                       description=m.str("description", ""), ram=m.size("ram", 4 << 30), source=source)
    if spec.ram < MIN_RAM:
        # The PowerNV host's default DMA window is sized from RAM; below a
        # few pages there is no window (and no kernel) to build.
        raise MachineFileError(source, "machine.ram", "a size of at least 16M", data["machine"].get("ram"))
    # (every platform but POWER's is laid out as x86 is: no PHBs, PCI domain 0000)
    x86 = spec.platform not in POWER_PLATFORMS
    _parse_kernel(data, spec, source)
    if x86 and "phb" in data:
        raise MachineFileError(source, "phb", f"no [[phb]] tables on platform {spec.platform} (its devices sit in "
                                              f"PCI domain 0000)", "a [[phb]] table")
    for platform, (keys, parse) in PLATFORM_TABLES.items():
        if platform == spec.platform:
            parse(data, spec, source)
            continue
        for key in keys:
            if key in data:
                raise MachineFileError(source, key, f"no [{key}] table on platform {spec.platform} (it describes "
                                                    f"a machine of platform {platform})", f"a [{key}] table")
    phbs = [] if x86 else data.get("phb", [])
    if not x86 and (not isinstance(phbs, list) or not phbs):
        raise MachineFileError(source, "phb", "at least one [[phb]] table")
    phb_keys = {"index", "model", "m32_pci_base", "tce_page_sizes", "eeh", "max_order", "dma32_start",
                "dma32_size", "ddw_page_sizes", "ddw_windows", "dma64_address", "ddw_largest_block"}
    for i, table in enumerate(phbs):
        r = _Reader(source, f"phb[{i}]", table, phb_keys)
        defaults = PhbSpec(index=0)
        phb = PhbSpec(
            index=r.int("index", lo=0, hi=0xFFFF), model=r.str("model", "PHB4" if spec.platform == "powernv" else "sPAPR"),
            m32_pci_base=r.size("m32_pci_base", defaults.m32_pci_base),
            tce_page_sizes=r.page_sizes("tce_page_sizes", defaults.tce_page_sizes), eeh=r.bool("eeh", True),
            max_order=r.int("max_order", lo=0, hi=20) if r.has("max_order") else None,
            dma32_start=r.size("dma32_start", defaults.dma32_start), dma32_size=r.size("dma32_size", defaults.dma32_size),
            ddw_page_sizes=r.page_sizes("ddw_page_sizes", defaults.ddw_page_sizes),
            ddw_windows=r.int("ddw_windows", defaults.ddw_windows, lo=1, hi=2),
            dma64_address=r.int("dma64_address", defaults.dma64_address),
            ddw_largest_block=r.int("ddw_largest_block", defaults.ddw_largest_block))
        if any(p.index == phb.index for p in spec.phbs):
            raise MachineFileError(source, f"phb[{i}].index", "an index not used by another PHB", phb.index)
        if spec.platform == "powernv" and not phb.tce_page_sizes & (1 << 12):
            raise MachineFileError(source, f"phb[{i}].tce_page_sizes", "a list that includes 4K")
        # (at least one 4 KiB TCE: a smaller DMA32 window has no table to build)
        if phb.m32_pci_base & (phb.m32_pci_base - 1) or not 1 << 12 <= phb.m32_pci_base <= 1 << 32:
            raise MachineFileError(source, f"phb[{i}].m32_pci_base", "a power of two from 4K to 4G", phb.m32_pci_base)
        if phb.dma32_size & (phb.dma32_size - 1) or not 1 << 12 <= phb.dma32_size <= 1 << 32:
            raise MachineFileError(source, f"phb[{i}].dma32_size", "a power of two from 4K to 4G", phb.dma32_size)
        spec.phbs.append(phb)
    devices = data.get("device", [])
    if not isinstance(devices, list):
        raise MachineFileError(source, "device", "a list of [[device]] tables", devices)
    from .kernel.pci.device import parse_bdf
    from .kernel.pci.models import MODEL_OPTIONS, default_dma_mask, is_endpoint_model, model_names
    dev_keys = {"bdf", "model", "phb", "pe", "iommu_group", "behind_bridge", "driver", "dma_mask",
                "group_uid", "group_gid", "group_mode"}.union(*MODEL_OPTIONS.values())
    first_with_bdf: dict[str, int] = {}
    first_in_group: dict[int, tuple[int, tuple[int, int]]] = {}
    first_on_pe: dict[tuple[int, int], tuple[int, int]] = {}
    for i, table in enumerate(devices):
        r = _Reader(source, f"device[{i}]", table, dev_keys)
        bdf = r.str("bdf")
        try:
            domain = parse_bdf(bdf)[0]
        except ValueError as exc:
            raise MachineFileError(source, f"device[{i}].bdf", "a PCI address DDDD:BB:SS.F", bdf) from exc
        endpoint_models = model_names()
        model = r.str("model")
        if model not in endpoint_models and model not in HOST_DEVICE_MODELS:
            raise MachineFileError(source, f"device[{i}].model",
                                   f"a device model: {', '.join(endpoint_models)}, one registered with "
                                   f"vfiosim.devices.register_model (--device-module MODULE on the command line), "
                                   f"or on x86 a host device ({', '.join(HOST_DEVICE_MODELS)})", model)
        endpoint = is_endpoint_model(model)
        if x86:
            if r.has("phb") or r.has("pe"):
                raise MachineFileError(source, f"device[{i}].{'phb' if r.has('phb') else 'pe'}",
                                       f"no phb or pe key on platform {spec.platform} (devices are grouped by "
                                       f"iommu_group only)",
                                       "a key")
            if domain != 0:
                raise MachineFileError(source, f"device[{i}].bdf", "PCI domain 0000 (the only one of an x86 machine)",
                                       bdf)
        elif not endpoint:
            raise MachineFileError(source, f"device[{i}].model",
                                   f"an endpoint model ({', '.join(endpoint_models)}; host device models are for "
                                   f"platform x86)", model)
        default_driver = "vfio-pci" if endpoint else HOST_DEVICE_MODELS[model][4] or ""
        dev = DeviceSpec(bdf=bdf.lower(), model=model, phb=0 if x86 else r.int("phb", lo=0, hi=0xFFFF),
                         iommu_group=r.int("iommu_group", lo=0, hi=0xFFFFF), pe=r.int("pe", 1, lo=0, hi=4095),
                         behind_bridge=r.bool("behind_bridge", False), driver=r.str("driver", default_driver),
                         dma_mask=r.int("dma_mask", default_dma_mask(model)), group_uid=r.int("group_uid", 0, hi=0xFFFFFFFF),
                         group_gid=r.int("group_gid", 0, hi=0xFFFFFFFF), group_mode=r.int("group_mode", 0o600, hi=0o7777))
        dev.options = _model_options(r, i, model, source)
        if not endpoint and dev.driver == "vfio-pci":
            raise MachineFileError(source, f"device[{i}].driver", f"a host driver: vfio-pci binds only endpoint "
                                                                  f"models here ({', '.join(endpoint_models)}), "
                                                                  f"not a {model}", dev.driver)
        if x86:
            if dev.bdf in first_with_bdf:
                raise MachineFileError(source, f"device[{i}].bdf", "an address not used by another device", bdf)
            first_with_bdf[dev.bdf] = i
            spec.devices.append(dev)
            continue
        if not any(p.index == dev.phb for p in spec.phbs):
            raise MachineFileError(source, f"device[{i}].phb", f"the index of a [[phb]] ({[p.index for p in spec.phbs]})",
                                   dev.phb)
        if domain != dev.phb:
            raise MachineFileError(source, f"device[{i}].bdf", f"PCI domain {dev.phb:04x} (the domain of phb {dev.phb})",
                                   bdf)
        # The first earlier device in conflict decides the message (indexes
        # instead of a scan of all earlier devices: machines can be large).
        conflicts = []
        if dev.bdf in first_with_bdf:
            conflicts.append((first_with_bdf[dev.bdf], 0))
        j, pe_of_group = first_in_group.get(dev.iommu_group, (-1, None))
        if pe_of_group is not None and pe_of_group != (dev.phb, dev.pe):
            conflicts.append((j, 1))
        j, group_of_pe = first_on_pe.get((dev.phb, dev.pe), (-1, None))
        if group_of_pe is not None and group_of_pe != dev.iommu_group:
            conflicts.append((j, 2))
        if conflicts:
            j, kind = min(conflicts)
            other = spec.devices[j]
            if kind == 0:
                raise MachineFileError(source, f"device[{i}].bdf", "an address not used by another device", bdf)
            if kind == 1:
                raise MachineFileError(source, f"device[{i}].iommu_group",
                                       f"a group of its own: group {dev.iommu_group} is device[{j}]'s, on another PE",
                                       dev.iommu_group)
            raise MachineFileError(source, f"device[{i}].iommu_group",
                                   f"group {other.iommu_group}: devices of one PE share one IOMMU group",
                                   dev.iommu_group)
        first_with_bdf.setdefault(dev.bdf, i)
        first_in_group.setdefault(dev.iommu_group, (i, (dev.phb, dev.pe)))
        first_on_pe.setdefault((dev.phb, dev.pe), (i, dev.iommu_group))
        spec.devices.append(dev)
    del top
    # behind_bridge says the device is alone on the bus below its bridge, which
    # is when Linux can reset it with a secondary bus reset; another device on
    # that bus would contradict it.
    on_bus: dict[str, list[int]] = {}
    for i, dev in enumerate(spec.devices):
        on_bus.setdefault(dev.bdf[:7], []).append(i)
    for i, dev in enumerate(spec.devices):
        others = [j for j in on_bus[dev.bdf[:7]] if j != i]
        if dev.behind_bridge and others:
            raise MachineFileError(source, f"device[{i}].behind_bridge",
                                   f"false: behind_bridge means alone on its bus, and device[{others[0]}] "
                                   f"({spec.devices[others[0]].bdf}) is on bus {dev.bdf[:7]} too", True)
    return spec


def _model_options(r: _Reader, i: int, model: str, source: str) -> dict[str, Any]:
    """The keys only some models take (virtio-net's backend and MAC address)."""
    from .kernel.pci.models import MODEL_OPTIONS
    own = MODEL_OPTIONS.get(model, ())
    for name in sorted(set().union(*MODEL_OPTIONS.values())):
        if r.has(name) and name not in own:
            takers = ", ".join(m for m, keys in MODEL_OPTIONS.items() if name in keys)
            raise MachineFileError(source, f"device[{i}].{name}", f"no {name} key for model {model!r} (only {takers} "
                                   f"takes one)", r.table[name])
    if model != "virtio-net":
        return {}
    from .kernel.pci.net_backends import read_pcap
    from .kernel.pci.virtio_net import parse_mac
    out: dict[str, Any] = {}
    backend = r.str("backend", "loopback", choices=("loopback", "pcap"))
    out["backend"] = backend
    base_dir = os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else os.getcwd()
    for key in ("pcap_rx", "pcap_tx"):
        if r.has(key):
            if backend != "pcap":
                raise MachineFileError(source, f"device[{i}].{key}", 'backend = "pcap" with it', r.table[key])
            path = r.str(key)
            out[key] = path if os.path.isabs(path) else os.path.join(base_dir, path)
    if "pcap_rx" in out:
        try:
            read_pcap(out["pcap_rx"])
        except (OSError, ValueError) as exc:
            raise MachineFileError(source, f"device[{i}].pcap_rx", "a readable pcap file of Ethernet frames",
                                   getattr(exc, "strerror", None) or str(exc)) from exc
    if r.has("mac"):
        try:
            parse_mac(r.str("mac"))
        except ValueError as exc:
            raise MachineFileError(source, f"device[{i}].mac", 'a unicast MAC address like "52:54:00:12:34:56"',
                                   r.table["mac"]) from exc
        out["mac"] = r.str("mac")
    return out


def load_spec_file(path: str) -> MachineSpec:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise MachineFileError(str(path), "(file)", "a readable TOML file", exc.strerror) from exc
    except tomllib.TOMLDecodeError as exc:
        raise MachineFileError(str(path), "(syntax)", "valid TOML", str(exc)) from exc
    return parse_spec(data, str(path))


def load_spec_text(text: str, source: str = "<string>") -> MachineSpec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MachineFileError(source, "(syntax)", "valid TOML", str(exc)) from exc
    return parse_spec(data, source)
