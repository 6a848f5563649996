"""The wire between the preload shim and the vfiosim daemon, for Python.

``src/vfiosim/preload/vfiosim_protocol.h`` is the C declaration of the same
numbers and layouts (the shim and the daemon's helper library include it);
``tests/test_protocol_abi.py`` compiles that header and checks every number
and offset here against it.

One ``AF_UNIX``/``SOCK_SEQPACKET`` connection per process carries the hello
(with ``SCM_CREDENTIALS``: the kernel vouches for the sender's pid) and file
descriptors; every call after it goes through a shared-memory channel
(:data:`VCHAN`) that the hello reply hands over: a request, then one reply.

Request: a fixed 64-byte header, then ``length`` bytes of payload (a path)::

    u32 op, u32 flags, s32 fd, s32 fd2, u64 a[5], u32 length, u32 reserved

Reply: a 16-byte header, then ``length`` bytes of payload::

    s64 ret, s32 errno, u32 length

Pointers are plain integers: the daemon reads and writes the program's
memory itself, so the shim knows no ioctl struct layout.
"""

from __future__ import annotations

import ctypes
import struct

MAGIC_VERSION = 0x5646_0004          # "VF", protocol version 4

REQ = struct.Struct("<IIii5QII")
REP = struct.Struct("<qiI")
assert REQ.size == 64 and REP.size == 16

MAX_PAYLOAD = 4096                  # VMAX_PAYLOAD: a path (PATH_MAX), or a reply's data

# -- operations (VOP_*) --------------------------------------------------------------------
OP_HELLO = 1        # socket: a[0] = MAGIC_VERSION, flags = HELLO_*; reply: the fake root, SCM_RIGHTS channel
OP_OPEN = 2         # fd = placeholder, a[0] = flags, a[1] = mode, payload = path
OP_CLOSE = 3        # fd
OP_IOCTL = 4        # fd, a[0] = cmd, a[1] = arg, fd2 = placeholder for a new fd or -1; window
OP_READ = 5         # fd, a[0] = buffer, a[1] = count, a[2] = offset (flags & RW_POSITIONAL); window
OP_WRITE = 6        # fd, a[0] = buffer, a[1] = count, a[2] = offset (flags & RW_POSITIONAL); window
OP_DUP = 7          # fd = old, fd2 = new, a[0] = cloexec
OP_SETFD = 8        # fd, a[0] = cloexec
OP_MMAP = 9         # fd, a[0] = offset, a[1] = length, a[2] = prot, a[3] = shared, a[4] = address; ret = handle;
                    # payload: VMAP
OP_MMIO = 10        # a[0] = handle, a[1] = offset in the mapping, a[2] = size, a[3] = value (flags & MMIO_WRITE)
OP_MUNMAP = 11      # a[0] = handle
OP_STATUS = 12      # reply payload: u64 VmLck kB, u64 VmPin kB
OP_FORK = 13        # a[0] = child pid (sent by the parent right after fork())
OP_INFO = 14        # socket, no hello: reply payload: the fake root (for `vfiosim run --connect`)
OP_SETATTR = 15     # chown/chmod: payload = path (or fd >= 0), a[0] = uid, a[1] = gid, a[2] = mode, flags = SETATTR_*
OP_FLUSH = 16       # nothing but an ordering point: the posted stores before it are performed

OP_NAMES = {v: k[3:].lower() for k, v in dict(globals()).items() if k.startswith("OP_") and isinstance(v, int)}

# -- flags -----------------------------------------------------------------------------------
F_REFRESH_CREDS = 1 << 8            # the program called a libc function that changes ids, caps or limits
# With F_WINDOW the payload is a copy of the program's memory at a[4] (a pointer
# argument), as the program can read it; F_WINDOW_WRITABLE: it can write it too.
# The reply's payload is then what the program stores back: u32 offset, bytes.
F_WINDOW = 1 << 9
F_WINDOW_WRITABLE = 1 << 10
WIN_MAX = 512                       # VWIN_MAX: bytes of a window
RW_POSITIONAL = 1 << 0
MMIO_WRITE = 1 << 0
HELLO_FORK = 1 << 0                 # sent by a fork child (its parent sends OP_FORK)
SETATTR_OWNER = 1 << 0
SETATTR_MODE = 1 << 1


# -- the shared-memory channel (struct vchan) -------------------------------------------------

class vreq(ctypes.Structure):
    _fields_ = [("op", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("fd", ctypes.c_int32),
                ("fd2", ctypes.c_int32), ("a", ctypes.c_uint64 * 5), ("len", ctypes.c_uint32),
                ("reserved", ctypes.c_uint32)]


class vrep(ctypes.Structure):
    _fields_ = [("ret", ctypes.c_int64), ("err", ctypes.c_int32), ("len", ctypes.c_uint32)]


VMAP_MAX_POSTED = 64
VMAP_MAX_RAM = 8
VPOST_KICK = 1                      # a store there has side effects: the daemon is woken to perform it


class vmap_post(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("length", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class vmap_range(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("length", ctypes.c_uint64), ("fd_offset", ctypes.c_uint64)]


class vmap(ctypes.Structure):
    """OP_MMAP's reply payload: how the program reaches the mapping without a round trip."""
    _fields_ = [("slot", ctypes.c_uint32), ("nposted", ctypes.c_uint32), ("nram", ctypes.c_uint32),
                ("reserved", ctypes.c_uint32), ("posted", vmap_post * VMAP_MAX_POSTED),
                ("ram", vmap_range * VMAP_MAX_RAM)]


class vpost(ctypes.Structure):
    """A posted store in the channel's ring."""
    _fields_ = [("handle", ctypes.c_uint64), ("offset", ctypes.c_uint64), ("value", ctypes.c_uint64),
                ("size", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


VRING = 256
VLIVE = 64


class vchan_prog(ctypes.Structure):
    _fields_ = [("req_seq", ctypes.c_uint32), ("prog_waiting", ctypes.c_uint32), ("ring_head", ctypes.c_uint32),
                ("ack_seq", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("spin_fails", ctypes.c_uint32),
                ("wake_seq", ctypes.c_uint32), ("pad", ctypes.c_uint32 * 9)]


class vchan_daemon(ctypes.Structure):
    _fields_ = [("rep_seq", ctypes.c_uint32), ("daemon_waiting", ctypes.c_uint32), ("ring_tail", ctypes.c_uint32),
                ("taken_seq", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("spin", ctypes.c_uint32),
                ("pad", ctypes.c_uint32 * 10)]


class vchan(ctypes.Structure):
    _fields_ = [("magic", ctypes.c_uint32), ("size", ctypes.c_uint32), ("pad0", ctypes.c_uint32 * 14),
                ("prog", vchan_prog), ("daemon", vchan_daemon), ("live", ctypes.c_uint32 * VLIVE),
                ("req", vreq), ("req_payload", ctypes.c_uint8 * MAX_PAYLOAD),
                ("rep", vrep), ("rep_payload", ctypes.c_uint8 * (MAX_PAYLOAD + ctypes.sizeof(vmap))),
                ("ring", vpost * VRING)]


VCHAN_SIZE = 32768
assert ctypes.sizeof(vchan) <= VCHAN_SIZE


def pack_request(op: int, flags: int = 0, fd: int = -1, fd2: int = -1, a: tuple[int, ...] = (),
                 payload: bytes = b"") -> bytes:
    args = [x & 0xFFFFFFFFFFFFFFFF for x in a] + [0] * (5 - len(a))
    return REQ.pack(op, flags, fd, fd2, *args, len(payload), 0) + payload


def pack_reply(ret: int, err: int = 0, payload: bytes = b"") -> bytes:
    return REP.pack(ret, err, len(payload)) + payload


class ProtocolError(Exception):
    """A malformed message: the connection is dropped."""


def unpack_request(msg: bytes | bytearray | memoryview) -> tuple[int, int, int, int, tuple[int, ...], bytes]:
    if len(msg) < REQ.size:
        raise ProtocolError(f"short request: {len(msg)} bytes, need {REQ.size}")
    op, flags, fd, fd2, a0, a1, a2, a3, a4, length, reserved = REQ.unpack_from(msg)
    if length > MAX_PAYLOAD or len(msg) < REQ.size + length:
        raise ProtocolError(f"payload length {length} does not match the message ({len(msg)} bytes)")
    if reserved:
        raise ProtocolError(f"reserved field is {reserved:#x}")
    if op not in OP_NAMES:
        raise ProtocolError(f"unknown operation {op}")
    return op, flags, fd, fd2, (a0, a1, a2, a3, a4), bytes(msg[REQ.size:REQ.size + length])
