"""A comparable picture of everything a failed call must leave unchanged.

``snapshot(m)`` collects, from the simulated machine's own structures: the
platform's IOMMU state (``Platform.state()``: every TCE of the PowerNV tables
programmed in the PEs, the pseries hypervisor's tables with the guest kernel's
window state, every userspace-address cache entry; VT-d domain extents);
every page pin; each process's locked_vm and preregistered
regions (with their use and mapping counts); each user's locked_vm; each
group's container and the IOMMU driver's view of it; every iommufd context's
object table.  Two snapshots are equal when nothing a program
or a device could observe differs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vfiosim.kernel.iommu import prereg


def snapshot(m) -> dict[str, Any]:
    k = m.kernel
    out: dict[str, Any] = {}
    out["platform"] = k.platform.state()
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
