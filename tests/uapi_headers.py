"""The Linux 6.12 uAPI headers the ABI test compiles against.

vfiosim models Linux 6.12, whose ``<linux/vfio.h>`` has the cdev ioctls and
whose ``<linux/iommufd.h>`` the Debian 12 host's linux-libc-dev (6.1) lacks
entirely.  So the headers are Debian's own 6.12 linux-libc-dev, found in this
order:

1. ``$VFIOSIM_UAPI_HEADERS``: an include directory (``<dir>/linux/iommufd.h``);
2. the system's ``/usr/include`` when it is 6.12 or newer;
3. the cache, ``$XDG_CACHE_HOME/vfiosim/uapi-headers`` (default
   ``~/.cache/vfiosim/uapi-headers``);
4. a download: ``apt-get download linux-libc-dev`` of the newest 6.12 version
   that the host's Debian release or its backports serves, with a private apt
   state (vfiosim.qemu.image.GuestApt: no root, the host's apt untouched),
   unpacked with ``dpkg-deb -x`` into the cache.

When none of these works the caller skips with :class:`HeadersUnavailable`'s
message, which says what was tried.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "linux-libc-dev"
SERIES = "6.12"
ENV = "VFIOSIM_UAPI_HEADERS"


class HeadersUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Headers:
    include: Path              # has linux/vfio.h and linux/iommufd.h
    arch_include: Path | None  # has asm/ for the host (a multiarch directory), if separate
    origin: str                # for messages

    def cflags(self) -> list[str]:
        # -isystem directories come before the standard ones, so <linux/...>
        # and <asm/...> are the 6.12 headers while <stdio.h> stays the host's.
        flags = [f"-isystem{self.include}"]
        if self.arch_include is not None:
            flags.insert(0, f"-isystem{self.arch_include}")
        return flags


def _version_code(include: Path) -> int | None:
    try:
        text = (include / "linux" / "version.h").read_text()
    except OSError:
        return None
    m = re.search(r"#define\s+LINUX_VERSION_CODE\s+(\d+)", text)
    return int(m.group(1)) if m else None


def _multiarch() -> str | None:
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    out = subprocess.run([gcc, "-print-multiarch"], capture_output=True, text=True).stdout.strip()
    return out or None


def _usable(include: Path) -> bool:
    return (include / "linux" / "iommufd.h").is_file() and (include / "linux" / "vfio.h").is_file()


def _from_dir(root: Path, origin: str) -> Headers:
    arch = _multiarch()
    arch_dir = root / arch if arch and (root / arch / "asm").is_dir() else None
    return Headers(root, arch_dir, origin)


def cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "vfiosim" / "uapi-headers"


def find_headers(download: bool = True) -> Headers:
    tried: list[str] = []
    env = os.environ.get(ENV)
    if env:
        root = Path(env)
        if _usable(root):
            return _from_dir(root, f"${ENV}={root}")
        tried.append(f"${ENV}={root} has no linux/iommufd.h and linux/vfio.h")
    system = Path("/usr/include")
    code = _version_code(system)
    if code is not None and code >= (6 << 16) + (12 << 8) and _usable(system):
        return _from_dir(system, "the system's /usr/include")
    tried.append(f"/usr/include is {code >> 16}.{(code >> 8) & 0xFF}" if code else "/usr/include has no version.h")
    cached = sorted(cache_dir().glob(f"{PACKAGE}_{SERIES}.*/usr/include"))
    for include in reversed(cached):
        if _usable(include):
            return _from_dir(include, f"Debian's {include.parents[1].name} (cached in {cache_dir()})")
    tried.append(f"nothing cached in {cache_dir()}")
    if not download:
        raise HeadersUnavailable("; ".join(tried))
    try:
        return _download()
    except HeadersUnavailable as exc:
        tried.append(str(exc))
        raise HeadersUnavailable("; ".join(tried)) from None


def _download() -> Headers:
    from vfiosim.qemu.image import GuestApt, QemuDemoUnavailable, _version_gt

    for tool in ("apt-get", "apt-cache", "dpkg", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise HeadersUnavailable(f"no {tool} to download Debian's {PACKAGE} {SERIES}")
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    apt = GuestApt(cache / "apt", arch=arch or "amd64")
    try:
        apt.setup()
        apt.update()
    except QemuDemoUnavailable as exc:
        raise HeadersUnavailable(f"apt cannot reach the Debian archive: {exc}") from None
    versions = [v for v in apt.versions(PACKAGE) if v.startswith(SERIES + ".")]
    if not versions:
        raise HeadersUnavailable(f"neither the host's Debian release nor its backports has {PACKAGE} {SERIES}.x")
    newest = versions[0]
    for v in versions[1:]:
        if _version_gt(v, newest):
            newest = v
    target = cache / f"{PACKAGE}_{newest}"
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        proc = apt.run("apt-get", "download", "-q", f"{PACKAGE}={newest}", cwd=Path(tmp), check=False)
        debs = list(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        if len(debs) != 1:
            raise HeadersUnavailable(f"apt-get download {PACKAGE}={newest} failed: {proc.stderr.strip()[-400:]}")
        unpacked = Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(unpacked, target)
    include = target / "usr" / "include"
    if not _usable(include):
        raise HeadersUnavailable(f"{PACKAGE} {newest} has no linux/iommufd.h")
    return _from_dir(include, f"Debian's {PACKAGE} {newest} (downloaded into {cache})")
