"""Where a simulated NIC's frames go: the network backends of virtio-net.

A backend is the wire.  ``transmit(frame)`` is a frame the driver sent;
``pending()``/``pop()`` are frames waiting to be received by the driver.

* :class:`Loopback`: every frame sent comes back on receive, in order (a
  cable from the port to itself).  It also checks what comes back: a frame
  the driver sends that is byte for byte one it was handed earlier completed
  a round trip (device -> driver memory -> driver -> device, both directions
  through the IOMMU); any other frame is counted as new.  A forwarding
  program such as ``testpmd --forward-mode=io`` sends only its first burst
  new, so a corrupted frame shows up as a new one.
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
import struct
import time
from typing import Callable, Protocol

PCAP_MAGIC = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
LINKTYPE_ETHERNET = 1
PCAP_SNAPLEN = 65535


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

    def __init__(self, capacity: int = 256, keep_new: int = 64) -> None:
        self.capacity = capacity
        self.keep_new = keep_new
        self.can_receive: Callable[[], bool] = lambda: True          # set by the device
        self.queue: collections.deque[bytes] = collections.deque()
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
        if not self.can_receive():
            for frame in frames:
                self._account(frame)
            self.dropped += len(frames)
            return len(frames)
        taken = frames[:max(self.capacity - len(self.queue), 0)]
        for frame in taken:
            self._account(frame)
        self.queue.extend(taken)
        return len(taken)

    def _account(self, frame: bytes) -> None:
        self.sent += 1
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

    def pending(self) -> int:
        return len(self.queue)

    def pop(self) -> bytes:
        frame = self.queue.popleft()
        self.received += 1
        self.in_flight[frame] += 1
        return frame

    def reset(self) -> None:
        self.queue.clear()
        self.in_flight.clear()

    def stats(self) -> dict[str, int]:
        return {"sent": self.sent, "received": self.received, "returned": self.returned, "new": self.new,
                "dropped": self.dropped, "waiting": len(self.queue), "in_flight": sum(self.in_flight.values())}


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


def backend_from_spec(kind: str, *, pcap_rx: str | None = None, pcap_tx: str | None = None) -> NetBackend:
    """A backend from a machine file's ``backend``/``pcap_rx``/``pcap_tx``."""
    if kind == "loopback":
        return Loopback()
    if kind == "pcap":
        return Pcap(pcap_rx, pcap_tx)
    raise ValueError(f"network backend {kind!r}: 'loopback' or 'pcap'")
