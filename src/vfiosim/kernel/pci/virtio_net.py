"""virtio-net: a modern virtio network device (1af4:1041) on the simulated PCI bus.

One queue pair and a control queue (§5.1.2: receiveq1 = 0, transmitq1 = 1,
controlq = 2), QEMU's default sizes (256 each; 64 for the control queue),
four MSI-X vectors (QEMU: 2 * queue pairs + 2).  Offered features:

* VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM (required: the device reaches
  memory only through the IOMMU), VIRTIO_F_INDIRECT_DESC;
* VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS (the link is up), VIRTIO_NET_F_MTU
  (1500), VIRTIO_NET_F_CTRL_VQ with VIRTIO_NET_F_CTRL_RX (promiscuous and
  all-multicast modes) and VIRTIO_NET_F_CTRL_MAC_ADDR.

No checksum or segmentation offloads, no mergeable receive buffers, no
multiqueue: every frame is one receive buffer and its header says nothing
(§5.1.6: the 12-byte ``virtio_net_hdr`` with ``num_buffers`` 1).

The device runs when the driver notifies a queue (a store to the
notification area): a transmit notification sends what the driver made
available to the backend and delivers whatever the backend has for the
driver into the receive queue; a receive notification (the driver posted
buffers) delivers what was waiting.  As QEMU's virtio-net, the device asks
for receive notifications (clears VRING_USED_F_NO_NOTIFY) only while frames
wait for buffers, so a polling driver that keeps its receive ring full
never has to notify it.
"""

from __future__ import annotations

import collections
import operator
import struct

from .device import DmaError
from . import virtio_native
from .net_backends import Frames, Loopback, NetBackend, backend_from_spec, receive_frames, transmit_frames
from .virtio import VIRTIO_F_INDIRECT_DESC, Burst, Chain, SplitQueue, VirtioError, VirtioPciDevice

VIRTIO_ID_NET = 1
PCI_CLASS_NETWORK_ETHERNET = 0x020000

# Feature bits (§5.1.3).
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23

VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_HDR_LEN = 12                 # struct virtio_net_hdr with num_buffers (VERSION_1, §5.1.6)
ETH_MTU = 1500

# Control queue (§5.1.6.5).
VIRTIO_NET_OK, VIRTIO_NET_ERR = 0, 1
VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_RX_PROMISC = 0
VIRTIO_NET_CTRL_RX_ALLMULTI = 1
VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_MAC_TABLE_SET = 0
VIRTIO_NET_CTRL_MAC_ADDR_SET = 1

RXQ, TXQ, CTRLQ = 0, 1, 2
QUEUE_SIZE = 256
CTRL_QUEUE_SIZE = 64
MSIX_VECTORS = 4
DEFAULT_MAC = "52:54:00:12:34:56"       # QEMU's default NIC address
BURST = 256                             # chains taken per pass over a queue

# The header of every received frame: no flags, no GSO, one buffer.
RX_HEADER = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1)


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"MAC address {text!r}: six hexadecimal bytes separated by ':'")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"MAC address {text!r}: six hexadecimal bytes separated by ':'") from None
    if mac[0] & 1:
        raise ValueError(f"MAC address {text}: a multicast address cannot be a NIC's")
    return mac


class VirtioNet(VirtioPciDevice):
    model = "virtio-net"

    def __init__(self, bdf: str, *, dma_mask: int = (1 << 64) - 1, backend: NetBackend | None = None,
                 mac: str = DEFAULT_MAC) -> None:
        features = (1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
                    | 1 << VIRTIO_NET_F_MTU | 1 << VIRTIO_NET_F_CTRL_VQ | 1 << VIRTIO_NET_F_CTRL_RX
                    | 1 << VIRTIO_NET_F_CTRL_MAC_ADDR)
        self.mac = parse_mac(mac)
        self.link_up = True
        self.stats = dict.fromkeys(("tx_frames", "tx_bytes", "rx_frames", "rx_bytes", "rx_dropped",
                                    "rx_filtered", "ctrl_commands"), 0)
        self.backend: NetBackend = backend if backend is not None else Loopback()
        # The native burst path (virtio_native.py): its page table, and how often it
        # ran a notification or left it to the Python path, by reason.
        self.native_pages = virtio_native.NativePages()
        self.native_stats: collections.Counter[str] = collections.Counter()
        super().__init__(bdf, virtio_id=VIRTIO_ID_NET, class_code=PCI_CLASS_NETWORK_ETHERNET, features=features,
                         queue_sizes=[QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE], msix_vectors=MSIX_VECTORS,
                         dma_mask=dma_mask)
        self._wire_backend()

    @classmethod
    def from_options(cls, bdf: str, *, dma_mask: int = (1 << 64) - 1, backend: str = "loopback",
                     pcap_rx: str | None = None, pcap_tx: str | None = None, mac: str = DEFAULT_MAC) -> "VirtioNet":
        """The factory behind ``model = "virtio-net"`` in a machine file."""
        return cls(bdf, dma_mask=dma_mask, mac=mac,
                   backend=backend_from_spec(backend, pcap_rx=pcap_rx, pcap_tx=pcap_tx))

    def _wire_backend(self) -> None:
        if isinstance(self.backend, Loopback):
            self.backend.can_receive = lambda: self.driver_ok and self.queues[RXQ].ready

    def set_backend(self, backend: NetBackend) -> None:
        """Plug the device into another wire (frames waiting in the old one are lost)."""
        self.backend = backend
        self._wire_backend()

    # -- configuration ------------------------------------------------------------------------------------

    def device_config(self) -> bytes:
        """struct virtio_net_config (§5.1.4): mac, status, max_virtqueue_pairs, mtu."""
        status = VIRTIO_NET_S_LINK_UP if self.link_up else 0
        return self.mac + struct.pack("<HHH", status, 1, ETH_MTU)

    def set_link(self, up: bool) -> None:
        """Plug or unplug the cable: a configuration change (the driver's LSC interrupt)."""
        if up != self.link_up:
            self.link_up = up
            self.notify_config()

    def device_reset(self) -> None:
        # virtio_net_reset(): promiscuous on, filters cleared.
        self.promisc = True
        self.allmulti = False
        self.mac_table: set[bytes] = set()
        self.backend.reset()
        self.native_pages.clear()

    def device_start(self) -> None:
        self._guarded(self._receive)

    def _guarded(self, fn) -> None:  # type: ignore[no-untyped-def]
        try:
            fn()
        except VirtioError as exc:
            self.virtio_error(str(exc))

    # -- queues ---------------------------------------------------------------------------------------------------

    def queue_notify(self, queue: SplitQueue) -> None:
        if queue.index == CTRLQ:
            self._control()
            return
        if queue.index == TXQ and type(self.backend) is Loopback and virtio_native.ENABLED and \
                virtio_native.loopback_burst(self, self.queues[RXQ], queue, RX_HEADER):
            return
        # Transmit and receive until neither moves: a transmit queue that waited for
        # receive room (loopback) goes on once the driver posted receive buffers.
        while self._transmit() and self._receive():
            pass
        self._receive()
        flush = getattr(self.backend, "flush", None)
        if flush is not None:
            flush()

    def _transmit(self) -> bool:
        """virtio_net_flush_tx(): each chain is a header and a frame.  Returns
        True if it stopped because the backend could take no more."""
        q = self.queues[TXQ]
        if not q.ready or self.broken:
            return False
        stats = self.stats
        while True:
            burst = q.take_burst(BURST)
            if burst is None:
                return False
            frames = self._tx_frames(q, burst)
            taken = transmit_frames(self.backend, frames)
            if taken < len(burst):
                q.unget(len(burst) - taken)
            stats["tx_frames"] += taken
            stats["tx_bytes"] += sum(frames.lens[:taken])
            if taken:
                q.publish_burst(burst.heads[:taken], [0] * taken)
                self.notify_queue(q)
            if taken < len(burst):
                return True
            if len(burst) < BURST:
                # All the driver had made available when it notified: anything it adds
                # later it notifies again (VRING_USED_F_NO_NOTIFY is never set here).
                return False

    def _tx_frames(self, q: SplitQueue, burst: Burst) -> Frames:
        """The frames of a transmit burst, each after room for the header it
        will have when received (so a loopback can hand them on as they are)."""
        if burst.addr is not None:
            if burst.writable:
                raise VirtioError("virtio-net header not in first element")
            try:
                data = self.bus_master.dma_read_burst(burst.addr, burst.lens)
            except DmaError as exc:
                raise VirtioError(f"queue {q.index}: {exc}") from None
            if min(burst.lens) < VIRTIO_NET_HDR_LEN:
                short = next(n for n in burst.lens if n < VIRTIO_NET_HDR_LEN)
                raise VirtioError(f"virtio-net header incorrect: {short} bytes")
            frames = Frames(data, [n - VIRTIO_NET_HDR_LEN for n in burst.lens], VIRTIO_NET_HDR_LEN)
        else:
            chains = burst.chains()
            for chain in chains:
                if not chain.readable:
                    raise VirtioError("virtio-net header not in first element")
            parts = []
            for chain_data in q.gather_many(chains):
                if len(chain_data) < VIRTIO_NET_HDR_LEN:
                    raise VirtioError(f"virtio-net header incorrect: {len(chain_data)} bytes")
                parts.append(chain_data[VIRTIO_NET_HDR_LEN:])
            frames = Frames.pack(parts, VIRTIO_NET_HDR_LEN)
        frames.fill_room(RX_HEADER)
        return frames

    def _accepts(self, frame: bytes) -> bool:
        """receive_filter(): promiscuous, broadcast, (all-)multicast, our address, the MAC table."""
        if self.promisc or len(frame) < 6:
            return True
        dst = frame[:6]
        if dst == b"\xff" * 6:
            return True
        if dst[0] & 1:
            return self.allmulti or dst in self.mac_table
        return dst == self.mac or dst in self.mac_table

    def _receive(self) -> int:
        """virtio_net_receive(): each frame into one chain of receive buffers.
        Returns the frames delivered."""
        q = self.queues[RXQ]
        if not q.ready or not self.driver_ok:
            return 0
        backend = self.backend
        delivered = 0
        while backend.pending():
            burst = q.take_burst(min(backend.pending(), BURST))
            if burst is None:
                # No buffers: ask the driver to notify when it posts some, then look
                # again, as it may have posted them before it saw the flag.
                q.set_notify(True)
                burst = q.take_burst(min(backend.pending(), BURST))
                if burst is None:
                    return delivered
            frames = receive_frames(backend, len(burst), VIRTIO_NET_HDR_LEN)
            n = len(frames)
            written = [f + VIRTIO_NET_HDR_LEN for f in frames.lens]
            if burst.addr is not None and self.promisc and burst.writable == len(burst) \
                    and all(map(operator.le, written, burst.lens)):
                # Every frame fits its buffer: all of them, each after its header, in
                # one scatter-gather DMA.
                if n < len(burst):
                    q.unget(len(burst) - n)
                frames.fill_room(RX_HEADER)
                try:
                    self.bus_master.dma_write_burst(burst.addr[:n], written, frames.data)
                except DmaError as exc:
                    raise VirtioError(f"queue {q.index}: {exc}") from None
                self._delivered(q, burst.heads[:n], written)
                delivered += n
            else:
                delivered += self._receive_one_by_one(q, burst.chains(), frames.tolist())
        q.set_notify(False)
        return delivered

    def _receive_one_by_one(self, q: SplitQueue, chains: list[Chain], frames: list[bytes]) -> int:
        """Each frame in turn into the next chain: a frame the filter refuses, or
        too large for the chain, is dropped and the chain keeps for the next one.
        Returns the frames delivered."""
        stats = self.stats
        done: list[tuple[int, int]] = []
        writes: list[tuple[Chain, bytes]] = []
        i = 0
        for frame in frames:
            chain = chains[i]
            if not chain.writable:
                raise VirtioError("virtio-net receive queue contains no in buffers")
            if not self._accepts(frame):
                stats["rx_filtered"] += 1
                continue
            if chain.writable_len() < VIRTIO_NET_HDR_LEN + len(frame):
                # Without mergeable buffers a frame must fit one chain: QEMU gives the
                # buffer back and drops the frame.
                stats["rx_dropped"] += 1
                self.log(f"virtio-net {self.bdf}: dropped a {len(frame)}-byte frame: receive buffer of "
                         f"{chain.writable_len()} bytes is too small")
                continue
            writes.append((chain, RX_HEADER + frame))
            done.append((chain.head, VIRTIO_NET_HDR_LEN + len(frame)))
            i += 1
        q.unget(len(chains) - i)
        q.scatter_many(writes)
        if done:
            heads, written = zip(*done)
            self._delivered(q, list(heads), list(written))
        return len(done)

    def _delivered(self, q: SplitQueue, heads: list[int], written: list[int]) -> None:
        self.stats["rx_frames"] += len(heads)
        self.stats["rx_bytes"] += sum(written) - VIRTIO_NET_HDR_LEN * len(heads)
        q.publish_burst(heads, written)
        self.notify_queue(q)

    def _control(self) -> None:
        """virtio_net_handle_ctrl(): a class/command header and its data, one ack byte back."""
        q = self.queues[CTRLQ]
        while True:
            chains = q.take(BURST)
            if not chains:
                return
            done = []
            for chain in chains:
                if chain.readable_len() < 2 or chain.writable_len() < 1:
                    raise VirtioError("virtio-net ctrl missing headers")
                data = q.gather(chain)
                ack = self._command(data[0], data[1], data[2:])
                self.stats["ctrl_commands"] += 1
                q.scatter(chain, bytes([ack]))
                done.append((chain.head, 1))
            q.publish(done)
            self.notify_queue(q)

    def _command(self, cls: int, cmd: int, data: bytes) -> int:
        if cls == VIRTIO_NET_CTRL_RX and self.negotiated(VIRTIO_NET_F_CTRL_RX):
            if cmd not in (VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_CTRL_RX_ALLMULTI) or len(data) != 1:
                return VIRTIO_NET_ERR
            if cmd == VIRTIO_NET_CTRL_RX_PROMISC:
                self.promisc = bool(data[0])
            else:
                self.allmulti = bool(data[0])
            return VIRTIO_NET_OK
        if cls == VIRTIO_NET_CTRL_MAC:
            if cmd == VIRTIO_NET_CTRL_MAC_ADDR_SET and self.negotiated(VIRTIO_NET_F_CTRL_MAC_ADDR):
                if len(data) != 6:
                    return VIRTIO_NET_ERR
                self.mac = bytes(data)
                return VIRTIO_NET_OK
            if cmd == VIRTIO_NET_CTRL_MAC_TABLE_SET:
                # Two tables (unicast, multicast): a le32 count and that many addresses each.
                table: set[bytes] = set()
                at = 0
                for _ in range(2):
                    if at + 4 > len(data):
                        return VIRTIO_NET_ERR
                    n = struct.unpack_from("<I", data, at)[0]
                    at += 4
                    if at + 6 * n > len(data):
                        return VIRTIO_NET_ERR
                    table.update(data[at + 6 * i:at + 6 * i + 6] for i in range(n))
                    at += 6 * n
                if at != len(data):
                    return VIRTIO_NET_ERR
                self.mac_table = table
                return VIRTIO_NET_OK
        return VIRTIO_NET_ERR

    def snapshot(self) -> dict[str, int]:
        out = super().snapshot()
        out.update(self.stats)
        return out
