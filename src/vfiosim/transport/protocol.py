"""The wire protocol between the preload shim and the vfiosim daemon.

One ``AF_UNIX``/``SOCK_SEQPACKET`` connection per real process: message
boundaries are kept by the socket, the peer's pid comes from
``SO_PEERCRED``.  Every request is answered by exactly one reply.

Request: a fixed 64-byte header, then ``length`` bytes of payload (a path)::

    u32 op, u32 flags, s32 fd, s32 fd2, u64 a[5], u32 length, u32 reserved

Reply: a 16-byte header, then ``length`` bytes of payload::

    s64 ret, s32 errno, u32 length

All integers are little-endian (host order on x86-64).  Pointers are plain
integers: the daemon reads and writes the program's memory itself
(process_vm_readv/writev), so the shim knows no struct layouts.

``vfiosim_preload.c`` declares the same layout; ``tests/test_run.py`` checks
that a malformed message is rejected and the connection dropped.
"""

from __future__ import annotations

import struct

MAGIC_VERSION = 0x5646_0001          # "VF", protocol version 1

REQ = struct.Struct("<IIii5QII")
REP = struct.Struct("<qiI")
assert REQ.size == 64 and REP.size == 16

MAX_PAYLOAD = 4096                  # a path (PATH_MAX)

# -- operations ----------------------------------------------------------------------------
OP_HELLO = 1        # a[0] = MAGIC_VERSION, flags = HELLO_*; reply payload: the fake root
OP_OPEN = 2         # fd = placeholder, a[0] = flags, a[1] = mode, payload = path
OP_CLOSE = 3        # fd
OP_IOCTL = 4        # fd, a[0] = cmd, a[1] = arg, fd2 = placeholder for a new fd or -1
OP_READ = 5         # fd, a[0] = buffer, a[1] = count, a[2] = offset (flags & RW_POSITIONAL)
OP_WRITE = 6        # fd, a[0] = buffer, a[1] = count, a[2] = offset (flags & RW_POSITIONAL)
OP_DUP = 7          # fd = old, fd2 = new, a[0] = cloexec
OP_SETFD = 8        # fd, a[0] = cloexec
OP_MMAP = 9         # fd, a[0] = offset, a[1] = length, a[2] = prot, a[3] = shared; ret = mapping handle
OP_MMIO = 10        # a[0] = handle, a[1] = offset in the mapping, a[2] = size, a[3] = value (flags & MMIO_WRITE)
OP_MUNMAP = 11      # a[0] = handle
OP_STATUS = 12      # reply payload: u64 VmLck kB, u64 VmPin kB
OP_FORK = 13        # a[0] = child pid (sent by the parent right after fork())
OP_INFO = 14        # reply payload: the fake root (for `vfiosim run --connect`)

OP_NAMES = {v: k[3:].lower() for k, v in dict(globals()).items() if k.startswith("OP_") and isinstance(v, int)}

# -- flags -----------------------------------------------------------------------------------
F_REFRESH_CREDS = 1 << 8            # the program changed its ids, capabilities or limits
RW_POSITIONAL = 1 << 0
MMIO_WRITE = 1 << 0
HELLO_FORK = 1 << 0                 # sent by a fork child (its parent sends OP_FORK)


def pack_request(op: int, flags: int = 0, fd: int = -1, fd2: int = -1, a: tuple[int, ...] = (),
                 payload: bytes = b"") -> bytes:
    args = [x & 0xFFFFFFFFFFFFFFFF for x in a] + [0] * (5 - len(a))
    return REQ.pack(op, flags, fd, fd2, *args, len(payload), 0) + payload


def pack_reply(ret: int, err: int = 0, payload: bytes = b"") -> bytes:
    return REP.pack(ret, err, len(payload)) + payload


class ProtocolError(Exception):
    """A malformed message: the connection is dropped."""


def unpack_request(msg: bytes) -> tuple[int, int, int, int, tuple[int, ...], bytes]:
    if len(msg) < REQ.size:
        raise ProtocolError(f"short request: {len(msg)} bytes, need {REQ.size}")
    op, flags, fd, fd2, a0, a1, a2, a3, a4, length, reserved = REQ.unpack_from(msg)
    if length > MAX_PAYLOAD or len(msg) != REQ.size + length:
        raise ProtocolError(f"payload length {length} does not match the message ({len(msg)} bytes)")
    if reserved:
        raise ProtocolError(f"reserved field is {reserved:#x}")
    if op not in OP_NAMES:
        raise ProtocolError(f"unknown operation {op}")
    return op, flags, fd, fd2, (a0, a1, a2, a3, a4), msg[REQ.size:]
