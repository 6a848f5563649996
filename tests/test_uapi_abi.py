"""Check vfiosim.uapi (vfio.py, iommufd.py) against Linux 6.12's headers.

The ctypes declarations are only trustworthy if they are compared with what a
C compiler makes of the real headers, so this module:

1. generates a C program *from the Python registries* (STRUCTS, IOCTLS,
   CONSTANTS, ...) that prints sizeof/_Alignof/offsetof/member sizes and
   signedness, every ioctl number and every constant, compiles it with gcc
   against <linux/vfio.h> and <linux/iommufd.h> as Debian's linux-libc-dev
   6.12 ships them (tests/uapi_headers.py finds, caches or downloads them),
   runs it and compares each number with the Python value;
2. parses the header text itself and asserts that every struct (with every
   member, in order), every #define and every enum constant is declared in
   Python, so the registries cannot silently miss something.

gcc is a stated requirement of the project: without it these tests fail
rather than skip, because a skipped ABI check looks like a passing one.  The
6.12 headers are skipped for, with the reason, only when they cannot be had
(no network and nothing cached): the host's own linux-libc-dev is 6.1, which
has no iommufd.h.
"""

from __future__ import annotations

import ctypes
import platform
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from types import ModuleType

from uapi_headers import Headers, HeadersUnavailable, find_headers
from vfiosim.uapi import iommufd, ioctl, vfio


@dataclass(frozen=True)
class Uapi:
    """One Python uAPI module and the headers it declares."""

    module: ModuleType
    headers: tuple[str, ...]          # under <linux/>
    guards: frozenset[str]            # include guards: the only macros with no Python counterpart
    nr_base: str | None = None        # a base the ioctl numbers are offsets from (VFIO_BASE)
    min_structs: int = 1
    min_defines: int = 1

    @property
    def name(self) -> str:
        return self.module.__name__.rsplit(".", 1)[-1]


UAPIS = (
    # vfio.h only names the s390 zPCI capability ids; their layouts live in
    # vfio_zdev.h and are declared in vfio.py as well.
    Uapi(vfio, ("vfio.h", "vfio_zdev.h"), frozenset({"VFIO_H", "_VFIO_ZDEV_H_"}), "VFIO_BASE",
         min_structs=40, min_defines=150),
    Uapi(iommufd, ("iommufd.h",), frozenset({"_IOMMUFD_H"}), min_structs=20, min_defines=5),
)
UAPI_IDS = [u.name for u in UAPIS]


@pytest.fixture(scope="module")
def headers() -> Headers:
    try:
        return find_headers()
    except HeadersUnavailable as exc:
        pytest.skip(f"Linux 6.12 uAPI headers unavailable: {exc}")

# Arguments fed to the function-like macros (VFIO_DEVICE_STATE_VALID & co.):
# all combinations of the three v1 state bits plus some high-bit noise.
MACRO_FUNCTION_ARGS = (*range(16), 0x80000000, 0xFFFFFFF0, 0xFFFFFFFF)


# ---------------------------------------------------------------------------
# Probes: one C expression each, printed by the generated program
# ---------------------------------------------------------------------------


@dataclass
class Probe:
    label: str  # what a mismatch message names, e.g. "struct x: offsetof(a.b)"
    c_expr: str
    expected: int | str | None  # None: compared by the test itself
    is_string: bool = False
    actual: str | None = None  # filled in from the program's output


def _c_type_name(cls: type) -> str:
    return f"{'union' if issubclass(cls, ctypes.Union) else 'struct'} {cls.__name__}"


def _is_flexible_array(ctype: type) -> bool:
    return issubclass(ctype, ctypes.Array) and ctype._length_ == 0


def _is_integer(ctype: type) -> bool:
    return issubclass(ctype, ctypes._SimpleCData) and not issubclass(ctype, ctypes._Pointer)


def _is_signed(ctype: type) -> bool:
    return ctype(-1).value < 0


@dataclass
class Member:
    c_path: str  # how C names it after "->", e.g. "ddw.levels", "err.mask"
    offset: int
    ctype: type


def _members(cls: type, prefix: str = "", base: int = 0) -> Iterator[Member]:
    """All members of a ctypes struct/union, recursively, named as C names them.

    Anonymous union wrappers are transparent (C has no name for them), named
    nested structs contribute a dotted prefix.
    """
    for name, ctype, *bits in cls._fields_:
        assert not bits, f"{cls.__name__}.{name}: bit-fields are not supported by this check"
        offset = base + getattr(cls, name).offset
        if name in getattr(cls, "_anonymous_", ()):
            yield from _members(ctype, prefix, offset)
            continue
        yield Member(prefix + name, offset, ctype)
        if issubclass(ctype, (ctypes.Structure, ctypes.Union)):
            yield from _members(ctype, f"{prefix}{name}.", offset)


def _struct_probes() -> list[Probe]:
    probes: list[Probe] = []
    for c_name, cls in ((n, c) for u in UAPIS for n, c in u.module.STRUCTS.items()):
        c_type = _c_type_name(cls)
        assert c_name == cls.__name__, f"STRUCTS key {c_name!r} names class {cls.__name__}"
        probes.append(Probe(f"{c_type}: sizeof", f"sizeof({c_type})", ctypes.sizeof(cls)))
        probes.append(Probe(f"{c_type}: _Alignof", f"_Alignof({c_type})", ctypes.alignment(cls)))
        for m in _members(cls):
            where = f"{c_type}: {m.c_path}"
            lvalue = f"(({c_type} *)0)->{m.c_path}"
            offsetof = f"offsetof({c_type}, {m.c_path})"
            probes.append(Probe(f"{where}: offsetof", offsetof, m.offset))

            # A flexible array member has no C sizeof; check its element
            # instead, which is what the variable part is made of.
            if _is_flexible_array(m.ctype):
                element, element_lvalue = m.ctype._type_, f"{lvalue}[0]"
                probes.append(Probe(f"{where}: offsetofend", offsetof, vfio.offsetofend(cls, m.c_path)))
            else:
                probes.append(Probe(f"{where}: sizeof", f"sizeof({lvalue})", ctypes.sizeof(m.ctype)))
                probes.append(
                    Probe(
                        f"{where}: offsetofend",
                        f"{offsetof} + sizeof({lvalue})",
                        vfio.offsetofend(cls, m.c_path),
                    )
                )
                if issubclass(m.ctype, ctypes.Array):
                    element, element_lvalue = m.ctype._type_, f"{lvalue}[0]"
                elif issubclass(m.ctype, ctypes._Pointer):
                    element, element_lvalue = m.ctype._type_, f"*{lvalue}"
                else:
                    element, element_lvalue = m.ctype, lvalue

            if element is not m.ctype:
                probes.append(
                    Probe(f"{where}: element sizeof", f"sizeof({element_lvalue})", ctypes.sizeof(element))
                )
            # __u32 vs __s32 does not change the layout, only the value read.
            if _is_integer(element):
                probes.append(
                    Probe(
                        f"{where}: signedness",
                        f"((__typeof__({element_lvalue}))-1 < 0)",
                        int(_is_signed(element)),
                    )
                )
    return probes


def _ioctl_probes() -> list[Probe]:
    probes = []
    for u in UAPIS:
        for name, cmd in u.module.IOCTLS.items():
            probes.append(Probe(name, name, cmd))
            if u.nr_base is not None:
                base = getattr(u.module, u.nr_base)
                probes.append(Probe(f"{name}: offset from {u.nr_base}", f"_IOC_NR({name}) - {u.nr_base}",
                                    ioctl._IOC_NR(cmd) - base))
    return probes


def _constant_probes() -> dict[str, tuple[Probe, Probe]]:
    # C gives each macro its own type (int, unsigned, char...), and e.g.
    # VFIO_REGION_TYPE_PCI_VENDOR_TYPE is "1 << 31", a negative int.  Compare
    # bit patterns at the C type's width: print the width and the value
    # masked to it.
    probes = {}
    for name, value in ((n, v) for u in UAPIS for n, v in u.module.CONSTANTS.items()):
        width = Probe(f"{name}: sizeof", f"sizeof({name})", None)
        masked = Probe(name, f"(unsigned long long)({name}) & (~0ULL >> (64 - 8 * sizeof({name})))", value)
        probes[name] = (width, masked)
    return probes


def _string_probes() -> list[Probe]:
    return [Probe(name, name, value, is_string=True)
            for u in UAPIS for name, value in u.module.STRING_CONSTANTS.items()]


def _macro_function_probes(headers: Headers) -> list[Probe]:
    probes = []
    for u in UAPIS:
        for name, params in sorted(_header_function_macros(headers, u).items()):
            probes += _function_probes(u, name, params)
    return probes


def _function_probes(u: Uapi, name: str, params: list[str]) -> list[Probe]:
    assert len(params) == 1, f"{name}{params}: extend MACRO_FUNCTION_ARGS handling for multi-argument macros"
    function = getattr(u.module, name)
    # Pass a __u32, as the callers (device_state fields) do.
    return [Probe(f"{name}({arg:#x})", f"{name}((__u32){arg:#x}U)", int(function(arg))) for arg in MACRO_FUNCTION_ARGS]


def _host_encoding_probes() -> list[Probe]:
    # ioctl.py's host encoding against the host's <linux/ioctl.h>.  C takes a
    # type for the size argument, so sizes are spelled char[N].
    probes = [
        Probe(name, name, getattr(ioctl, name))
        for name in (
            "_IOC_NRBITS",
            "_IOC_TYPEBITS",
            "_IOC_SIZEBITS",
            "_IOC_DIRBITS",
            "_IOC_NRSHIFT",
            "_IOC_TYPESHIFT",
            "_IOC_SIZESHIFT",
            "_IOC_DIRSHIFT",
            "_IOC_NONE",
            "_IOC_READ",
            "_IOC_WRITE",
        )
    ]
    for type_, nr, size in (("x", 3, 24), (";", 255, 1), (0xAE, 0x80, 4096), ("V", 0, 8191)):
        c_type = f"'{type_}'" if isinstance(type_, str) else hex(type_)
        probes.append(Probe(f"_IO({type_!r}, {nr})", f"_IO({c_type}, {nr})", ioctl._IO(type_, nr)))
        for macro in ("_IOR", "_IOW", "_IOWR"):
            cmd = getattr(ioctl, macro)(type_, nr, size)
            probes.append(Probe(f"{macro}({type_!r}, {nr}, {size})", f"{macro}({c_type}, {nr}, char[{size}])", cmd))
            for decoder in ("_IOC_DIR", "_IOC_TYPE", "_IOC_NR", "_IOC_SIZE"):
                decoded = getattr(ioctl, decoder)(cmd)
                probes.append(Probe(f"{decoder}({cmd:#x})", f"{decoder}({cmd:#x}U)", decoded))
    return probes


# ---------------------------------------------------------------------------
# The generated program
# ---------------------------------------------------------------------------


@dataclass
class AbiProbes:
    structs: list[Probe]
    ioctls: list[Probe]
    constants: dict[str, tuple[Probe, Probe]]
    strings: list[Probe]
    macro_functions: list[Probe]
    host_encoding: list[Probe]

    def all(self) -> list[Probe]:
        constant_probes = [p for pair in self.constants.values() for p in pair]
        return [
            *self.structs,
            *self.ioctls,
            *constant_probes,
            *self.strings,
            *self.macro_functions,
            *self.host_encoding,
        ]


def _c_program(probes: list[Probe]) -> str:
    # Lines are keyed by probe index, so labels never need C escaping.
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/ioctl.h>",
        *(f"#include <linux/{header}>" for u in UAPIS for header in u.headers),
        "",
        "int main(void)",
        "{",
    ]
    for index, probe in enumerate(probes):
        if probe.is_string:
            lines.append(f'\tprintf("%d\\t%s\\n", {index}, {probe.c_expr});')
        else:
            lines.append(f'\tprintf("%d\\t%llu\\n", {index}, (unsigned long long)({probe.c_expr}));')
    lines += ["\treturn 0;", "}", ""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def abi(tmp_path_factory: pytest.TempPathFactory, headers: Headers) -> AbiProbes:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc not found on PATH: gcc is required to check the VFIO ABI against <linux/vfio.h>")

    probes = AbiProbes(
        structs=_struct_probes(),
        ioctls=_ioctl_probes(),
        constants=_constant_probes(),
        strings=_string_probes(),
        macro_functions=_macro_function_probes(headers),
        host_encoding=_host_encoding_probes(),
    )
    every_probe = probes.all()

    workdir = tmp_path_factory.mktemp("uapi_abi")
    source, binary = workdir / "uapi_abi.c", workdir / "uapi_abi"
    source.write_text(_c_program(every_probe))
    compiled = subprocess.run(
        [gcc, "-std=gnu11", "-Wall", *headers.cflags(), "-o", str(binary), str(source)], capture_output=True, text=True
    )
    assert compiled.returncode == 0, f"gcc failed on generated {source} ({headers.origin}):\n{compiled.stderr}"
    ran = subprocess.run([str(binary)], capture_output=True, text=True, check=True)

    for line in ran.stdout.splitlines():
        index, _, value = line.partition("\t")
        every_probe[int(index)].actual = value
    missing = [p.label for p in every_probe if p.actual is None]
    assert not missing, f"generated program printed nothing for: {missing}"
    return probes


def _show(value: int | str | None) -> str:
    # ioctl numbers and flags are only recognisable in hex.
    return f"{value} ({value:#x})" if isinstance(value, int) and value > 9 else repr(value)


def _mismatches(probes: list[Probe]) -> list[str]:
    wrong = []
    for p in probes:
        actual = p.actual if p.is_string else int(p.actual)
        if actual != p.expected:
            wrong.append(f"{p.label}: C says {_show(actual)}, Python says {_show(p.expected)}")
    return wrong


# ---------------------------------------------------------------------------
# Python vs C
# ---------------------------------------------------------------------------


def test_struct_layouts_match_c(abi: AbiProbes) -> None:
    wrong = _mismatches(abi.structs)
    assert not wrong, "struct layout mismatches:\n" + "\n".join(wrong)


def test_ioctl_numbers_match_c(abi: AbiProbes) -> None:
    wrong = _mismatches(abi.ioctls)
    assert not wrong, "ioctl number mismatches:\n" + "\n".join(wrong)


def test_constants_match_c(abi: AbiProbes) -> None:
    wrong = []
    for name, (width_probe, value_probe) in abi.constants.items():
        bits = 8 * int(width_probe.actual)
        value = next(u.module.CONSTANTS[name] for u in UAPIS if name in u.module.CONSTANTS)
        if not -(1 << (bits - 1)) <= value < (1 << bits):
            wrong.append(f"{name}: Python value {value:#x} does not fit the C type ({bits} bits)")
        elif value & ((1 << bits) - 1) != int(value_probe.actual):
            wrong.append(f"{name}: C says {int(value_probe.actual):#x}, Python says {value:#x} ({bits}-bit type)")
    assert not wrong, "constant mismatches:\n" + "\n".join(wrong)


def test_string_macros_match_c(abi: AbiProbes) -> None:
    wrong = _mismatches(abi.strings)
    assert not wrong, "string macro mismatches:\n" + "\n".join(wrong)


def test_function_macros_match_c(abi: AbiProbes) -> None:
    wrong = _mismatches(abi.macro_functions)
    assert not wrong, "function-like macro mismatches:\n" + "\n".join(wrong)


def test_host_ioctl_encoding_matches_c(abi: AbiProbes) -> None:
    wrong = _mismatches(abi.host_encoding)
    assert not wrong, "host ioctl encoding mismatches against <linux/ioctl.h>:\n" + "\n".join(wrong)


# ---------------------------------------------------------------------------
# Header -> Python: nothing in the header may be missing
# ---------------------------------------------------------------------------


def _header_text(path: Path) -> str:
    text = path.read_text()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.DOTALL)
    text = re.sub(r"//[^\n]*", " ", text)
    return text.replace("\\\n", " ")


def _texts(headers: Headers, u: Uapi) -> list[str]:
    return [_header_text(headers.include / "linux" / name) for name in u.headers]


_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)(\([^)]*\))?(.*)$", re.MULTILINE)


def _header_defines(headers: Headers, u: Uapi) -> dict[str, str]:
    """Object-like macros: name -> replacement text."""
    return {
        name: value.strip()
        for text in _texts(headers, u)
        for name, params, value in _DEFINE.findall(text)
        if not params
    }


def _header_function_macros(headers: Headers, u: Uapi) -> dict[str, list[str]]:
    """Function-like macros: name -> parameter names."""
    return {
        name: [p.strip() for p in params.strip("()").split(",")]
        for text in _texts(headers, u)
        for name, params, _ in _DEFINE.findall(text)
        if params
    }


def _header_enumerators(headers: Headers, u: Uapi) -> list[str]:
    names = []
    for text in _texts(headers, u):
        for body in re.findall(r"\benum\b\s*\w*\s*\{(.*?)\}", text, flags=re.DOTALL):
            names += [m.group(1) for item in body.split(",") if (m := re.match(r"\s*(\w+)", item))]
    return names


def _split_members(body: str) -> list[str]:
    """C-visible member names of a struct/union body, in declaration order.

    Members of anonymous unions/structs are reached directly in C, so they
    are flattened into the enclosing list.
    """
    body = re.sub(r"^[ \t]*#.*$", "", body, flags=re.MULTILINE)  # nested #defines
    declarations, depth, start = [], 0, 0
    for i, char in enumerate(body):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == ";" and depth == 0:
            declarations.append(body[start:i])
            start = i + 1
    names = []
    for declaration in (d.strip() for d in declarations):
        if not declaration:
            continue
        if "{" in declaration:
            inner = declaration[declaration.index("{") + 1 : declaration.rindex("}")]
            declarator = declaration[declaration.rindex("}") + 1 :].strip()
            names += [declarator] if declarator else _split_members(inner)
            continue
        match = re.search(r"(\w+)\s*(\[[^\]]*\])?\s*$", declaration)
        assert match, f"cannot parse member declaration {declaration!r}"
        names.append(match.group(1))
    return names


def _header_structs(headers: Headers, u: Uapi) -> dict[str, list[str]]:
    """Struct name -> C-visible member names, for every struct definition."""
    structs = {}
    for text in _texts(headers, u):
        for match in re.finditer(r"\bstruct\s+(\w+)\s*\{", text):
            depth, end = 1, match.end()
            while depth:
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                end += 1
            structs[match.group(1)] = _split_members(text[match.end() : end - 1])
    return structs


@pytest.mark.parametrize("u", UAPIS, ids=UAPI_IDS)
def test_every_header_struct_is_declared_with_all_members(headers: Headers, u: Uapi) -> None:
    header_structs = _header_structs(headers, u)
    assert len(header_structs) >= u.min_structs, "header parsing found suspiciously few structs"
    missing = sorted(set(header_structs) - set(u.module.STRUCTS))
    assert not missing, f"structs in the header but not in {u.name}.STRUCTS: {missing}"
    extra = sorted(set(u.module.STRUCTS) - set(header_structs))
    assert not extra, f"{u.name}.STRUCTS entries with no struct in the header: {extra}"

    wrong = []
    for name, c_members in header_structs.items():
        # Top-level C-visible names only (no dots): nested structs are
        # checked as structs of their own.
        py_members = [m.c_path for m in _members(u.module.STRUCTS[name]) if "." not in m.c_path]
        if py_members != c_members:
            wrong.append(f"struct {name}: header has {c_members}, Python has {py_members}")
    assert not wrong, "struct member lists differ:\n" + "\n".join(wrong)


@pytest.mark.parametrize("u", UAPIS, ids=UAPI_IDS)
def test_every_header_define_is_declared(headers: Headers, u: Uapi) -> None:
    defines = _header_defines(headers, u)
    assert len(defines) >= u.min_defines, "header parsing found suspiciously few #defines"
    m = u.module
    wrong = []
    for name, value in defines.items():
        if name in u.guards:
            continue
        if value.startswith('"'):
            if name not in m.STRING_CONSTANTS:
                wrong.append(f"{name}: string macro missing from {u.name}.STRING_CONSTANTS")
        elif value.startswith("_IO"):
            if name not in m.IOCTLS:
                wrong.append(f"{name}: ioctl missing from {u.name}.IOCTLS")
        elif not value:
            wrong.append(f"{name}: empty macro; if it is an include guard add it to the Uapi's guards")
        elif name not in m.CONSTANTS:
            wrong.append(f"{name} = {value}: integer macro missing from {u.name}.CONSTANTS")
    for name in _header_enumerators(headers, u):
        if name not in m.CONSTANTS:
            wrong.append(f"{name}: enum constant missing from {u.name}.CONSTANTS")
    for name in _header_function_macros(headers, u):
        if not callable(getattr(m, name, None)):
            wrong.append(f"{name}: function-like macro has no Python function")
    assert not wrong, f"header definitions not declared in {u.name}.py:\n" + "\n".join(wrong)


@pytest.mark.parametrize("u", UAPIS, ids=UAPI_IDS)
def test_registries_hold_nothing_unknown_to_the_header(headers: Headers, u: Uapi) -> None:
    # The reverse direction: a typo'd or invented name would otherwise only
    # surface as a C compile error.
    m = u.module
    known = set(_header_defines(headers, u)) | set(_header_enumerators(headers, u))
    invented = sorted((set(m.CONSTANTS) | set(m.IOCTLS) | set(m.STRING_CONSTANTS)) - known)
    assert not invented, f"names declared in {u.name}.py that the header does not define: {invented}"
    assert not set(m.IOCTLS) & set(m.CONSTANTS), "an ioctl is also listed as a plain constant"


# ---------------------------------------------------------------------------
# ioctl encoding on other architectures, and the shared numbers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", 0x3B96),
        ("aarch64", 0x3B96),
        ("riscv64", 0x3B96),
        ("s390x", 0x3B96),
        ("ppc64le", 0x20003B96),
        ("ppc64", 0x20003B96),
        ("ppc", 0x20003B96),
        ("mips64", 0x20003B96),
        ("sparc64", 0x20003B96),
        ("alpha", 0x20003B96),
        ("parisc64", 0x3B96),
    ],
)
def test_vfio_io_number_per_arch(machine: str, expected: int) -> None:
    assert ioctl.encoding_for(machine)._IO(";", 100 + 50) == expected


def test_other_arch_direction_encodings() -> None:
    ppc = ioctl.encoding_for("ppc64le")
    # powerpc TCGETS is _IOR('t', 19, char[44]) = 0x402c7413 in the kernel.
    assert ppc._IOR("t", 19, 44) == 0x402C7413
    assert ppc._IOW("t", 20, 44) == 0x802C7414
    assert ppc._IOC_SIZE(0x402C7413) == 44 and ppc._IOC_DIR(0x402C7413) == ppc._IOC_READ
    with pytest.raises(ValueError):
        ppc._IOR("t", 1, 1 << 13)  # powerpc has only 13 size bits

    # parisc keeps the generic layout but swaps READ and WRITE.
    generic, parisc = ioctl.encoding_for("x86_64"), ioctl.encoding_for("parisc")
    assert parisc._IOR("t", 19, 44) == generic._IOW("t", 19, 44)
    assert parisc._IOW("t", 19, 44) == generic._IOR("t", 19, 44)

    # sparc lets READ/WRITE requests use the NONE bit as a 14th size bit.
    sparc = ioctl.encoding_for("sparc64")
    cmd = sparc._IOR("t", 1, 0x2000)
    assert cmd == 0x60007401
    assert sparc._IOC_SIZE(cmd) == 0x2000 and sparc._IOC_DIR(cmd) == sparc._IOC_READ
    assert sparc._IOC_SIZE(sparc._IO("t", 1)) == 0


def test_host_module_functions_use_host_encoding() -> None:
    host = ioctl.encoding_for(platform.machine())
    assert ioctl._IO(";", 150) == host._IO(";", 150)
    assert vfio.VFIO_GET_API_VERSION == host._IO(";", 100)


def test_shared_ioctl_numbers() -> None:
    assert vfio.VFIO_IOMMU_SPAPR_TCE_GET_INFO == vfio.VFIO_IOMMU_GET_INFO
    assert vfio.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO == vfio.VFIO_IOMMU_GET_INFO
    assert vfio.IOCTL_BASE_OFFSETS["VFIO_IOMMU_SPAPR_TCE_GET_INFO"] == 12
    assert vfio.ioctl_name(vfio.VFIO_IOMMU_GET_INFO) == (
        "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO/VFIO_IOMMU_GET_INFO/VFIO_IOMMU_SPAPR_TCE_GET_INFO"
    )
    # 6.12 gave base+21 to the migration data fd's VFIO_MIG_GET_PRECOPY_INFO too.
    assert vfio.ioctl_name(vfio.VFIO_EEH_PE_OP) == "VFIO_MIG_GET_PRECOPY_INFO/VFIO_EEH_PE_OP"
    assert vfio.ioctl_name_for(vfio.VFIO_EEH_PE_OP, "vfio-container") == "VFIO_EEH_PE_OP"
    # ... and base+18..20 to the device cdev's iommufd ioctls, sPAPR's on a container.
    assert vfio.ioctl_name_for(vfio.VFIO_DEVICE_BIND_IOMMUFD, "vfio-device") == "VFIO_DEVICE_BIND_IOMMUFD"
    assert vfio.ioctl_name_for(vfio.VFIO_DEVICE_BIND_IOMMUFD, "vfio-container") == \
        "VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY"
    assert vfio.ioctl_name(0xDEADBEEF) is None


def test_offsetofend_and_anonymous_members() -> None:
    assert vfio.offsetofend(vfio.vfio_iommu_spapr_tce_info, "ddw.levels") == 32
    assert vfio.minsz(vfio.vfio_iommu_spapr_tce_info, "dma32_window_size") == 16
    assert vfio.offsetofend(vfio.vfio_eeh_pe_op, "err.mask") == 40
    assert vfio.offsetofend(vfio.vfio_irq_set, "data") == 20  # flexible array: ends where it starts
    with pytest.raises(AttributeError):
        vfio.offsetofend(vfio.vfio_eeh_pe_op, "err.nope")

    op = vfio.vfio_eeh_pe_op()
    op.err.mask = 0xFFFF
    assert op.err.mask == 0xFFFF
    plane = vfio.vfio_device_gfx_plane_info()
    plane.dmabuf_id = 7
    assert plane.region_index == 7  # same storage: it is a union


def test_iommufd_numbers_do_not_collide_with_vfio() -> None:
    # /dev/vfio/vfio served by iommufd (IOMMUFD_VFIO_CONTAINER) dispatches on
    # _IOC_NR: 0x80.. is iommufd's, VFIO_BASE + n below it is VFIO's.
    assert iommufd.IOMMU_DESTROY == ioctl._IO(";", 0x80)
    assert set(iommufd.IOCTLS.values()).isdisjoint(vfio.IOCTLS.values())
    assert max(ioctl._IOC_NR(c) for c in vfio.IOCTLS.values()) < iommufd.IOMMUFD_CMD_BASE
    assert iommufd.ioctl_name(iommufd.IOMMU_IOAS_MAP) == "IOMMU_IOAS_MAP"
    assert vfio.minsz(iommufd.iommu_hw_info, "__reserved") == 32
