"""Machine files: the TOML schema that describes a simulated machine.

The presets in ``vfiosim/presets/`` use it, and so can users
(``Machine.from_file``).  docs/machine-files.md documents every key.  Every
error names the file, the key and what was expected.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

PLATFORMS = ("powernv", "pseries")
DEVICE_MODELS = ("edu",)

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


@dataclass
class MachineSpec:
    name: str
    platform: str
    description: str = ""
    ram: int = 4 << 30
    phbs: list[PhbSpec] = field(default_factory=list)
    devices: list[DeviceSpec] = field(default_factory=list)
    source: str = "<machine>"


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

    def int(self, name: str, default: int | None = None, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
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

    def bool(self, name: str, default: bool) -> bool:
        value = self.table.get(name, default)
        if not isinstance(value, bool):
            raise MachineFileError(self.source, self.key(name), "true or false", value)
        return value

    def size(self, name: str, default: int | None = None) -> int:
        if name not in self.table:
            if default is None:
                raise MachineFileError(self.source, self.key(name), "a size (this key is required)")
            return default
        return parse_size(self.table[name], self.source, self.key(name))

    def page_sizes(self, name: str, default: int) -> int:
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


def parse_spec(data: dict[str, Any], source: str) -> MachineSpec:
    top = _Reader(source, "", data, {"machine", "phb", "device"})
    if "machine" not in data:
        raise MachineFileError(source, "machine", "a [machine] table")
    m = _Reader(source, "machine", data["machine"], {"name", "description", "platform", "ram"})
    spec = MachineSpec(name=m.str("name"), platform=m.str("platform", choices=PLATFORMS),
                       description=m.str("description", ""), ram=m.size("ram", 4 << 30), source=source)
    phbs = data.get("phb", [])
    if not isinstance(phbs, list) or not phbs:
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
            ddw_windows=r.int("ddw_windows", defaults.ddw_windows, lo=0, hi=2),
            dma64_address=r.int("dma64_address", defaults.dma64_address),
            ddw_largest_block=r.int("ddw_largest_block", defaults.ddw_largest_block))
        if any(p.index == phb.index for p in spec.phbs):
            raise MachineFileError(source, f"phb[{i}].index", "an index not used by another PHB", phb.index)
        if spec.platform == "powernv" and not phb.tce_page_sizes & (1 << 12):
            raise MachineFileError(source, f"phb[{i}].tce_page_sizes", "a list that includes 4K")
        if phb.m32_pci_base & (phb.m32_pci_base - 1) or not 0 < phb.m32_pci_base <= 1 << 32:
            raise MachineFileError(source, f"phb[{i}].m32_pci_base", "a power of two up to 4G", phb.m32_pci_base)
        if phb.dma32_size & (phb.dma32_size - 1) or not 0 < phb.dma32_size <= 1 << 32:
            raise MachineFileError(source, f"phb[{i}].dma32_size", "a power of two up to 4G", phb.dma32_size)
        spec.phbs.append(phb)
    devices = data.get("device", [])
    if not isinstance(devices, list):
        raise MachineFileError(source, "device", "a list of [[device]] tables", devices)
    dev_keys = {"bdf", "model", "phb", "pe", "iommu_group", "behind_bridge", "driver", "dma_mask",
                "group_uid", "group_gid", "group_mode"}
    from .kernel.pci.device import parse_bdf
    for i, table in enumerate(devices):
        r = _Reader(source, f"device[{i}]", table, dev_keys)
        bdf = r.str("bdf")
        try:
            domain = parse_bdf(bdf)[0]
        except ValueError as exc:
            raise MachineFileError(source, f"device[{i}].bdf", "a PCI address DDDD:BB:SS.F", bdf) from exc
        dev = DeviceSpec(bdf=bdf.lower(), model=r.str("model", choices=DEVICE_MODELS), phb=r.int("phb", lo=0, hi=0xFFFF),
                         iommu_group=r.int("iommu_group", lo=0, hi=0xFFFFF), pe=r.int("pe", 1, lo=0, hi=4095),
                         behind_bridge=r.bool("behind_bridge", False), driver=r.str("driver", "vfio-pci"),
                         dma_mask=r.int("dma_mask", (1 << 28) - 1), group_uid=r.int("group_uid", 0, hi=0xFFFFFFFF),
                         group_gid=r.int("group_gid", 0, hi=0xFFFFFFFF), group_mode=r.int("group_mode", 0o600, hi=0o7777))
        if not any(p.index == dev.phb for p in spec.phbs):
            raise MachineFileError(source, f"device[{i}].phb", f"the index of a [[phb]] ({[p.index for p in spec.phbs]})",
                                   dev.phb)
        if domain != dev.phb:
            raise MachineFileError(source, f"device[{i}].bdf", f"PCI domain {dev.phb:04x} (the domain of phb {dev.phb})",
                                   bdf)
        for j, other in enumerate(spec.devices):
            if other.bdf == dev.bdf:
                raise MachineFileError(source, f"device[{i}].bdf", "an address not used by another device", bdf)
            if other.iommu_group == dev.iommu_group and (other.phb, other.pe) != (dev.phb, dev.pe):
                raise MachineFileError(source, f"device[{i}].iommu_group",
                                       f"a group of its own: group {dev.iommu_group} is device[{j}]'s, on another PE",
                                       dev.iommu_group)
            if (other.phb, other.pe) == (dev.phb, dev.pe) and other.iommu_group != dev.iommu_group:
                raise MachineFileError(source, f"device[{i}].iommu_group",
                                       f"group {other.iommu_group}: devices of one PE share one IOMMU group",
                                       dev.iommu_group)
        spec.devices.append(dev)
    del top
    return spec


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
