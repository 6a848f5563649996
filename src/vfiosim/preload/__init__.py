"""The C parts of ``vfiosim run``: the LD_PRELOAD shim (vfiosim_preload.c)
and the daemon's side of the channel (vfiosim_daemon.c, a CPython extension
module), which share the wire declarations of vfiosim_protocol.h.

``pip install`` builds both next to this file (setup.py); a source checkout
used in place (``PYTHONPATH=src``) builds them on first use into a cache
directory, keyed by the sources' hash.  Needs only a C compiler, libc and
Python's headers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

from ..cachedir import user_cache

SOURCE = "vfiosim_preload.c"
DAEMON_SOURCE = "vfiosim_daemon.c"
HEADERS = ("vfiosim_protocol.h", "vfiosim_procmap.h", "x86_alu.h")   # included by the sources: part of their hash
CFLAGS = ["-shared", "-fPIC", "-O2", "-fvisibility=hidden", "-Wall"]
LIBS = ["-ldl", "-lpthread"]


class ShimBuildError(RuntimeError):
    pass


def _cache_dir() -> Path:
    return user_cache()


def compile_shim(source: str | os.PathLike[str], output: str | os.PathLike[str], python: bool = False) -> None:
    """Compile the shim with the system C compiler (``python``: a CPython
    extension module, against this interpreter's headers)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise ShimBuildError("no C compiler (cc or gcc) to build the vfiosim preload library")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name, suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        includes = ["-I", str(Path(source).parent)]
        if python:
            includes += ["-I", sysconfig.get_paths()["include"]]
        proc = subprocess.run([cc, *CFLAGS, *includes, "-o", tmp, str(source), *LIBS],
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
    """Absolute path of the daemon's extension module, building it if needed."""
    return _built(DAEMON_SOURCE, "_vfiosim_daemon", f"libvfiosim_daemon-{sysconfig.get_config_var('SOABI')}",
                  python=True)


def daemon_module() -> ModuleType:
    """The daemon's extension module (vfiosim_daemon.c), loaded from
    :func:`daemon_library_path`."""
    import importlib.machinery
    import importlib.util
    name = f"{__name__}._vfiosim_daemon"
    loader = importlib.machinery.ExtensionFileLoader(name, daemon_library_path())
    spec = importlib.util.spec_from_file_location(name, loader.path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _built(source: str, ext_name: str, lib_name: str, python: bool = False) -> str:
    here = Path(__file__).resolve().parent
    src = here / source
    headers = [here / name for name in HEADERS]
    if python:                          # an extension module: built for this interpreter only
        import importlib.machinery
        built = [here / f"{ext_name}{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES
                 if (here / f"{ext_name}{suffix}").exists()]
    else:
        built = sorted(here.glob(f"{ext_name}*.so")) + sorted(here.glob(f"{lib_name}.so"))
    installed = any(part in ("site-packages", "dist-packages") for part in here.parts)
    newest = max((p.stat().st_mtime for p in (src, *headers) if p.exists()), default=0.0)
    if built and (installed or not src.exists() or built[0].stat().st_mtime >= newest):
        return str(built[0])
    if not src.exists():
        raise ShimBuildError(f"the vfiosim library {lib_name} is missing from {here}")
    digest = hashlib.sha256(src.read_bytes() + b"".join(h.read_bytes() for h in headers if h.exists())).hexdigest()[:16]
    name = f"{lib_name}-{digest}.so"
    for cache in (_cache_dir(), Path(tempfile.gettempdir()) / f"vfiosim-{os.getuid()}"):
        out = cache / name
        if out.exists():
            return str(out)
        try:
            compile_shim(src, out, python)
        except OSError:
            continue                    # not writable: the next place
        return str(out)
    raise ShimBuildError(f"no writable directory to build the vfiosim library {lib_name} in ({_cache_dir()})")
