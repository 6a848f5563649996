"""The guest image of ``vfiosim qemu-demo``: fetched once, built from Debian packages.

* Host tools: ``qemu-system-ppc64`` (Debian package ``qemu-system-ppc``) and
  ``powerpc64le-linux-gnu-gcc`` with its static libc (``gcc-powerpc64le-linux-gnu``,
  ``libc6-dev-ppc64el-cross``); installed with ``apt-get`` when missing, if allowed
  and possible (root).
* Guest packages, architecture ppc64el, from the Debian archive the host's apt uses
  (a private apt state, see ``GuestApt``): the kernel that the newest
  ``linux-image-powerpc64le`` of the host's release and its backports depends on, and
  ``busybox-static``.  ``apt-get download`` fetches them into
  ``$XDG_CACHE_HOME/vfiosim/qemu/debs`` (default ``~/.cache/vfiosim/qemu``) once,
  recorded in ``manifest.json``; later runs use the cache and need no network.
* The initramfs (a gzipped newc cpio written here): busybox, ``/init``
  (``guest/init.sh``), the statically cross-compiled ``guest/edu_vfio_guest.c``,
  and the kernel modules VFIO needs in dependency order, read from each module's
  ``.modinfo`` (in Debian's 6.12: ``vfio``, ``vfio_iommu_spapr_tce``,
  ``vfio_pci_core``, ``vfio_pci``, and ``virtio_blk`` for ``--dma-api``).  Built
  images are cached by a hash of their inputs.

Nothing here needs vfiosim itself; ``demo.py`` runs the result.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..cachedir import user_cache

GUEST_ARCH = "ppc64el"
KERNEL_META = "linux-image-powerpc64le"
BUSYBOX = "busybox-static"
HOST_TOOLS = {                      # command -> the Debian package that provides it
    "qemu-system-ppc64": "qemu-system-ppc",
    "powerpc64le-linux-gnu-gcc": "gcc-powerpc64le-linux-gnu",
    "dpkg-deb": "dpkg",
}
CROSS_LIBC = "libc6-dev-ppc64el-cross"      # libc.a for the static guest program (only Recommended by the gcc)
HOST_PACKAGES = sorted({*HOST_TOOLS.values(), CROSS_LIBC} - {"dpkg"})
# What the guest's VFIO needs; their dependencies are found in the modules.
MODULE_TARGETS = ["vfio_iommu_spapr_tce", "vfio_pci"]
# virtio-blk gives the guest kernel's own DMA API something to map on the same PHB
# (H_PUT_TCE_INDIRECT); the demo goes on without it if the kernel has no such module.
OPTIONAL_MODULES = ["virtio_blk"]
BUSYBOX_APPLETS = ["sh", "mount", "insmod", "poweroff", "cat", "echo", "ls", "dmesg", "sleep", "uname", "dd",
                   "basename"]
IMAGE_FORMAT = 2                    # bump when the image layout changes

HERE = Path(__file__).resolve().parent
GUEST_SOURCE = HERE / "guest" / "edu_vfio_guest.c"
INIT_SCRIPT = HERE / "guest" / "init.sh"

Log = Callable[[str], None]


class QemuDemoUnavailable(RuntimeError):
    """The demo cannot run here; the message says exactly what is missing and why."""


def cache_dir() -> Path:
    return user_cache("qemu", override="VFIOSIM_QEMU_CACHE")


def _quiet(text: str) -> None:
    pass


def _run(argv: list[str], *, cwd: str | os.PathLike[str] | None = None, log: Log = _quiet,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    log("$ " + " ".join(argv))
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"})
    if check and proc.returncode != 0:
        raise QemuDemoUnavailable(f"`{' '.join(argv)}` failed with exit status {proc.returncode}: "
                                  f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc


# -- host prerequisites -------------------------------------------------------------------------------

@dataclass
class Prerequisites:
    qemu: str
    cross_gcc: str
    qemu_version: str


def _can_install() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None and shutil.which("dpkg") is not None


def _cross_libc_ok() -> bool:
    gcc = shutil.which("powerpc64le-linux-gnu-gcc")
    if gcc is None:
        return False
    out = subprocess.run([gcc, "-print-file-name=libc.a"], capture_output=True, text=True).stdout.strip()
    return os.path.isabs(out) and os.path.exists(out)


def _missing() -> list[tuple[str, str]]:
    """(what, Debian package) for each host prerequisite that is not there."""
    gone = [(cmd, pkg) for cmd, pkg in HOST_TOOLS.items() if shutil.which(cmd) is None]
    if not gone and not _cross_libc_ok():
        gone.append(("the ppc64el static libc (libc.a)", CROSS_LIBC))
    return gone


def check_prerequisites(*, install: bool = True, log: Log = _quiet) -> Prerequisites:
    """The host tools, installed with apt-get if missing and ``install`` (as root).
    Raises QemuDemoUnavailable saying what is missing and why it could not be installed."""
    missing = _missing()
    if missing:
        what = ", ".join(m for m, _ in missing)
        pkgs = sorted({p for _, p in missing} | ({CROSS_LIBC} if any(p.startswith("gcc-") for _, p in missing) else set()))
        if not install:
            raise QemuDemoUnavailable(f"missing {what} (Debian packages: {' '.join(pkgs)}); this run may not "
                                      f"install them (.ci/run does, as root: apt-get install {' '.join(pkgs)})")
        if not _can_install():
            raise QemuDemoUnavailable(f"missing {what} (Debian packages: {' '.join(pkgs)}) and cannot install "
                                      f"them here (needs root and apt-get): run `apt-get install {' '.join(pkgs)}`")
        log(f"installing {' '.join(pkgs)}")
        # A mirror that fails for one index makes `apt-get update` exit 100; whether
        # the packages can be installed is what the install step then finds out.
        _run(["apt-get", "update", "-q"], log=log, check=False)
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *pkgs], log=log)
        missing = _missing()
        if missing:
            raise QemuDemoUnavailable(f"apt-get installed {' '.join(pkgs)} but {', '.join(m for m, _ in missing)} "
                                      f"is still missing")
    qemu = shutil.which("qemu-system-ppc64")
    gcc = shutil.which("powerpc64le-linux-gnu-gcc")
    assert qemu and gcc
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()
    return Prerequisites(qemu, gcc, version[0] if version else "?")


# -- guest packages: a private apt index for ppc64el -----------------------------------------------------
#
# The guest's packages come from the same Debian archive the host's apt uses, through
# a private apt state in the cache (its own sources.list, lists and archives, for the
# ppc64el architecture only), so nothing of the host's apt or dpkg configuration
# changes and no root is needed.  Suites: the host's release and its backports.
# The newest linux-image-powerpc64le wins: Debian 12's own 6.1 kernel cannot run VFIO
# in a pseries guest (its vfio-pci probe fails with EINVAL: VFIO requires the
# IOMMU_CAP_CACHE_COHERENCY capability, and that kernel's POWER IOMMU code has no
# iommu_ops to report it), so on Debian 12 the guest kernel is the backports one.

def _os_codename() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("VERSION_CODENAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return ""


def system_archives(codename: str, etc_apt: str = "/etc/apt") -> list[tuple[str, str]]:
    """(URI, signed-by keyring) of the host's apt sources that serve ``codename`` itself
    (the main archive, not its -security or -updates companions)."""
    found: list[tuple[str, str]] = []
    parts = Path(etc_apt) / "sources.list.d"
    texts: list[tuple[str, str]] = []
    for path in sorted(parts.glob("*.sources")) if parts.is_dir() else []:
        texts.append(("deb822", path.read_text(errors="replace")))
    for path in [Path(etc_apt) / "sources.list", *(sorted(parts.glob("*.list")) if parts.is_dir() else [])]:
        if path.exists():
            texts.append(("list", path.read_text(errors="replace")))
    for kind, text in texts:
        if kind == "deb822":
            for stanza in text.split("\n\n"):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
                if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
                    continue
                if codename in fields.get("suites", "").split() and "main" in fields.get("components", "").split():
                    for uri in fields.get("uris", "").split():
                        found.append((uri, fields.get("signed-by", "")))
        else:
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if not words or words[0] != "deb":
                    continue
                opts = ""
                if len(words) > 1 and words[1].startswith("["):
                    end = next(i for i, w in enumerate(words) if w.endswith("]"))
                    opts, words = " ".join(words[1:end + 1]), [words[0], *words[end + 1:]]
                if len(words) >= 4 and words[2] == codename and "main" in words[3:]:
                    signed = ""
                    for opt in opts.strip("[]").split():
                        if opt.startswith("signed-by="):
                            signed = opt.split("=", 1)[1]
                    found.append((words[1], signed))
    return found


class GuestApt:
    """apt-get/apt-cache with a private state for one architecture (the guest's,
    ppc64el, unless told otherwise): no root, nothing of the host's apt changed.
    ``suites``: the host's release and its backports unless told otherwise (the
    kernel selftests take their sources from ``sid``)."""

    def __init__(self, root: Path, log: Log = _quiet, arch: str = GUEST_ARCH,
                 suites: list[str] | None = None) -> None:
        self.root = root
        self.log = log
        self.arch = arch
        self.suites = suites
        self.sources = root / "sources.list"

    def options(self) -> list[str]:
        r = self.root
        opts = [f"-oDir::State={r / 'state'}", f"-oDir::Cache={r / 'cache'}",
                f"-oDir::Etc::SourceList={self.sources}", f"-oDir::Etc::SourceParts={r / 'sources.list.d'}",
                f"-oDir::Etc::Preferences={r / 'preferences'}", f"-oDir::Etc::PreferencesParts={r / 'preferences.d'}",
                f"-oDir::State::status={r / 'status'}", f"-oAPT::Architecture={self.arch}",
                f"-oAPT::Architectures::={self.arch}", "-oDebug::NoLocking=1", "-oAPT::Get::List-Cleanup=0"]
        if os.geteuid() == 0:
            opts.append("-oAPT::Sandbox::User=root")       # the cache belongs to the caller
        return opts

    def setup(self) -> None:
        codename = _os_codename()
        if not codename:
            raise QemuDemoUnavailable("cannot tell the host's Debian release (no VERSION_CODENAME in /etc/os-release)")
        archives = system_archives(codename)
        if not archives:
            raise QemuDemoUnavailable(f"no apt source of the host serves Debian {codename} main: the guest's "
                                      f"{self.arch} packages have nowhere to come from")
        lines = []
        for uri, signed_by in archives:
            opt = f"arch={self.arch}" + (f" signed-by={signed_by}" if signed_by else "")
            for suite in self.suites or (codename, f"{codename}-backports"):
                lines.append(f"deb [{opt}] {uri} {suite} main")
        for d in ("state/lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "status").touch()
        self.sources.write_text("\n".join(lines) + "\n")

    def run(self, tool: str, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([tool, *self.options(), *args], cwd=cwd, log=self.log, check=check)

    def update(self) -> None:
        proc = self.run("apt-get", "update", "-q", check=False)
        if not any((self.root / "state" / "lists").glob("*_Packages*")):
            raise QemuDemoUnavailable(f"`apt-get update` for {self.arch} fetched no package list "
                                      f"(no network to the Debian archive?): {proc.stderr.strip()[-600:]}")

    def versions(self, pkg: str) -> list[str]:
        out = self.run("apt-cache", "madison", pkg, check=False).stdout
        return [line.split("|")[1].strip() for line in out.splitlines() if line.count("|") >= 2]


def _version_gt(a: str, b: str) -> bool:
    return subprocess.run(["dpkg", "--compare-versions", a, "gt", b]).returncode == 0


def fetch_debs(*, log: Log = _quiet, arch: str = GUEST_ARCH, kernel_meta: str = KERNEL_META) -> dict[str, Path]:
    """The guest's kernel and busybox .debs (for ``arch``: ppc64el by default, or amd64
    for the x86 guest of `vfiosim qemu-record`), downloaded once into the cache."""
    debs = cache_dir() / "debs"
    manifest = debs / ("manifest.json" if arch == GUEST_ARCH else f"manifest-{arch}.json")
    if manifest.exists():
        try:
            names = json.loads(manifest.read_text())
            paths = {k: debs / v for k, v in names.items()}
            if set(paths) == {"kernel", "busybox"} and all(p.exists() for p in paths.values()):
                return paths
        except (ValueError, AttributeError):
            pass
    for tool in ("apt-get", "apt-cache", "dpkg"):
        if shutil.which(tool) is None:
            raise QemuDemoUnavailable(f"the guest packages are not cached in {debs} and there is no {tool} to fetch them")
    apt = GuestApt(cache_dir() / ("apt" if arch == GUEST_ARCH else f"apt-{arch}"), log, arch)
    apt.setup()
    apt.update()
    versions = apt.versions(kernel_meta)
    if not versions:
        raise QemuDemoUnavailable(f"the Debian archive has no {kernel_meta} for {arch}")
    newest = versions[0]
    for v in versions[1:]:
        if _version_gt(v, newest):
            newest = v
    kernel_pkg = ""
    for line in apt.run("apt-cache", "depends", f"{kernel_meta}={newest}").stdout.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            kernel_pkg = line.split(":", 1)[1].strip().split(":")[0]
            break
    if not kernel_pkg:
        raise QemuDemoUnavailable(f"{kernel_meta} {newest} depends on no linux-image package")
    debs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        apt.run("apt-get", "download", "-q", kernel_pkg, BUSYBOX, cwd=Path(tmp))
        got = sorted(os.listdir(tmp))
        kernel = [n for n in got if n.startswith(kernel_pkg + "_") and n.endswith(".deb")]
        busybox = [n for n in got if n.startswith(BUSYBOX + "_") and n.endswith(".deb")]
        if len(kernel) != 1 or len(busybox) != 1:
            raise QemuDemoUnavailable(f"apt-get download left {got}, expected one {kernel_pkg} and one {BUSYBOX} .deb")
        for n in got:
            os.replace(os.path.join(tmp, n), debs / n)
    names = {"kernel": kernel[0], "busybox": busybox[0]}
    manifest.write_text(json.dumps(names, indent=2) + "\n")
    log(f"cached {kernel[0]} and {busybox[0]} in {debs}")
    return {k: debs / v for k, v in names.items()}


# -- kernel modules ---------------------------------------------------------------------------------------

def _norm(name: str) -> str:
    return name.replace("-", "_")


MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz")


def module_name(path: Path) -> str:
    name = path.name
    for suffix in MODULE_SUFFIXES:
        if name.endswith(suffix):
            return _norm(name[:-len(suffix)])
    raise ValueError(f"{path} is not a kernel module")


def module_bytes(path: Path) -> bytes:
    """A module's ELF image.  Debian's 6.12 ships modules xz-compressed, and busybox
    insmod hands the file to init_module() as it is, so the image carries them
    uncompressed."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def modinfo_depends(ko: bytes) -> list[str]:
    """The ``depends=`` of a module's .modinfo section (NUL-separated key=value strings)."""
    at = ko.find(b"\0depends=")
    if at < 0:
        return []
    value = ko[at + 9:ko.index(b"\0", at + 1)].decode()
    return [d for d in value.split(",") if d]


def module_load_order(index: dict[str, Path], builtin: set[str], targets: list[str]) -> list[Path]:
    """Modules to insmod, dependencies first; built-in ones are skipped."""
    order: list[Path] = []
    state: dict[str, int] = {}

    def visit(name: str) -> None:
        n = _norm(name)
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise QemuDemoUnavailable(f"module dependency cycle through {name}")
        if n not in index:
            if n in builtin:
                state[n] = 2
                return
            raise QemuDemoUnavailable(f"the guest kernel has no module {name} and does not build it in")
        state[n] = 1
        for dep in modinfo_depends(module_bytes(index[n])):
            visit(dep)
        state[n] = 2
        order.append(index[n])

    for t in targets:
        visit(t)
    return order


# -- cpio ---------------------------------------------------------------------------------------------------

class Cpio:
    """A newc ("070701") archive, as the kernel's initramfs unpacker reads it."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nameb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(nameb), 0]
        self.ino += 1
        hdr = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        self.buf.write(hdr + nameb)
        self.buf.write(b"\0" * (-(len(hdr) + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = self.buf.getvalue()
        return data + b"\0" * (-len(data) % 512)


# -- the image ------------------------------------------------------------------------------------------------

@dataclass
class GuestImage:
    kernel: Path              # vmlinux (ELF), booted with -kernel
    initrd: Path              # gzipped newc cpio
    kernel_package: str       # the .deb names it was built from
    busybox_package: str
    modules: list[str]        # insmod order
    kernel_release: str


def kernel_can_run_guest_vfio(vmlinux: Path) -> bool:
    """VFIO requires IOMMU_CAP_CACHE_COHERENCY (vfio_group_find_or_alloc, since 2022); on
    POWER the IOMMU code reports it from spapr_tce_iommu_capable(), which older kernels
    (Debian 12's 6.1) lack.  Debian's vmlinux keeps its symbol table: look for it."""
    import mmap
    with open(vmlinux, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return data.find(b"spapr_tce_iommu_capable\0") >= 0


def _extract(deb: Path, into: Path, log: Log) -> None:
    into.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(into)], log=log)


def build_image(*, install: bool = True, log: Log = _quiet, prereq: Prerequisites | None = None) -> GuestImage:
    """Fetch (once) and build (once per input) the guest kernel and initramfs."""
    prereq = prereq or check_prerequisites(install=install, log=log)
    debs = fetch_debs(log=log)
    source = GUEST_SOURCE.read_bytes()
    init = INIT_SCRIPT.read_bytes()
    key = hashlib.sha256(b"\0".join([str(IMAGE_FORMAT).encode(), debs["kernel"].name.encode(),
                                     debs["busybox"].name.encode(), source, init,
                                     prereq.cross_gcc.encode()])).hexdigest()[:16]
    out = cache_dir() / "images" / key
    meta_path = out / "image.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        img = GuestImage(out / "vmlinux", out / "initrd.cpio.gz", meta["kernel_package"], meta["busybox_package"],
                         meta["modules"], meta["kernel_release"])
        if img.kernel.exists() and img.initrd.exists():
            return img
    log(f"building the guest image in {out}")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        t = Path(tmp)
        _extract(debs["kernel"], t / "k", log)
        _extract(debs["busybox"], t / "bb", log)
        vmlinux = sorted((t / "k" / "boot").glob("vmlinux-*"))
        moddirs = sorted((t / "k" / "lib" / "modules").iterdir())
        if len(vmlinux) != 1 or len(moddirs) != 1:
            raise QemuDemoUnavailable(f"{debs['kernel'].name} has {len(vmlinux)} vmlinux and {len(moddirs)} module "
                                      f"trees; expected one of each")
        release = moddirs[0].name
        if not kernel_can_run_guest_vfio(vmlinux[0]):
            raise QemuDemoUnavailable(
                f"the newest ppc64el kernel here, {debs['kernel'].name}, cannot run VFIO in a pseries guest: it "
                f"has no spapr_tce_iommu_capable, so VFIO's IOMMU_CAP_CACHE_COHERENCY check fails and vfio-pci's "
                f"probe returns EINVAL (Debian 12's 6.1 is such a kernel; its backports suite has 6.12, which works)")
        index = {module_name(p): p for p in moddirs[0].rglob("*.ko*") if p.name.endswith(MODULE_SUFFIXES)}
        builtin_file = moddirs[0] / "modules.builtin"
        builtin = set()
        if builtin_file.exists():
            builtin = {module_name(Path(line.strip())) for line in builtin_file.read_text().splitlines()
                       if line.strip().endswith(".ko")}
        optional = [m for m in OPTIONAL_MODULES if _norm(m) in index or _norm(m) in builtin]
        modules = module_load_order(index, builtin, MODULE_TARGETS + optional)
        guest_bin = t / "edu_vfio_guest"
        _run([prereq.cross_gcc, "-static", "-O2", "-Wall", "-o", str(guest_bin), str(GUEST_SOURCE)], log=log)
        busybox = t / "bb" / "bin" / "busybox"
        cpio = Cpio()
        for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
            cpio.dir(d)
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3, 0o666)
        cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
        for applet in BUSYBOX_APPLETS:
            cpio.symlink(f"bin/{applet}", "busybox")
        cpio.file("init", init, 0o755)
        cpio.file("bin/edu_vfio_guest", guest_bin.read_bytes(), 0o755)
        names = []
        for ko in modules:
            name = module_name(ko) + ".ko"
            cpio.file(f"lib/modules/{name}", module_bytes(ko))
            names.append(name)
        cpio.file("lib/modules/load-order", ("\n".join(names) + "\n").encode())
        (out / "initrd.cpio.gz").write_bytes(gzip.compress(cpio.finish(), compresslevel=6))
        os.replace(vmlinux[0], out / "vmlinux")
    meta = {"kernel_package": debs["kernel"].name, "busybox_package": debs["busybox"].name,
            "modules": names, "kernel_release": release}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    for old in (cache_dir() / "images").iterdir():      # images of older inputs
        if old != out and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return GuestImage(out / "vmlinux", out / "initrd.cpio.gz", meta["kernel_package"], meta["busybox_package"],
                      names, release)
