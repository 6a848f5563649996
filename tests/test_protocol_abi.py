"""The wire between the shim and the daemon is declared once per language and checked here.

src/vfiosim/preload/vfiosim_protocol.h is what the C shim and the daemon's
helper library compile against; src/vfiosim/transport/protocol.py is the
Python side.  As tests/test_uapi_abi.py does for <linux/vfio.h>, this test
generates a C program from the Python declarations that prints every number
and layout as the compiler sees the header, and compares; it also parses the
header so that nothing declared there is missing in Python, and builds the
shim and the helper library against it.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

import vfiosim
from vfiosim.transport import protocol as P

PRELOAD = Path(vfiosim.__file__).parent / "preload"
HEADER = PRELOAD / "vfiosim_protocol.h"

# Python name -> C name, for every number on the wire.
CONSTANTS = {
    "MAGIC_VERSION": "VFIOSIM_MAGIC_VERSION", "MAX_PAYLOAD": "VMAX_PAYLOAD", "F_REFRESH_CREDS": "VF_REFRESH_CREDS",
    "F_WINDOW": "VF_WINDOW", "F_WINDOW_WRITABLE": "VF_WINDOW_WRITABLE", "WIN_MAX": "VWIN_MAX",
    "RW_POSITIONAL": "VRW_POSITIONAL", "MMIO_WRITE": "VMMIO_WRITE", "HELLO_FORK": "VHELLO_FORK",
    "SETATTR_OWNER": "VSETATTR_OWNER", "SETATTR_MODE": "VSETATTR_MODE", "VRING": "VRING", "VLIVE": "VLIVE",
    "VMAP_MAX_POSTED": "VMAP_MAX_POSTED", "VPOST_KICK": "VPOST_KICK", "VMAP_MAX_RAM": "VMAP_MAX_RAM", "VCHAN_SIZE": "VCHAN_SIZE",
    **{name: "V" + name for name in dir(P) if name.startswith("OP_") and name != "OP_NAMES"},
}
STRUCTS = {"vreq": P.vreq, "vrep": P.vrep, "vmap_post": P.vmap_post, "vmap_range": P.vmap_range, "vmap": P.vmap, "vpost": P.vpost,
           "vchan_prog": P.vchan_prog, "vchan_daemon": P.vchan_daemon, "vchan": P.vchan}


def _cc() -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to check the protocol"
    return cc


def _probes() -> list[tuple[str, str, int]]:
    """(label, C expression, the Python value)."""
    out = [(f"#define {c}", f"(unsigned long long)({c})", getattr(P, py)) for py, c in CONSTANTS.items()]
    for name, cls in STRUCTS.items():
        out.append((f"sizeof(struct {name})", f"sizeof(struct {name})", ctypes.sizeof(cls)))
        for field, *_ in cls._fields_:
            out.append((f"offsetof(struct {name}, {field})", f"offsetof(struct {name}, {field})",
                        getattr(cls, field).offset))
    return out


def test_every_number_and_layout_agrees_with_the_header(tmp_path):
    probes = _probes()
    src = tmp_path / "probe.c"
    lines = ["#include <stddef.h>", "#include <stdio.h>", f'#include "{HEADER}"', "int main(void) {"]
    lines += [f'    printf("%llu\\n", (unsigned long long)({expr}));' for _label, expr, _v in probes]
    lines += ["    return 0;", "}"]
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "probe"
    subprocess.run([_cc(), "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    values = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    bad = [f"{label}: C {c}, Python {py}" for (label, _e, py), c in zip(probes, values) if c != py]
    assert not bad, "\n".join(bad)
    assert len(values) == len(probes)


def test_everything_the_header_declares_is_declared_in_python():
    text = HEADER.read_text()
    defines = set(re.findall(r"^#define (V\w+)\s", text, re.M)) - {"VFIOSIM_PROTOCOL_H"}
    assert defines <= set(CONSTANTS.values()), sorted(defines - set(CONSTANTS.values()))
    structs = set(re.findall(r"^struct (\w+) \{", text, re.M))
    assert structs == set(STRUCTS), structs ^ set(STRUCTS)
    # and every member, in order
    for name, cls in STRUCTS.items():
        body = re.search(rf"^struct {name} \{{(.*?)^\}};", text, re.M | re.S)
        assert body, name
        members = re.findall(r"(\w+)(?:\[[^\]]*\])?\s*[,;]", re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S))
        assert members == [f for f, *_ in cls._fields_], (name, members)


def test_the_operation_names_are_one_table():
    assert P.OP_NAMES[P.OP_IOCTL] == "ioctl" and len(P.OP_NAMES) == len(set(P.OP_NAMES.values()))


@pytest.mark.parametrize("source", ["vfiosim_preload.c", "vfiosim_daemon.c"])
def test_the_shim_and_the_daemon_helper_build_against_the_header(tmp_path, source):
    text = (PRELOAD / source).read_text()
    assert '#include "vfiosim_protocol.h"' in text
    assert not re.search(r"\bOP_HELLO\s*=", text), f"{source} declares the operations again"
    python = ["-I", sysconfig.get_paths()["include"]] if source == "vfiosim_daemon.c" else []   # an extension module
    subprocess.run([_cc(), "-shared", "-fPIC", "-Wall", "-Werror", "-I", str(PRELOAD), *python, "-o",
                    str(tmp_path / "lib.so"), str(PRELOAD / source), "-ldl", "-lpthread"], check=True)
