"""Model-based test of Type1 / Type1v2 on the x86 VT-d machine.

Hypothesis drives several processes through containers (VFIO_TYPE1_IOMMU and
VFIO_TYPE1v2_IOMMU, one or two groups), MAP_DMA and UNMAP_DMA (valid,
invalid, UNMAP_ALL), mmap/munmap (also of memory mapped for DMA), mlock and
munlock, fork, setrlimit, setuid, closes and exits.  A reference model keeps
the mappings each container should have, written from the uAPI's rules
(Type1v2 unmaps whole mappings only; Type1 unmaps from the first mapping
that starts inside the range), and after every step the machine must agree:

* each container's mappings are exactly the model's, and its VT-d domain
  maps exactly their bytes, into pages of the process that made each mapping;
* the machine's page pins are the model's mapped pages (a page mapped twice
  is pinned twice);
* each live process's locked_vm (VmLck) is the pages of the model's mappings
  it made plus the pages it mlock'ed (upstream charges both: deviations.md 9);
* a group is in at most one container; after an exit nothing of the process
  remains, and once every process has exited nothing is pinned or mapped.
"""

from __future__ import annotations

import ctypes
import os
import resource

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

import vfiosim
from modelbase import ProcessModel
from vfiosim import uapi

KiB, MiB = 1 << 10, 1 << 20
PAGE = 4096
BUF = 4 * MiB
IOVAS = [0x100000 * k for k in range(1, 9)] + [0x100000 + PAGE, 0xFEE00000, 1 << 38]


class Type1Model(ProcessModel):
    BUF = BUF

    def __init__(self) -> None:
        super().__init__()
        self.m = vfiosim.Machine.preset("x86")
        # container (VfioContainer) -> {"v2": bool, "maps": {iova: (size, owner mm)}}: the
        # address space that mapped it (a process's, or its image's before an exec)
        self.model: dict[int, dict] = {}
        self.conts: dict[int, object] = {}

    def container_of(self, pr, fd):
        try:
            f = pr["p"].task.files.get(fd)
        except Exception:
            return None
        return getattr(f, "container", None)

    def live_model(self):
        """Model entries of containers whose Type1 state still exists."""
        out = []
        for key, entry in list(self.model.items()):
            cont = self.conts[key]
            if cont.iommu_data is not entry["iommu"]:
                # The last group left or the container was released: its mappings went with it.
                del self.model[key]
                continue
            out.append((cont, entry))
        return out

    # -- processes -------------------------------------------------------------------------------------

    @initialize()
    def two_processes(self):
        self.spawn(0, 64 * MiB)
        self.spawn(1000, 8 * MiB)

    @precondition(lambda self: sum(p["p"].alive for p in self.procs) < 3)
    @rule(uid=st.sampled_from([0, 1000]), limit=st.sampled_from([256 * KiB, 8 * MiB, 1 << 30]))
    def spawn(self, uid, limit):
        p = self.m.spawn(uid=uid, rlimit_memlock=(limit, limit))
        buf = p.mmap(BUF)
        p.write_memory(buf, b"\x5a" * BUF)
        pr = {"p": p, "buf": buf, "fds": [], "maps": [], "containers": []}
        self.procs.append(pr)
        self.note_memory(pr)

    @precondition(lambda self: sum(p["p"].alive for p in self.procs) < 4)
    @rule(i=st.integers(0, 3))
    def fork(self, i):
        pr = self.proc(i)
        if pr:
            child = pr["p"].fork()
            c = {"p": child, "buf": pr["buf"], "fds": list(pr["fds"]), "maps": list(pr["maps"]),
                 "containers": list(pr["containers"])}
            self.procs.append(c)
            self.note_memory(c)

    @rule(i=st.integers(0, 3))
    def exit(self, i):
        self.exit_process(i)

    @rule(i=st.integers(0, 3))
    def exec(self, i):
        """execve(): a new address space; the files stay open.  Type1 maps the
        new image's memory; the old image's mappings stay, charged to its mm."""
        self.exec_process(i)

    @rule(i=st.integers(0, 3), limit=st.sampled_from([0, 64 * KiB, 1 * MiB, 8 * MiB]), drop=st.booleans())
    def creds(self, i, limit, drop):
        pr = self.proc(i)
        if pr:
            hard = pr["p"].getrlimit(resource.RLIMIT_MEMLOCK)[1]
            self.call(pr["p"].setrlimit, resource.RLIMIT_MEMLOCK, (min(limit, hard), hard))
            if drop:
                self.call(pr["p"].setuid, 1000)

    # -- memory ---------------------------------------------------------------------------------------------

    @rule(i=st.integers(0, 3), size=st.sampled_from([64 * KiB, 1 * MiB]), touch=st.booleans(),
          ro=st.booleans())
    def mmap(self, i, size, touch, ro):
        pr = self.proc(i)
        if pr:
            addr = pr["p"].mmap(size, 1 if ro else 3)
            if touch and not ro:
                pr["p"].write_memory(addr, b"\x11" * size)
            pr["maps"].append((addr, size))
            self.note_memory(pr)

    def region(self, pr, k):
        regions = [(pr["buf"], BUF)] + pr["maps"]
        return regions[k % len(regions)]

    @rule(i=st.integers(0, 3), k=st.integers(0, 4), off=st.integers(0, 1023), pages=st.integers(1, 512),
          op=st.sampled_from(["munmap", "mlock", "munlock", "mprotect"]))
    def memory(self, i, k, off, pages, op):
        pr = self.proc(i)
        if not pr:
            return
        base, size = self.region(pr, k)
        addr = base + (off * PAGE) % size
        p = pr["p"]
        if op == "munmap":
            self.call(p.munmap, addr, pages * PAGE)
        elif op == "mlock":
            self.call(p.mlock, addr, pages * PAGE)
        elif op == "munlock":
            self.call(p.munlock, addr, pages * PAGE)
        else:
            self.call(p.mprotect, addr, pages * PAGE, 1)

    # -- VFIO ---------------------------------------------------------------------------------------------------

    @rule(i=st.integers(0, 3), groups=st.sampled_from([(4,), (5,), (4, 5), (5, 4)]), v2=st.booleans(),
          maps=st.lists(st.tuples(st.integers(0, 1023), st.integers(1, 64), st.integers(0, 7)), max_size=3))
    def setup(self, i, groups, v2, maps):
        """The usual sequence in one step (and a few mappings), so that deep states are reached."""
        self.setup_only(i, groups, v2)
        pairs = self.pairs()
        if pairs:
            for off, pages, slot in maps:
                self.map(len(pairs) - 1, 0, off, pages, slot, 3)

    def setup_only(self, i, groups, v2):
        pr = self.proc(i)
        if not pr:
            return
        p = pr["p"]
        c = self.call(p.open, "/dev/vfio/vfio", os.O_RDWR)
        if c is None:
            return
        pr["fds"].append(c)
        for gid in groups:
            g = self.call(p.open, f"/dev/vfio/{gid}", os.O_RDWR)
            if g is None:
                continue
            pr["fds"].append(g)
            self.call(p.ioctl, g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
        iommu = uapi.VFIO_TYPE1v2_IOMMU if v2 else uapi.VFIO_TYPE1_IOMMU
        if self.call(p.ioctl, c, uapi.VFIO_SET_IOMMU, iommu) is not None:
            cont = self.container_of(pr, c)
            self.model[id(cont)] = {"v2": v2, "maps": {}, "iommu": cont.iommu_data}
            self.conts[id(cont)] = cont
            pr["containers"].append(c)

    def container(self, pr, k):
        live = [c for c in pr["containers"] if c in pr["fds"]]
        return live[k % len(live)] if live else None

    def pairs(self):
        """Every (process, container fd) that can make calls."""
        return [(pr, c) for pr in self.procs if pr["p"].alive for c in pr["containers"] if c in pr["fds"]]

    def has_containers(self):
        return bool(self.pairs())

    @precondition(has_containers)
    @rule(i=st.integers(0, 15), r=st.integers(0, 4), off=st.integers(0, 1023),
          pages=st.integers(1, 256), slot=st.integers(0, len(IOVAS) - 1), flags=st.sampled_from([3, 3, 1, 2, 0, 7]))
    def map(self, i, r, off, pages, slot, flags):
        pairs = self.pairs()
        if not pairs:
            return
        pr, c = pairs[i % len(pairs)]
        base, size = self.region(pr, r)
        vaddr = base + (off * PAGE) % size
        iova = IOVAS[slot]
        s = uapi.vfio_iommu_type1_dma_map(argsz=32, flags=flags, vaddr=vaddr, iova=iova, size=pages * PAGE)
        cont = self.container_of(pr, c)
        if self.call(pr["p"].ioctl, c, uapi.VFIO_IOMMU_MAP_DMA, s) is not None:
            entry = self.model.get(id(cont))
            assert entry is not None and entry["iommu"] is cont.iommu_data
            for old, (osize, _) in entry["maps"].items():
                assert old + osize <= iova or iova + pages * PAGE <= old, "MAP_DMA over an existing mapping"
            entry["maps"][iova] = (pages * PAGE, pr["p"].mm)
            event("mapped" if pr["p"].pid == self.procs[0]["p"].pid else "mapped by another process")

    @precondition(has_containers)
    @rule(i=st.integers(0, 15), slot=st.integers(0, len(IOVAS) - 1),
          pages=st.sampled_from([1, 16, 256, 512, 4096]), unmap_all=st.booleans())
    def unmap(self, i, slot, pages, unmap_all):
        pairs = self.pairs()
        if not pairs:
            return
        pr, c = pairs[i % len(pairs)]
        cont = self.container_of(pr, c)
        entry = self.model.get(id(cont))
        if unmap_all:
            s = uapi.vfio_iommu_type1_dma_unmap(argsz=24, flags=uapi.VFIO_DMA_UNMAP_FLAG_ALL, iova=0, size=0)
            iova, end = 0, 1 << 64
        else:
            iova = IOVAS[slot]
            s = uapi.vfio_iommu_type1_dma_unmap(argsz=24, iova=iova, size=pages * PAGE)
            end = iova + pages * PAGE
        expected = None
        if entry is not None and entry["iommu"] is cont.iommu_data:
            maps = entry["maps"]
            removed = []
            inside = [a for a, (sz, _) in maps.items() if a < iova < a + sz]
            ends_inside = [a for a, (sz, _) in maps.items() if a < end < a + sz]
            if entry["v2"] and not unmap_all and (inside or ends_inside):
                expected = "EINVAL"
            else:
                for a in sorted(maps):
                    sz = maps[a][0]
                    if a + sz <= iova:
                        continue
                    if a >= end or (not entry["v2"] and iova > a):
                        break
                    removed.append(a)
                expected = removed
        ret = self.call(pr["p"].ioctl, c, uapi.VFIO_IOMMU_UNMAP_DMA, s)
        if expected is None:
            return
        if expected == "EINVAL":
            assert ret is None
            return
        assert ret == 0, "UNMAP_DMA failed where the model unmaps"
        assert s.size == sum(entry["maps"][a][0] for a in expected)
        for a in expected:
            del entry["maps"][a]
        if expected:
            event("unmapped")

    @rule(i=st.integers(0, 3), a=st.integers(0, 20))
    def close(self, i, a):
        pr = self.proc(i)
        if pr and pr["fds"]:
            fd = pr["fds"].pop(a % len(pr["fds"]))
            self.call(pr["p"].close, fd)

    @rule(i=st.integers(0, 3), a=st.integers(0, 20))
    def unset_container(self, i, a):
        pr = self.proc(i)
        if pr and pr["fds"]:
            self.call(pr["p"].ioctl, pr["fds"][a % len(pr["fds"])], uapi.VFIO_GROUP_UNSET_CONTAINER)

    # -- invariants -------------------------------------------------------------------------------------------

    @invariant()
    def containers_hold_the_models_mappings(self):
        for cont, entry in self.live_model():
            iommu = cont.iommu_data
            got = [(d.iova, d.size) for d in iommu.dmas]
            want = sorted((a, sz) for a, (sz, _) in entry["maps"].items())
            assert got == want, (got, want)
            total = sum(sz for sz, _ in entry["maps"].values())
            for d in iommu.domain_list:
                assert d.domain.mapped_bytes() == total

    @invariant()
    def every_extent_is_pinned_memory_of_the_mapping_process(self):
        phys = self.m.kernel.phys
        for cont, entry in self.live_model():
            for d in cont.iommu_data.domain_list:
                for iova, length, hpa, _prot in d.domain.extents():
                    owner = next(mm for a, (sz, mm) in entry["maps"].items() if a <= iova < a + sz)
                    obj, off = phys.lookup(hpa)
                    assert obj.phys_base in self.mem_of[owner], f"{iova:#x} maps another address space's memory"
                    first = off >> obj.page_shift
                    assert (obj.pincount[first:first + (length >> 12)] > 0).all()

    @invariant()
    def pins_are_the_mapped_pages(self):
        pages = sum(sz for _, e in self.live_model() for sz, _ in e["maps"].values()) // PAGE
        assert self.m.pinned_pages() == pages

    @invariant()
    def locked_vm_is_mappings_plus_mlock(self):
        live = self.live_model()
        for pr in self.procs:
            p = pr["p"]
            if not p.alive:
                continue
            mapped = sum(sz for _, e in live for sz, mm in e["maps"].values() if mm is p.mm) // PAGE
            mlocked = p.mm.locked_bytes() // PAGE
            assert p.mm.locked_vm == mapped + mlocked, (p.pid, p.mm.locked_vm, mapped, mlocked)
            assert p.status()["VmLck"] == (mapped + mlocked) * 4

    @invariant()
    def groups_belong_to_one_container(self):
        for g in self.m.kernel.vfio.groups.values():
            if g.container is not None:
                assert g in g.container.group_list
                assert sum(g in other.container.group_list for other in self.m.kernel.vfio.groups.values()
                           if other.container is not None and other.container is not g.container) == 0

    def teardown(self):
        for pr in self.procs:
            pr["p"].exit()
        assert self.m.pinned_pages() == 0
        assert not self.m.processes()
        assert all(d.kind != "paging" for unit in self.m.iommu_units for d in unit.domains)
        assert not self.m.oopses, self.m.oopses


Type1Model.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestType1Model = Type1Model.TestCase
