"""A plain-data description of a machine, for `vfiosim topology` and tests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .machine import Machine


def describe(m: "Machine") -> dict[str, Any]:
    k = m.kernel
    pes = []
    for pe in k.pes:
        tg = pe.table_group
        entry: dict[str, Any] = {
            "name": pe.name,
            "iommu_group": pe.iommu_group.id if pe.iommu_group else None,
            "devices": [d.bdf for d in pe.devices],
            "dma32_window": {"start": tg.tce32_start, "size": tg.tce32_size},
            "ddw": {"page_sizes": tg.pgsizes, "max_windows": tg.max_dynamic_windows_supported,
                    "max_levels": tg.max_levels},
            "windows": pe.windows(),
            "eeh": None if pe.eeh is None else {"state": pe.eeh.get_state(), "frozen": pe.eeh.frozen,
                                               "freezes": pe.eeh.freeze_count},
        }
        phb = getattr(pe, "phb", None)
        if phb is not None:
            entry["phb"] = {"index": phb.index, "model": phb.model}
        else:
            entry["phb"] = {"index": pe.hv.index, "model": "sPAPR", "liobns": [t.liobn for t in pe.hv.tables]}
        pes.append(entry)
    groups = []
    for gid, g in sorted(k.iommu_groups.items()):
        vg = k.vfio.groups.get(gid)
        owner = None
        if vg is not None and vg.opened_file is not None:
            owner = "open"
        groups.append({
            "id": gid, "devices": [d.bdf for d in g.devices], "viable": not g.host_driver_owned(),
            "node": f"/dev/vfio/{gid}" if vg is not None and k.config.vfio_group else None,
            "state": owner or "closed",
            "container": vg.container.describe() if vg is not None and vg.container is not None else None,
        })
        if vg is not None and vg.iommufd is not None:
            groups[-1]["iommufd"] = True            # VFIO_GROUP_SET_CONTAINER was given an iommufd
        if g.domain is not None and g.domain.owner in m.iommu_units:
            # x86: the IOMMU domain the group's DMA goes through now.
            groups[-1]["domain"] = {"type": g.domain.type, "id": g.domain.id}
    devices = []
    for bdf, d in sorted(k.devices.items()):
        devices.append({"bdf": bdf, "model": d.model, "vendor": d.vendor, "device": d.device_id,
                        "class": d.class_code, "driver": d.driver,
                        "iommu_group": d.iommu_group.id if d.iommu_group else None,
                        "bars": {i: {"size": b.size, "address": d.bar_addresses.get(i)} for i, b in d.bars.items()},
                        "reset": d.reset_method})
    vfio_devices = [{"name": d.cdev_name, "device": d.name, "iommu_group": d.group.id,
                     "cdev": f"/dev/vfio/devices/{d.cdev_name}" if k.config.vfio_device_cdev else None}
                    for d in k.vfio.devices] if not k.vfio.legacy else []
    # every open iommufd (/dev/iommu, or /dev/vfio/vfio served by iommufd) and its objects
    contexts: dict[int, dict[str, Any]] = {}
    for pid, task in sorted(k.tasks.items()):
        for fd, f in sorted(task.files.items()):
            ictx = getattr(f, "ictx", None)
            if ictx is None:
                continue
            if id(ictx) not in contexts:
                contexts[id(ictx)] = {"path": f.name, "fds": [], **ictx.describe()}
            contexts[id(ictx)]["fds"].append({"pid": pid, "fd": fd})
    out = {"machine": m.name, "description": m.spec.description, "platform": m.platform,
           "kernel": m.kernel_version, "page_size": m.page_size, "iommu_drivers": k.vfio.iommu_drivers.names(),
           "kernel_config": k.config.symbols(), "dev_nodes": sorted(k.dev_nodes),
           "vfio_devices": vfio_devices, "iommufd": list(contexts.values()),
           "eeh": k.eeh_enabled(), "pes": pes, "iommu_groups": groups, "devices": devices,
           "processes": sorted(k.tasks)}
    if m.iommu_units:
        out["iommu_units"] = [u.describe() for u in m.iommu_units]
    return out
