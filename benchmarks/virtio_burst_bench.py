#!/usr/bin/env python3
"""The virtio-net NIC's own cost per 32-frame burst, in process (not a test).

A Python driver does what DPDK's virtio PMD does under ``testpmd
--forward-mode=io`` after ``start tx_first``: 32 frames in flight, each
received frame sent back from the same mbuf.  The mbufs are laid out as in a
DPDK mempool (2368-byte elements: object header, ``struct rte_mbuf``, 128
bytes of headroom, 2048 of data room), the receive ring is kept full, and
every transmit burst ends with one notification (a 16-bit store to the
queue's notify address), which the device handles before the store returns.

Measured: the CPU time inside the device's notification (``queue_notify``:
the virtqueues, the IOMMU translation, the DMA, the loopback) per burst,
median over the bursts, on each machine (CPU time of the thread, so other
work on a shared machine does not count); with ``--profile``, the same run under
cProfile split by module.  ``--host-memory`` puts the driver's memory
behind the same path ``vfiosim run`` uses (transport/host.py's
HostMemoryObject: reads and writes of this process's /proc/self/mem), so the
host copies are measured as under testpmd; ``--host-memory file`` through the
path it uses for a program's shared memory file such as DPDK's (copies from
the daemon's own mapping of it).

Deterministic: no second process, no socket, no shim; the figure depends on
the CPU only.  Compare trees by running both on the same machine.

    python3 benchmarks/virtio_burst_bench.py [--bursts 2000] [--machine powernv,x86] [--profile] [--host-memory [proc|file]]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import vfiosim  # noqa: E402
from vfiosim import client  # noqa: E402
from vfiosim.kernel.pci import virtio as V  # noqa: E402
from vfiosim.kernel.pci.virtio_net import VIRTIO_NET_HDR_LEN, VirtioNet  # noqa: E402
from virtio_driver import DEFAULT_FEATURES, VirtioNetDriver  # noqa: E402
from dpdk_bench import by_category  # noqa: E402

MACHINES = {"powernv": "powernv-virtio", "x86": "x86-virtio", "pseries": "pseries"}
BURST = 32
RING = 256
MBUF_STRIDE = 2368          # mempool header 64 + struct rte_mbuf 128 + RTE_MBUF_DEFAULT_BUF_SIZE 2176
MBUF_DATA = 64 + 128 + 128  # the data of an mbuf: after its header, the mbuf and RTE_PKTMBUF_HEADROOM
NMBUF = 2048
FRAME_LEN = 64


class Ring:
    """A split virtqueue through NumPy views of its memory (the driver's side)."""

    def __init__(self, ring: Any) -> None:
        a = ring.mem.array()
        n = ring.size
        self.size = n
        self.ring = ring
        self.desc = a[ring.desc_off:ring.desc_off + 16 * n].view(V.DESC_DTYPE)
        self.avail_idx = a[ring.avail_off + 2:ring.avail_off + 4].view("<u2")
        self.avail = a[ring.avail_off + 4:ring.avail_off + 4 + 2 * n].view("<u2")
        self.avail_flags = a[ring.avail_off:ring.avail_off + 2].view("<u2")
        self.used_flags = a[ring.used_off:ring.used_off + 2].view("<u2")
        self.used_idx = a[ring.used_off + 2:ring.used_off + 4].view("<u2")
        self.used = a[ring.used_off + 4:ring.used_off + 4 + 8 * n].view("<u4").reshape(n, 2)
        self.last_used = 0

    def make_available(self, heads: np.ndarray) -> None:
        idx = int(self.avail_idx[0])
        slots = (idx + np.arange(len(heads))) % self.size
        self.avail[slots] = heads
        self.avail_idx[0] = (idx + len(heads)) & 0xFFFF

    def reap(self) -> np.ndarray:
        idx = int(self.used_idx[0])
        n = (idx - self.last_used) & 0xFFFF
        slots = (self.last_used + np.arange(n)) % self.size
        self.last_used = idx
        return self.used[slots].copy()

    def wants_notify(self) -> bool:
        return not int(self.used_flags[0]) & V.VRING_USED_F_NO_NOTIFY


class PmdLikeDriver:
    """testpmd's io forwarding on one port, as the virtio PMD does it."""

    def __init__(self, drv: VirtioNetDriver) -> None:
        self.drv = drv
        drv.dev.enable_bus_master()
        # MSI-X on, a vector for configuration changes only, none for the queues (DPDK without Rx interrupts).
        self.irqs = drv.dev.enable_irqs("msix", 1)
        assert drv.negotiate(DEFAULT_FEATURES)
        drv.w16(V.COMMON_MSIX, 0)
        self.rx = Ring(drv.setup_queue(0, RING))
        self.tx = Ring(drv.setup_queue(1, RING))
        # DPDK disables used-buffer interrupts on its queues: it polls.
        self.rx.avail_flags[0] = V.VRING_AVAIL_F_NO_INTERRUPT
        self.tx.avail_flags[0] = V.VRING_AVAIL_F_NO_INTERRUPT
        self.pool_mem = drv.dev.container.dma_alloc(NMBUF * MBUF_STRIDE)
        self.pool = self.pool_mem.array()
        base = self.pool_mem.iova
        self.data_iova = base + np.arange(NMBUF, dtype=np.uint64) * MBUF_STRIDE + MBUF_DATA
        self.free = list(range(NMBUF))
        self.rx_mbuf = np.zeros(RING, dtype=np.int64)
        # The receive ring full: each buffer the header and the data room.
        heads = np.arange(RING, dtype=np.uint16)
        for i in range(RING):
            self.rx_mbuf[i] = self.free.pop()
        self.rx.desc["addr"] = self.data_iova[self.rx_mbuf] - VIRTIO_NET_HDR_LEN
        self.rx.desc["len"] = 2048 + VIRTIO_NET_HDR_LEN
        self.rx.desc["flags"] = V.VRING_DESC_F_WRITE
        self.rx.make_available(heads)
        self.tx_free = list(range(RING))
        self.tx_mbuf = np.zeros(RING, dtype=np.int64)
        drv.w8(V.COMMON_STATUS, drv.status() | V.STATUS_DRIVER_OK)
        self.kicks = 0

    def kick(self, ring: Ring) -> None:
        self.kicks += 1
        self.drv.rings[ring.ring.index].kick()

    def tx_first(self) -> None:
        mbufs = np.array([self.free.pop() for _ in range(BURST)])
        for k, m in enumerate(mbufs.tolist()):
            at = int(m) * MBUF_STRIDE + MBUF_DATA
            frame = b"\xff" * 6 + b"\x52\x54\x00\xaa\xbb\xcc" + b"\x88\xb5" + bytes((k + i) & 0xFF for i in range(50))
            self.pool[at:at + FRAME_LEN] = np.frombuffer(frame, dtype=np.uint8)
        self.transmit(mbufs, np.full(BURST, FRAME_LEN))

    def transmit(self, mbufs: np.ndarray, lens: np.ndarray) -> None:
        # virtio_xmit_cleanup(): free what the device used.
        for head, _len in self.tx.reap().tolist():
            self.free.append(int(self.tx_mbuf[head]))
            self.tx_free.append(head)
        heads = np.array([self.tx_free.pop() for _ in range(len(mbufs))], dtype=np.uint16)
        self.tx_mbuf[heads] = mbufs
        # can_push: the header in the headroom, one descriptor per frame.
        for m in mbufs.tolist():
            at = int(m) * MBUF_STRIDE + MBUF_DATA - VIRTIO_NET_HDR_LEN
            self.pool[at:at + VIRTIO_NET_HDR_LEN] = 0
        self.tx.desc["addr"][heads] = self.data_iova[mbufs] - VIRTIO_NET_HDR_LEN
        self.tx.desc["len"][heads] = lens + VIRTIO_NET_HDR_LEN
        self.tx.desc["flags"][heads] = 0
        self.tx.make_available(heads)
        if self.tx.wants_notify():
            self.kick(self.tx)

    def receive(self) -> tuple[np.ndarray, np.ndarray]:
        used = self.rx.reap()
        heads = used[:, 0].astype(np.int64)
        mbufs = self.rx_mbuf[heads].copy()
        lens = used[:, 1].astype(np.int64) - VIRTIO_NET_HDR_LEN
        # Refill the same descriptors with fresh mbufs.
        fresh = np.array([self.free.pop() for _ in range(len(heads))], dtype=np.int64)
        self.rx_mbuf[heads] = fresh
        self.rx.desc["addr"][heads] = self.data_iova[fresh] - VIRTIO_NET_HDR_LEN
        self.rx.make_available(heads.astype(np.uint16))
        if len(heads) and self.rx.wants_notify():
            self.kick(self.rx)
        return mbufs, lens


def host_memory(m: vfiosim.Machine, mode: str = "proc") -> Any:
    """Reach the machine's memory objects through /proc/self/mem, as
    ``vfiosim run`` reaches a real program's: the same bytes (a MemoryObject's
    array is memory of this process), read and written by HostMemoryObject.
    ``mode`` "file": every page bound as the daemon binds a pinned page of a
    program's shared memory file (SharedFiles), its mapping being the array
    itself: the copies are those the daemon makes from its own mapping."""
    from vfiosim.kernel.mm import MemoryObject
    from vfiosim.transport.host import HostMemoryObject, HostProcess

    me = HostProcess.open(os.getpid())
    phys = m.kernel.phys
    orig = phys.lookup
    proxies: dict[int, HostMemoryObject] = {}

    def lookup(hpa: int) -> Any:
        found = orig(hpa)
        if found is None or not isinstance(found[0], MemoryObject):
            return found
        obj, off = found
        proxy = proxies.get(id(obj))
        if proxy is None:
            proxy = HostMemoryObject(me, obj.data.ctypes.data, obj.length, obj.page_shift)
            if mode == "file":
                from vfiosim.transport.host import SharedFiles
                proxy.files = SharedFiles(me)
                proxy.files.bases = np.zeros(2, dtype=np.uint64)      # slot 1: the program's address itself
                proxy.slots = np.ones(obj.length >> obj.page_shift, dtype=np.int32)
            proxies[id(obj)] = proxy
        return proxy, off
    phys.lookup = lookup  # type: ignore[method-assign]
    for pe_or_ctx in [getattr(d.bus_master, "translator", None) for d in m.kernel.devices.values()]:
        for cache in ("tce_cache", "iotlb"):          # translations made before: to the objects themselves
            if hasattr(pe_or_ctx, cache):
                getattr(pe_or_ctx, cache).clear()

    def restore() -> None:
        del phys.lookup
        me.close()
    return restore


def run(machine: str, bursts: int, with_profile: bool, host: str) -> dict[str, Any]:
    m = vfiosim.Machine.load(MACHINES.get(machine, machine))
    p = m.spawn(uid=0, rlimit_memlock=(1 << 30, 1 << 30))
    dev = client.open_device("1af4:1041", p)
    nic = m.device(next(bdf for gid, bdfs in m.iommu_groups().items() for bdf in bdfs
                        if isinstance(m.device(bdf), VirtioNet)))
    assert isinstance(nic, VirtioNet)
    pmd = PmdLikeDriver(VirtioNetDriver(dev))
    # Only the device's DMA goes through /proc/self/mem (pins stay as they are).
    restore = host_memory(m, host) if host else None
    times: list[float] = []
    prof = cProfile.Profile()
    kicks0 = frames0 = 0
    orig = VirtioNet.queue_notify

    def timed(self: VirtioNet, q: V.SplitQueue) -> None:
        # CPU time of this thread: what the device costs, whatever else the machine runs.
        t = time.thread_time()
        if with_profile:
            prof.enable()
        try:
            orig(self, q)
        finally:
            if with_profile:
                prof.disable()
            times.append(time.thread_time() - t)

    VirtioNet.queue_notify = timed  # type: ignore[method-assign]
    try:
        pmd.tx_first()
        warm = 50
        for i in range(warm + bursts):
            if i == warm:
                times.clear()
                prof = cProfile.Profile()
                kicks0, frames0 = pmd.kicks, nic.stats["tx_frames"]
            mbufs, lens = pmd.receive()
            if len(mbufs):
                pmd.transmit(mbufs, lens)
    finally:
        VirtioNet.queue_notify = orig  # type: ignore[method-assign]
        if restore is not None:
            restore()
    assert not nic.errors, nic.errors
    lb = nic.backend.stats()
    assert lb["new"] == BURST and lb["returned"] >= bursts * BURST, lb
    frames = nic.stats["tx_frames"] - frames0
    out: dict[str, Any] = {
        "machine": machine, "host_memory": host, "bursts": bursts, "kicks": pmd.kicks - kicks0,
        "frames_per_notification": round(frames / max(len(times), 1), 1),
        "us_per_burst_median": round(1e6 * statistics.median(times), 1),
        "us_per_burst_p10": round(1e6 * sorted(times)[len(times) // 10], 1),
        "us_per_burst_mean": round(1e6 * statistics.fmean(times), 1),
        "us_per_frame": round(1e6 * statistics.median(times) / BURST, 2),
    }
    native = getattr(nic, "native_stats", None)
    if native is not None:
        # How the native burst path (virtio_native.py) fared: bursts it ran, fall-backs by reason.
        out["native"] = dict(native)
    if with_profile:
        out["profile_share"] = by_category(prof)
        st = pstats.Stats(prof)
        rows = []
        for (file, line, func), (cc, nc, tt, ct, _c) in sorted(st.stats.items(),  # type: ignore[attr-defined]
                                                                 key=lambda kv: -kv[1][2])[:25]:
            rows.append({"function": f"{Path(file).name}:{line}({func})", "calls_per_burst": round(nc / len(times), 1),
                         "own_us_per_burst": round(1e6 * tt / len(times), 2)})
        out["top"] = rows
    dev.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bursts", type=int, default=2000)
    ap.add_argument("--machine", default="powernv,x86", help="comma-separated: powernv, x86, pseries or presets")
    ap.add_argument("--profile", action="store_true", help="also a run under cProfile, split by module")
    ap.add_argument("--host-memory", nargs="?", const="proc", default="", choices=("proc", "file"),
                    help="reach memory as `vfiosim run` does: through /proc/self/mem (proc, the default), or "
                         "through the daemon's mapping of a shared memory file (file)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    results = []
    for machine in args.machine.split(","):
        r = run(machine, args.bursts, False, args.host_memory)
        if args.profile:
            pr = run(machine, max(args.bursts // 4, 100), True, args.host_memory)
            r["profile_share"], r["top"] = pr["profile_share"], pr["top"]
        results.append(r)
        print(f"{machine}{f' (host memory: {args.host_memory})' if args.host_memory else ''}: "
              f"{r['us_per_burst_median']} us per "
              f"{BURST}-frame burst in the device (median; 10th percentile {r['us_per_burst_p10']}, "
              f"mean {r['us_per_burst_mean']}), "
              f"{r['us_per_frame']} us a frame, {r['frames_per_notification']} frames per notification")
        for k, v in r.get("profile_share", {}).items():
            print(f"    {v:6.1%}  {k}")
        for row in r.get("top", []):
            print(f"      {row['own_us_per_burst']:8.2f} us  {row['calls_per_burst']:6.1f}x  {row['function']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M"),
                                               "load_avg": os.getloadavg(), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
