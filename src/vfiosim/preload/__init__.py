"""The C parts of ``vfiosim run``: the LD_PRELOAD shim (vfiosim_preload.c)
and the daemon's helper library (vfiosim_daemon.c), which share the wire
declarations of vfiosim_protocol.h.

``pip install`` builds both next to this file (setup.py); a source checkout
used in place (``PYTHONPATH=src``) builds them on first use into a cache
directory, keyed by the sources' hash.  Needs only a C compiler and libc.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = "vfiosim_preload.c"
DAEMON_SOURCE = "vfiosim_daemon.c"
HEADER = "vfiosim_protocol.h"
CFLAGS = ["-shared", "-fPIC", "-O2", "-fvisibility=hidden", "-Wall"]
LIBS = ["-ldl", "-lpthread"]


class ShimBuildError(RuntimeError):
    pass


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vfiosim"


def compile_shim(source: str | os.PathLike[str], output: str | os.PathLike[str]) -> None:
    """Compile the shim with the system C compiler."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise ShimBuildError("no C compiler (cc or gcc) to build the vfiosim preload library")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name, suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *CFLAGS, "-I", str(Path(source).parent), "-o", tmp, str(source), *LIBS],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ShimBuildError(f"building the vfiosim preload library failed:\n{proc.stderr}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library_path() -> str:
    """Absolute path of the preload library, building it if needed."""
    return _built(SOURCE, "_vfiosim_preload", "libvfiosim_preload")


def daemon_library_path() -> str:
    """Absolute path of the daemon's helper library, building it if needed."""
    return _built(DAEMON_SOURCE, "_vfiosim_daemon", "libvfiosim_daemon")


def _built(source: str, ext_name: str, lib_name: str) -> str:
    here = Path(__file__).resolve().parent
    src = here / source
    header = here / HEADER
    built = sorted(here.glob(f"{ext_name}*.so")) + sorted(here.glob(f"{lib_name}.so"))
    installed = any(part in ("site-packages", "dist-packages") for part in here.parts)
    newest = max((p.stat().st_mtime for p in (src, header) if p.exists()), default=0.0)
    if built and (installed or not src.exists() or built[0].stat().st_mtime >= newest):
        return str(built[0])
    if not src.exists():
        raise ShimBuildError(f"the vfiosim library {lib_name} is missing from {here}")
    digest = hashlib.sha256(src.read_bytes() + (header.read_bytes() if header.exists() else b"")).hexdigest()[:16]
    name = f"{lib_name}-{digest}.so"
    for cache in (_cache_dir(), Path(tempfile.gettempdir()) / f"vfiosim-{os.getuid()}"):
        out = cache / name
        if out.exists():
            return str(out)
        try:
            compile_shim(src, out)
        except OSError:
            continue                    # not writable: the next place
        return str(out)
    raise ShimBuildError(f"no writable directory to build the vfiosim library {lib_name} in ({_cache_dir()})")
