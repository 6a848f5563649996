"""The ``vfiosim`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, TextIO

from . import __version__
from .kernel.kernel import KERNEL_PROFILES
from .machine import KERNEL_ENV, MACHINE_ENV, PAGE_SIZE_ENV, PAGE_SIZES, Machine, machine_settings, preset_names
from .machine_spec import MachineFileError


def _machine_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--machine", metavar="NAME|FILE",
                    help=f"a preset ({', '.join(preset_names())}) or a machine file "
                         f"(default: ${MACHINE_ENV}, else powernv)")
    ap.add_argument("--kernel", choices=KERNEL_PROFILES,
                    help=f"kernel behaviour to simulate (default: ${KERNEL_ENV}, else 6.12; 3.10 is the seed patch)")
    ap.add_argument("--page-size", type=int, choices=PAGE_SIZES,
                    help=f"the host kernel's PAGE_SIZE (default: ${PAGE_SIZE_ENV}, else 4096)")
    ap.add_argument("--kernel-config", metavar="OPTIONS", default=None,
                    help="kernel options that differ from Debian's 6.12 build (which has no iommufd): 'iommufd' "
                         "(IOMMUFD, VFIO_DEVICE_CDEV), 'iommufd-compat' (and IOMMUFD_VFIO_CONTAINER), or a "
                         "comma-separated list such as IOMMUFD,VFIO_DEVICE_CDEV,VFIO_CONTAINER=n; added to the "
                         "machine file's [kernel] config")
    ap.add_argument("--device-module", metavar="MODULE", action="append", default=[],
                    help="import MODULE (a dotted name, or a .py file) first: it registers device models "
                         "with vfiosim.devices.register_model (repeatable)")


def _machine_from_env(args: argparse.Namespace) -> None:
    """Fill in --machine, --kernel and --page-size as the client library does:
    the option, else the environment, else the default."""
    args.machine_from_env = args.machine is None and bool(os.environ.get(MACHINE_ENV))
    if getattr(args, "machine_from_trace", False) and args.machine is None and not args.machine_from_env:
        return              # `vfiosim replay`: the trace's header says which machine and page size
    args.machine, args.kernel, args.page_size = machine_settings(args.machine, args.kernel, args.page_size)


def _import_device_module(spec: str) -> None:
    import importlib
    import importlib.util
    if spec.endswith(".py") or os.sep in spec:
        if not os.path.isfile(spec):
            raise ValueError(f"--device-module {spec}: no such file")
        name = "vfiosim_user_" + os.path.splitext(os.path.basename(spec))[0]
        loader_spec = importlib.util.spec_from_file_location(name, spec)
        assert loader_spec is not None and loader_spec.loader is not None
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
    else:
        try:
            importlib.import_module(spec)
        except ImportError as exc:
            raise ValueError(f"--device-module {spec}: {exc}") from exc


def _load(args: argparse.Namespace) -> Machine:
    for spec in args.device_module:
        _import_device_module(spec)
    try:
        return Machine.load(args.machine, page_size=args.page_size, kernel=args.kernel,
                            kernel_config=getattr(args, "kernel_config", None))
    except ValueError as exc:
        if args.machine_from_env:               # say where the name came from
            exc.args = (f"${MACHINE_ENV}: {exc}",)
        raise


def _json_option(ap: argparse.ArgumentParser, what: str) -> None:
    """``--json [FILE]``, the same for every command: JSON to FILE; to standard
    output (instead of the text) with ``-`` or no FILE."""
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE",
                    help=f"write {what} as JSON to FILE; with no FILE or '-', to standard output instead of the text")


@contextmanager
def _json_target(target: str | None) -> Iterator[TextIO | None]:
    """The stream ``--json`` names (opened before any work, so that a bad
    path fails at once), or None without ``--json``."""
    if target is None:
        yield None
    elif target == "-":
        yield sys.stdout
    else:
        with open(target, "w") as f:
            yield f


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return 0 if run_demo(_load(args), transfers=args.transfers) else 1


def _hex(v: Any) -> str:
    return "-" if v is None else f"{v:#x}"


def cmd_topology(args: argparse.Namespace) -> int:
    with _json_target(args.json) as json_out:
        m = _load(args)
        topo = m.topology()
        if json_out is not None:
            json.dump(topo, json_out, indent=2)
            print(file=json_out)
            if json_out is sys.stdout:
                return 0
    _print_topology(topo)
    return 0


def _print_topology(topo: dict[str, Any]) -> None:
    print(f"{topo['machine']}: {topo['description']}")
    print(f"platform {topo['platform']}, Linux {topo['kernel']} profile, {topo['page_size'] // 1024} KiB pages, "
          f"EEH {'available' if topo['eeh'] else 'not available'}, IOMMU drivers: "
          f"{', '.join(topo['iommu_drivers']) or 'none'}")
    print("kernel config: " + ", ".join(topo["kernel_config"]))
    nodes = [n for n in topo["dev_nodes"] if n in ("/dev/vfio/vfio", "/dev/iommu")]
    print("nodes: " + (", ".join(nodes) or "none") + (", /dev/vfio/devices/" if any(
        n.startswith("/dev/vfio/devices/") for n in topo["dev_nodes"]) else ""))
    last_phb = None
    for pe in topo["pes"]:
        phb = pe["phb"]
        extra = f" LIOBNs {', '.join(hex(x) for x in phb['liobns'])}" if "liobns" in phb else ""
        header = f"{phb['model']} PHB#{phb['index']}{extra}"
        if header != last_phb:              # PEs of one PHB under one heading
            print(f"\n{header}")
            last_phb = header
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
    for unit in topo.get("iommu_units", []):
        if unit["model"] == "intel-iommu":
            _print_vtd_unit(unit)
        else:
            _print_iommu_unit(unit)
    print("\nIOMMU groups")
    for g in topo["iommu_groups"]:
        node = g["node"] or "(no VFIO node: bound to host drivers)"
        domain = ""
        if "domain" in g:
            d = g["domain"]
            domain = {"identity": ", identity domain (host)", "blocked": ", blocking domain (VFIO, no IOMMU set)"}.get(
                d["type"], f", paging domain #{d['id']}")
        print(f"  group {g['id']}: {node}, {'viable' if g['viable'] else 'not viable'}{domain}, "
              f"devices {', '.join(g['devices'])}")
    if topo["vfio_devices"]:
        print("\nVFIO devices (sysfs vfio-dev)")
        for v in topo["vfio_devices"]:
            print(f"  {v['name']}: {v['device']}, group {v['iommu_group']}, cdev {v['cdev'] or 'none'}")
    _print_iommufd(topo)
    print("\nPCI devices")
    for d in topo["devices"]:
        bars = "".join(f", BAR{i} {_hex(b['address'])}+{b['size']:#x}" for i, b in d["bars"].items())
        print(f"  {d['bdf']} {d['vendor']:04x}:{d['device']:04x} class {d['class']:06x} ({d['model']}), driver "
              f"{d['driver'] or 'none'}, group {d['iommu_group']}{bars}, reset {d['reset'] or 'none'}")


def _print_iommufd(topo: dict[str, Any]) -> None:
    """Every open iommufd and its objects (an IOAS with its mappings)."""
    for ctx in topo["iommufd"]:
        users = ", ".join(f"pid {u['pid']} fd {u['fd']}" for u in ctx["fds"])
        print(f"\niommufd {ctx['path']} ({users}): accounting {ctx['account_mode']}"
              + (f", compat IOAS {ctx['vfio_ioas']}" if ctx["vfio_ioas"] is not None else ""))
        for obj in ctx["objects"]:
            detail = ", ".join(f"{k} {v}" for k, v in obj.items() if k not in ("id", "type", "areas", "iova_ranges",
                                                                                 "allowed"))
            print(f"  {obj['type']} {obj['id']}: {detail}")
            for a in obj.get("areas", []):
                print(f"    IOVA {a['iova']:#x}+{a['length']:#x} <- {_hex(a['user_va'])}"
                      f"{', pinned' if a['pinned'] else ''}")


def _sizes(bitmap: int) -> str:
    names = []
    for shift in range(64):
        if bitmap >> shift & 1:
            size = 1 << shift
            unit = next((u for u, s in (("G", 30), ("M", 20), ("K", 10)) if size >= 1 << s and not size % (1 << s)), "")
            names.append(f"{size >> {'G': 30, 'M': 20, 'K': 10}.get(unit, 0)}{unit}")
    return "|".join(names)


def _print_iommu_unit(u: dict[str, Any]) -> None:
    """Another platform's IOMMU unit: the keys every unit's description has
    (kernel/platform/base.py: Platform.describe)."""
    print(f"\nIOMMU unit {u['name']} ({u['model']}), page sizes {_sizes(u['page_sizes'])}")
    for d in u["domains"]:
        print(f"  paging domain #{d['id']}: groups {', '.join(map(str, d['groups'])) or '-'}, "
              f"{d['mapped_bytes']:#x} bytes mapped")
    if u["faults"]:
        print(f"  {u['faults']} DMA fault(s) recorded")


def _print_vtd_unit(u: dict[str, Any]) -> None:
    """An x86 VT-d remapping unit and its domains."""
    print(f"\nIntel VT-d {u['name']} ({u['model']}{', caching mode' if u['caching_mode'] else ''})")
    print(f"  {u['address_width']}-bit IOVA (0x0..{(1 << u['address_width']) - 1:#x}), page sizes {_sizes(u['page_sizes'])}, "
          f"interrupt remapping {'on' if u['interrupt_remapping'] else 'off'}, "
          f"snoop control {'on' if u['snoop_control'] else 'off'}")
    for r in u["reserved_regions"]:
        print(f"  reserved {r['start']:#x}..{r['end']:#x} ({r['type']})")
    for d in u["domains"]:
        print(f"  paging domain #{d['id']}: groups {', '.join(map(str, d['groups'])) or '-'}, "
              f"{d['mapped_bytes']:#x} bytes mapped in {d['extents']} extent(s)")
    if u["faults"]:
        print(f"  {u['faults']} DMA fault(s) recorded")


# -- vfiosim run / serve / trace show (real programs through the preload shim) ----------------------------


def _host_page_size_ok(args: argparse.Namespace, command: str) -> bool:
    host = os.sysconf("SC_PAGE_SIZE")
    if args.page_size != host:
        print(f"vfiosim {command}: real programs run with the host's {host}-byte pages; "
              f"--page-size {args.page_size} is for the in-process API", file=sys.stderr)
        return False
    return True


def cmd_run(args: argparse.Namespace) -> int:
    from .transport import run as R
    from .transport.elfcheck import preload_obstacle
    if not args.connect and not _host_page_size_ok(args, "run"):
        return 2
    argv = list(args.program)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("vfiosim run: name a program: vfiosim run [--machine NAME|FILE] -- PROGRAM ARGS...", file=sys.stderr)
        return 2
    if args.connect:
        for given, option in ((args.trace, "--trace FILE"), (args.verbose, "-v")):
            if given:
                print(f"vfiosim run: {option.split()[0]} belongs to the daemon: vfiosim serve {option}",
                      file=sys.stderr)
                return 2
    obstacle = preload_obstacle(argv[0])
    if obstacle:
        print(f"vfiosim run: warning: {obstacle}", file=sys.stderr, flush=True)
    if args.connect:
        return R.run_connected(args.connect, argv, wait=args.wait)
    return R.run(_load(args), argv, trace=args.trace, verbose=args.verbose)


def cmd_serve(args: argparse.Namespace) -> int:
    from .transport import run as R
    if not _host_page_size_ok(args, "serve"):
        return 2
    if args.ready_fd is not None:
        try:
            os.fstat(args.ready_fd)
        except OSError as exc:
            print(f"vfiosim serve: --ready-fd {args.ready_fd}: {exc.strerror}", file=sys.stderr)
            return 2
    return R.serve(_load(args), args.socket, trace=args.trace, ready_fd=args.ready_fd, verbose=args.verbose)


def cmd_trace_show(args: argparse.Namespace) -> int:
    from .tracing.format import TraceError
    from .transport.trace import show
    try:
        with _naming_the_trace(args.file):
            return show(args.file, sys.stdout)
    except TraceError as exc:           # names the file, and the line when there is one
        print(f"vfiosim trace show: {exc}", file=sys.stderr)
        return 1


def cmd_trace_summary(args: argparse.Namespace) -> int:
    from .tracing.format import TraceError
    from .transport.summary import print_summary, summarize_trace
    try:
        with _naming_the_trace(args.file):
            print_summary(summarize_trace(args.file), sys.stdout)
    except TraceError as exc:           # names the file and line
        print(f"vfiosim trace summary: {exc}", file=sys.stderr)
        return 1
    return 0


@contextmanager
def _naming_the_trace(path: str) -> Iterator[None]:
    """A file that is not JSON lines: say which file."""
    try:
        yield
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a vfiosim trace (JSON lines): {exc}") from None


def _run_parsers(sub: Any) -> None:
    run = sub.add_parser("run", help="run an unmodified program with its VFIO calls reaching a simulated machine",
                         usage="vfiosim run [--machine NAME|FILE] [--trace FILE] [-v] [--connect SOCKET] "
                               "-- PROGRAM ARGS...")
    _machine_args(run)
    run.add_argument("--trace", metavar="FILE", help="write every VFIO call as a JSON line to FILE")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="print each failing VFIO call with the simulated kernel's reason, and its kernel log "
                          "(dmesg) lines, on stderr")
    run.add_argument("--connect", metavar="SOCKET", help="use the machine of a running `vfiosim serve`")
    run.add_argument("--wait", metavar="SECONDS", type=float, default=10.0,
                     help="with --connect: how long to wait for a daemon that is still starting (default 10)")
    run.add_argument("program", nargs=argparse.REMAINDER, help="the program and its arguments, after --")
    run.set_defaults(func=cmd_run)
    serve = sub.add_parser("serve", help="serve a simulated machine to programs started with `vfiosim run --connect`")
    _machine_args(serve)
    serve.add_argument("--socket", default="vfiosim.sock", help="Unix socket to listen on (default: ./vfiosim.sock)")
    serve.add_argument("--trace", metavar="FILE", help="write every VFIO call as a JSON line to FILE")
    serve.add_argument("-v", "--verbose", action="store_true",
                       help="print each failing VFIO call with the simulated kernel's reason, and its kernel log "
                            "(dmesg) lines, on stderr")
    serve.add_argument("--ready-fd", metavar="N", type=int,
                       help="once programs can connect, write the socket's path and a newline to file descriptor N "
                            "and close it (for scripts and supervisors)")
    serve.set_defaults(func=cmd_serve)
    trace = sub.add_parser("trace", help="inspect, convert and compare traces (--trace, vfiosim record, reference)")
    tsub = trace.add_subparsers(dest="trace_command", required=True)
    show = tsub.add_parser("show", help="print a trace strace-style (any trace: format of record, older --trace "
                                        "files, the reference traces)")
    show.add_argument("file")
    show.set_defaults(func=cmd_trace_show)
    summary = tsub.add_parser("summary", help="condense a trace: runs of per-page map/unmap and of config or BAR "
                                              "accesses become one line each, with counts")
    summary.add_argument("file")
    summary.set_defaults(func=cmd_trace_summary)
    from .tracing.cli import add_trace_subcommands
    add_trace_subcommands(tsub)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    if args.plot:
        bench.require_matplotlib()
    names = [n for n, _ in bench.suite(args.quick)]
    for name in args.only or []:
        if name not in names:
            print(f"vfiosim bench: no figure {name!r} (figures: {', '.join(names)})", file=sys.stderr)
            return 2
    with _json_target(args.json) as json_out:
        # JSON on standard output: the table goes to stderr, out of the way of a parser.
        table = sys.stderr if json_out is sys.stdout else sys.stdout
        figures = bench.run(quick=args.quick, out=table, json_out=json_out, plot_dir=args.plot, only=args.only,
                            progress=not args.no_progress)
    if args.json not in (None, "-"):
        print(f"wrote {args.json}")
    return 1 if args.strict and any(f.met is False for f in figures) else 0


def _bench_parser(sub: Any) -> None:
    b = sub.add_parser("bench", help="measure the simulator's cost as ratios against the bare work (see docs/performance.md)")
    b.add_argument("--quick", action="store_true", help="tiny sizes only: a smoke run of every benchmark in seconds")
    _json_option(b, "the figures")
    b.add_argument("--plot", metavar="DIR", help="write PNG charts to DIR (needs the plot extra: matplotlib)")
    b.add_argument("--only", metavar="NAME", action="append", help="run only this figure (repeatable)")
    b.add_argument("--strict", action="store_true", help="exit 1 if a goal is not met")
    b.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    b.set_defaults(func=cmd_bench)


def cmd_qemu_demo(args: argparse.Namespace) -> int:
    from .qemu.demo import report, run_demo
    from .qemu.image import QemuDemoUnavailable
    if not _host_page_size_ok(args, "qemu-demo"):
        return 2
    if args.platform == "x86":
        pseries_only = [opt for opt, on in (("--dma-api", args.dma_api), ("--no-mmap", args.no_mmap),
                                            ("--guest-iommu", args.guest_iommu != "auto")) if on]
        if pseries_only:
            print(f"vfiosim qemu-demo: {', '.join(pseries_only)}: only with --platform pseries", file=sys.stderr)
            return 2
    log = (lambda text: print(text, file=sys.stderr, flush=True)) if args.verbose else \
        (lambda text: print(text, file=sys.stderr, flush=True) if text.startswith(("vfiosim", "building", "cached",
                                                                                  "installing", "adding")) else None)
    try:
        if args.platform == "x86":
            from .qemu.x86_demo import report_x86, run_x86_demo
            x86 = run_x86_demo(trace=args.trace, workdir=args.workdir, install=not args.no_install,
                               timeout=args.timeout, log=log)
            report_x86(x86, sys.stdout)
            return 0 if x86.ok else 1
        result = run_demo(trace=args.trace, workdir=args.workdir, install=not args.no_install,
                          timeout=args.timeout, log=log, dma_api=args.dma_api, no_mmap=args.no_mmap,
                          guest_iommu=args.guest_iommu)
    except QemuDemoUnavailable as exc:
        print(f"vfiosim qemu-demo: cannot run here: {exc}", file=sys.stderr)
        return 3
    report(result, sys.stdout)
    return 0 if result.ok else 1


def _qemu_demo_parser(sub: Any) -> None:
    q = sub.add_parser("qemu-demo", help="boot an unmodified QEMU pseries (or x86) guest whose vfio-pci device is "
                                         "vfiosim's edu, and DMA through the guest's own VFIO (see docs/qemu.md)")
    q.add_argument("--platform", choices=("pseries", "x86"), default="pseries",
                   help="pseries: a POWER guest on the PowerNV machine, its TCE hypercalls relayed to sPAPR v2 "
                        "(default); x86: a q35 guest with a VT-d vIOMMU on the x86 machine, its IOMMU mappings "
                        "relayed to Type1")
    q.add_argument("--trace", metavar="FILE", help="where to write vfiosim's trace (default: in the work directory)")
    q.add_argument("--workdir", metavar="DIR", help="where to keep the console, QEMU's and vfiosim's traces "
                                                    "(default: ~/.cache/vfiosim/qemu/last-run, replaced by each run)")
    q.add_argument("--no-install", action="store_true", help="do not apt-get install missing host tools")
    q.add_argument("--timeout", type=float, default=900.0, help="give up on QEMU after this many seconds (default 900)")
    q.add_argument("--dma-api", action="store_true",
                   help="instead of the guest's VFIO test, read a virtio-blk disk on the same PHB: the guest "
                        "kernel's DMA API batches TCEs with H_PUT_TCE_INDIRECT (docs/qemu.md)")
    q.add_argument("--no-mmap", action="store_true",
                   help="QEMU reaches BAR0 with pread/pwrite on the device fd, not through a mapping (x-no-mmap=true)")
    q.add_argument("--guest-iommu", choices=("auto", "v1", "v2"), default="auto",
                   help="the sPAPR IOMMU type the guest program uses (default: v2 when the guest offers it)")
    q.add_argument("-v", "--verbose", action="store_true", help="show every command and QEMU's own messages")
    q.set_defaults(func=cmd_qemu_demo, page_size=4096)


def cmd_dpdk_demo(args: argparse.Namespace) -> int:
    from .dpdk.demo import DpdkDemoUnavailable, report, run_demo
    for spec in args.device_module:
        _import_device_module(spec)
    quiet = ("vfiosim", "installing", "$ ")
    log = (lambda text: print(text, file=sys.stderr, flush=True)) if args.verbose else \
        (lambda text: print(text, file=sys.stderr, flush=True) if text.startswith(quiet) else None)
    try:
        result = run_demo(machine=args.nic_machine, seconds=args.seconds, install=not args.no_install, trace=args.trace,
                          workdir=args.workdir, timeout=args.timeout, log=log, memory_mb=args.memory)
    except DpdkDemoUnavailable as exc:
        print(f"vfiosim dpdk-demo: cannot run here: {exc}", file=sys.stderr)
        return 3
    report(result, sys.stdout)
    return 0 if result.ok else 1


def _dpdk_demo_parser(sub: Any) -> None:
    d = sub.add_parser("dpdk-demo", help="run Debian's unmodified dpdk-testpmd on vfiosim's virtio-net NIC: "
                                         "sPAPR TCE v2 on PowerNV, Type1 on x86 (see docs/dpdk.md)")
    d.add_argument("--machine", dest="nic_machine", default="powernv", metavar="powernv|x86|FILE",
                   help="powernv (the preset powernv-virtio), x86 (x86-virtio), or a machine file with a "
                        "virtio-net device (default: powernv)")
    d.add_argument("--seconds", type=float, default=5.0, help="how long to forward and measure (default 5)")
    d.add_argument("--memory", type=int, default=64, metavar="MB", help="DPDK's memory, EAL -m (default 64)")
    d.add_argument("--trace", metavar="FILE", help="where to write vfiosim's trace (default: in the work directory)")
    d.add_argument("--workdir", metavar="DIR", help="where to keep the trace and testpmd's output "
                                                    "(default: ~/.cache/vfiosim/dpdk/last-run, replaced by each run)")
    d.add_argument("--no-install", action="store_true", help="do not apt-get install DPDK when it is missing")
    d.add_argument("--timeout", type=float, default=300.0, help="give up on testpmd after this many seconds")
    d.add_argument("--device-module", metavar="MODULE", action="append", default=[],
                   help="import MODULE first (device models a machine file names)")
    d.add_argument("-v", "--verbose", action="store_true", help="show testpmd's output and every command")
    d.set_defaults(func=cmd_dpdk_demo)


def cmd_selftests(args: argparse.Namespace) -> int:
    from pathlib import Path
    from .selftests import SelftestsUnavailable, print_report, run_selftests
    log = (lambda text: print(text, file=sys.stderr, flush=True)) if args.verbose else \
        (lambda text: print(text, file=sys.stderr, flush=True) if not text.startswith("$ ") else None)
    with _json_target(args.json) as out:
        try:
            report = run_selftests(args.package, runs=args.run, only=args.only, download=not args.no_download,
                                   log=log, output=Path(args.logs) if args.logs else None)
        except SelftestsUnavailable as exc:
            print(f"vfiosim selftests: cannot run here: {exc}", file=sys.stderr)
            return 3
        if out is not None:
            json.dump(report.to_json(), out, indent=2)
            out.write("\n")
        if out is not sys.stdout:
            print_report(report, sys.stdout)
    return 0 if report.ok else 1


def _selftests_parser(sub: Any) -> None:
    from .selftests import RUNS, SOURCE_PACKAGE
    s = sub.add_parser("selftests", help="build the Linux kernel's own VFIO selftests (Debian's linux-source, "
                                         "unmodified) and run them under `vfiosim run` (see docs/selftests.md)")
    s.add_argument("--run", action="append", choices=[r.name for r in RUNS],
                   help="run only on this machine configuration (repeatable; default: all)")
    s.add_argument("--only", metavar="PROGRAM", action="append",
                   help="run only this selftest program (a glob, repeatable), e.g. vfio_dma_mapping_test")
    s.add_argument("--package", default=SOURCE_PACKAGE,
                   help=f"the Debian source package to take them from (default {SOURCE_PACKAGE}, the one the "
                        f"expected results were written for)")
    s.add_argument("--no-download", action="store_true", help="use the cached package only")
    s.add_argument("--logs", metavar="DIR", help="write each program's output to DIR/<run>.<program>.log")
    _json_option(s, "the results")
    s.add_argument("-v", "--verbose", action="store_true", help="show every command")
    s.set_defaults(func=cmd_selftests)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vfiosim", description="A simulated Linux VFIO kernel with the POWER sPAPR "
                                 "TCE IOMMU and the x86 Type1 IOMMU: run VFIO userspace code without hardware or root.")
    ap.add_argument("--version", action="version", version=f"vfiosim {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the kernel documentation's flow (sPAPR on POWER, Type1 on x86) with an edu DMA round trip")
    _machine_args(demo)
    demo.add_argument("--transfers", type=int, default=4, help="edu DMA transfers of 4 KiB (default 4)")
    demo.set_defaults(func=cmd_demo)
    topo = sub.add_parser("topology", help="list PHBs, PEs, IOMMU groups, devices and DMA windows")
    _machine_args(topo)
    _json_option(topo, "the topology")
    topo.set_defaults(func=cmd_topology)
    _run_parsers(sub)
    _bench_parser(sub)
    from .fuzz import add_fuzz_parser
    add_fuzz_parser(sub)
    _qemu_demo_parser(sub)
    _dpdk_demo_parser(sub)
    _selftests_parser(sub)
    from .tracing.cli import add_parsers as _tracing_parsers
    _tracing_parsers(sub)
    from .qemu.record import add_parsers as _qemu_record_parsers
    _qemu_record_parsers(sub)
    args = ap.parse_args(argv)
    command = " ".join(filter(None, ("vfiosim", args.command, getattr(args, "trace_command", None))))
    try:
        if hasattr(args, "machine"):
            _machine_from_env(args)
        return int(args.func(args))
    except BrokenPipeError:                 # `vfiosim topology | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except (MachineFileError, ValueError) as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:                  # a file that cannot be read or written: say which and why
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{command}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
