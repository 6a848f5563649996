"""Will the preload shim reach a program?  Checked before ``vfiosim run`` starts it.

``LD_PRELOAD`` is a request to the dynamic linker, so it does nothing for:

* a statically linked program: its ELF program headers have no
  ``PT_INTERP``, no dynamic linker runs (static-pie included);
* a program of another ELF class or machine than the shim (a 32-bit build);
* a set-uid or set-gid program, or one with file capabilities, run by a user
  it changes identity for: the kernel marks it AT_SECURE and ld.so ignores
  ``LD_PRELOAD`` paths with slashes (ld.so(8), "secure-execution mode").

Such a program's VFIO calls go to the host kernel; on a host without VFIO it
reports "no such device" and nothing says why.  Scripts (``#!``) and files
that are not ELF are left to the kernel: their interpreter decides.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import sys

PT_INTERP = 3
_ELF_MAGIC = b"\x7fELF"
_MACHINES = {3: "i386", 62: "x86-64", 183: "AArch64", 21: "ppc64", 40: "ARM", 243: "RISC-V"}


def resolve(program: str, search_path: str | None) -> str | None:
    """The file ``execvp`` would run: a name with a slash as is, else the first match on ``search_path``."""
    if "/" in program:
        return program if os.path.isfile(program) else None
    return shutil.which(program, path=search_path)


def _elf_header(path: str) -> tuple[int, int, int, list[int]] | None:
    """(ELF class, byte order, e_machine, program header types), or None for a file that is not ELF."""
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if len(ident) < 52 or ident[:4] != _ELF_MAGIC or ident[4] not in (1, 2) or ident[5] not in (1, 2):
                return None
            elf_class, order = ident[4], "<" if ident[5] == 1 else ">"
            e_machine = struct.unpack_from(order + "H", ident, 18)[0]
            if elf_class == 2:
                phoff = struct.unpack_from(order + "Q", ident, 32)[0]
                phentsize, phnum = struct.unpack_from(order + "HH", ident, 54)
            else:
                phoff = struct.unpack_from(order + "I", ident, 28)[0]
                phentsize, phnum = struct.unpack_from(order + "HH", ident, 42)
            if phentsize < 4 or phnum > 4096:
                return None
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return None
    types = [struct.unpack_from(order + "I", table, i * phentsize)[0]
             for i in range(len(table) // phentsize)]
    return elf_class, ident[5], e_machine, types


def _describe(elf_class: int, machine: int) -> str:
    return f"{32 if elf_class == 1 else 64}-bit {_MACHINES.get(machine, f'machine {machine}')}"


def preload_obstacle(program: str, search_path: str | None = None) -> str | None:
    """Why the shim would not load into ``program`` (a sentence naming it), or None."""
    path = resolve(program, search_path if search_path is not None else os.environ.get("PATH", os.defpath))
    if path is None:
        return None                                   # exec reports it
    elf = _elf_header(path)
    if elf is None:
        return None
    elf_class, order, machine, types = elf
    name = program if os.path.abspath(program) == os.path.abspath(path) else f"{program} ({path})"
    if PT_INTERP not in types:
        return (f"{name} is statically linked: LD_PRELOAD cannot load the vfiosim shim into it, so its "
                f"VFIO calls would reach this host's kernel, not the simulated machine; link it dynamically "
                f"(without -static)")
    ours = _elf_header(sys.executable)
    if ours is not None and (elf_class, order, machine) != ours[:3]:
        return (f"{name} is a {_describe(elf_class, machine)} program and the vfiosim shim is "
                f"{_describe(ours[0], ours[2])}: the dynamic linker will not load it, so its VFIO calls would reach "
                f"this host's kernel; build it for {_describe(ours[0], ours[2])}")
    try:
        st = os.stat(path)
    except OSError:
        return None
    # AT_SECURE: the exec changes the effective id away from the real one.
    if (st.st_mode & stat.S_ISUID and st.st_uid != os.getuid()) or \
            (st.st_mode & stat.S_ISGID and st.st_gid != os.getgid()):
        return (f"{name} is set-{'uid' if st.st_mode & stat.S_ISUID else 'gid'}: it runs in secure-"
                f"execution mode, where the dynamic linker ignores LD_PRELOAD, so its VFIO calls would reach this "
                f"host's kernel; run a copy without the set-id bit")
    if os.geteuid() != 0:
        try:
            os.getxattr(path, "security.capability")
        except OSError:
            pass
        else:
            return (f"{name} has file capabilities: it runs in secure-execution mode, where the dynamic "
                    f"linker ignores LD_PRELOAD, so its VFIO calls would reach this host's kernel")
    return None
