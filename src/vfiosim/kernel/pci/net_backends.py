"""Where a simulated NIC's frames go: the network backends of virtio-net.

A backend is the wire.  ``transmit(frame)`` is a frame the driver sent;
``pending()``/``pop()`` are frames waiting to be received by the driver.
A backend may also move whole bursts as :class:`Frames` (one buffer, no
Python object per frame): ``transmit_frames()`` and ``receive_frames()``;
:func:`transmit_frames` and :func:`receive_frames` fall back to the
per-frame methods for a backend without them.

* :class:`Loopback`: every frame sent comes back on receive, in order (a
  cable from the port to itself).  It also checks what comes back: a frame
  the driver sends that is byte for byte one it was handed earlier completed
  a round trip (device -> driver memory -> driver -> device, both directions
  through the IOMMU); any other frame is counted as new.  A forwarding
  program such as ``testpmd --forward-mode=io`` sends only its first burst
  new, so a corrupted frame shows up as a new one.  Frames sent back in the
  order they were handed out (a forwarding program's) are compared a burst
  at a time, in one comparison of bytes.
* :class:`Pcap`: frames are replayed from a pcap file to the driver, and the
  frames the driver sends are appended to another pcap file.

Why pcap and not TAP: a TAP device needs CAP_NET_ADMIN (or an administrator
to create it), touches the host's networking, and makes every run depend on
what else is on that network.  A pcap pair needs no privilege, is the same
on every run (CI included), and tcpdump/Wireshark read and write it; replay
tools (``tcpreplay``-style captures) feed it real traffic.
"""

from __future__ import annotations

import collections
import itertools
import struct
import time
from typing import Callable, Protocol, Sequence


PCAP_MAGIC = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
LINKTYPE_ETHERNET = 1
PCAP_SNAPLEN = 65535


class Frames:
    """A burst of frames in one buffer, each after ``headroom`` bytes of room
    for a per-frame header, which belong to whoever holds the batch
    (virtio-net puts each frame's ``virtio_net_hdr`` there): frame ``i`` is
    the ``lens[i]`` bytes that end at ``ends[i]``, the running sum of
    ``headroom + lens``.  ``room``: what every headroom holds, when the
    holder knows (None: anything)."""

    __slots__ = ("data", "lens", "headroom", "room", "_ends")

    def __init__(self, data: bytearray, lens: list[int], headroom: int = 0, room: bytes | None = None) -> None:
        self.data = data
        self.lens = lens
        self.headroom = headroom
        self.room = room if headroom else b""
        self._ends: list[int] | None = None

    @classmethod
    def pack(cls, frames: Sequence[bytes], headroom: int = 0) -> "Frames":
        room = bytes(headroom)
        return cls(bytearray(b"").join(room + f for f in frames), [len(f) for f in frames], headroom, room)

    @classmethod
    def concat(cls, parts: Sequence["Frames"]) -> "Frames":
        """One batch of several with the same headroom."""
        if len(parts) == 1:
            return parts[0]
        room = parts[0].room
        return cls(bytearray(b"").join(p.data for p in parts), [n for p in parts for n in p.lens], parts[0].headroom,
                   room if all(p.room == room for p in parts) else None)

    def __len__(self) -> int:
        return len(self.lens)

    @property
    def ends(self) -> list[int]:
        if self._ends is None:
            room = self.headroom
            self._ends = list(itertools.accumulate(n + room for n in self.lens))
        return self._ends

    def nbytes(self) -> int:
        """The frames' bytes (the headroom not counted)."""
        return sum(self.lens)

    def frame(self, i: int) -> bytes:
        end = self.ends[i]
        return bytes(self.data[end - self.lens[i]:end])

    def tolist(self) -> list[bytes]:
        raw = bytes(self.data)
        return [raw[e - n:e] for e, n in zip(self.ends, self.lens)]

    def __getitem__(self, which: slice) -> "Frames":
        """Frames ``[a, b)`` (a slice without step), in a buffer of their own."""
        a, b, _ = which.indices(len(self))
        if a == 0 and b == len(self):
            return self
        if a >= b:
            return Frames(bytearray(), [], self.headroom, self.room)
        ends = self.ends
        return Frames(self.data[ends[a - 1] if a else 0:ends[b - 1]], self.lens[a:b], self.headroom, self.room)

    def fill_room(self, header: bytes) -> None:
        """Put ``header`` (headroom bytes) in front of every frame."""
        if self.room == header:
            return
        view = memoryview(self.data)
        room = self.headroom
        for end, n in zip(self.ends, self.lens):
            view[end - n - room:end - n] = header
        self.room = header

    def with_headroom(self, headroom: int) -> "Frames":
        """The same frames, each after ``headroom`` bytes (this batch if it has that already)."""
        if headroom == self.headroom:
            return self
        return Frames.pack(self.tolist(), headroom)

    def same_prefix(self, other: "Frames") -> int:
        """How many leading frames of the two batches are byte for byte the
        same (the headroom not compared)."""
        m = min(len(self), len(other))
        if m == 0:
            return 0
        if self.lens[:m] == other.lens[:m] and self.headroom == other.headroom and self.room is not None \
                and self.room == other.room:
            end = len(self.data) if m == len(self.lens) else self.ends[m - 1]
            mine = self.data if end == len(self.data) else self.data[:end]
            theirs = other.data if end == len(other.data) else other.data[:end]
            if mine == theirs:
                return m                   # the usual case: one comparison of the whole burst
        for i, (e1, e2, n1, n2) in enumerate(zip(self.ends, other.ends, self.lens, other.lens)):
            if n1 != n2 or self.data[e1 - n1:e1] != other.data[e2 - n2:e2]:
                return i
        return m


class NetBackend(Protocol):
    name: str

    def transmit(self, frame: bytes) -> bool:
        """The driver sent ``frame``.  False: the backend cannot take it now;
        the device keeps it queued and offers it again later."""
        ...

    def transmit_many(self, frames: list[bytes]) -> int:
        """Several frames in order; returns how many it took (the rest wait)."""
        ...

    def pending(self) -> int:
        """Frames waiting to be received by the driver."""
        ...

    def pop(self) -> bytes:
        """The next frame for the driver."""
        ...

    def reset(self) -> None:
        """The device was reset."""
        ...

    def stats(self) -> dict[str, int]:
        ...


class Loopback:
    """A cable from the port to itself.

    ``capacity`` frames can wait for receive buffers; beyond that the device
    stops taking frames from the transmit queue until the driver posts
    receive buffers (flow control, as QEMU's net queue holds a frame when the
    receiving side has no buffers).  Frames sent while the device cannot
    receive at all (its receive queue not enabled, or the driver not ready)
    are dropped, as by a port whose receiver is off."""

    name = "loopback"
    IN_ORDER_MAX = 1 << 16      # frames handed out, kept in order for the fast comparison

    def __init__(self, capacity: int = 256, keep_new: int = 64) -> None:
        self.capacity = capacity
        self.keep_new = keep_new
        self.can_receive: Callable[[], bool] = lambda: True          # set by the device
        self.queue: collections.deque[Frames] = collections.deque()  # waiting for the driver
        self.waiting = 0
        # Frames handed to the driver and not sent back yet: those in the order
        # they were handed out, then any others (counted by content).
        self.handed: collections.deque[Frames] = collections.deque()
        self.handed_count = 0
        self.in_flight: collections.Counter[bytes] = collections.Counter()
        self.new_frames: list[bytes] = []        # the first ``keep_new`` new frames, for inspection
        self.sent = 0                            # frames the driver sent
        self.new = 0                             # ... that were not a frame handed to the driver earlier
        self.returned = 0                        # ... that were, byte for byte
        self.received = 0                        # frames handed to the driver
        self.dropped = 0                         # sent while the device could not receive

    def transmit(self, frame: bytes) -> bool:
        return self.transmit_many([frame]) == 1

    def transmit_many(self, frames: list[bytes]) -> int:
        return self.transmit_frames(Frames.pack(frames))

    def transmit_frames(self, frames: Frames) -> int:
        if not self.can_receive():
            self._account(frames)
            self.dropped += len(frames)
            return len(frames)
        taken = frames[:max(self.capacity - self.waiting, 0)]
        if len(taken):
            self._account(taken)
            self.queue.append(taken)
            self.waiting += len(taken)
        return len(taken)

    def loop_through(self, data: bytearray, lens: list[int], room: bytes) -> None:
        """transmit_frames() then receive_frames() of the same burst, with no
        frame waiting before it and room for all of it (virtio_native.py:
        the frames went straight from the transmit to the receive buffers)."""
        handed = self.handed
        if len(handed) == 1:
            head = handed[0]
            if head.lens == lens and head.headroom == len(room) and head.room == room and head.data == data:
                # The one burst handed out, sent back whole and unchanged (a forwarding
                # program's steady state): what _loop_through() does, without its slicing.
                n = len(lens)
                self.sent += n
                self.returned += n
                self.received += n
                handed[0] = Frames(data, lens, len(room), room)
                return
        self._loop_through(data, lens, room)

    def _loop_through(self, data: bytearray, lens: list[int], room: bytes) -> None:
        frames = Frames(data, lens, len(room), room)
        self._account(frames)
        self.received += len(lens)
        self.handed.append(frames)
        self.handed_count += len(lens)
        if self.handed_count > self.IN_ORDER_MAX:
            self._unorder()

    def _account(self, frames: Frames) -> None:
        self.sent += len(frames)
        done = 0
        while self.handed and done < len(frames):
            # Sent back in the order handed out (a forwarding program): compare a burst at once.
            head = self.handed[0]
            k = head.same_prefix(frames[done:])
            if k == 0:
                break
            done += k
            self.handed_count -= k
            if k == len(head):
                self.handed.popleft()
            else:
                self.handed[0] = head[k:]
        self.returned += done
        if done == len(frames):
            return
        self._unorder()
        for frame in frames[done:].tolist():
            n = self.in_flight.get(frame)
            if n:
                self.returned += 1
                if n == 1:
                    del self.in_flight[frame]
                else:
                    self.in_flight[frame] = n - 1
            else:
                self.new += 1
                if len(self.new_frames) < self.keep_new:
                    self.new_frames.append(frame)

    def _unorder(self) -> None:
        """Count the frames handed out in order by content instead."""
        for batch in self.handed:
            self.in_flight.update(batch.tolist())
        self.handed.clear()
        self.handed_count = 0

    def pending(self) -> int:
        return self.waiting

    def pop(self) -> bytes:
        return self.receive_frames(1).frame(0)

    def receive_frames(self, n: int, headroom: int = 0) -> Frames:
        """Up to ``n`` waiting frames, handed to the driver."""
        parts: list[Frames] = []
        want = n
        while want and self.queue:
            head = self.queue[0]
            if len(head) <= want:
                parts.append(self.queue.popleft())
                want -= len(head)
            else:
                parts.append(head[:want])
                self.queue[0] = head[want:]
                want = 0
        if not parts:
            return Frames(bytearray(), [], headroom)
        out = Frames.concat([p.with_headroom(headroom) for p in parts])
        self.waiting -= len(out)
        self.received += len(out)
        self.handed.append(out)
        self.handed_count += len(out)
        if self.handed_count > self.IN_ORDER_MAX:
            self._unorder()
        return out

    def reset(self) -> None:
        self.queue.clear()
        self.waiting = 0
        self.handed.clear()
        self.handed_count = 0
        self.in_flight.clear()

    def stats(self) -> dict[str, int]:
        return {"sent": self.sent, "received": self.received, "returned": self.returned, "new": self.new,
                "dropped": self.dropped, "waiting": self.waiting,
                "in_flight": sum(self.in_flight.values()) + self.handed_count}


def read_pcap(path: str) -> list[bytes]:
    """The frames of a pcap file (Ethernet link type; microsecond or
    nanosecond timestamps, either byte order)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24:
        raise ValueError(f"{path}: not a pcap file (shorter than its 24-byte header)")
    for endian in ("<", ">"):
        magic = struct.unpack_from(endian + "I", data)[0]
        if magic in (PCAP_MAGIC, PCAP_MAGIC_NS):
            break
    else:
        raise ValueError(f"{path}: not a pcap file (magic {data[:4].hex()}; pcapng is not supported)")
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    if linktype != LINKTYPE_ETHERNET:
        raise ValueError(f"{path}: link type {linktype}, not Ethernet (1)")
    frames = []
    at = 24
    while at + 16 <= len(data):
        _sec, _frac, incl, _orig = struct.unpack_from(endian + "IIII", data, at)
        at += 16
        if at + incl > len(data):
            raise ValueError(f"{path}: record at offset {at - 16} runs past the end of the file")
        frames.append(data[at:at + incl])
        at += incl
    return frames


class PcapWriter:
    """Appends frames to a new pcap file (microsecond timestamps)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.f = open(path, "wb")
        self.f.write(struct.pack("<IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, PCAP_SNAPLEN, LINKTYPE_ETHERNET))
        self.f.flush()

    def write(self, frame: bytes) -> None:
        now = time.time()
        sec = int(now)
        self.f.write(struct.pack("<IIII", sec, int((now - sec) * 1e6), len(frame), len(frame)))
        self.f.write(frame)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()


class Pcap:
    """Frames from ``rx`` (a pcap file) are received by the driver, once each,
    as fast as it posts buffers; frames the driver sends go to ``tx`` (a pcap
    file, created).  Either may be None: nothing to receive, or sent frames
    are counted and discarded."""

    name = "pcap"

    def __init__(self, rx: str | None = None, tx: str | None = None) -> None:
        self.rx_path = rx
        self.tx_path = tx
        self.frames = collections.deque(read_pcap(rx) if rx else [])
        self.writer = PcapWriter(tx) if tx else None
        self.sent = 0
        self.received = 0

    def transmit(self, frame: bytes) -> bool:
        return self.transmit_many([frame]) == 1

    def transmit_many(self, frames: list[bytes]) -> int:
        self.sent += len(frames)
        if self.writer is not None:
            for frame in frames:
                self.writer.write(frame)
        return len(frames)

    def transmit_frames(self, frames: Frames) -> int:
        return self.transmit_many(frames.tolist())

    def receive_frames(self, n: int, headroom: int = 0) -> Frames:
        out = [self.frames.popleft() for _ in range(min(n, len(self.frames)))]
        self.received += len(out)
        return Frames.pack(out, headroom)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def pending(self) -> int:
        return len(self.frames)

    def pop(self) -> bytes:
        self.received += 1
        return self.frames.popleft()

    def reset(self) -> None:
        self.flush()

    def stats(self) -> dict[str, int]:
        return {"sent": self.sent, "received": self.received, "waiting": len(self.frames)}

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def transmit_frames(backend: NetBackend, frames: Frames) -> int:
    """``backend.transmit_frames(frames)``, or its per-frame form."""
    fn: Callable[[Frames], int] | None = getattr(backend, "transmit_frames", None)
    return fn(frames) if fn is not None else backend.transmit_many(frames.tolist())


def receive_frames(backend: NetBackend, n: int, headroom: int) -> Frames:
    """Up to ``n`` frames waiting for the driver, each after ``headroom`` bytes."""
    fn: Callable[[int, int], Frames] | None = getattr(backend, "receive_frames", None)
    if fn is not None:
        return fn(n, headroom)
    out: list[bytes] = []
    while len(out) < n and backend.pending():
        out.append(backend.pop())
    return Frames.pack(out, headroom)


def backend_from_spec(kind: str, *, pcap_rx: str | None = None, pcap_tx: str | None = None) -> NetBackend:
    """A backend from a machine file's ``backend``/``pcap_rx``/``pcap_tx``."""
    if kind == "loopback":
        return Loopback()
    if kind == "pcap":
        return Pcap(pcap_rx, pcap_tx)
    raise ValueError(f"network backend {kind!r}: 'loopback' or 'pcap'")
