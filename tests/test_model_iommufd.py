"""Model-based test of iommufd and the VFIO device cdev on the x86 VT-d machine.

Hypothesis drives several processes (root and uid 1000, two of the same
user) through /dev/iommu: IOASes, the device cdevs bound and attached (to an
IOAS, which makes an automatic HWPT, or to an HWPT from IOMMU_HWPT_ALLOC),
detached, IOMMU_IOAS_MAP (fixed and automatic IOVAs, in the MSI window, over
other mappings), IOMMU_IOAS_UNMAP (inside, across and around mappings, and
everything), IOMMU_DESTROY of any object, IOMMU_OPTION_RLIMIT_MODE, plus
mmap/munmap/mprotect/mlock of the memory, fork, exec, setrlimit, setuid,
closes and exits.  A reference model written from the uAPI's rules
(drivers/iommu/iommufd/io_pagetable.c, ioas.c, pages.c, device.c of 6.12)
keeps each IOAS's mappings, each HWPT's IOAS, each device's attachment, and
after every step the machine must agree:

* each IOAS has exactly the model's areas (IOVA, length, user address), and
  every HWPT's VT-d domain maps exactly their bytes into pinned pages of the
  address space that mapped each one;
* iopt_unmap_iova_range(): an IOAS_UNMAP unmaps the areas inside the range
  in IOVA order and stops with ENOENT at the first one that sticks out
  (keeping what it unmapped); nothing unmapped is ENOENT;
* the machine's page pins are the pages of the areas of IOASes that have a
  domain (an IOAS without one pins nothing);
* accounting as pages.c does it, fixed when the mapping is made: nothing
  with CAP_IPC_LOCK, else the *user's* locked_vm (``user->locked_vm``,
  shared by the uid's processes), or the mm's locked_vm (VmLck) once root
  set IOMMU_OPTION_RLIMIT_MODE on the context and then dropped its
  privileges; VmPin (``pinned_vm``) counts every pinned page of its mm;
* a device's group is attached to its HWPT's domain; after every exit
  nothing is pinned, charged, bound or left in a domain.
"""

from __future__ import annotations

import errno
import os
import resource

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from modelbase import ProcessModel
import iommufdutil as U
from vfiosim.uapi import iommufd as iu
from vfiosim.uapi import vfio as uapi

KiB, MiB = 1 << 10, 1 << 20
PAGE = 4096
BUF = 4 * MiB
APERTURE = 1 << 39                                       # QEMU's intel-iommu: 39-bit IOVAs
MSI = (0xFEE00000, 0xFEEFFFFF)
IOVAS = [0x100000 * k for k in range(1, 9)] + [0x100000 + PAGE, 0xFEE00000, 0xFEDFF000, APERTURE - 0x10000]
U64_MAX = (1 << 64) - 1


class IommufdModel(ProcessModel):
    BUF = BUF

    def __init__(self) -> None:
        super().__init__()
        self.m = U.machine()
        self.m.kernel.dev_nodes["/dev/iommu"].gid = 1000
        # id(IommufdFile) -> {"file", "ictx", "mm_mode": bool, "ioas": {id: {iova: area}},
        #                     "hwpts": {id: [ioas id, auto]}}
        self.ctxs: dict[int, dict] = {}
        # id(device File) -> {"file", "ctx": key, "devid", "pt": hwpt id or None}
        self.devs: dict[int, dict] = {}

    # -- helpers --------------------------------------------------------------------------------------------

    def file_of(self, pr, fd):
        try:
            return pr["p"].task.files.get(fd)
        except Exception:
            return None

    def ctx_fds(self, pr):
        return [fd for fd in pr["fds"] if getattr(self.file_of(pr, fd), "kind", "") == "iommufd"]

    def dev_fds(self, pr):
        return [fd for fd in pr["fds"] if getattr(self.file_of(pr, fd), "kind", "") == "vfio-device"]

    def ctx(self, pr, fd):
        f = self.file_of(pr, fd)
        entry = self.ctxs.get(id(f)) if f is not None else None
        if entry is None and f is not None and getattr(f, "kind", "") == "iommufd":
            entry = self.ctxs[id(f)] = {"file": f, "ictx": f.ictx, "mm_mode": False, "ioas": {}, "hwpts": {}}
        return entry

    def sync(self):
        """Drop what the kernel released: devices whose file is gone are
        unbound (detached first), contexts whose file is gone are destroyed."""
        for key, dev in list(self.devs.items()):
            if dev["file"].released:
                self.detach_model(dev)
                del self.devs[key]
        for key, c in list(self.ctxs.items()):
            if c["file"].released:
                assert not any(d["ctx"] == key for d in self.devs.values()), "a bound device outlived its iommufd"
                del self.ctxs[key]

    def detach_model(self, dev):
        pt = dev["pt"]
        dev["pt"] = None
        if pt is None:
            return
        c = self.ctxs[dev["ctx"]]
        ioas, auto = c["hwpts"][pt]
        if auto and not any(d["pt"] == pt and d["ctx"] == dev["ctx"] for d in self.devs.values()):
            del c["hwpts"][pt]                       # the automatic HWPT goes with its last device

    def pinned(self, c, ioas_id):
        return any(h[0] == ioas_id for h in c["hwpts"].values())

    def device_attached(self, c, ioas_id):
        key = next(k for k, v in self.ctxs.items() if v is c)
        return any(d["ctx"] == key and d["pt"] is not None and c["hwpts"][d["pt"]][0] == ioas_id
                   for d in self.devs.values())

    def areas(self):
        """(context, IOAS id, iova, area) of every live mapping."""
        self.sync()
        for key, c in self.ctxs.items():
            for ioas_id, areas in c["ioas"].items():
                for iova, a in areas.items():
                    yield c, ioas_id, iova, a

    # -- processes -------------------------------------------------------------------------------------------

    @initialize()
    def processes(self):
        self.spawn(0, 64 * MiB)
        self.spawn(1000, 2 * MiB)
        self.spawn(1000, 8 * MiB)

    @precondition(lambda self: sum(p["p"].alive for p in self.procs) < 4)
    @rule(uid=st.sampled_from([0, 1000]), limit=st.sampled_from([256 * KiB, 2 * MiB, 1 << 30]))
    def spawn(self, uid, limit):
        p = self.m.spawn(uid=uid, gid=uid, rlimit_memlock=(limit, limit))
        buf = p.mmap(BUF)
        p.write_memory(buf, b"\x5a" * BUF)
        pr = {"p": p, "buf": buf, "fds": [], "maps": []}
        self.procs.append(pr)
        self.note_memory(pr)

    @precondition(lambda self: sum(p["p"].alive for p in self.procs) < 5)
    @rule(i=st.integers(0, 4))
    def fork(self, i):
        pr = self.proc(i)
        if pr:
            child = pr["p"].fork()
            c = {"p": child, "buf": pr["buf"], "fds": list(pr["fds"]), "maps": list(pr["maps"])}
            self.procs.append(c)
            self.note_memory(c)

    @rule(i=st.integers(0, 4))
    def exit(self, i):
        self.exit_process(i)

    @rule(i=st.integers(0, 4))
    def exec(self, i):
        """A new address space; the old one stays while iommufd holds its pages."""
        self.exec_process(i)

    @rule(i=st.integers(0, 4), limit=st.sampled_from([0, 64 * KiB, 1 * MiB, 8 * MiB]), drop=st.booleans())
    def creds(self, i, limit, drop):
        pr = self.proc(i)
        if pr:
            hard = pr["p"].getrlimit(resource.RLIMIT_MEMLOCK)[1]
            self.call(pr["p"].setrlimit, resource.RLIMIT_MEMLOCK, (min(limit, hard), hard))
            if drop:
                self.call(pr["p"].setuid, 1000)

    @rule(i=st.integers(0, 4), size=st.sampled_from([64 * KiB, 1 * MiB]), ro=st.booleans())
    def mmap(self, i, size, ro):
        pr = self.proc(i)
        if pr:
            addr = pr["p"].mmap(size, 1 if ro else 3)
            if not ro:
                pr["p"].write_memory(addr, b"\x11" * size)
            pr["maps"].append((addr, size))
            self.note_memory(pr)

    def region(self, pr, k):
        regions = [(pr["buf"], BUF)] + pr["maps"]
        return regions[k % len(regions)]

    @rule(i=st.integers(0, 4), k=st.integers(0, 4), off=st.integers(0, 1023), pages=st.integers(1, 512),
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

    @rule(i=st.integers(0, 4), a=st.integers(0, 20))
    def close(self, i, a):
        pr = self.proc(i)
        if pr and pr["fds"]:
            fd = pr["fds"].pop(a % len(pr["fds"]))
            self.call(pr["p"].close, fd)

    # -- /dev/iommu -------------------------------------------------------------------------------------------

    @rule(i=st.integers(0, 4), mm_mode=st.booleans(), ioases=st.integers(1, 2))
    def open_iommufd(self, i, mm_mode, ioases):
        pr = self.proc(i)
        if not pr:
            return
        p = pr["p"]
        fd = self.call(p.open, "/dev/iommu", os.O_RDWR)
        if fd is None:
            return
        pr["fds"].append(fd)
        c = self.ctx(pr, fd)
        if mm_mode:
            ok = self.call(U.option, p, fd, iu.IOMMU_OPTION_RLIMIT_MODE, iu.IOMMU_OPTION_OP_SET, 1) is not None
            assert ok == (p.geteuid() == 0), "RLIMIT_MODE needs CAP_SYS_RESOURCE, and only that on an empty context"
            c["mm_mode"] = ok
        for _ in range(ioases):
            self.ioas_alloc(pr, fd)

    @rule(i=st.integers(0, 4), dev=st.sampled_from(["vfio0", "vfio1"]), hwpt=st.booleans(),
          maps=st.lists(st.tuples(st.integers(0, 1023), st.integers(1, 64), st.integers(-1, 7)), max_size=3))
    def setup(self, i, dev, hwpt, maps):
        """The usual sequence in one step -- /dev/iommu, an IOAS, a device
        bound and attached (to the IOAS or an HWPT of it), a few mappings --
        so that deep states are reached."""
        pr = self.proc(i)
        if not pr:
            return
        self.open_iommufd(i, False, 1)
        fds = self.ctx_fds(pr)
        if not fds:
            return
        fd = fds[-1]
        c = self.ctx(pr, fd)
        if not c["ioas"]:
            return
        ioas = max(c["ioas"])
        p = pr["p"]
        dfd = self.call(p.open, f"/dev/vfio/devices/{dev}", os.O_RDWR)
        if dfd is not None:
            pr["fds"].append(dfd)
            devid = self.call(U.bind, p, dfd, fd)
            if devid is not None:
                f = self.file_of(pr, dfd)
                self.devs[id(f)] = {"file": f, "ctx": id(self.file_of(pr, fd)), "devid": devid, "pt": None,
                                    "fd": dfd}
                pt = ioas
                if hwpt:
                    h = self.call(U.hwpt_alloc, p, fd, devid, ioas)
                    if h is not None:
                        c["hwpts"][h] = [ioas, False]
                        pt = h
                self.attach_to(pr, dfd, pt)
        pairs = self.ctx_pairs()
        for off, pages, slot in maps:
            self.map(pairs.index((pr, fd)), sorted(c["ioas"]).index(ioas) if ioas in c["ioas"] else 0, 0, off,
                     pages, slot, 6)

    def ioas_alloc(self, pr, fd):
        oid = self.call(U.ioas_alloc, pr["p"], fd)
        if oid is not None:
            self.ctx(pr, fd)["ioas"][oid] = {}

    def ctx_pairs(self):
        return [(pr, fd) for pr in self.procs if pr["p"].alive for fd in self.ctx_fds(pr)]

    def has_ctx(self):
        return bool(self.ctx_pairs())

    def pick_ctx(self, i):
        pairs = self.ctx_pairs()
        return pairs[i % len(pairs)] if pairs else (None, None)

    def pick_ioas(self, c, k):
        ids = sorted(c["ioas"]) or [1]
        return ids[k % len(ids)]

    @precondition(has_ctx)
    @rule(i=st.integers(0, 15))
    def another_ioas(self, i):
        pr, fd = self.pick_ctx(i)
        if pr:
            self.ioas_alloc(pr, fd)

    # -- devices ------------------------------------------------------------------------------------------------

    @precondition(has_ctx)
    @rule(i=st.integers(0, 15), dev=st.sampled_from(["vfio0", "vfio1"]), k=st.integers(0, 3), attach=st.booleans())
    def bind(self, i, dev, k, attach):
        """Open a cdev, VFIO_DEVICE_BIND_IOMMUFD, and (usually) attach it to an IOAS."""
        pr, fd = self.pick_ctx(i)
        if not pr:
            return
        p = pr["p"]
        dfd = self.call(p.open, f"/dev/vfio/devices/{dev}", os.O_RDWR)
        if dfd is None:
            return
        pr["fds"].append(dfd)
        devid = self.call(U.bind, p, dfd, fd)
        if devid is None:
            return
        c = self.ctx(pr, fd)
        f = self.file_of(pr, dfd)
        self.devs[id(f)] = {"file": f, "ctx": id(self.file_of(pr, fd)), "devid": devid, "pt": None, "fd": dfd}
        event("bound")
        if attach and c["ioas"]:
            self.attach_to(pr, dfd, self.pick_ioas(c, k))

    def dev_pairs(self):
        out = []
        for pr in self.procs:
            if not pr["p"].alive:
                continue
            for fd in self.dev_fds(pr):
                dev = self.devs.get(id(self.file_of(pr, fd)))
                if dev is not None:
                    out.append((pr, fd, dev))
        return out

    def has_dev(self):
        return bool(self.dev_pairs())

    def attach_to(self, pr, dfd, pt):
        dev = self.devs[id(self.file_of(pr, dfd))]
        c = self.ctxs[dev["ctx"]]
        got = self.call(U.attach, pr["p"], dfd, pt)
        if got is None:
            return
        old = dev["pt"]
        if pt in c["ioas"]:
            # attached to an IOAS: an automatic HWPT (a compatible one is reused)
            assert got not in c["ioas"], "ATTACH to an IOAS wrote back the IOAS, not its HWPT"
            c["hwpts"].setdefault(got, [pt, True])
            assert c["hwpts"][got][0] == pt
        else:
            assert got == pt and c["hwpts"][pt][1] is False
        dev["pt"] = got
        if old is not None and old != got:
            dev["pt"] = old
            self.detach_model(dev)                   # replaced: the old automatic HWPT may go
            dev["pt"] = got
        event("attached")

    @precondition(has_dev)
    @rule(i=st.integers(0, 15), k=st.integers(0, 5))
    def attach(self, i, k):
        pairs = self.dev_pairs()
        pr, dfd, dev = pairs[i % len(pairs)]
        c = self.ctxs[dev["ctx"]]
        targets = sorted(c["ioas"]) + sorted(h for h, (_, auto) in c["hwpts"].items() if not auto)
        if targets:
            self.attach_to(pr, dfd, targets[k % len(targets)])

    @precondition(has_dev)
    @rule(i=st.integers(0, 15))
    def detach(self, i):
        pairs = self.dev_pairs()
        pr, dfd, dev = pairs[i % len(pairs)]
        ok = self.call(lambda: U.detach(pr["p"], dfd) or True) is not None
        # vfio_df_ioctl_detach_pt() -> vfio_iommufd_physical_detach_ioas(): 0 when not attached too
        assert ok, "DETACH of a bound device"
        self.detach_model(dev)

    @precondition(has_dev)
    @rule(i=st.integers(0, 15), k=st.integers(0, 3))
    def hwpt_alloc(self, i, k):
        pairs = self.dev_pairs()
        pr, dfd, dev = pairs[i % len(pairs)]
        c = self.ctxs[dev["ctx"]]
        if not c["ioas"]:
            return
        ioas = self.pick_ioas(c, k)
        fd = next((f for f in self.ctx_fds(pr) if id(self.file_of(pr, f)) == dev["ctx"]), None)
        if fd is None:
            return
        hwpt = self.call(U.hwpt_alloc, pr["p"], fd, dev["devid"], ioas)
        if hwpt is not None:
            c["hwpts"][hwpt] = [ioas, False]
            event("hwpt allocated")

    @precondition(has_ctx)
    @rule(i=st.integers(0, 15), oid=st.integers(1, 8))
    def destroy(self, i, oid):
        pr, fd = self.pick_ctx(i)
        if not pr:
            return
        c = self.ctx(pr, fd)
        ok = self.call(lambda: U.destroy(pr["p"], fd, oid) or True) is not None
        bound = {d["devid"] for d in self.devs.values() if d["ctx"] == id(self.file_of(pr, fd))}
        if oid in c["ioas"]:
            busy = any(h[0] == oid for h in c["hwpts"].values())
            assert ok == (not busy), "an IOAS is destroyed unless an HWPT holds it"
            if ok:
                del c["ioas"][oid]
                event("IOAS destroyed")
        elif oid in c["hwpts"]:
            busy = any(d["pt"] == oid for d in self.devs.values() if d["ctx"] == id(self.file_of(pr, fd)))
            assert ok == (not busy), "an HWPT is destroyed unless a device is attached to it"
            if ok:
                del c["hwpts"][oid]
        elif oid in bound:
            assert not ok, "a bound device is destroyed by unbinding, not IOMMU_DESTROY"
        else:
            assert not ok

    # -- mappings -------------------------------------------------------------------------------------------------

    @precondition(has_ctx)
    @rule(i=st.integers(0, 15), k=st.integers(0, 3), r=st.integers(0, 4), off=st.integers(0, 1023),
          pages=st.integers(1, 256), slot=st.integers(-1, len(IOVAS) - 1), flags=st.sampled_from([6, 6, 2, 4, 0]))
    def map(self, i, k, r, off, pages, slot, flags):
        pr, fd = self.pick_ctx(i)
        if not pr:
            return
        c = self.ctx(pr, fd)
        ioas = self.pick_ioas(c, k)
        p = pr["p"]
        base, size = self.region(pr, r)
        vaddr = base + (off * PAGE) % size
        length = pages * PAGE
        iova = IOVAS[slot] if slot >= 0 else None
        got = self.call(U.ioas_map, p, fd, ioas, vaddr, length, iova, flags)
        areas = c["ioas"].get(ioas)
        if iova is not None and areas is not None:
            if any(a < iova + length and iova < a + x["length"] for a, x in areas.items()):
                assert got is None, "IOAS_MAP over a mapping"
            # a domain reserves what is outside its aperture; an attached device its
            # reserved regions (iopt_table_enforce_dev_resv_regions(): the MSI window)
            if self.pinned(c, ioas) and iova + length > APERTURE:
                assert got is None, "IOAS_MAP outside the domain's aperture"
            if self.device_attached(c, ioas) and iova <= MSI[1] and MSI[0] < iova + length:
                assert got is None, "IOAS_MAP into the attached device's MSI window"
        if got is None:
            return
        assert areas is not None
        if iova is not None:
            assert got == iova
        assert not any(a < got + length and got < a + x["length"] for a, x in areas.items())
        privileged = p.geteuid() == 0
        mode = "none" if privileged else ("mm" if c["mm_mode"] else "user")
        areas[got] = {"length": length, "mm": p.mm, "uid": p.getuid(), "mode": mode, "user_va": vaddr}
        event(f"mapped ({mode} accounting, {'pinned' if self.pinned(c, ioas) else 'not pinned'})")

    @precondition(has_ctx)
    @rule(i=st.integers(0, 15), k=st.integers(0, 3), slot=st.integers(0, len(IOVAS) - 1), shift=st.integers(-2, 2),
          pages=st.sampled_from([1, 16, 256, 512, 4096]), everything=st.booleans())
    def unmap(self, i, k, slot, shift, pages, everything):
        pr, fd = self.pick_ctx(i)
        if not pr:
            return
        c = self.ctx(pr, fd)
        ioas = self.pick_ioas(c, k)
        areas = c["ioas"].get(ioas)
        if everything:
            iova, length = 0, U64_MAX
        else:
            iova, length = IOVAS[slot] + shift * PAGE, pages * PAGE
        # iopt_unmap_iova_range(), in IOVA order
        expect: list[int] = []
        err = None
        if areas is not None:
            last = iova + length - 1 if not everything else U64_MAX
            for a in sorted(areas):
                x = areas[a]
                if a + x["length"] - 1 < iova or a > last:
                    continue
                if a < iova or a + x["length"] - 1 > last:
                    err = errno.ENOENT
                    break
                expect.append(a)
            if not expect and not everything:
                err = errno.ENOENT
        try:
            got = U.ioas_unmap(pr["p"], fd, ioas, iova, length)
            got_err = None
        except OSError as exc:
            got, got_err = None, exc.errno
        if areas is None:
            assert got_err == errno.ENOENT
            return
        assert got_err == err, (got_err, err, iova, length, sorted(areas))
        if err is None:
            assert got == sum(areas[a]["length"] for a in expect)
        for a in expect:
            del areas[a]
        if expect:
            event("unmapped" if err is None else "unmapped, then ENOENT")

    # -- invariants -------------------------------------------------------------------------------------------

    @invariant()
    def ioases_hold_the_models_areas(self):
        self.sync()
        for c in self.ctxs.values():
            desc = {o["id"]: o for o in c["ictx"].describe()["objects"]}
            assert {i for i, o in desc.items() if o["type"] == "ioas"} == set(c["ioas"])
            assert {i for i, o in desc.items() if o["type"] == "hwpt_paging"} == set(c["hwpts"])
            for ioas_id, areas in c["ioas"].items():
                got = [(a["iova"], a["length"], a["user_va"]) for a in desc[ioas_id]["areas"]]
                assert got == sorted((a, x["length"], x["user_va"]) for a, x in areas.items())
            for h, (ioas_id, auto) in c["hwpts"].items():
                assert desc[h]["ioas"] == ioas_id and desc[h]["auto"] == auto
                assert desc[h]["mapped_bytes"] == sum(x["length"] for x in c["ioas"][ioas_id].values())

    @invariant()
    def domains_map_pinned_memory_of_the_mapping_address_space(self):
        self.sync()
        phys = self.m.kernel.phys
        for c in self.ctxs.values():
            for h, (ioas_id, _) in c["hwpts"].items():
                hwpt = c["ictx"].objects[h]
                for iova, length, hpa, _prot in hwpt.domain.extents():
                    owner = next(x["mm"] for a, x in c["ioas"][ioas_id].items() if a <= iova < a + x["length"])
                    obj, off = phys.lookup(hpa)
                    assert obj.phys_base in self.mem_of[owner], f"{iova:#x} maps another address space's memory"
                    first = off >> obj.page_shift
                    assert (obj.pincount[first:first + (length >> 12)] > 0).all()

    @invariant()
    def devices_use_their_hwpts_domain(self):
        self.sync()
        for dev in self.devs.values():
            group = dev["file"].device.group.iommu_group
            if dev["pt"] is None:
                assert group.domain is group.blocking_domain or group.domain.type == "blocked", group.domain
            else:
                hwpt = self.ctxs[dev["ctx"]]["ictx"].objects[dev["pt"]]
                assert group.domain is hwpt.domain

    @invariant()
    def pins_and_charges_are_the_models(self):
        pins = 0
        users: dict[int, int] = {}
        locked: dict[object, int] = {}
        pinned_vm: dict[object, int] = {}
        for c, ioas_id, _iova, x in list(self.areas()):
            if not self.pinned(c, ioas_id):
                continue
            n = x["length"] // PAGE
            pins += n
            pinned_vm[x["mm"]] = pinned_vm.get(x["mm"], 0) + n
            if x["mode"] == "user":
                users[x["uid"]] = users.get(x["uid"], 0) + n
            elif x["mode"] == "mm":
                locked[x["mm"]] = locked.get(x["mm"], 0) + n
        assert self.m.pinned_pages() == pins
        for uid in (0, 1000):
            assert self.m.kernel.users.locked_vm(uid) == users.get(uid, 0), uid
        # (the address space an exec() or exit left is unobservable: the kernel
        # drops what is still charged to it, deviations aside)
        mms = {pr["p"].mm for pr in self.procs if pr["p"].alive}
        for mm in mms:
            assert mm.pinned_vm == pinned_vm.get(mm, 0)
            assert mm.locked_vm == locked.get(mm, 0) + mm.locked_bytes() // PAGE

    def teardown(self):
        for pr in self.procs:
            pr["p"].exit()
        k = self.m.kernel
        assert self.m.pinned_pages() == 0 and not self.m.processes()
        assert all(u.locked_vm == 0 for u in k.users.all())
        assert all(d.kind != "paging" for unit in self.m.iommu_units for d in unit.domains)
        assert all(g.cdev_device_open_cnt == 0 and not g.iommu_group.dma_owner_claimed()
                   for g in k.vfio.groups.values())
        assert not self.m.oopses, self.m.oopses


IommufdModel.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestIommufdModel = IommufdModel.TestCase
