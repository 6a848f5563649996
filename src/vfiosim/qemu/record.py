"""``vfiosim qemu-record``: real kernels to record against, in QEMU guests, for CI.

Three guests, each a Debian kernel (6.12 from bookworm-backports, as ``image.py`` picks
it), and two booting kernels built from Debian's 6.12 source, in QEMU under TCG with
QEMU's own emulated ``edu`` devices bound to vfio-pci, so that the guest's VFIO is the
real thing:

* **pseries** (``qemu-system-ppc64 -M pseries``, ppc64le): two edu devices on two
  sPAPR PHBs, the real sPAPR TCE IOMMU driver over the hypervisor's TCE tables; the
  machine of the pseries preset.
* **powernv** (``qemu-system-ppc64 -M powernv9``, ppc64le, under skiboot): two edu
  devices behind the root ports of two PHB4s; the sPAPR TCE driver over Linux's own
  IODA2 TCE tables, with EEH; the machine of the powernv preset.
* **x86** (``qemu-system-x86_64 -M q35``): an emulated Intel VT-d IOMMU
  (``intel-iommu``, caching mode; ``intel_iommu=on iommu=pt``) and two edu devices,
  each behind its own PCIe root port: Type1; the machine of the x86 preset.
* **x86-iommufd**: the same guest booting a kernel built from Debian's 6.12 source
  with iommufd and the VFIO device cdev (``scripts/build-iommufd-kernel.sh``, given
  with ``--kernel-build DIR``; Debian's own has ``# CONFIG_IOMMUFD is not set``): the
  x86 scenarios again, and the iommufd ones, compiled against that kernel's uAPI
  headers; replayed on the x86 preset with the trace's kernel configuration.
  **x86-iommufd-compat**: the same with iommufd's VFIO container
  (``IOMMUFD_VFIO_CONTAINER``, VFIO's own container left out).

Inside, ``/init`` (``guest/record-init.sh``) runs the project's scenario programs,
each under the recording shim (``LD_PRELOAD=libvfiosim_record.so``, exactly what
``vfiosim record`` does): the reference walker over the steps of the reference
traces, ``vfio_families`` (each device ioctl family and its error paths),
``vfio_processes`` (fork, exec, limits and credentials), the examples, and on POWER
the demo's guest program.  The programs and the shim are built here for the guest (a
cross compiler for ppc64le) and linked dynamically against the toolchain's glibc,
which the initramfs carries, with the kernel's .config (the trace header's
``kernel_config``).  The traces come out on a second serial line (powernv: on the
only one, the console, silenced) as a gzipped tar in base64, and are replayed on the
matching simulated machine (docs/conformance.md).

Nothing here runs the guest under vfiosim: the recordings are of QEMU and Linux only.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .image import (Cpio, QemuDemoUnavailable, _can_install, _extract, _run, cache_dir,
                    fetch_debs, module_bytes, module_load_order, module_name)

HERE = Path(__file__).resolve().parent
GUEST_DIR = HERE / "guest"
INIT = GUEST_DIR / "record-init.sh"
RECORDER = HERE.parent / "tracing" / "vfiosim_record.c"
REFERENCE_TRACES = HERE.parent.parent.parent / "tests" / "data" / "reference_traces"
MARK = "vfiosim-guest:"
BEGIN, END = "=== vfiosim-traces begin ===", "=== vfiosim-traces end ==="
IMAGE_FORMAT = 2
Log = Callable[[str], None]

APPLETS = ["sh", "mount", "insmod", "poweroff", "cat", "echo", "ls", "dmesg", "sleep", "uname", "tar", "gzip",
           "base64", "mkdir", "sync", "cd", "rm", "head", "tail", "wc", "readlink", "basename", "stty", "grep"]


@dataclass(frozen=True)
class Scenario:
    name: str
    command: str                 # a shell command line in the guest
    sources: tuple[str, ...] = ()  # programs it needs (C files in guest/ or examples/)
    walker: str = ""             # the reference trace whose steps it walks
    bdf: str = ""                # the device the walker opens, when not the reference trace's


@dataclass(frozen=True)
class GuestPlatform:
    name: str                    # the vfiosim preset it corresponds to
    deb_arch: str
    kernel_meta: str
    kernel_glob: str             # in the kernel .deb's /boot
    qemu: str
    qemu_package: str
    cc: str
    cc_packages: tuple[str, ...]
    libc_dir: str                # the toolchain's runtime glibc
    loader: str                  # PT_INTERP of its programs
    modules: tuple[str, ...]
    console: str                 # the guest's console and the line the traces leave on
    out_tty: str
    append: str
    scenarios: tuple[Scenario, ...]
    memory: str = "1G"
    # The machine's own devices: powernv's PHB4s and root ports come only with them.
    defaults: bool = False
    # The vfiosim preset the traces replay on (with the trace's kernel configuration),
    # when not the one named like the platform.
    preset: str = ""
    # The kernel is not Debian's but one built from its source with iommufd
    # (scripts/build-iommufd-kernel.sh), given with --kernel-build, whose .config
    # must have these options (its traces go in this platform's directory).
    built_kernel: bool = False
    kernel_options: tuple[str, ...] = ()

    @property
    def machine(self) -> str:
        return self.preset or self.name

    def qemu_args(self) -> list[str]:
        if self.name == "pseries":
            # The default PHB (domain 0) and a second one (domain 1), an edu on each:
            # the machine of the reference traces and of the pseries preset.
            return ["-M", "pseries,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,cap-ccf-assist=off",
                    "-device", "edu",
                    "-device", "spapr-pci-host-bridge,index=1,id=phb1", "-device", "edu,bus=phb1.0"]
        if self.name == "powernv":
            # POWER9 bare metal under skiboot: six PHB4s, each with its root port
            # (pcie.N); an edu behind the first two, as the powernv preset has them.
            return ["-M", "powernv9", "-device", "edu,bus=pcie.0", "-device", "edu,bus=pcie.1"]
        return ["-M", "q35", "-device", "intel-iommu,caching-mode=on",
                "-device", "pcie-root-port,id=rp1,chassis=1,slot=1", "-device", "edu,bus=rp1",
                "-device", "pcie-root-port,id=rp2,chassis=2,slot=2", "-device", "edu,bus=rp2"]

    def serial_args(self, console: str, traces: str) -> list[str]:
        if self.name == "pseries":
            return ["-serial", f"file:{console}", "-chardev", f"file,id=traces,path={traces}",
                    "-device", "spapr-vty,chardev=traces"]
        if self.name == "powernv":
            # One line: skiboot's UART, Linux's OPAL console hvc0.  The traces leave on it
            # too, with the kernel's console messages silenced (record-init.sh).
            return ["-serial", f"file:{console}"]
        return ["-serial", f"file:{console}", "-serial", f"file:{traces}"]


_WALK = "reference_walker < /etc/walker-{0}.txt"
_CDEV = "/dev/vfio/devices/$(ls /sys/bus/pci/devices/{0}/vfio-dev)"
_GROUP = "/dev/vfio/$(basename $(readlink /sys/bus/pci/devices/{0}/iommu_group))"
_X86_SCENARIOS = (
    Scenario("walker-type1v2", _WALK.format("type1v2-x86"), ("reference_walker.c",), "type1v2-x86.jsonl"),
    Scenario("families", "vfio_families 0000:01:00.0", ("vfio_families.c",)),
    Scenario("type1_edu_dma", "type1_edu_dma 0000:02:00.0 2048", ("type1_edu_dma.c",)),
    Scenario("processes", "vfio_processes 0000:01:00.0", ("vfio_processes.c",)),
)


def _x86_built(name: str, options: tuple[str, ...]) -> GuestPlatform:
    return GuestPlatform(
        name=name, deb_arch="amd64", kernel_meta="linux-image-amd64", kernel_glob="",
        qemu="qemu-system-x86_64", qemu_package="qemu-system-x86", cc="gcc", cc_packages=("gcc", "libc6-dev"),
        libc_dir="/lib/x86_64-linux-gnu", loader="/lib64/ld-linux-x86-64.so.2",
        modules=(), console="ttyS0", out_tty="/dev/ttyS1",
        append="console=ttyS0 quiet panic=-1 intel_iommu=on iommu=pt", preset="x86",
        built_kernel=True, kernel_options=options,
        # 2 KiB transfers, as type1_edu_dma: QEMU 7.2's edu aborts the VM on a DMA
        # that ends at the last byte of its buffer.
        scenarios=_X86_SCENARIOS + (
            Scenario("iommufd_edu_dma", "iommufd_edu_dma 0000:02:00.0 \"\" 2048", ("iommufd_edu_dma.c",)),
            Scenario("iommufd_families", "iommufd_families 0000:01:00.0 0000:02:00.0", ("iommufd_families.c",)),
            Scenario("iommufd_edges", "iommufd_edges 0000:01:00.0", ("iommufd_edges.c",)),
            Scenario("iommufd_pages", f"iommufd_pages {_CDEV.format('0000:01:00.0')} 16", ("iommufd_pages.c",)),
            # As uid 1000 without capabilities, RLIMIT_MEMLOCK 1 MiB: iommufd's
            # per-user charge, then the container's per-mm one (Type1 or iommufd's);
            # as root without CAP_IPC_LOCK, iommufd's per-mm mode.
            Scenario("iommufd_user", f"iommufd_user 1000 0x100000 iommufd {_CDEV.format('0000:01:00.0')}",
                     ("iommufd_user.c",)),
            Scenario("iommufd_mm", f"iommufd_user 0 0x100000 iommufd {_CDEV.format('0000:01:00.0')}",
                     ("iommufd_user.c",)),
            Scenario("container_user", f"iommufd_user 1000 0x100000 container {_GROUP.format('0000:01:00.0')} "
                                       f"0000:01:00.0", ("iommufd_user.c",)),
            # Two processes of uid 1000 share iommufd's per-user charge; a limit
            # lowered below what is pinned refuses the next map.
            Scenario("iommufd_shared", f"iommufd_shared 1000 0x100000 {_CDEV.format('0000:01:00.0')} "
                                       f"{_CDEV.format('0000:02:00.0')}", ("iommufd_shared.c",)),
        ))


PLATFORMS: dict[str, GuestPlatform] = {
    "pseries": GuestPlatform(
        name="pseries", deb_arch="ppc64el", kernel_meta="linux-image-powerpc64le", kernel_glob="vmlinux-*",
        qemu="qemu-system-ppc64", qemu_package="qemu-system-ppc", cc="powerpc64le-linux-gnu-gcc",
        cc_packages=("gcc-powerpc64le-linux-gnu", "libc6-dev-ppc64el-cross"),
        libc_dir="/usr/powerpc64le-linux-gnu/lib", loader="/lib64/ld64.so.2",
        modules=("vfio_iommu_spapr_tce", "vfio_pci"), console="hvc0", out_tty="/dev/hvc1",
        append="console=hvc0 quiet panic=-1 nowatchdog",
        scenarios=(
            Scenario("walker-v1", _WALK.format("v1"), ("reference_walker.c",), "v1.jsonl"),
            Scenario("walker-v2", _WALK.format("v2"), ("reference_walker.c",), "v2.jsonl"),
            Scenario("families", "vfio_families 0000:00:00.0", ("vfio_families.c",)),
            Scenario("spapr_edu_dma", "spapr_edu_dma 0001:00:00.0 2048", ("spapr_edu_dma.c",)),
            Scenario("edu-guest-v2", "edu_vfio_guest v2", ("edu_vfio_guest.c",)),
            Scenario("edu-guest-v1", "edu_vfio_guest v1", ("edu_vfio_guest.c",)),
            Scenario("processes", "vfio_processes 0000:00:00.0", ("vfio_processes.c",)),
        )),
    # The same kernel on bare metal: Linux's powernv platform drives the PHB4s' IODA2
    # TCE tables itself (pnv_pci_ioda2_*), with EEH, and VFIO's sPAPR TCE driver sits on
    # that.  2 GiB of RAM: the default DMA window is RAM rounded up to a power of two,
    # at most the 32-bit MMIO base (2 GiB), as on the preset's 4 GiB host.
    "powernv": GuestPlatform(
        name="powernv", deb_arch="ppc64el", kernel_meta="linux-image-powerpc64le", kernel_glob="vmlinux-*",
        qemu="qemu-system-ppc64", qemu_package="qemu-system-ppc", cc="powerpc64le-linux-gnu-gcc",
        cc_packages=("gcc-powerpc64le-linux-gnu", "libc6-dev-ppc64el-cross"),
        libc_dir="/usr/powerpc64le-linux-gnu/lib", loader="/lib64/ld64.so.2",
        modules=("vfio_iommu_spapr_tce", "vfio_pci"), console="hvc0", out_tty="/dev/hvc0",
        append="console=hvc0 quiet panic=-1 nowatchdog", memory="2G", defaults=True,
        scenarios=(
            Scenario("walker-v1", _WALK.format("v1"), ("reference_walker.c",), "v1.jsonl", bdf="0000:01:00.0"),
            Scenario("walker-v2", _WALK.format("v2"), ("reference_walker.c",), "v2.jsonl", bdf="0000:01:00.0"),
            Scenario("families", "vfio_families 0000:01:00.0", ("vfio_families.c",)),
            Scenario("spapr_edu_dma", "spapr_edu_dma 0001:01:00.0 2048", ("spapr_edu_dma.c",)),
            Scenario("edu-guest-v2", "edu_vfio_guest v2", ("edu_vfio_guest.c",)),
            Scenario("edu-guest-v1", "edu_vfio_guest v1", ("edu_vfio_guest.c",)),
            Scenario("processes", "vfio_processes 0000:01:00.0", ("vfio_processes.c",)),
        )),
    "x86": GuestPlatform(
        name="x86", deb_arch="amd64", kernel_meta="linux-image-amd64", kernel_glob="vmlinuz-*",
        qemu="qemu-system-x86_64", qemu_package="qemu-system-x86", cc="gcc", cc_packages=("gcc", "libc6-dev"),
        libc_dir="/lib/x86_64-linux-gnu", loader="/lib64/ld-linux-x86-64.so.2",
        modules=("vfio_iommu_type1", "vfio_pci"), console="ttyS0", out_tty="/dev/ttyS1",
        append="console=ttyS0 quiet panic=-1 intel_iommu=on iommu=pt",
        scenarios=_X86_SCENARIOS),
    # The same guest on Debian's 6.12 source built with iommufd and the VFIO device
    # cdev, everything built in (scripts/build-iommufd-kernel.sh; Debian's own kernel
    # has `# CONFIG_IOMMUFD is not set`): the group/container scenarios again, on a
    # kernel that also has /dev/iommu, then the iommufd ones.  Replayed on the x86
    # preset with the trace's kernel configuration.  x86-iommufd keeps VFIO's own
    # container (Type1); x86-iommufd-compat has iommufd's instead
    # (IOMMUFD_VFIO_CONTAINER, which needs VFIO_CONTAINER=n).
    "x86-iommufd": _x86_built("x86-iommufd", ("CONFIG_IOMMUFD=y", "CONFIG_VFIO_DEVICE_CDEV=y",
                                              "CONFIG_VFIO_CONTAINER=y")),
    "x86-iommufd-compat": _x86_built("x86-iommufd-compat", ("CONFIG_IOMMUFD=y", "CONFIG_VFIO_DEVICE_CDEV=y",
                                                            "CONFIG_IOMMUFD_VFIO_CONTAINER=y")),
}


def walker_input(trace: list[dict[str, Any]], bdf: str = "") -> str:
    """A reference trace's steps as reference_walker.c reads them (one step a line);
    ``bdf``: the device to open instead of the one the trace was recorded with."""
    meta = trace[0]
    lines = [f"0 meta buf_size={meta['buf_size']} memlock_cur={meta['rlimit_memlock_cur']} "
             f"memlock_max={meta['rlimit_memlock_max']} bdf={bdf or meta['bdf']}"]
    for step in trace[1:]:
        if "seq" not in step:
            continue
        op = step["op"]
        if step.get("skipped"):
            op = "skip"
        elif op in ("note", "meta"):
            op = "note"
        kv = []
        args = step.get("args") or {}
        for key, value in args.items():
            if key.endswith("_sym"):
                continue
            if key == "vaddr" and "vaddr_sym" in args:
                value = "@" + args["vaddr_sym"]
            kv.append(f"{key}={value}")
        if "vaddr_sym" in args and "vaddr" not in args:
            kv.append("vaddr=@" + args["vaddr_sym"])
        lines.append(f"{step['seq']} {op} {' '.join(kv)}".rstrip())
    return "\n".join(lines) + "\n"


def _reference_dir() -> Path | None:
    env = os.environ.get("VFIOSIM_REFERENCE_TRACES")
    for d in ([Path(env)] if env else []) + [REFERENCE_TRACES]:
        if d.is_dir():
            return d
    return None


def _source(name: str) -> Path:
    top = HERE.parent.parent.parent
    # examples/ of a checkout, or the copy an installed package has (setup.py).
    for d in (GUEST_DIR, top / "examples", GUEST_DIR / "examples", top / "tests" / "c"):
        if (d / name).exists():
            return d / name
    raise QemuDemoUnavailable(f"the guest program {name} is not here (examples/ and tests/c/ come with a source "
                              f"checkout)")


# -- host tools ---------------------------------------------------------------------------------------------


def check_tools(p: GuestPlatform, *, install: bool, log: Log) -> None:
    def missing() -> list[str]:
        out = []
        if shutil.which(p.qemu) is None:
            out.append(p.qemu_package)
        if shutil.which(p.cc) is None or not Path(p.libc_dir, "libc.so.6").exists():
            out.extend(p.cc_packages)
        if shutil.which("dpkg-deb") is None:
            out.append("dpkg")
        return out
    pkgs = missing()
    if not pkgs:
        return
    if not install or not _can_install():
        raise QemuDemoUnavailable(f"the {p.name} guest needs {' '.join(pkgs)} (apt-get install {' '.join(pkgs)}; "
                                  f"this run may not install them)")
    log(f"installing {' '.join(pkgs)}")
    _run(["apt-get", "update", "-q"], log=log, check=False)
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *pkgs], log=log)
    if missing():
        raise QemuDemoUnavailable(f"apt-get installed {' '.join(pkgs)}, but {' '.join(missing())} still missing")


# -- the image --------------------------------------------------------------------------------------------------


@dataclass
class RecordImage:
    kernel: Path
    initrd: Path
    kernel_package: str
    scenarios: list[str]


@dataclass(frozen=True)
class KernelBuild:
    """A guest kernel built from source (scripts/build-iommufd-kernel.sh's output
    directory): ``bzImage``, its ``config`` and its uAPI headers (``headers/include``,
    from ``make headers_install``), which the scenario programs are compiled against."""
    bzimage: Path
    config: Path
    headers: Path
    release: str

    @property
    def description(self) -> str:
        return f"Linux {self.release} built from source ({self.bzimage})"

    def has(self, options: Iterable[str]) -> bool:
        lines = set(self.config.read_text().splitlines())
        return all(o in lines for o in options)


def bzimage_release(data: bytes) -> str:
    """The kernel release of an x86 bzImage: the setup header (magic "HdrS" at 0x202)
    points at the version string with ``kernel_version`` (0x20e), relative to 0x200
    (Documentation/arch/x86/boot.rst)."""
    if data[0x202:0x206] != b"HdrS":
        raise QemuDemoUnavailable("not an x86 bzImage (no HdrS setup header)")
    at = int.from_bytes(data[0x20E:0x210], "little") + 0x200
    end = data.find(b"\0", at, at + 256)
    text = data[at:end if end >= 0 else at + 256].decode(errors="replace")
    if not text.split():
        raise QemuDemoUnavailable("the bzImage's setup header has no kernel version string")
    return text.split()[0]


def load_kernel_build(directory: Path) -> KernelBuild:
    d = Path(directory)
    bz, config, headers = d / "bzImage", d / "config", d / "headers" / "include"
    missing = [str(f) for f in (bz, config, headers / "linux" / "iommufd.h") if not f.exists()]
    if missing:
        raise QemuDemoUnavailable(f"{d} is not a kernel build of scripts/build-iommufd-kernel.sh: no "
                                  f"{', '.join(missing)}")
    return KernelBuild(bz, config, headers, bzimage_release(bz.read_bytes()))


def build_record_image(p: GuestPlatform, *, log: Log, kernel: KernelBuild | None = None) -> RecordImage:
    if p.built_kernel and kernel is None:
        raise QemuDemoUnavailable(f"the {p.name} guest boots a kernel built from source: "
                                  f"scripts/build-iommufd-kernel.sh builds one, --kernel-build DIR gives it")
    if not p.built_kernel and kernel is not None:
        raise QemuDemoUnavailable(f"the {p.name} guest boots Debian's kernel; --kernel-build is for "
                                  f"{', '.join(n for n, q in PLATFORMS.items() if q.built_kernel)}")
    if kernel is not None and not kernel.has(p.kernel_options):
        raise QemuDemoUnavailable(f"{kernel.config} is not a kernel for {p.name}: it needs "
                                  f"{' '.join(p.kernel_options)} (scripts/build-iommufd-kernel.sh "
                                  f"{'compat' if 'compat' in p.name else 'container'} builds one)")
    debs = fetch_debs(log=log, arch=p.deb_arch, kernel_meta=p.kernel_meta)
    refs = _reference_dir()
    scenarios = [s for s in p.scenarios if not s.walker or (refs is not None and (refs / s.walker).exists())]
    for s in p.scenarios:
        if s not in scenarios:
            log(f"{p.name}: no reference trace {s.walker} (a source checkout's tests/data/reference_traces, or "
                f"$VFIOSIM_REFERENCE_TRACES): scenario {s.name} left out")
    sources = sorted({src for s in scenarios for src in s.sources})
    # A kernel built here comes with its own uAPI headers (<linux/iommufd.h>).
    cflags = [f"-isystem{kernel.headers}"] if kernel is not None else []
    h = hashlib.sha256()
    kernel_parts = ([kernel.release, hashlib.sha256(kernel.bzimage.read_bytes()).hexdigest(),
                     kernel.config.read_text(), (kernel.headers / "linux" / "iommufd.h").read_text()]
                    if kernel is not None else [debs["kernel"].name])
    for part in (str(IMAGE_FORMAT), p.name, *kernel_parts, debs["busybox"].name, INIT.read_text(),
                 RECORDER.read_text(), *(_source(src).read_text() for src in sources),
                 *(s.command + s.bdf for s in scenarios),
                 *((refs / s.walker).read_text() for s in scenarios if s.walker and refs is not None)):
        h.update(part.encode() + b"\0")
    kernel_package = kernel.description if kernel is not None else debs["kernel"].name
    root = cache_dir() / "record-images"
    out = root / f"{p.name}-{h.hexdigest()[:16]}"
    meta = out / "image.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        img = RecordImage(out / "kernel", out / "initrd.cpio.gz", m["kernel_package"], m["scenarios"])
        if img.kernel.exists() and img.initrd.exists():
            return img
    log(f"building the {p.name} recording image in {out}")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        t = Path(tmp)
        _extract(debs["busybox"], t / "bb", log)
        # (name, bytes) of the kernel's .config in /boot, where the recorder reads it.
        configs: list[tuple[str, bytes]]
        if kernel is None:
            _extract(debs["kernel"], t / "k", log)
            kernels = sorted((t / "k" / "boot").glob(p.kernel_glob))
            moddirs = sorted((t / "k" / "lib" / "modules").iterdir())
            if len(kernels) != 1 or len(moddirs) != 1:
                raise QemuDemoUnavailable(f"{debs['kernel'].name}: expected one kernel and one module tree")
            index = {module_name(m): m for m in moddirs[0].rglob("*.ko*")
                     if m.name.endswith((".ko", ".ko.xz", ".ko.gz"))}
            builtin_file = moddirs[0] / "modules.builtin"
            builtin = {module_name(Path(line.strip())) for line in builtin_file.read_text().splitlines()
                       if line.strip().endswith(".ko")} if builtin_file.exists() else set()
            modules = module_load_order(index, builtin, list(p.modules))
            configs = [(c.name, c.read_bytes()) for c in sorted((t / "k" / "boot").glob("config-*"))]
            kernel_image = kernels[0]
        else:
            modules = []              # everything the guest needs is built in
            configs = [(f"config-{kernel.release}", kernel.config.read_bytes())]
            kernel_image = t / "kernel"
            shutil.copyfile(kernel.bzimage, kernel_image)
        cpio = Cpio()
        for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib64", "lib/modules", "etc", "traces", "boot"):
            cpio.dir(d)
        for name, data in configs:
            cpio.file(f"boot/{name}", data)
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3, 0o666)
        cpio.file("bin/busybox", (t / "bb" / "bin" / "busybox").read_bytes(), 0o755)
        for applet in APPLETS:
            cpio.symlink(f"bin/{applet}", "busybox")
        cpio.file("init", INIT.read_bytes(), 0o755)
        # The toolchain's glibc, for the dynamically linked programs and the shim.
        libc = Path(p.libc_dir)
        for lib in ("libc.so.6", "libdl.so.2", "libpthread.so.0", Path(p.loader).name):
            src = (libc / lib).resolve()
            if not src.exists():
                raise QemuDemoUnavailable(f"{libc / lib} is missing (the {p.name} toolchain's glibc)")
            cpio.file(f"lib64/{lib}", src.read_bytes(), 0o755)
        if p.loader != f"/lib64/{Path(p.loader).name}":
            raise QemuDemoUnavailable(f"unexpected loader {p.loader}")
        shim = t / "libvfiosim_record.so"
        _run([p.cc, "-shared", "-fPIC", "-O2", "-fvisibility=hidden", "-Wall", "-o", str(shim), str(RECORDER),
              "-ldl", "-lpthread"], log=log)
        cpio.file("lib/libvfiosim_record.so", shim.read_bytes(), 0o755)
        for source in sources:
            exe = t / Path(source).stem
            _run([p.cc, "-O2", "-Wall", *cflags, "-o", str(exe), str(_source(source))], log=log)
            cpio.file(f"bin/{exe.name}", exe.read_bytes(), 0o755)
        for s in scenarios:
            if s.walker:
                assert refs is not None
                steps = [json.loads(line) for line in (refs / s.walker).read_text().splitlines() if line.strip()]
                cpio.file(f"etc/walker-{s.walker.removesuffix('.jsonl')}.txt", walker_input(steps, s.bdf).encode())
        cpio.file("etc/scenarios", "".join(f"{s.name}|{s.command}\n" for s in scenarios).encode())
        names = []
        for ko in modules:
            name = module_name(ko) + ".ko"
            cpio.file(f"lib/modules/{name}", module_bytes(ko))
            names.append(name)
        cpio.file("lib/modules/load-order", ("\n".join(names) + "\n").encode())
        cpio.file("etc/out-tty", (p.out_tty + "\n").encode())
        (out / "initrd.cpio.gz").write_bytes(gzip.compress(cpio.finish(), compresslevel=6))
        os.replace(kernel_image, out / "kernel")
    meta.write_text(json.dumps({"kernel_package": kernel_package, "scenarios": [s.name for s in scenarios],
                                "modules": names}, indent=2) + "\n")
    for old in root.iterdir():                     # this platform's images of older inputs
        if old != out and old.name.rsplit("-", 1)[0] == p.name and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return RecordImage(out / "kernel", out / "initrd.cpio.gz", kernel_package, [s.name for s in scenarios])


# -- the run -------------------------------------------------------------------------------------------------


@dataclass
class RecordRun:
    platform: str
    ok: bool
    reason: str
    seconds: float
    traces: list[Path] = field(default_factory=list)
    guest: list[str] = field(default_factory=list)
    console: str = ""
    kernel_package: str = ""


def qemu_argv(p: GuestPlatform, img: RecordImage, console: str, traces: str) -> list[str]:
    return [p.qemu, *p.qemu_args(), "-accel", "tcg", "-smp", "1", "-m", p.memory, "-display", "none",
            *([] if p.defaults else ["-nodefaults"]), "-monitor", "none", "-no-reboot",
            *p.serial_args(console, traces),
            "-kernel", str(img.kernel), "-initrd", str(img.initrd), "-append", p.append]


def extract_traces(raw: str, dest: Path) -> list[Path]:
    """The traces the guest wrote between the markers (base64 of a gzipped tar)."""
    text = raw.replace("\r", "")
    if BEGIN not in text or END not in text:
        return []
    body = text.split(BEGIN, 1)[1].split(END, 1)[0]
    data = base64.b64decode("".join(body.split()))
    out = []
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if not member.isfile() or not name.endswith(".jsonl"):
                continue
            f = tar.extractfile(member)
            assert f is not None
            (dest / name).write_bytes(f.read())
            out.append(dest / name)
    return sorted(out)


def record_platform(name: str, out_dir: Path, *, workdir: Path, install: bool = True, timeout: float = 900,
                    log: Log = lambda text: None, kernel_build: Path | None = None) -> RecordRun:
    """Boot the platform's guest, record its scenarios, put the traces in ``out_dir``;
    ``kernel_build``: the directory of a kernel built from source, for the platforms
    that boot one (x86-iommufd)."""
    p = PLATFORMS[name]
    kernel = load_kernel_build(kernel_build) if kernel_build is not None else None
    check_tools(p, install=install, log=log)
    img = build_record_image(p, log=log, kernel=kernel)
    workdir.mkdir(parents=True, exist_ok=True)
    console, traces = workdir / f"{name}-console.log", workdir / f"{name}-traces.out"
    for f in (console, traces):
        if f.exists():
            f.unlink()
    argv = qemu_argv(p, img, str(console), str(traces))
    log("$ " + " ".join(argv))
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        rc, qemu_out = proc.returncode, (proc.stdout + proc.stderr).strip()
    except subprocess.TimeoutExpired:
        rc, qemu_out = -1, f"QEMU did not finish within {timeout:.0f} s"
    seconds = time.monotonic() - t0
    guest = [line[line.index(MARK):].rstrip() for line in _read(console).splitlines() if MARK in line]
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.jsonl"):
        old.unlink()
    got = extract_traces(_read(traces) if p.out_tty != f"/dev/{p.console}" else _read(console), out_dir)
    run = RecordRun(name, False, "", seconds, got, guest, str(console), img.kernel_package)
    expected = set(img.scenarios)
    have = {t.stem for t in got}
    failed = [line for line in guest if re.search(r"scenario \S+ exit [1-9]", line)]
    if rc != 0:
        run.reason = f"QEMU exited with status {rc}: {qemu_out[-400:]}"
    elif have != expected:
        run.reason = f"traces missing for {', '.join(sorted(expected - have)) or '-'} (console: {console})"
    elif failed:
        run.reason = f"a scenario program failed: {failed[0]} (console: {console})"
    else:
        run.ok = True
        run.reason = f"{len(got)} scenarios recorded on {img.kernel_package}"
    return run


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# -- conformance -----------------------------------------------------------------------------------------------

FAMILY_ORDER = ["container", "group", "IOMMU (sPAPR)", "IOMMU (Type1)", "iommufd", "EEH", "device cdev",
                "device info", "region access", "interrupts", "ioeventfd", "device features", "reset",
                "device (other)", "files", "process"]


@dataclass
class Conformance:
    """Per platform, per family: matching steps / total; and every divergence."""
    cells: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    divergences: dict[str, list[Any]] = field(default_factory=dict)
    totals: dict[str, list[int]] = field(default_factory=dict)
    labels: dict[str, dict[str, int]] = field(default_factory=dict)

    def table(self) -> str:
        platforms = sorted(self.cells)
        fams = [f for f in FAMILY_ORDER if any(f in self.cells[p] for p in platforms)]
        fams += sorted({f for p in platforms for f in self.cells[p]} - set(fams))
        lines = ["| family | " + " | ".join(platforms) + " |", "|---|" + "---:|" * len(platforms)]
        for f in fams:
            row = []
            for p in platforms:
                c = self.cells[p].get(f)
                row.append(f"{c[0]}/{c[1]}" if c else "-")
            lines.append(f"| {f} | " + " | ".join(row) + " |")
        lines.append("| **all** | " + " | ".join(f"**{self.totals[p][0]}/{self.totals[p][1]}**" for p in platforms)
                     + " |")
        return "\n".join(lines) + "\n"


def conformance(traces: Mapping[str, Iterable[Path]], *, log: Log = lambda text: None) -> Conformance:
    """Replay each platform's traces on its preset and count, per ioctl family."""
    from ..tracing import open_trace
    from ..tracing.replay import machine_for, replay
    c = Conformance()
    for platform, paths in traces.items():
        cells = c.cells.setdefault(platform, {})
        divs = c.divergences.setdefault(platform, [])
        tot = c.totals.setdefault(platform, [0, 0])
        labels = c.labels.setdefault(platform, {"kernel": 0, "environment": 0, "machine": 0})
        for path in sorted(paths):
            with open_trace(path) as t:
                preset = PLATFORMS[platform].machine if platform in PLATFORMS else platform
                machine, _why = machine_for(t.header, machine=preset)
                r = replay(machine, t)
            log(f"{platform}/{path.stem}: {r.matched}/{r.steps} steps match")
            for fam, fc in r.families.items():
                cell = cells.setdefault(fam, [0, 0])
                cell[0] += fc.matched
                cell[1] += fc.steps
            tot[0] += r.matched
            tot[1] += r.steps
            for k, v in r.counts.items():
                labels[k] += v
            divs.extend((path.stem, d) for d in r.divergences)
    return c


def report_conformance(c: Conformance, out: Any, *, details: bool = True) -> None:
    """The table, then every difference: kernel ones (failures) and labelled ones."""
    out.write(c.table())
    for platform in sorted(c.cells):
        labels = c.labels[platform]
        out.write(f"\n{platform}: {c.totals[platform][0]}/{c.totals[platform][1]} steps match; divergences: kernel "
                  f"{labels['kernel']}, environment {labels['environment']}, machine {labels['machine']}\n")
        if not details:
            continue
        for scenario, d in c.divergences[platform]:
            out.write(f"  [{scenario}] {d}\n")


def default_traces_dir() -> Path:
    """The conformance traces of a source checkout (tests/data/conformance): the one
    vfiosim runs from, else the one in the current directory (an installed vfiosim)."""
    for top in (HERE.parent.parent.parent, Path.cwd()):
        candidate = top / "tests" / "data" / "conformance"
        if candidate.is_dir():
            return candidate
    return HERE.parent.parent.parent / "tests" / "data" / "conformance"


def traces_in(root: Path) -> dict[str, list[Path]]:
    found = {}
    for platform in PLATFORMS:
        paths = sorted((root / platform).glob("*.jsonl"))
        if paths:
            found[platform] = paths
    return found


# -- the command line ------------------------------------------------------------------------------------------


def cmd_qemu_record(args: Any) -> int:
    import sys
    def say(text: str) -> None:
        if args.verbose or text.startswith(("building", "cached", "installing", *PLATFORMS)):
            print(text, file=sys.stderr, flush=True)
    # "all": the Debian kernels, and with --kernel-build the platform of that kernel.
    try:
        built = load_kernel_build(Path(args.kernel_build)) if args.kernel_build else None
    except QemuDemoUnavailable as exc:
        print(f"vfiosim qemu-record: --kernel-build: {exc}", file=sys.stderr)
        return 3
    platforms = ([n for n, p in PLATFORMS.items() if not p.built_kernel or (built and built.has(p.kernel_options))]
                 if args.platform == "all" else [args.platform])
    out = Path(args.out)
    work = Path(args.workdir) if args.workdir else cache_dir() / "record-run"
    recorded: dict[str, list[Path]] = {}
    status = 0
    for name in platforms:
        print(f"vfiosim qemu-record: booting the {name} guest (QEMU, TCG) ...", file=sys.stderr, flush=True)
        try:
            run = record_platform(name, out / name, workdir=work, install=not args.no_install, timeout=args.timeout,
                                  log=say, kernel_build=Path(args.kernel_build) if args.kernel_build and
                                  PLATFORMS[name].built_kernel else None)
        except QemuDemoUnavailable as exc:
            print(f"vfiosim qemu-record: {name}: cannot run here: {exc}", file=sys.stderr)
            return 3
        verdict = "recorded" if run.ok else "FAILED"
        print(f"vfiosim qemu-record: {name}: {verdict} in {run.seconds:.0f} s: {run.reason}", file=sys.stderr)
        for line in run.guest:
            say(line)
        if not run.ok:
            status = 1
            for line in run.guest[-15:]:
                print(f"  {line}", file=sys.stderr)
        recorded[name] = run.traces
        for t in run.traces:
            print(f"  {t}", file=sys.stderr)
    if args.no_replay or not any(recorded.values()):
        return status
    c = conformance({k: v for k, v in recorded.items() if v}, log=say)
    print()
    report_conformance(c, sys.stdout)
    return 1 if status or any(c.labels[p]["kernel"] for p in c.labels) else 0


def cmd_conformance(args: Any) -> int:
    import json as _json
    import sys
    root = Path(args.traces) if args.traces else default_traces_dir()
    found = traces_in(root)
    if not found:
        print(f"vfiosim conformance: no traces in {root}/<platform>/*.jsonl (vfiosim qemu-record --out {root} "
              f"records them)", file=sys.stderr)
        return 2
    c = conformance(found)
    if args.json:
        doc = {"traces": str(root), "cells": c.cells, "totals": c.totals, "labels": c.labels,
               "divergences": {p: [dict(d.as_json(), trace=s) for s, d in divs] for p, divs in c.divergences.items()}}
        _json.dump(doc, sys.stdout, indent=1)
        print()
    else:
        report_conformance(c, sys.stdout, details=not args.table_only)
    return 1 if any(c.labels[p]["kernel"] for p in c.labels) else 0


def add_parsers(sub: Any) -> None:
    q = sub.add_parser("qemu-record", help="record the scenario programs against real Linux VFIO in QEMU guests "
                                           "(pseries, powernv9, x86 q35; x86-iommufd: a kernel built with "
                                           "iommufd) and replay them (see docs/conformance.md)")
    q.add_argument("--platform", choices=[*PLATFORMS, "all"], default="all")
    q.add_argument("--out", default="conformance-traces", metavar="DIR",
                   help="where the traces go, one directory per platform (default ./conformance-traces; "
                        "tests/data/conformance holds the project's)")
    q.add_argument("--workdir", metavar="DIR", help="the guests' consoles (default ~/.cache/vfiosim/qemu/record-run)")
    q.add_argument("--kernel-build", metavar="DIR",
                   help="the kernel x86-iommufd (or x86-iommufd-compat) boots: the output directory of "
                        "scripts/build-iommufd-kernel.sh (bzImage, config, headers/); with --platform all, the "
                        "platform of that kernel is recorded too")
    q.add_argument("--no-install", action="store_true", help="do not apt-get install missing host tools")
    q.add_argument("--timeout", type=float, default=1200.0, help="give up on a guest after this many seconds")
    q.add_argument("--no-replay", action="store_true", help="record only")
    q.add_argument("-v", "--verbose", action="store_true", help="show every command and the guests' output")
    q.set_defaults(func=cmd_qemu_record)
    c = sub.add_parser("conformance", help="replay recorded real-kernel traces (DIR/<platform>/*.jsonl) on the "
                                           "matching simulated machines: matching steps per ioctl family")
    c.add_argument("traces", nargs="?", help="default: tests/data/conformance of a source checkout")
    c.add_argument("--json", action="store_true", help="machine-readable")
    c.add_argument("--table-only", action="store_true", help="the table and totals, not every difference")
    c.set_defaults(func=cmd_conformance)
