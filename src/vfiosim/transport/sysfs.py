"""The fake /sys and /dev/vfio a program under ``vfiosim run`` sees.

The daemon writes a small tree into a private directory; the preload shim
rewrites the paths listed in ``<root>/prefixes`` into it (open, stat,
access, readlink, opendir, realpath).  Files and symlinks are laid out as
Linux has them, so the usual ways of finding a device work::

    /sys/bus/pci/devices/<bdf> -> ../../../devices/pci<dom>:<bus>/<bdf>
    /sys/devices/pci<dom>:<bus>/<bdf>/{vendor,device,class,config,resource,...}
    /sys/devices/.../<bdf>/iommu_group -> ../../../kernel/iommu_groups/<N>
    /sys/devices/.../<bdf>/driver -> ../../../bus/pci/drivers/vfio-pci
    /sys/kernel/iommu_groups/<N>/devices/<bdf> -> ../../../../devices/pci<dom>:<bus>/<bdf>
    /sys/devices/.../<bdf>/vfio-dev/vfio<M>/{uevent,subsystem,device,power/}
    /sys/class/vfio-dev/vfio<M> -> ../../devices/pci<dom>:<bus>/<bdf>/vfio-dev/vfio<M>
    /dev/vfio/vfio, /dev/vfio/<N>
    /dev/iommu, /dev/vfio/devices/vfio<N>      (kernels with IOMMUFD, VFIO_DEVICE_CDEV)

``vfio-dev/vfio<M>`` is the struct device vfio_main.c registers for every
VFIO device (__vfio_register_dev(): "vfio%d" of the vfio-dev class, parent
the PCI device), present whether or not the kernel has the device cdev.  The
tree is that of a kernel without it (CONFIG_VFIO_DEVICE_CDEV=n, as vfiosim
offers no /dev/vfio/devices/): no ``dev`` file and an empty ``uevent``,
as device_add() leaves them for a device with no dev_t.

The host's own PCI devices stay visible in /sys/bus/pci/devices (as links
to the real sysfs) unless a simulated device has the same address.
/dev/vfio entries are regular files holding ``major minor mode uid gid``:
the shim reports them to stat() as character devices with those values.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..machine import Machine

VFIO_GROUP_MAJOR = 243          # a dynamic char major, as /proc/devices shows "vfio"
MISC_MAJOR = 10
VFIO_MINOR = 196
# /dev/iommu is a misc device with a dynamic minor, /dev/vfio/devices/vfioN the
# "vfio-dev" region's dynamic major; the preload shim uses the same numbers.  As a
# Linux 6.12.118 guest with iommufd built in showed them (docs/conformance.md,
# x86-iommufd): misc_minor_alloc() hands out dynamic minors from 256 up (/dev/iommu
# got 257), and vfio_init() allocates the "vfio-dev" region right after the groups'
# "vfio" one, so its major is the next lower (there 249 and 248; here 243 and 242).
IOMMUFD_MISC_MINOR = 257
VFIO_CDEV_MAJOR = VFIO_GROUP_MAJOR - 1
#: the modules whose /sys/module entries are the simulated kernel's (see _modules)
MODULES = ("iommufd", "vfio", "vfio_pci", "vfio_pci_core", "vfio_iommu_type1", "vfio_iommu_spapr_tce")

# IORESOURCE_MEM | IORESOURCE_SIZEALIGN, plus PREFETCH / MEM_64 (include/linux/ioport.h)
_IORESOURCE_MEM = 0x00000200
_IORESOURCE_PREFETCH = 0x00002000
_IORESOURCE_MEM_64 = 0x00100000
_IORESOURCE_SIZEALIGN = 0x00040000


def _write(path: str, text: str | bytes) -> None:
    mode = "wb" if isinstance(text, bytes) else "w"
    with open(path, mode) as f:
        f.write(text)


def device_dir(bdf: str) -> str:
    dom, bus, _ = bdf.split(":")
    return f"/sys/devices/pci{dom}:{bus}/{bdf}"


class FakeSysfs:
    """The tree for one machine, in a temporary directory (removed by close())."""

    def __init__(self, machine: "Machine", root: str | None = None) -> None:
        self.machine = machine
        self.root = root or tempfile.mkdtemp(prefix="vfiosim-root-")
        self.prefixes: list[str] = []
        self.build()
        # Readable by every program the daemon serves, whatever uid it runs as
        # (or drops to later), as /sys and /dev are; only the daemon writes it.
        os.chmod(self.root, 0o755)

    def path(self, p: str) -> str:
        return self.root + p

    def _mkdir(self, p: str) -> None:
        os.makedirs(self.path(p), exist_ok=True)

    def _link(self, target: str, p: str) -> None:
        full = self.path(p)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if os.path.lexists(full):
            os.unlink(full)
        os.symlink(target, full)

    def build(self) -> None:
        m = self.machine
        k = m.kernel
        self._mkdir("/dev/vfio")
        if k.config.vfio_device_cdev:
            self._mkdir("/dev/vfio/devices")
        for path in k.dev_nodes:
            self.update_node(path)
        self._mkdir("/sys/bus/pci/devices")
        self._mkdir("/sys/bus/pci/drivers/vfio-pci")
        self._mkdir("/sys/kernel/iommu_groups")
        sim = set(k.devices)
        try:
            host = os.listdir("/sys/bus/pci/devices")
        except OSError:
            host = []
        for bdf in host:
            if bdf not in sim:
                self._link(os.path.realpath(f"/sys/bus/pci/devices/{bdf}"), f"/sys/bus/pci/devices/{bdf}")
        self._mkdir("/sys/class/vfio-dev")
        # The IOMMU's and VFIO's debugfs are the simulated kernel's too: none here, never
        # the host's (a VT-d host's /sys/kernel/debug/iommu/intel knows no simulated BDF).
        self.prefixes = ["/dev/vfio", "/sys/bus/pci/devices", "/sys/bus/pci/drivers/vfio-pci",
                         "/sys/kernel/iommu_groups", "/sys/class/vfio-dev", "/sys/kernel/debug/iommu",
                         "/sys/kernel/debug/vfio"]
        vfio_index = {d.name: d.index for g in k.vfio.groups.values() for d in g.devices}
        for gid, group in sorted(k.iommu_groups.items()):
            self._mkdir(f"/sys/kernel/iommu_groups/{gid}/devices")
            _write(self.path(f"/sys/kernel/iommu_groups/{gid}/type"), "DMA\n")
            _write(self.path(f"/sys/kernel/iommu_groups/{gid}/reserved_regions"), "")
        for bdf, dev in sorted(k.devices.items()):
            ddir = device_dir(bdf)
            self.prefixes.append(ddir)
            self._mkdir(ddir)
            rel = os.path.relpath(ddir, "/sys/bus/pci/devices")
            self._link(rel, f"/sys/bus/pci/devices/{bdf}")
            cls = dev.class_code
            files = {
                "vendor": f"0x{dev.vendor:04x}\n",
                "device": f"0x{dev.device_id:04x}\n",
                "class": f"0x{cls:06x}\n",
                "revision": f"0x{dev.config.read(0x08, 1):02x}\n",
                "subsystem_vendor": f"0x{dev.config.read(0x2C, 2):04x}\n",
                "subsystem_device": f"0x{dev.config.read(0x2E, 2):04x}\n",
                "irq": "0\n",
                "numa_node": "-1\n",
                "enable": "1\n" if dev.driver == "vfio-pci" else "0\n",
                "modalias": (f"pci:v{dev.vendor:08X}d{dev.device_id:08X}sv{dev.config.read(0x2C, 2):08X}"
                             f"sd{dev.config.read(0x2E, 2):08X}bc{cls >> 16:02X}sc{(cls >> 8) & 0xFF:02X}"
                             f"i{cls & 0xFF:02X}\n"),
                "uevent": (f"DRIVER={dev.driver or ''}\nPCI_CLASS={cls:X}\nPCI_ID={dev.vendor:04X}:{dev.device_id:04X}\n"
                           f"PCI_SUBSYS_ID={dev.config.read(0x2C, 2):04X}:{dev.config.read(0x2E, 2):04X}\n"
                           f"PCI_SLOT_NAME={bdf}\n"),
            }
            for name, text in files.items():
                _write(self.path(f"{ddir}/{name}"), text)
            _write(self.path(f"{ddir}/config"), bytes(dev.config.data[:256]))
            lines = []
            for i in range(13):
                bar = dev.bars.get(i) if i < 6 else None
                addr = dev.bar_addresses.get(i) if i < 6 else None
                if bar is None or addr is None:
                    lines.append(f"0x{0:016x} 0x{0:016x} 0x{0:016x}")
                    continue
                flags = _IORESOURCE_MEM | _IORESOURCE_SIZEALIGN
                flags |= _IORESOURCE_PREFETCH if bar.prefetchable else 0
                flags |= _IORESOURCE_MEM_64 if bar.is_64bit else 0
                lines.append(f"0x{addr:016x} 0x{addr + bar.size - 1:016x} 0x{flags:016x}")
            _write(self.path(f"{ddir}/resource"), "\n".join(lines) + "\n")
            for i, bar in dev.bars.items():
                _write(self.path(f"{ddir}/resource{i}"), "")
            self._link("../../../bus/pci", f"{ddir}/subsystem")
            dev_group = dev.iommu_group
            if dev_group is not None:
                self._link(f"../../../kernel/iommu_groups/{dev_group.id}", f"{ddir}/iommu_group")
                self._link(os.path.relpath(ddir, f"/sys/kernel/iommu_groups/{dev_group.id}/devices"),
                           f"/sys/kernel/iommu_groups/{dev_group.id}/devices/{bdf}")
            if bdf in vfio_index:
                self._vfio_dev(ddir, vfio_index[bdf])
            if dev.driver:
                self._mkdir(f"/sys/bus/pci/drivers/{dev.driver}")
                self._link(f"../../../bus/pci/drivers/{dev.driver}", f"{ddir}/driver")
                self._link(os.path.relpath(ddir, f"/sys/bus/pci/drivers/{dev.driver}"),
                           f"/sys/bus/pci/drivers/{dev.driver}/{bdf}")
        self._modules()
        _write(self.path("/prefixes"), "".join(p + "\n" for p in self.prefixes))

    def update_node(self, path: str) -> None:
        """(Re)write what stat() reports for a /dev/vfio node: its owner and mode
        (after a chown or chmod), replaced in one rename."""
        node = self.machine.kernel.dev_nodes.get(path)
        if node is None:
            return
        if path == "/dev/iommu":
            major, minor = MISC_MAJOR, IOMMUFD_MISC_MINOR
        elif path.startswith("/dev/vfio/devices/vfio"):
            major, minor = VFIO_CDEV_MAJOR, int(path[len("/dev/vfio/devices/vfio"):])
        elif path.startswith("/dev/vfio/"):
            name = path.rsplit("/", 1)[1]
            major, minor = (MISC_MAJOR, VFIO_MINOR) if name == "vfio" else (VFIO_GROUP_MAJOR, int(name))
        else:
            return
        tmp = self.path(path) + ".new"
        _write(tmp, f"{major} {minor} {node.mode:o} {node.uid} {node.gid}\n")
        os.replace(tmp, self.path(path))

    def _vfio_dev(self, ddir: str, index: int) -> None:
        """``<ddir>/vfio-dev/vfio<index>`` and its /sys/class/vfio-dev link (see the module doc)."""
        vdir = f"{ddir}/vfio-dev/vfio{index}"
        self._mkdir(f"{vdir}/power")
        _write(self.path(f"{vdir}/uevent"), "")
        for name, text in (("control", "auto\n"), ("runtime_status", "unsupported\n"),
                           ("runtime_active_time", "0\n"), ("runtime_suspended_time", "0\n")):
            _write(self.path(f"{vdir}/power/{name}"), text)
        self._link(os.path.relpath("/sys/class/vfio-dev", vdir), f"{vdir}/subsystem")
        self._link(f"../../../{os.path.basename(ddir)}", f"{vdir}/device")      # as kernfs writes it
        self._link(os.path.relpath(vdir, "/sys/class/vfio-dev"), f"/sys/class/vfio-dev/vfio{index}")

    def _modules(self) -> None:
        """/sys/module/<name> of the VFIO modules the machine's kernel has loaded,
        as its configuration builds them: DPDK's EAL checks them
        (rte_eal_check_module("vfio"), "vfio_pci") before it uses VFIO at all, and
        reads vfio's enable_unsafe_noiommu_mode; programs probing for iommufd look
        for /sys/module/iommufd.  A module without parameters has no parameters/
        directory (vfio_pci_core's knobs are set by vfio_pci, not module_param)."""
        m = self.machine
        params: dict[str, dict[str, str]] = {
            "vfio": {"enable_unsafe_noiommu_mode": "N"},
            "vfio_pci": {"ids": "", "nointxmask": "N", "disable_idle_d3": "N", "enable_sriov": "N",
                         "disable_denylist": "N"},
            "vfio_pci_core": {},
        }
        config = m.kernel.config
        if config.iommufd:
            params["iommufd"] = {}                 # a module (=m, as distributions build it); no parameters
        # The IOMMU backends the platform registered (under "if VFIO_CONTAINER" in Kconfig).
        for driver in m.kernel.vfio.iommu_drivers:
            if driver.module:
                params[driver.module] = driver.module_parameters()
        for name, values in params.items():
            self._mkdir(f"/sys/module/{name}/parameters" if values else f"/sys/module/{name}")
            _write(self.path(f"/sys/module/{name}/initstate"), "live\n")
            for key, value in values.items():
                _write(self.path(f"/sys/module/{name}/parameters/{key}"), value + "\n")
        # Every module vfiosim models is the simulated kernel's, present or not:
        # a host's own vfio_iommu_type1 or iommufd must not show through.
        self.prefixes += [f"/sys/module/{name}" for name in MODULES]

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
