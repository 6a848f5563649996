"""Linux ioctl request-number encoding (``_IOC``/``_IO``/``_IOR``/``_IOW``/``_IOWR``).

An ioctl number packs four bit fields -- direction, type ("magic"), number and
argument size -- but the field widths and the direction values are
architecture specific, so the same ``_IO(';', 150)`` is ``0x3B96`` on x86_64
and ``0x20003B96`` on ppc64le.  The layouts below mirror the kernel headers:

* ``include/uapi/asm-generic/ioctl.h`` -- every architecture not listed below
  (x86, arm, arm64, riscv, s390, loongarch, ia64, m68k, sh, ...):
  8 nr bits, 8 type bits, 14 size bits, 2 dir bits; NONE=0, WRITE=1, READ=2.
* ``arch/{powerpc,mips,alpha}/include/uapi/asm/ioctl.h``: 13 size bits,
  3 dir bits; NONE=1, READ=2, WRITE=4 (OSF/1 heritage: NONE gets its own bit).
* ``arch/sparc/include/uapi/asm/ioctl.h``: as powerpc, except that READ/WRITE
  ioctls may use a 14th size bit that overlaps the NONE direction bit.
* ``arch/parisc/include/uapi/asm/ioctl.h``: generic layout, but READ=1 and
  WRITE=2 (swapped).

The module-level functions and ``_IOC_*`` constants use the encoding of the
host this runs on (``platform.machine()``); :func:`encoding_for` gives any other
architecture's, e.g. to compute what a ppc64le guest would see.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

__all__ = [
    "IoctlEncoding",
    "encoding_for",
    "HOST",
    "_IOC",
    "_IO",
    "_IOR",
    "_IOW",
    "_IOWR",
    "_IOC_DIR",
    "_IOC_TYPE",
    "_IOC_NR",
    "_IOC_SIZE",
    "_IOC_NONE",
    "_IOC_READ",
    "_IOC_WRITE",
]


@dataclass(frozen=True)
class IoctlEncoding:
    """One architecture's ioctl bit layout.

    Attribute and method names deliberately copy the kernel macros so that C
    snippets translate one-to-one.
    """

    arch: str
    _IOC_SIZEBITS: int
    _IOC_DIRBITS: int
    _IOC_NONE: int
    _IOC_READ: int
    _IOC_WRITE: int
    _IOC_NRBITS: int = 8
    _IOC_TYPEBITS: int = 8
    # sparc only: READ/WRITE requests borrow the NONE bit as a 14th size bit.
    xsize: bool = False

    # -- derived layout (same formulas as asm-generic/ioctl.h) ---------------

    @property
    def _IOC_NRSHIFT(self) -> int:
        return 0

    @property
    def _IOC_TYPESHIFT(self) -> int:
        return self._IOC_NRSHIFT + self._IOC_NRBITS

    @property
    def _IOC_SIZESHIFT(self) -> int:
        return self._IOC_TYPESHIFT + self._IOC_TYPEBITS

    @property
    def _IOC_DIRSHIFT(self) -> int:
        return self._IOC_SIZESHIFT + self._IOC_SIZEBITS

    @property
    def _IOC_NRMASK(self) -> int:
        return (1 << self._IOC_NRBITS) - 1

    @property
    def _IOC_TYPEMASK(self) -> int:
        return (1 << self._IOC_TYPEBITS) - 1

    @property
    def _IOC_SIZEMASK(self) -> int:
        return (1 << self._IOC_SIZEBITS) - 1

    @property
    def _IOC_DIRMASK(self) -> int:
        return (1 << self._IOC_DIRBITS) - 1

    # -- encoding ------------------------------------------------------------

    def _IOC(self, dir: int, type: int | str, nr: int, size: int) -> int:  # noqa: A002 - kernel names
        """Pack an ioctl number.

        Unlike the C macro (which silently lets oversized values bleed into
        neighbouring fields) this rejects out-of-range fields: a wrong ioctl
        number in a simulator is far harder to debug than an exception.
        """
        type_ = _type_code(type)
        rw = self._IOC_READ | self._IOC_WRITE
        size_bits = self._IOC_SIZEBITS + 1 if self.xsize and dir & rw else self._IOC_SIZEBITS
        _check_range("dir", dir, self._IOC_DIRBITS)
        _check_range("type", type_, self._IOC_TYPEBITS)
        _check_range("nr", nr, self._IOC_NRBITS)
        _check_range("size", size, size_bits)
        return (
            (dir << self._IOC_DIRSHIFT)
            | (type_ << self._IOC_TYPESHIFT)
            | (nr << self._IOC_NRSHIFT)
            | (size << self._IOC_SIZESHIFT)
        )

    def _IO(self, type: int | str, nr: int) -> int:  # noqa: A002
        return self._IOC(self._IOC_NONE, type, nr, 0)

    def _IOR(self, type: int | str, nr: int, size: int) -> int:  # noqa: A002
        return self._IOC(self._IOC_READ, type, nr, size)

    def _IOW(self, type: int | str, nr: int, size: int) -> int:  # noqa: A002
        return self._IOC(self._IOC_WRITE, type, nr, size)

    def _IOWR(self, type: int | str, nr: int, size: int) -> int:  # noqa: A002
        return self._IOC(self._IOC_READ | self._IOC_WRITE, type, nr, size)

    # -- decoding ------------------------------------------------------------

    def _IOC_DIR(self, nr: int) -> int:
        raw = (nr >> self._IOC_DIRSHIFT) & self._IOC_DIRMASK
        rw = self._IOC_READ | self._IOC_WRITE
        if self.xsize and raw & rw:
            # The NONE bit is really the top size bit here; hide it.
            return raw & rw
        return raw

    def _IOC_TYPE(self, nr: int) -> int:
        return (nr >> self._IOC_TYPESHIFT) & self._IOC_TYPEMASK

    def _IOC_NR(self, nr: int) -> int:
        return (nr >> self._IOC_NRSHIFT) & self._IOC_NRMASK

    def _IOC_SIZE(self, nr: int) -> int:
        if self.xsize:
            raw_dir = (nr >> self._IOC_DIRSHIFT) & self._IOC_DIRMASK
            if not raw_dir & (self._IOC_READ | self._IOC_WRITE):
                return 0
            return (nr >> self._IOC_SIZESHIFT) & ((1 << (self._IOC_SIZEBITS + 1)) - 1)
        return (nr >> self._IOC_SIZESHIFT) & self._IOC_SIZEMASK


def _type_code(type_: int | str) -> int:
    # C writes the type as a char literal (VFIO_TYPE is ';'); accept that form.
    if isinstance(type_, str):
        if len(type_) != 1:
            raise ValueError(f"ioctl type must be a single character, got {type_!r}")
        return ord(type_)
    return type_


def _check_range(field: str, value: int, bits: int) -> None:
    if not 0 <= value < (1 << bits):
        raise ValueError(f"ioctl {field} {value:#x} does not fit in {bits} bits")


_GENERIC = IoctlEncoding("generic", _IOC_SIZEBITS=14, _IOC_DIRBITS=2, _IOC_NONE=0, _IOC_READ=2, _IOC_WRITE=1)
_POWERPC = IoctlEncoding("powerpc", _IOC_SIZEBITS=13, _IOC_DIRBITS=3, _IOC_NONE=1, _IOC_READ=2, _IOC_WRITE=4)
_MIPS = IoctlEncoding("mips", _IOC_SIZEBITS=13, _IOC_DIRBITS=3, _IOC_NONE=1, _IOC_READ=2, _IOC_WRITE=4)
_ALPHA = IoctlEncoding("alpha", _IOC_SIZEBITS=13, _IOC_DIRBITS=3, _IOC_NONE=1, _IOC_READ=2, _IOC_WRITE=4)
_SPARC = IoctlEncoding(
    "sparc", _IOC_SIZEBITS=13, _IOC_DIRBITS=3, _IOC_NONE=1, _IOC_READ=2, _IOC_WRITE=4, xsize=True
)
_PARISC = IoctlEncoding("parisc", _IOC_SIZEBITS=14, _IOC_DIRBITS=2, _IOC_NONE=0, _IOC_READ=1, _IOC_WRITE=2)

# uname -m / platform.machine() spellings, matched by prefix.  Anything else is
# asm-generic, which is what the kernel itself falls back to.
_ARCH_PREFIXES: tuple[tuple[tuple[str, ...], IoctlEncoding], ...] = (
    (("ppc", "powerpc"), _POWERPC),
    (("mips",), _MIPS),
    (("sparc",), _SPARC),
    (("alpha",), _ALPHA),
    (("parisc", "hppa"), _PARISC),
)


def encoding_for(machine: str) -> IoctlEncoding:
    """Return the ioctl encoding of the architecture named by ``machine``.

    ``machine`` is a ``platform.machine()``/``uname -m`` string such as
    ``"x86_64"``, ``"aarch64"``, ``"ppc64le"`` or ``"mips64"``.
    """
    name = machine.strip().lower()
    for prefixes, encoding in _ARCH_PREFIXES:
        if name.startswith(prefixes):
            return encoding
    return _GENERIC


HOST: IoctlEncoding = encoding_for(platform.machine())

_IOC_NRBITS = HOST._IOC_NRBITS
_IOC_TYPEBITS = HOST._IOC_TYPEBITS
_IOC_SIZEBITS = HOST._IOC_SIZEBITS
_IOC_DIRBITS = HOST._IOC_DIRBITS
_IOC_NRSHIFT = HOST._IOC_NRSHIFT
_IOC_TYPESHIFT = HOST._IOC_TYPESHIFT
_IOC_SIZESHIFT = HOST._IOC_SIZESHIFT
_IOC_DIRSHIFT = HOST._IOC_DIRSHIFT
_IOC_NONE = HOST._IOC_NONE
_IOC_READ = HOST._IOC_READ
_IOC_WRITE = HOST._IOC_WRITE

_IOC = HOST._IOC
_IO = HOST._IO
_IOR = HOST._IOR
_IOW = HOST._IOW
_IOWR = HOST._IOWR
_IOC_DIR = HOST._IOC_DIR
_IOC_TYPE = HOST._IOC_TYPE
_IOC_NR = HOST._IOC_NR
_IOC_SIZE = HOST._IOC_SIZE
