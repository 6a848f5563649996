#!/usr/bin/env python3
"""Packets per second through vfiosim's virtio-net and IOMMU, against DPDK's own net_null (not a test).

Debian's unmodified dpdk-testpmd, the same options every time (no hugepages,
IOVA as VA, 2048 mbufs, io forwarding, one burst of 32 in flight from
``start tx_first``), measured by testpmd itself: ``show port stats all``
after a second of warm-up and again after the measured seconds gives Rx-pps
over that interval.  In one run, interleaved round by round:

* ``net_null``: DPDK's null vdev (no device at all: receive allocates
  mbufs, transmit frees them), the upper bound; run under ``vfiosim run`` too
  (``--no-pci --vdev net_null0``), so the shim is loaded in both.
* ``powernv``: the virtio-net NIC of the powernv-virtio machine (sPAPR TCE v2);
* ``x86``: the same NIC on x86-virtio (Type1, VT-d).

The ratio of each NIC figure to net_null's (median over the rounds) is the
result.  Then, with ``--profile``, one more run of each machine splits where
the daemon's time goes while testpmd forwards: waiting for testpmd (the
notification's trip through the shim's SIGSEGV handler and the socket, and
DPDK's own work), handling requests outside the device (the transport), and
inside the device's notification (cProfile by module: the virtqueues and
backend, the IOMMU, host memory).

    python3 benchmarks/dpdk_bench.py [--rounds 3] [--seconds 5] [--profile] [--json FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from vfiosim.dpdk import demo as D  # noqa: E402

TARGETS = ("net_null", "powernv", "x86")
MEMORY_MB = 64


def script(seconds: float) -> list[tuple[str, float]]:
    return [("start tx_first", 1.0), ("show port stats all", seconds), ("show port stats all", 0.0),
            ("stop", 0.0), ("quit", 0.0)]


def run_once(target: str, testpmd: str, seconds: float) -> tuple[int, object, str]:
    if target == "net_null":
        m, _ = D.load_machine("x86")
        argv = D.testpmd_argv(testpmd, vdev="net_null0", memory_mb=MEMORY_MB)
    else:
        m, bdf = D.load_machine(target)
        argv = D.testpmd_argv(testpmd, bdf=bdf, memory_mb=MEMORY_MB)
    run = D.run_testpmd(m, argv, script(seconds), timeout=300)
    if len(run.stats) < 2 or run.exit_status != 0:
        raise SystemExit(f"{target}: testpmd failed (exit {run.exit_status}):\n{run.output[-2000:]}")
    return run.stats[1].rx_pps, run, target


# Where cProfile's own time goes, by "file:function" (first match wins).
CATEGORIES = [
    ("virtqueues and backend (kernel/pci)", ("kernel/pci/",)),
    ("IOMMU translation (the TCE cache or IOTLB, table walks)",
     ("kernel/platform/", "kernel/iommu/", "dma.py:translate", "dma.py:_page_map", "dma.py:_fill", "dma.py:_runs")),
    ("DMA plumbing (kernel/dma.py, kernel/mm.py)", ("kernel/dma.py", "kernel/mm.py")),
    ("host memory (transport/host.py: reads and writes of /proc/<pid>/mem)", ("transport/host.py",)),
]


def by_category(prof: cProfile.Profile) -> dict[str, float]:
    """The share of cProfile's own time in each of CATEGORIES, and the rest."""
    totals = {name: 0.0 for name, _ in CATEGORIES}
    other = 0.0
    for (file, _line, func), (_cc, _nc, tt, _ct, _callers) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        where = f"{file}:{func}"
        for name, keys in CATEGORIES:
            if any(k in where for k in keys):
                totals[name] += tt
                break
        else:
            other += tt
    total = sum(totals.values()) + other or 1.0
    return {**{k: round(v / total, 3) for k, v in totals.items()}, "other (builtins, struct)": round(other / total, 3)}


def profile_once(target: str, testpmd: str, seconds: float, with_cprofile: bool) -> dict:
    """Over the measured interval (between the two ``show port stats all``):
    the share of wall-clock time the daemon spends inside the device's
    notifications, and, ``with_cprofile``, where that time goes by module (a
    separate run: cProfile slows the device several times)."""
    from vfiosim.kernel.pci.virtio_net import VirtioNet
    from vfiosim.transport.daemon import Daemon

    prof = cProfile.Profile()
    window: list[float] = []
    acc = {"notify": 0.0, "requests": 0.0, "notifications": 0, "handled": 0}
    # The daemon's work comes in two ways: requests (Daemon._serve_request) and
    # posted stores performed in a batch (Daemon._flush_posts: the NIC's
    # notification is a posted doorbell), one inside the other at times.
    orig_notify, orig_serve, orig_flush = VirtioNet.queue_notify, Daemon._serve_request, Daemon._flush_posts
    depth = [0]

    def measuring() -> bool:
        return len(window) == 1

    def notify(self, q):  # type: ignore[no-untyped-def]
        if not measuring():
            return orig_notify(self, q)
        t = time.perf_counter()
        if with_cprofile:
            prof.enable()
        try:
            orig_notify(self, q)
        finally:
            if with_cprofile:
                prof.disable()
            acc["notify"] += time.perf_counter() - t
            acc["notifications"] += 1

    def timed(orig):  # type: ignore[no-untyped-def]
        def work(self, *args):  # type: ignore[no-untyped-def]
            if not measuring() or depth[0]:
                return orig(self, *args)
            depth[0] += 1
            t = time.perf_counter()
            try:
                return orig(self, *args)
            finally:
                depth[0] -= 1
                acc["requests"] += time.perf_counter() - t
                acc["handled"] += 1
        return work

    def log(line: str) -> None:
        if line == "testpmd> show port stats all":
            window.append(time.perf_counter())

    # How the serving thread waited for testpmd's doorbells: a spin that caught one, or asleep.
    waits: list[tuple[int, int]] = []
    orig_channel = Daemon._serve_channel

    def serve_channel(self, sess):  # type: ignore[no-untyped-def]
        try:
            return orig_channel(self, sess)
        finally:
            if sess.channel is not None:
                waits.append(sess.channel.waits)

    VirtioNet.queue_notify = notify                                                  # type: ignore[method-assign]
    Daemon._serve_request, Daemon._flush_posts = timed(orig_serve), timed(orig_flush)  # type: ignore[method-assign]
    Daemon._serve_channel = serve_channel                                            # type: ignore[method-assign]
    try:
        m, bdf = D.load_machine(target)
        argv = D.testpmd_argv(testpmd, bdf=bdf, memory_mb=MEMORY_MB)
        run = D.run_testpmd(m, argv, script(seconds), timeout=300, log=log)
    finally:
        VirtioNet.queue_notify = orig_notify                                       # type: ignore[method-assign]
        Daemon._serve_request, Daemon._flush_posts = orig_serve, orig_flush      # type: ignore[method-assign]
        Daemon._serve_channel = orig_channel                                     # type: ignore[method-assign]
    wall = window[1] - window[0] if len(window) >= 2 else seconds
    n = max(acc["notifications"], 1)
    out = {
        "target": target, "cprofile": with_cprofile, "pps": run.stats[1].rx_pps if len(run.stats) > 1 else 0,
        "interval_s": round(wall, 3), "notifications": acc["notifications"],
        "frames_per_notification": round(m.device(bdf).stats["tx_frames"] / max(m.device(bdf).notifications, 1), 1),
        "us_per_notification": round(1e6 * acc["notify"] / n, 1),
        "us_per_cycle": round(1e6 * wall / n, 1),
        "requests": acc["handled"],             # requests and batches of posted stores
        # The native burst path (kernel/pci/virtio_native.py): notifications it ran, fall-backs by reason.
        "native": dict(getattr(m.device(bdf), "native_stats", {})),
        # The whole run (set-up included): waits a spin ended, waits that slept.
        "daemon_waits": {"spin": sum(w[0] for w in waits), "slept": sum(w[1] for w in waits)},
        "wall_split": {
            "in the device (virtqueues, IOMMU, host memory)": round(acc["notify"] / wall, 3),
            "in the daemon's request handling, outside the device": round((acc["requests"] - acc["notify"]) / wall, 3),
            "the rest of the round trip (the shim's SIGSEGV and channel, the daemon's wake-up, testpmd's own work)":
                round(1 - acc["requests"] / wall, 3),
        },
    }
    if with_cprofile:
        out["device_profile_share"] = by_category(prof)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--profile", action="store_true", help="also split where the daemon's time goes")
    ap.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = ap.parse_args()
    testpmd = shutil.which("dpdk-testpmd")
    if testpmd is None:
        print("dpdk-testpmd is missing: apt-get install dpdk", file=sys.stderr)
        return 3
    pps: dict[str, list[int]] = {t: [] for t in TARGETS}
    for r in range(args.rounds):
        for target in TARGETS:
            value, _run, _ = run_once(target, testpmd, args.seconds)
            pps[target].append(value)
            print(f"round {r + 1}: {target:9s} {value:>12,} packets/s", file=sys.stderr, flush=True)
    med = {t: int(statistics.median(v)) for t, v in pps.items()}
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M"), "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                          "load_avg": os.getloadavg()},
        "dpdk": D._dpdk_version(), "seconds": args.seconds, "rounds": args.rounds,
        "testpmd": " ".join(D.testpmd_argv("dpdk-testpmd", bdf="<NIC>", memory_mb=MEMORY_MB)),
        "pps": pps, "median_pps": med,
        "ratio_to_net_null": {t: (med[t] / med["net_null"] if med["net_null"] else None) for t in ("powernv", "x86")},
        "goal": ">= 1/50 (0.02)",
    }
    print(f"\n{'target':10s} {'median packets/s':>18s} {'vs net_null':>14s}")
    for t in TARGETS:
        ratio = med[t] / med["net_null"] if med["net_null"] else 0
        print(f"{t:10s} {med[t]:>18,} {'1' if t == 'net_null' else f'1/{1 / ratio:,.0f}' if ratio else '-':>14s}")
    if args.profile:
        result["profile"] = []
        for t in ("powernv", "x86"):
            timed = profile_once(t, testpmd, args.seconds, with_cprofile=False)
            prof = profile_once(t, testpmd, args.seconds, with_cprofile=True)
            timed["device_profile_share"] = prof["device_profile_share"]
            result["profile"].append(timed)
            print(f"\n{t}: {timed['pps']:,} packets/s, {timed['frames_per_notification']} frames per notification; "
                  f"per notification {timed['us_per_cycle']} us, of which {timed['us_per_notification']} us in the device"
                  f"; native path: {timed['native'] or 'absent'}; the daemon's waits: {timed['daemon_waits']}")
            for k, v in timed["wall_split"].items():
                print(f"  {v:6.1%}  {k}")
            print("  inside the device (cProfile own time, a separate run):")
            for k, v in timed["device_profile_share"].items():
                print(f"    {v:6.1%}  {k}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
