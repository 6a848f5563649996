"""The ``vfiosim`` command."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import __version__
from .kernel.kernel import KERNEL_PROFILES
from .machine import Machine, preset_names
from .machine_spec import MachineFileError


def _machine_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--machine", default="powernv", metavar="NAME|FILE",
                    help=f"a preset ({', '.join(preset_names())}) or a machine file (default: powernv)")
    ap.add_argument("--kernel", default="6.12", choices=KERNEL_PROFILES,
                    help="kernel behaviour to simulate (default: 6.12; 3.10 is the seed patch)")
    ap.add_argument("--page-size", type=int, default=4096, choices=(4096, 65536),
                    help="the host kernel's PAGE_SIZE (default: 4096)")


def _load(args: argparse.Namespace) -> Machine:
    return Machine.load(args.machine, page_size=args.page_size, kernel=args.kernel)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return 0 if run_demo(_load(args), transfers=args.transfers) else 1


def _hex(v: Any) -> str:
    return "-" if v is None else f"{v:#x}"


def cmd_topology(args: argparse.Namespace) -> int:
    m = _load(args)
    topo = m.topology()
    if args.json:
        json.dump(topo, sys.stdout, indent=2)
        print()
        return 0
    print(f"{topo['machine']}: {topo['description']}")
    print(f"platform {topo['platform']}, Linux {topo['kernel']} profile, {topo['page_size'] // 1024} KiB pages, "
          f"EEH {'available' if topo['eeh'] else 'not available'}, IOMMU drivers: {', '.join(topo['iommu_drivers'])}")
    for pe in topo["pes"]:
        phb = pe["phb"]
        extra = f" LIOBNs {', '.join(hex(x) for x in phb['liobns'])}" if "liobns" in phb else ""
        print(f"\n{phb['model']} PHB#{phb['index']}{extra}")
        print(f"  {pe['name']}: IOMMU group {pe['iommu_group']}, devices {', '.join(pe['devices'])}")
        d32 = pe["dma32_window"]
        ddw = pe["ddw"]
        print(f"    32-bit DMA window {d32['start']:#x}+{d32['size']:#x}; DDW page sizes {ddw['page_sizes']:#x}, "
              f"{ddw['max_windows']} windows, {ddw['max_levels']} levels")
        if pe["eeh"] is not None:
            state = {0: "normal", 1: "reset", 2: "stopped (frozen)", 4: "DMA stopped", 5: "unavailable"}
            print(f"    EEH: {state.get(pe['eeh']['state'], pe['eeh']['state'])}, {pe['eeh']['freezes']} freeze(s)")
        for w in pe["windows"]:
            label = f"TVE#{w['tve']}" if "tve" in w else f"window {w['window']} (LIOBN {w['liobn']:#x})"
            owner = f", {w['owner']}" if "owner" in w else ""
            page = f"{w['page_size']:#x}-byte pages" if w["page_size"] else "real mode"
            mapped = "" if w["mapped"] is None else f", {w['mapped']} TCEs in use"
            print(f"    {label}: {w['start']:#x}+{w['size']:#x}, {page}{owner}{mapped}")
    print("\nIOMMU groups")
    for g in topo["iommu_groups"]:
        node = g["node"] or "(no VFIO node: bound to host drivers)"
        print(f"  group {g['id']}: {node}, {'viable' if g['viable'] else 'not viable'}, devices {', '.join(g['devices'])}")
    print("\nPCI devices")
    for d in topo["devices"]:
        bars = ", ".join(f"BAR{i} {_hex(b['address'])}+{b['size']:#x}" for i, b in d["bars"].items())
        print(f"  {d['bdf']} {d['vendor']:04x}:{d['device']:04x} class {d['class']:06x} ({d['model']}), driver "
              f"{d['driver']}, group {d['iommu_group']}, {bars}, reset {d['reset'] or 'none'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vfiosim", description="A simulated Linux VFIO kernel with the POWER sPAPR "
                                 "TCE IOMMU: run VFIO userspace code without hardware or root.")
    ap.add_argument("--version", action="version", version=f"vfiosim {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the kernel documentation's sPAPR flow with an edu DMA round trip")
    _machine_args(demo)
    demo.add_argument("--transfers", type=int, default=4, help="edu DMA transfers of 4 KiB (default 4)")
    demo.set_defaults(func=cmd_demo)
    topo = sub.add_parser("topology", help="list PHBs, PEs, IOMMU groups, devices and DMA windows")
    _machine_args(topo)
    topo.add_argument("--json", action="store_true", help="machine-readable output")
    topo.set_defaults(func=cmd_topology)
    args = ap.parse_args(argv)
    try:
        return int(args.func(args))
    except (MachineFileError, ValueError) as exc:
        print(f"vfiosim: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
