"""Model-based test: random sequences of VFIO calls across several processes.

Hypothesis drives opens, container/group set-up, IOMMU choice (sPAPR v1 and
v2), ENABLE/DISABLE, mmap/munmap, MAP/UNMAP, preregistration, dynamic
windows, setrlimit, setuid, closes and exits, valid and invalid alike.  After
every step the machine is checked against invariants derived independently
of the driver code:

* every valid TCE of every window programmed in a PE points at a pinned page;
* the machine's page pins equal the v1 TCEs plus the preregistered pages;
* each process's locked_vm equals the sum of what its containers charge
  (enabled v1 windows, TCE tables, preregistered regions);
* a group is in at most one container, and its container lists it;
* every TCE points into memory of the process that owns the container
  (its mm), never into another process's, across fork(), munmap() and exits;
* after a process exits nothing of it remains: no task, no open group, and
  once its last container is gone no pin either.

Processes also fork (the child shares the parent's containers and groups but
not its address space), mmap and munmap memory (also memory that is mapped
for DMA: the pins outlive the mapping), and lower their RLIMIT_MEMLOCK.
tests/test_model_type1.py does the same for Type1 on the x86 machine.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

import vfiosim
from modelbase import ProcessModel
from vfiosim import uapi
from vfiosim.kernel.iommu import prereg
from vfiosim.kernel.iommu.spapr_tce import TceContainer
from vfiosim.kernel.iommu.tce import TCE_PERM_MASK

MiB = 1 << 20


class VfioModel(ProcessModel):
    def __init__(self) -> None:
        super().__init__()
        self.m = vfiosim.Machine.preset("powernv")

    # -- rules ----------------------------------------------------------------------------------------

    @initialize()
    def two_processes(self):
        self.spawn(0, 8 << 30)
        self.spawn(0, 8 << 20)

    @precondition(lambda self: sum(p["p"].alive for p in self.procs) < 3)
    @rule(uid=st.sampled_from([0, 0, 1000]), limit=st.sampled_from([64 << 10, 8 << 20, 4 << 30]))
    def spawn(self, uid, limit):
        p = self.m.spawn(uid=uid, rlimit_memlock=(limit, limit))
        buf = p.mmap(16 * MiB)
        p.write_memory(buf, b"\x5a" * 16 * MiB)
        pr = {"p": p, "buf": buf, "fds": [], "maps": []}
        self.procs.append(pr)
        self.note_memory(pr)


    @precondition(lambda self: sum(p["p"].alive for p in self.procs) < 4)
    @rule(i=st.integers(0, 2))
    def fork(self, i):
        """fork(): the child shares every open file, not the memory."""
        pr = self.proc(i)
        if not pr:
            return
        child = pr["p"].fork()
        event("forked")
        c = {"p": child, "buf": pr["buf"], "fds": list(pr["fds"]), "maps": list(pr["maps"]),
             "containers": list(pr.get("containers", []))}
        self.procs.append(c)
        self.note_memory(c)

    @rule(i=st.integers(0, 2))
    def exec(self, i):
        """execve(): a new address space; the files stay open (none is O_CLOEXEC),
        a sPAPR container keeps the old mm and refuses the new image (EPERM)."""
        self.exec_process(i)

    @rule(i=st.integers(0, 2), size=st.sampled_from([64 << 10, 1 * MiB, 4 * MiB]), touch=st.booleans())
    def mmap(self, i, size, touch):
        pr = self.proc(i)
        if not pr:
            return
        addr = pr["p"].mmap(size)
        if touch:
            pr["p"].write_memory(addr, b"\x33" * size)
        pr["maps"].append((addr, size))
        self.note_memory(pr)

    @rule(i=st.integers(0, 2), k=st.integers(0, 5), off=st.integers(0, 255), pages=st.integers(1, 4096))
    def munmap(self, i, k, off, pages):
        """munmap(), also of memory that is mapped for DMA: pinned pages stay."""
        pr = self.proc(i)
        if not pr:
            return
        regions = [(pr["buf"], 16 * MiB)] + pr["maps"]
        base, size = regions[k % len(regions)]
        self.call(pr["p"].munmap, base + (off << 12) % size, pages << 12)

    @rule(i=st.integers(0, 2), k=st.integers(0, 5), pages=st.integers(1, 64))
    def map_other_memory(self, i, k, pages):
        """MAP_DMA (v1) or REGISTER_MEMORY (v2) of the extra mappings."""
        pr = self.proc(i)
        c = self.container(pr, k) if pr else None
        if c is None or not pr["maps"]:
            return
        addr, size = pr["maps"][k % len(pr["maps"])]
        n = min(pages << 12, size)
        dm = uapi.vfio_iommu_type1_dma_map(argsz=32, flags=3, vaddr=addr, iova=(k << 20) + (1 << 24), size=n)
        self.call(pr["p"].ioctl, c, uapi.VFIO_IOMMU_MAP_DMA, dm)
        r = uapi.vfio_iommu_spapr_register_memory(argsz=24, vaddr=addr, size=n)
        self.call(pr["p"].ioctl, c, uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY, r)

    @rule(i=st.integers(0, 2), group=st.sampled_from([0, 1]), v2=st.booleans(), enable=st.booleans())
    def setup(self, i, group, v2, enable):
        """The usual sequence in one step, so that deep states are reached."""
        pr = self.proc(i)
        if not pr:
            return
        p = pr["p"]
        c = self.call(p.open, "/dev/vfio/vfio", os.O_RDWR)
        g = self.call(p.open, f"/dev/vfio/{group}", os.O_RDWR)
        for fd in (c, g):
            if fd is not None:
                pr["fds"].append(fd)
        if c is None or g is None:
            return
        if self.call(p.ioctl, g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c)) is None:
            return
        iommu = uapi.VFIO_SPAPR_TCE_v2_IOMMU if v2 else uapi.VFIO_SPAPR_TCE_IOMMU
        if self.call(p.ioctl, c, uapi.VFIO_SET_IOMMU, iommu) is None:
            return
        if not v2 and enable:
            self.call(p.ioctl, c, uapi.VFIO_IOMMU_ENABLE)
        pr.setdefault("containers", []).append(c)

    def container(self, pr: dict, k: int) -> int | None:
        live = [c for c in pr.get("containers", []) if c in pr["fds"]]
        return live[k % len(live)] if live else None

    @rule(i=st.integers(0, 2), k=st.integers(0, 3), off=st.integers(0, 4000), pages=st.integers(1, 64),
          iova_page=st.integers(0, 4096), flags=st.sampled_from([1, 2, 3]), unmap=st.booleans(), win1=st.booleans())
    def map_valid(self, i, k, off, pages, iova_page, flags, unmap, win1):
        pr = self.proc(i)
        c = self.container(pr, k) if pr else None
        if c is None:
            return
        iova = (iova_page << 12) | ((1 << 59) if win1 else 0)
        if unmap:
            s = uapi.vfio_iommu_type1_dma_unmap(argsz=24, iova=iova, size=pages << 12)
            self.call(pr["p"].ioctl, c, uapi.VFIO_IOMMU_UNMAP_DMA, s)
        else:
            s = uapi.vfio_iommu_type1_dma_map(argsz=32, flags=flags, vaddr=pr["buf"] + (off << 12), iova=iova,
                                               size=pages << 12)
            self.call(pr["p"].ioctl, c, uapi.VFIO_IOMMU_MAP_DMA, s)

    @rule(i=st.integers(0, 2), k=st.integers(0, 3), off=st.integers(0, 3000), pages=st.integers(1, 1024),
          unregister=st.booleans())
    def prereg_valid(self, i, k, off, pages, unregister):
        pr = self.proc(i)
        c = self.container(pr, k) if pr else None
        if c is None:
            return
        s = uapi.vfio_iommu_spapr_register_memory(argsz=24, vaddr=pr["buf"] + (off << 12), size=pages << 12)
        cmd = uapi.VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY if unregister else uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY
        self.call(pr["p"].ioctl, c, cmd, s)

    @rule(i=st.integers(0, 2), k=st.integers(0, 3), remove=st.booleans(), levels=st.sampled_from([1, 2]))
    def window_valid(self, i, k, remove, levels):
        pr = self.proc(i)
        c = self.container(pr, k) if pr else None
        if c is None:
            return
        if remove:
            s = uapi.vfio_iommu_spapr_tce_remove(argsz=16, start_addr=1 << 59)
            self.call(pr["p"].ioctl, c, uapi.VFIO_IOMMU_SPAPR_TCE_REMOVE, s)
        else:
            s = uapi.vfio_iommu_spapr_tce_create(argsz=40, page_shift=12, window_size=1 << 30, levels=levels)
            self.call(pr["p"].ioctl, c, uapi.VFIO_IOMMU_SPAPR_TCE_CREATE, s)

    @rule(i=st.integers(0, 2))
    def open_container(self, i):
        pr = self.proc(i)
        if pr:
            fd = self.call(pr["p"].open, "/dev/vfio/vfio", os.O_RDWR)
            if fd is not None:
                pr["fds"].append(fd)

    @rule(i=st.integers(0, 2), group=st.sampled_from([0, 1]))
    def open_group(self, i, group):
        pr = self.proc(i)
        if pr:
            fd = self.call(pr["p"].open, f"/dev/vfio/{group}", os.O_RDWR)
            if fd is not None:
                pr["fds"].append(fd)

    @rule(i=st.integers(0, 2), a=st.integers(0, 20), b=st.integers(0, 20))
    def set_container(self, i, a, b):
        pr = self.proc(i)
        if pr and pr["fds"]:
            g, c = pr["fds"][a % len(pr["fds"])], pr["fds"][b % len(pr["fds"])]
            self.call(pr["p"].ioctl, g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))

    @rule(i=st.integers(0, 2), a=st.integers(0, 20), op=st.sampled_from([
        ("set", uapi.VFIO_SPAPR_TCE_IOMMU), ("set", uapi.VFIO_SPAPR_TCE_v2_IOMMU), ("enable", 0), ("disable", 0),
        ("unset", 0)]))
    def container_op(self, i, a, op):
        pr = self.proc(i)
        if not pr or not pr["fds"]:
            return
        fd = pr["fds"][a % len(pr["fds"])]
        p = pr["p"]
        kind, arg = op
        if kind == "set":
            self.call(p.ioctl, fd, uapi.VFIO_SET_IOMMU, arg)
        elif kind == "enable":
            self.call(p.ioctl, fd, uapi.VFIO_IOMMU_ENABLE)
        elif kind == "disable":
            self.call(p.ioctl, fd, uapi.VFIO_IOMMU_DISABLE)
        else:
            self.call(p.ioctl, fd, uapi.VFIO_GROUP_UNSET_CONTAINER)

    @rule(i=st.integers(0, 2), a=st.integers(0, 20), off=st.integers(0, 4095), pages=st.integers(0, 300),
          iova_page=st.sampled_from([0, 1, 100, (2 << 30 >> 12) - 2, 1 << 47 >> 12]), flags=st.sampled_from([1, 2, 3, 0]),
          unmap=st.booleans())
    def map_or_unmap(self, i, a, off, pages, iova_page, flags, unmap):
        pr = self.proc(i)
        if not pr or not pr["fds"]:
            return
        fd = pr["fds"][a % len(pr["fds"])]
        p = pr["p"]
        if unmap:
            s = uapi.vfio_iommu_type1_dma_unmap(argsz=24, iova=iova_page << 12, size=pages << 12)
            self.call(p.ioctl, fd, uapi.VFIO_IOMMU_UNMAP_DMA, s)
        else:
            s = uapi.vfio_iommu_type1_dma_map(argsz=32, flags=flags, vaddr=pr["buf"] + (off << 12),
                                               iova=iova_page << 12, size=pages << 12)
            self.call(p.ioctl, fd, uapi.VFIO_IOMMU_MAP_DMA, s)

    @rule(i=st.integers(0, 2), a=st.integers(0, 20), off=st.integers(0, 3000), pages=st.integers(0, 1000),
          unregister=st.booleans())
    def prereg(self, i, a, off, pages, unregister):
        pr = self.proc(i)
        if not pr or not pr["fds"]:
            return
        fd = pr["fds"][a % len(pr["fds"])]
        s = uapi.vfio_iommu_spapr_register_memory(argsz=24, vaddr=pr["buf"] + (off << 12), size=pages << 12)
        cmd = uapi.VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY if unregister else uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY
        self.call(pr["p"].ioctl, fd, cmd, s)

    @rule(i=st.integers(0, 2), a=st.integers(0, 20), shift=st.sampled_from([12, 16]),
          size=st.sampled_from([1 << 24, 1 << 30, 1 << 32]), levels=st.sampled_from([1, 2]), remove=st.booleans(),
          addr=st.sampled_from([0, 1 << 59]))
    def window(self, i, a, shift, size, levels, remove, addr):
        pr = self.proc(i)
        if not pr or not pr["fds"]:
            return
        fd = pr["fds"][a % len(pr["fds"])]
        if remove:
            s = uapi.vfio_iommu_spapr_tce_remove(argsz=16, start_addr=addr)
            self.call(pr["p"].ioctl, fd, uapi.VFIO_IOMMU_SPAPR_TCE_REMOVE, s)
        else:
            s = uapi.vfio_iommu_spapr_tce_create(argsz=40, page_shift=shift, window_size=size, levels=levels)
            self.call(pr["p"].ioctl, fd, uapi.VFIO_IOMMU_SPAPR_TCE_CREATE, s)

    @rule(i=st.integers(0, 2), a=st.integers(0, 20))
    def close(self, i, a):
        pr = self.proc(i)
        if pr and pr["fds"]:
            fd = pr["fds"].pop(a % len(pr["fds"]))
            self.call(pr["p"].close, fd)

    @rule(i=st.integers(0, 2), limit=st.sampled_from([0, 1 << 20, 8 << 20, 4 << 30]), drop=st.booleans())
    def creds(self, i, limit, drop):
        pr = self.proc(i)
        if not pr:
            return
        import resource
        hard = pr["p"].getrlimit(resource.RLIMIT_MEMLOCK)[1]
        self.call(pr["p"].setrlimit, resource.RLIMIT_MEMLOCK, (min(limit, hard), hard))
        if drop:
            self.call(pr["p"].setuid, 1000)

    @rule(i=st.integers(0, 2))
    def exit(self, i):
        if self.exit_process(i):
            for g in self.m.kernel.vfio.groups.values():
                assert g.opened_file is None or g.opened_file._refs > 0

    # -- invariants --------------------------------------------------------------------------------------

    def containers(self) -> list[TceContainer]:
        out = []
        for g in self.m.kernel.vfio.groups.values():
            c = g.container
            if c is not None and isinstance(c.iommu_data, TceContainer) and c.iommu_data not in out:
                out.append(c.iommu_data)
        return out

    @invariant()
    def tces_point_at_pinned_pages(self):
        phys = self.m.kernel.phys
        for pe in self.m.kernel.pes:
            for tbl in pe.tve:
                if tbl is None or tbl.it_userspace is None:
                    continue
                idx = tbl.it_ops.used(tbl, tbl.it_offset, tbl.it_size)
                for tce in tbl.entries.get_range(0, tbl.it_size)[idx - tbl.it_offset] if idx.size else []:
                    hpa = int(tce) & ~TCE_PERM_MASK
                    obj, off = phys.lookup(hpa)
                    assert obj.pincount[off >> obj.page_shift] > 0, f"TCE {int(tce):#x} points at an unpinned page"

    @invariant()
    def pins_are_tces_plus_regions(self):
        expected = 0
        for c in self.containers():
            if not c.v2:
                expected += sum(t.mapped_count() for t in c.tables if t is not None)
        # Regions of every address space: the processes' own, and the old ones
        # containers keep after an exec.
        mms = {id(mm): mm for mm in [pr["p"].mm for pr in self.procs] + [c.mm for c in self.containers() if c.mm]}
        for mm in mms.values():
            expected += sum(mem.entries for mem in prereg.regions(mm))
        # TCEs shared by windows of two PEs are counted once per table.
        assert self.m.pinned_pages() == expected

    @invariant()
    def locked_vm_is_what_containers_charge(self):
        page_shift = self.m.kernel.page_shift
        for pr in self.procs:
            p = pr["p"]
            if not p.alive:
                assert p.mm.locked_vm == 0
                continue
            charged = sum(mem.entries for mem in prereg.regions(p.mm))
            for c in self.containers():
                if c.mm is p.mm:
                    charged += c.locked_pages if c.enabled and not c.v2 else 0
                    charged += sum(t.it_allocated_size >> page_shift for t in c.tables if t is not None)
            assert p.mm.locked_vm == charged, (p.mm.locked_vm, charged)
            assert p.status()["VmLck"] == charged * (self.m.page_size // 1024)

    @invariant()
    def tces_point_into_the_owners_memory(self):
        """No container reaches another process's memory: its TCEs (v1) and
        preregistered regions (v2) are pages of the process whose mm it holds."""
        phys = self.m.kernel.phys
        for c in self.containers():
            if c.mm is None:
                continue
            owned = self.mem_of[c.mm]
            hpas = []
            for t in c.tables:
                if t is not None:
                    idx = t.it_ops.used(t, t.it_offset, t.it_size)
                    hpas += [t.it_ops.get(t, int(e)) & ~TCE_PERM_MASK for e in idx[:256]]
            for mem in prereg.regions(c.mm):
                hpas += [int(h) for h in mem.hpas[:64]]
            for hpa in hpas:
                obj, _ = phys.lookup(hpa)
                assert obj.phys_base in owned, f"{hpa:#x} is not memory of the container's address space"

    @invariant()
    def groups_belong_to_one_container(self):
        seen = {}
        for g in self.m.kernel.vfio.groups.values():
            if g.container is not None:
                assert g in g.container.group_list
                assert g.id not in seen
                seen[g.id] = g.container
        for c in {id(g.container): g.container for g in self.m.kernel.vfio.groups.values() if g.container}.values():
            for g in c.group_list:
                assert g.container is c

    def teardown(self):
        for pr in self.procs:
            pr["p"].exit()
        assert self.m.pinned_pages() == 0
        assert not self.m.oopses, self.m.oopses


VfioModel.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestVfioModel = VfioModel.TestCase
