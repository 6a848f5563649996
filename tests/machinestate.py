"""A comparable picture of everything a failed call must leave unchanged.

``snapshot(m)`` collects, from the simulated machine's own structures: every
TCE (PowerNV tables programmed in the PEs and owned by containers, the
pseries hypervisor's tables, with the pseries guest kernel's window state)
and every userspace-address cache entry; VT-d
domain extents; every page pin; each process's locked_vm and preregistered
regions (with their use and mapping counts); each user's locked_vm; each
group's container and the IOMMU driver's view of it; every iommufd context's
object table.  Two snapshots are equal when nothing a program
or a device could observe differs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vfiosim.kernel.iommu import prereg


def _entries(storage, size: int) -> tuple:
    idx = storage.used_indices(0, size)
    if not idx.size:
        return ()
    vals = storage.get_range(0, size)[idx] if size <= 1 << 22 else np.array([storage.get(int(i)) for i in idx])
    return tuple(zip(idx.tolist(), np.asarray(vals, dtype=np.uint64).tolist()))


def _table(tbl) -> tuple:
    uas = _entries(tbl.it_userspace, tbl.it_size) if tbl.it_userspace is not None else None
    return (tbl.bus_start, tbl.it_size, tbl.it_page_shift, tbl.it_indirect_levels, tbl.it_allocated_size,
            _entries(tbl.entries, tbl.it_size), uas)


def snapshot(m) -> dict[str, Any]:
    k = m.kernel
    out: dict[str, Any] = {}
    pes = {}
    for pe in k.pes:
        if hasattr(pe, "tve"):
            pes[pe.name] = ("pnv", pe.bypass, tuple(None if t is None else _table(t) for t in pe.tve))
        elif hasattr(pe, "hv"):
            tg = pe.table_group
            # (a disabled window keeps its old geometry, which nothing can see)
            pes[pe.name] = ("hv", tuple((t.liobn, t.enabled, t.bus_offset, t.page_shift, t.nb_table,
                                         _entries(t.entries, t.nb_table)) if t.enabled else (t.liobn, False)
                                        for t in pe.hv.tables),
                            # the guest kernel's tables (with their userspace views), its
                            # device-tree windows, and whether the PE is on failed_ddw_pdn_list
                            tuple(None if t is None else _table(t) for t in tg.tables),
                            tg.default_window_prop, tg.ddw, tg.ddw_failed)
    out["pes"] = pes
    out["vtd"] = [[(d.kind, tuple(d.extents())) for d in unit.domains] for unit in m.iommu_units]
    pins = []
    for obj in k.phys.objects():
        nz = np.flatnonzero(obj.pincount)
        if nz.size:
            pins.append((obj.phys_base, tuple(nz.tolist()), tuple(obj.pincount[nz].tolist())))
    out["pins"] = pins
    out["pinned_pages"] = k.phys.pinned_pages()
    tasks = {}
    for pid, t in sorted(k.tasks.items()):
        regions = tuple((mem.ua, mem.entries, mem.used, mem.mapped) for mem in prereg.regions(t.mm))
        tasks[pid] = {"locked_vm": t.mm.locked_vm, "pinned_vm": t.mm.pinned_vm, "regions": regions,
                      "fds": tuple((fd, f.kind) for fd, f in t.files.items())}
    out["tasks"] = tasks
    # per-user charges (iommufd's default accounting) and every iommufd context:
    # its objects (with their users counts), ids reserved but never finalized,
    # and each IOAS's areas and allowed ranges
    out["users"] = {u.uid: u.locked_vm for u in k.users.all() if u.locked_vm}
    ictxs: dict[int, Any] = {}
    for pid, t in sorted(k.tasks.items()):
        for fd, f in sorted(t.files.items()):
            ictx = getattr(f, "ictx", None)
            if ictx is not None and id(ictx) not in ictxs:
                desc = ictx.describe()
                for obj in desc["objects"]:
                    obj.pop("domain", None)          # the IOMMU's internal domain number
                ictxs[id(ictx)] = (pid, fd, desc,
                                   tuple(oid for oid, o in sorted(ictx.objects.items()) if o is None))
    out["iommufd"] = sorted(ictxs.values(), key=lambda v: (v[0], v[1]))
    groups = {}
    for gid, g in sorted(k.vfio.groups.items()):
        c = g.container
        desc = None
        if c is not None:
            desc = c.describe()
            desc.pop("id", None)
        groups[gid] = (g.opened_file is not None, g.container_users, desc)
    out["groups"] = groups
    return out


def diff(a: dict, b: dict) -> str:
    """Where two snapshots differ (for assertion messages)."""
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            lines.append(f"{key}:\n  before {a.get(key)!r}\n  after  {b.get(key)!r}")
    return "\n".join(lines)
