"""A plain-data description of a machine, for `vfiosim topology` and tests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .machine import Machine


def describe(m: "Machine") -> dict[str, Any]:
    k = m.kernel
    platform = k.platform.describe()           # its PEs, its IOMMU units
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
            **k.platform.describe_group(g),
        })
        if vg is not None and vg.iommufd is not None:
            groups[-1]["iommufd"] = True            # VFIO_GROUP_SET_CONTAINER was given an iommufd
    devices = []
    for bdf, d in sorted(k.devices.items()):
        devices.append({"bdf": bdf, "model": d.model, "vendor": d.vendor, "device": d.device_id,
                        "class": d.class_code, "driver": d.driver,
                        "iommu_group": d.iommu_group.id if d.iommu_group else None,
                        "bars": {i: {"size": b.size, "address": d.bar_addresses.get(i)} for i, b in d.bars.items()},
                        "reset": d.reset_method})
    vfio_devices = [{"name": d.cdev_name, "device": d.name, "iommu_group": d.group.id,
                     "cdev": f"/dev/vfio/devices/{d.cdev_name}" if k.config.vfio_device_cdev else None}
                    for d in k.vfio.devices] if k.profile.iommufd else []
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
           "eeh": k.eeh_enabled(), "pes": platform.pop("pes"), "iommu_groups": groups, "devices": devices,
           "processes": sorted(k.tasks)}
    out.update(platform)
    return out
