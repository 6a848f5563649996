"""docs/architecture.md "Adding a platform", followed to the letter.

A toy IOMMU platform, "toyiommu", lives here in the test module and nowhere
in the package: one IOMMU unit whose paging domains are a plain dictionary of
IOVA page -> (physical page, permission), a DMA translator that walks it and
faults on anything unmapped, its Platform, its PlatformBuilder and its
machine-file table, registered the way the walkthrough says (BUILDERS,
machine_spec.PLATFORMS and PLATFORM_TABLES; monkeypatched here).  Then a
machine file that names it runs VFIO's Type1 driver, the topology, the
fuzzer's invariants, the tests' snapshots and the daemon transport without
a change to any of them.
"""

from __future__ import annotations

import ctypes
import itertools
import os
from errno import EFAULT
from pathlib import Path
from typing import Any, Iterator

import pytest

import vfiosim
from vfiosim import fuzz, machine_spec, platforms, uapi
from vfiosim.cli import main
from vfiosim.kernel.dma import DmaFault, IommuBusMaster, Run
from vfiosim.kernel.errors import fail
from vfiosim.kernel.iommu.iommu import (IOMMU_DOMAIN_BLOCKED, IOMMU_DOMAIN_IDENTITY, IOMMU_DOMAIN_PAGING,
                                        IOMMU_READ, IOMMU_RESV_MSI, IOMMU_WRITE, IommuDomain, IommuGroup, IommuOps,
                                        ResvRegion, iommu_probe_device)
from vfiosim.kernel.iommu.type1 import Type1IommuDriver
from vfiosim.kernel.platform.base import IommuMapping, Platform
from vfiosim.machine_spec import DeviceSpec, MachineFileError, MachineSpec

from machinestate import diff, snapshot
from vfioutil import dma_map, edu_dma, enable_bus_master, open_device, reg_read

PAGE = 0x1000
MiB = 1 << 20

# -- 1. the hardware (docs: kernel/platform/<name>.py) ------------------------------------------------


class ToyDomain(IommuDomain):
    """A domain of the toy unit: identity, blocked, or paging with a page table
    that is a dict of IOVA page -> (physical page, IOMMU_READ|IOMMU_WRITE)."""

    def __init__(self, unit: "ToyIommu", type: str, domain_id: int = 0) -> None:
        super().__init__(unit, type, domain_id=domain_id, pgsize_bitmap=PAGE, aperture_start=0,
                         aperture_end=(1 << unit.aperture_bits) - 1)
        self.unit = unit
        self.ptes: dict[int, tuple[int, int]] = {}

    def __repr__(self) -> str:
        return f"<ToyDomain {self.type} #{self.id}>"

    def attach_dev(self, dev: Any) -> None:
        self.unit.contexts[dev.bdf].domain = self

    def map_pages(self, iova: int, paddr: int, size: int, prot: int) -> None:
        if iova + size - 1 > self.aperture_end:
            raise fail(EFAULT, f"IOVA {iova:#x}+{size:#x} is beyond the toy unit's aperture")
        for off in range(0, size, PAGE):
            assert iova + off not in self.ptes, "Type1 never maps over a mapping"
            self.ptes[iova + off] = (paddr + off, prot)

    def unmap_pages(self, iova: int, size: int) -> int:
        gone = [a for a in range(iova, iova + size, PAGE) if self.ptes.pop(a, None) is not None]
        return len(gone) * PAGE

    def iova_to_phys(self, iova: int) -> int:
        pte = self.ptes.get(iova & ~(PAGE - 1))
        return 0 if pte is None else pte[0] + (iova & (PAGE - 1))

    def mapped_bytes(self) -> int:
        return len(self.ptes) * PAGE

    def free(self) -> None:
        if self in self.unit.domains:
            self.unit.domains.remove(self)


class ToyContext:
    """A device's entry in the toy unit: the DmaTranslator its DMA goes through."""

    def __init__(self, unit: "ToyIommu", dev: Any) -> None:
        self.unit = unit
        self.dev = dev
        self.name = f"{unit.name} {dev.bdf}"
        self.domain: ToyDomain = unit.identity_domain

    def dma_enabled(self) -> bool:
        return True

    def translate(self, iova: int, length: int, write: bool) -> list[Run] | DmaFault:
        phys = self.unit.phys
        if self.domain.type == IOMMU_DOMAIN_BLOCKED:
            return DmaFault(iova, "toy: blocked")
        if self.domain.type == IOMMU_DOMAIN_IDENTITY:
            found = phys.lookup(iova)
            return DmaFault(iova, "toy: not RAM") if found is None else [(found[0], found[1], length)]
        need = IOMMU_WRITE if write else IOMMU_READ
        runs: list[Run] = []
        pos, end = iova, iova + length
        while pos < end:
            page = pos & ~(PAGE - 1)
            pte = self.domain.ptes.get(page)
            if pte is None or not pte[1] & need:
                return DmaFault(pos, f"toy: IOVA page {page:#x} is not mapped for {'write' if write else 'read'}")
            chunk = min(end, page + PAGE) - pos
            found = phys.lookup(pte[0] + (pos - page))
            if found is None:
                return DmaFault(pos, "toy: not RAM")
            runs.append((found[0], found[1], chunk))
            pos += chunk
        return runs

    def dma_fault(self, fault: DmaFault, write: bool) -> None:
        self.unit.faults.append((self.dev.bdf, fault.iova, write))
        self.unit.log(f"toy-iommu: {self.dev.bdf} {'write' if write else 'read'} fault at {fault.iova:#x}: "
                      f"{fault.reason}")


class ToyIommu(IommuOps):
    """The toy IOMMU unit: its ``iommu_ops``."""

    name = "toy0"

    def __init__(self, phys: Any, log: Any, aperture_bits: int) -> None:
        self.phys = phys
        self.log = log
        self.aperture_bits = aperture_bits
        self.identity_domain = ToyDomain(self, IOMMU_DOMAIN_IDENTITY)
        self.blocked_domain = ToyDomain(self, IOMMU_DOMAIN_BLOCKED)
        self.domains: list[ToyDomain] = []
        self.contexts: dict[str, ToyContext] = {}
        self.faults: list[tuple[str, int, bool]] = []
        self._ids = itertools.count(1)

    def probe_device(self, dev: Any) -> None:
        ctx = self.contexts[dev.bdf] = ToyContext(self, dev)
        dev.bus_master = IommuBusMaster(ctx, dev)

    def default_domain(self, dev: Any) -> IommuDomain:
        return self.identity_domain

    def domain_alloc_paging(self, dev: Any) -> IommuDomain:
        d = ToyDomain(self, IOMMU_DOMAIN_PAGING, next(self._ids))
        self.domains.append(d)
        return d

    def get_resv_regions(self, dev: Any) -> list[ResvRegion]:
        return [ResvRegion(0xFEE00000, MiB, IOMMU_RESV_MSI)]

    def isolated_msi(self, dev: Any) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": "toy-iommu", "page_sizes": PAGE,
                "domains": [{"id": d.id, "groups": [g.id for g in d.groups], "mapped_bytes": d.mapped_bytes()}
                            for d in self.domains],
                "faults": len(self.faults)}


class ToyPlatform(Platform):
    name = "toyiommu"

    def __init__(self, unit: ToyIommu) -> None:
        super().__init__()
        self.unit = unit

    @property
    def iommu_units(self) -> list[ToyIommu]:
        return [self.unit]

    def describe(self) -> dict[str, Any]:
        return {"pes": [], "iommu_units": [self.unit.describe()]}

    def describe_group(self, group: IommuGroup) -> dict[str, Any]:
        d = group.domain
        return {} if d is None else {"domain": {"type": d.type, "id": d.id}}

    def mappings(self, limit: int | None = None) -> Iterator[IommuMapping]:
        for d in self.unit.domains:
            pages = (IommuMapping(f"toy domain {d.id}", iova, pte[0], PAGE) for iova, pte in sorted(d.ptes.items()))
            yield from itertools.islice(pages, limit)

    def state(self) -> Any:
        return [(d.type, d.id, tuple(sorted(d.ptes.items()))) for d in self.unit.domains]

    def paging_domains(self) -> list[IommuDomain]:
        return list(self.unit.domains)


# -- 2. the builder (docs: platforms.py) -----------------------------------------------------------------


class ToyBuilder(platforms.PlatformBuilder):
    @classmethod
    def check(cls, profile: Any, page_size: int) -> None:
        if page_size != 4096:
            raise ValueError(f"the toy IOMMU has 4 KiB pages only, not page_size={page_size}")

    def setup(self) -> Platform:
        k = self.kernel
        self.unit = ToyIommu(k.phys, k.log.err, self.spec.platform_spec["aperture_bits"])
        if k.config.vfio_container:
            k.vfio.iommu_drivers.register(Type1IommuDriver(k))
        k.log.info(f"toy-iommu: {self.unit.name}, {self.unit.aperture_bits}-bit aperture")
        return ToyPlatform(self.unit)

    def bar_window(self, ds: DeviceSpec) -> tuple[int, int]:
        return 0, 0xC0000000

    def attach_device(self, dev: Any, ds: DeviceSpec) -> None:
        iommu_probe_device(dev, self.unit)


# -- 3. the machine file (docs: machine_spec.py) ------------------------------------------------------------


def parse_toy(data: dict[str, Any], spec: MachineSpec, source: str) -> None:
    """[toyiommu] aperture_bits: the width of the unit's IOVA space."""
    table = data.get("toyiommu", {})
    if not isinstance(table, dict) or set(table) - {"aperture_bits"}:
        raise MachineFileError(source, "toyiommu", "a table with the key aperture_bits", table)
    bits = table.get("aperture_bits", 32)
    if not isinstance(bits, int) or not 20 <= bits <= 64:
        raise MachineFileError(source, "toyiommu.aperture_bits", "an integer in 20..64", bits)
    spec.platform_spec = {"aperture_bits": bits}


TOY_TOML = """
[machine]
name = "toybox"
description = "one edu behind a toy IOMMU"
platform = "toyiommu"
ram = "256M"

[toyiommu]
aperture_bits = 32

[[device]]
bdf = "0000:01:00.0"
model = "edu"
iommu_group = 7
"""


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the platform the way the walkthrough says."""
    monkeypatch.setitem(platforms.BUILDERS, "toyiommu", ToyBuilder)
    monkeypatch.setattr(machine_spec, "PLATFORMS", (*machine_spec.PLATFORMS, "toyiommu"))
    monkeypatch.setitem(machine_spec.PLATFORM_TABLES, "toyiommu", (("toyiommu",), parse_toy))


def toy_machine() -> vfiosim.Machine:
    return vfiosim.Machine.from_toml(TOY_TOML, source="toybox.toml")


# -- 4. the tests ----------------------------------------------------------------------------------------


def test_the_machine_file_builds_a_toy_machine(toy):
    m = toy_machine()
    assert (m.platform, m.name) == ("toyiommu", "toybox")
    assert m.iommu_groups() == {7: ["0000:01:00.0"]}
    assert sorted(m.kernel.dev_nodes) == ["/dev/vfio/7", "/dev/vfio/vfio"]
    assert m.kernel.vfio.iommu_drivers.names() == ["vfio-iommu-type1"]
    unit = m.iommu_units[0]
    assert isinstance(unit, ToyIommu) and unit.aperture_bits == 32
    assert m.device("0000:01:00.0").bus_master.translator is unit.contexts["0000:01:00.0"]
    assert "toy-iommu: toy0, 32-bit aperture" in "\n".join(m.dmesg())
    assert m.kernel.config.vfio_container and not m.kernel.eeh_enabled()


def test_its_own_table_is_checked_and_refused_elsewhere(toy):
    with pytest.raises(MachineFileError) as exc:
        vfiosim.Machine.from_toml(TOY_TOML.replace("aperture_bits = 32", "aperture_bits = 8"), source="t.toml")
    assert exc.value.key == "toyiommu.aperture_bits"
    with pytest.raises(MachineFileError) as exc:
        vfiosim.Machine.from_toml(TOY_TOML + "\n[[phb]]\nindex = 0\n", source="t.toml")
    assert exc.value.key == "phb" and "toyiommu" in str(exc.value)
    x86 = TOY_TOML.replace('platform = "toyiommu"', 'platform = "x86"')
    with pytest.raises(MachineFileError) as exc:
        vfiosim.Machine.from_toml(x86, source="t.toml")
    assert exc.value.key == "toyiommu" and "platform toyiommu" in str(exc.value)
    with pytest.raises(MachineFileError) as exc:
        vfiosim.Machine.from_toml(TOY_TOML + "\n[iommu]\n", source="t.toml")
    assert exc.value.key == "iommu" and "platform x86" in str(exc.value)


def test_an_unregistered_platform_is_a_machine_file_error():
    with pytest.raises(MachineFileError) as exc:
        vfiosim.Machine.from_toml(TOY_TOML.replace("[toyiommu]\naperture_bits = 32\n", ""), source="t.toml")
    assert exc.value.key == "machine.platform" and "toyiommu" in str(exc.value)


def test_type1_maps_and_edu_dmas_through_the_toy_iommu(toy):
    m = toy_machine()
    unit = m.iommu_units[0]
    assert isinstance(unit, ToyIommu)
    bdf = "0000:01:00.0"
    p = m.spawn(rlimit_memlock=(8 * MiB, 8 * MiB))
    c = p.open("/dev/vfio/vfio", os.O_RDWR)
    g = p.open("/dev/vfio/7", os.O_RDWR)
    assert p.ioctl(c, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_TYPE1v2_IOMMU) == 1
    assert p.ioctl(c, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_SPAPR_TCE_IOMMU) == 0
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    assert [d.type for d in unit.domains] == [IOMMU_DOMAIN_PAGING]
    domain = unit.domains[0]
    assert m.kernel.iommu_groups[7].domain is domain

    # The IOMMU info: the toy's one page size.
    info = uapi.vfio_iommu_type1_info(argsz=ctypes.sizeof(uapi.vfio_iommu_type1_info))
    p.ioctl(c, uapi.VFIO_IOMMU_GET_INFO, info)
    assert info.iova_pgsizes == PAGE

    buf = p.mmap(4 * PAGE)
    payload = bytes(range(256)) * 16
    p.write_memory(buf, payload)
    dma_map(p, c, buf, 0x100000, 4 * PAGE)
    assert p.status()["VmLck"] == 16
    assert sorted(domain.ptes) == [0x100000 + i * PAGE for i in range(4)]
    assert all(prot & (IOMMU_READ | IOMMU_WRITE) == IOMMU_READ | IOMMU_WRITE for _, prot in domain.ptes.values())

    # edu DMA: RAM -> device buffer (0x40000) -> RAM, through the toy page table.
    dev = open_device(p, g, bdf)
    enable_bus_master(p, dev)
    edu_dma(p, dev, 0x100000, 0x40000, PAGE, to_ram=False)
    edu_dma(p, dev, 0x40000, 0x100000 + 2 * PAGE, PAGE, to_ram=True)
    assert reg_read(p, dev, 0x98) & 1 == 0                 # done
    assert p.read_memory(buf + 2 * PAGE, PAGE) == payload[:PAGE]
    assert not unit.faults

    # The live mappings the platform lists are the pages Type1 pinned.
    listed = list(m.kernel.platform.mappings())
    assert [mp.iova for mp in listed] == [0x100000 + i * PAGE for i in range(4)]
    fuzz.check_invariants(m)

    # UNMAP, and the same DMA faults the toy way: nothing written, a fault recorded.
    p.write_memory(buf + 3 * PAGE, b"\x55" * PAGE)
    unmap = uapi.vfio_iommu_type1_dma_unmap(argsz=24, iova=0x100000, size=4 * PAGE)
    p.ioctl(c, uapi.VFIO_IOMMU_UNMAP_DMA, unmap)
    assert unmap.size == 4 * PAGE
    assert domain.ptes == {} and p.status()["VmLck"] == 0
    edu_dma(p, dev, 0x40000, 0x100000 + 3 * PAGE, PAGE, to_ram=True)
    assert unit.faults == [(bdf, 0x100000 + 3 * PAGE, True)]
    assert p.read_memory(buf + 3 * PAGE, PAGE) == b"\x55" * PAGE
    assert f"toy-iommu: {bdf} write fault at {0x100000 + 3 * PAGE:#x}" in "\n".join(m.dmesg())

    p.exit()
    assert m.pinned_pages() == 0 and not m.oopses
    assert unit.domains == [] and m.kernel.iommu_groups[7].domain is unit.identity_domain
    fuzz.check_clean(m)


def test_a_failed_call_leaves_the_machine_state_unchanged(toy):
    """tests/machinestate.snapshot() reads the toy IOMMU through Platform.state()."""
    m = toy_machine()
    p = m.spawn()
    c = p.open("/dev/vfio/vfio", os.O_RDWR)
    g = p.open("/dev/vfio/7", os.O_RDWR)
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    buf = p.mmap(2 * PAGE)
    dma_map(p, c, buf, 0x200000, 2 * PAGE)
    before = snapshot(m)
    assert before["platform"] == [(IOMMU_DOMAIN_PAGING, 1, tuple(sorted(m.iommu_units[0].domains[0].ptes.items())))]
    # Overlapping the mapping (EEXIST), and past the toy's 32-bit aperture
    # (the aperture is a usable range Type1 checks: EINVAL).
    with pytest.raises(OSError) as exc:
        dma_map(p, c, buf, 0x201000, 2 * PAGE)
    assert exc.value.errno == 17
    with pytest.raises(OSError) as exc:
        dma_map(p, c, buf, 1 << 32, 2 * PAGE)
    assert exc.value.errno == 22
    assert snapshot(m) == before, diff(before, snapshot(m))
    fuzz.check_invariants(m)
    p.exit()
    fuzz.check_clean(m)


def test_the_topology_describes_the_toy_unit(toy, tmp_path, capsys):
    m = toy_machine()
    p = m.spawn()
    c = p.open("/dev/vfio/vfio", os.O_RDWR)
    g = p.open("/dev/vfio/7", os.O_RDWR)
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    dma_map(p, c, p.mmap(PAGE), 0, PAGE)
    topo = m.topology()
    assert topo["platform"] == "toyiommu" and topo["pes"] == [] and topo["eeh"] is False
    assert topo["iommu_units"] == [{"name": "toy0", "model": "toy-iommu", "page_sizes": PAGE,
                                    "domains": [{"id": 1, "groups": [7], "mapped_bytes": PAGE}], "faults": 0}]
    group = next(gr for gr in topo["iommu_groups"] if gr["id"] == 7)
    assert group["domain"] == {"type": IOMMU_DOMAIN_PAGING, "id": 1} and group["node"] == "/dev/vfio/7"
    # `vfiosim topology` on the machine file: the text names the unit and its domain.
    path = tmp_path / "toybox.toml"
    path.write_text(TOY_TOML)
    assert main(["topology", "--machine", str(path)]) == 0
    out = capsys.readouterr().out
    assert "platform toyiommu" in out and "IOMMU drivers: vfio-iommu-type1" in out
    assert "IOMMU unit toy0 (toy-iommu)" in out and "page sizes 4K" in out
    assert "group 7: /dev/vfio/7, viable, identity domain (host)" in out


def test_a_c_program_runs_on_it_under_the_daemon(toy, tmp_path):
    """examples/type1_edu_dma.c, unmodified, through the preload shim and the daemon."""
    from runutil import EXAMPLES, ThreadedDaemon, cc
    exe = cc(EXAMPLES / "type1_edu_dma.c", tmp_path)
    m = toy_machine()
    d = ThreadedDaemon(m, tmp_path)
    try:
        # /sys/module has the IOMMU driver the platform registered, and no other
        root = Path(d.root)
        assert (root / "sys/module/vfio_iommu_type1/parameters/dma_entry_limit").read_text() == "65535\n"
        assert not (root / "sys/module/vfio_iommu_spapr_tce").exists()
        r = d.run([str(exe)])
        assert r.returncode == 0, r.stdout + r.stderr + "\n".join(d.logs)
        assert "device 0000:01:00.0 in IOMMU group 7" in r.stdout
        assert "IOMMU page sizes 0x1000" in r.stdout
        assert "DMA round trip of" in r.stdout and "verified" in r.stdout
        assert "unmapped: VmLck 0 kB" in r.stdout
        assert d.wait_idle()
        assert m.pinned_pages() == 0 and not m.oopses and m.iommu_units[0].domains == []
    finally:
        d.close()


def test_the_demo_runs_the_type1_flow_on_it(toy):
    """The demo picks its flow by the IOMMU driver the platform registered."""
    import io

    from vfiosim.demo import run_demo
    m = toy_machine()
    out = io.StringIO()
    assert run_demo(m, out) is True, out.getvalue()
    text = out.getvalue()
    assert "ioctl(VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)" in text and "page sizes 0x1000" in text
    assert "after exit, 0 pages pinned, VmLck 0 kB" in text


def test_its_kernel_may_build_the_vfio_device_cdev(toy):
    """Only POWER kernels always build SPAPR_TCE_IOMMU, which rules the cdev out;
    a new platform is not POWER unless it says so."""
    m = vfiosim.Machine.from_toml(TOY_TOML, kernel_config="iommufd")
    assert m.kernel.config.vfio_device_cdev and "/dev/vfio/devices/vfio0" in m.kernel.dev_nodes
    assert "/dev/iommu" in m.kernel.dev_nodes
