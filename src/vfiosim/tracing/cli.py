"""The command line of the trace tools: ``vfiosim replay``, ``vfiosim record`` and
``vfiosim trace convert|diff`` (``vfiosim.cli`` registers them)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import IO, Any

from .compare import KERNEL, Divergence
from .format import TraceError, describe_header

EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3


def _err(command: str, text: str) -> None:
    print(f"vfiosim {command}: {text}", file=sys.stderr)


# -- vfiosim trace convert ----------------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    from .format import TraceWriter, open_trace
    try:
        with open_trace(args.input) as t:
            if t.kind == "v1" and not args.force:
                _err("trace convert", f"{args.input} is already in the format of record (version "
                                      f"{t.header['version']}); --force rewrites it anyway")
                return EXIT_USAGE
            header = dict(t.header)
            if t.kind == "legacy":
                header["version"] = 1
                header["converted_from"] = "vfiosim --trace before format 1"
            out = sys.stdout if args.output == "-" else args.output
            w = TraceWriter(out, header)
            n = 0
            try:
                for rec in t:
                    w.write(rec)
                    n += 1
            finally:
                w.close()
    except TraceError as exc:
        _err("trace convert", str(exc))
        return EXIT_USAGE
    except OSError as exc:
        _err("trace convert", f"{args.output}: {exc.strerror}")
        return EXIT_USAGE
    if args.output != "-":
        print(f"wrote {n} records to {args.output}", file=sys.stderr)
    return 0


# -- vfiosim trace diff ---------------------------------------------------------------------------------


def _print_divergence(d: Divergence, out: IO[str], indent: str = "  ", context: list[str] | None = None) -> None:
    out.write(f"{indent}{d}\n")
    if d.step:
        out.write(f"{indent}    A: {d.step}\n")
    if d.other:
        out.write(f"{indent}    B: {d.other}\n")
    for line in context or []:
        out.write(f"{indent}      after: {line}\n")


def cmd_diff(args: argparse.Namespace) -> int:
    from .diff import diff
    from .format import open_trace
    try:
        with open_trace(args.a) as a, open_trace(args.b) as b:
            r = diff(a, b, keep=args.max)
            ha, hb = a.header, b.header
    except TraceError as exc:
        _err("trace diff", str(exc))
        return EXIT_USAGE
    if args.json:
        doc = {"a": args.a, "b": args.b, "header_a": ha, "header_b": hb, **r.as_json()}
        json.dump(doc, sys.stdout, indent=1)
        print()
        return 0 if r.identical else EXIT_DIVERGED
    out = sys.stdout
    out.write(f"A: {args.a}: {describe_header(ha)}\nB: {args.b}: {describe_header(hb)}\n")
    if r.skipped_mmio:
        out.write("(BAR loads and stores through a mapping left out: a recording on a real kernel cannot see them)\n")
    for note in r.notes:
        out.write(f"environment: {note}\n")
    if r.first_by_scenario:
        out.write("\nfirst divergence of each scenario:\n")
        for scen, d in r.first_by_scenario.items():
            out.write(f"  [{scen or '-'}]\n")
            _print_divergence(d, out, "    ")
    shown = [d for d in r.divergences if args.all or d.label == KERNEL]
    if shown:
        out.write("\nevery divergence" + ("" if args.all else " (kernel; --all adds environment and machine)") + ":\n")
        for d in shown:
            _print_divergence(d, out)
    if len(r.divergences) >= args.max:
        out.write(f"  ... (the first {args.max} kept; --max N keeps more)\n")
    c = r.counts
    out.write(f"\n{r.matched}/{r.steps} paired steps match; divergences: kernel {c['kernel']}, environment "
              f"{c['environment']}, machine {c['machine']}; only in A: {r.only_a}, only in B: {r.only_b}\n")
    return 0 if r.identical else EXIT_DIVERGED


# -- vfiosim replay ---------------------------------------------------------------------------------------


def choose_machine(header: dict[str, Any], args: argparse.Namespace) -> tuple[Any, str]:
    """The machine to replay on (replay.machine_for): --machine, else the preset of the
    trace's platform; the trace's page size and kernel configuration unless
    --page-size and --kernel-config say otherwise."""
    from .replay import machine_for
    return machine_for(header, machine=args.machine, kernel=args.kernel, page_size=args.page_size,
                       kernel_config=args.kernel_config)


def machine_check(header: dict[str, Any], machine: Any) -> list[str]:
    """Where the trace's machine (its header) and the replay's differ."""
    notes = []
    topo = machine.topology()
    devs = {d["bdf"]: d for d in topo["devices"]}
    for d in header.get("devices") or []:
        mine = devs.get(d.get("bdf"))
        if mine is None:
            if d.get("driver", "vfio-pci") in ("vfio-pci", "") or d.get("iommu_group") is not None:
                notes.append(f"{d.get('bdf')} (group {d.get('iommu_group')}) is not on the replay's machine")
            continue
        if d.get("iommu_group") is not None and mine["iommu_group"] != d.get("iommu_group"):
            notes.append(f"{d['bdf']} is in group {d['iommu_group']} in the trace, {mine['iommu_group']} here")
        for key in ("vendor", "device"):
            if d.get(key) is not None and int(str(d[key]), 0) != mine[key]:
                notes.append(f"{d['bdf']}: {key} {d[key]} in the trace, {mine[key]:#x} here")
    windows = {w.get("iommu_group"): w for w in header.get("windows") or [] if "size" in w}
    for pe in topo["pes"]:
        w = windows.get(pe["iommu_group"])
        if w is not None and (w.get("start"), w.get("size")) != (pe["dma32_window"]["start"], pe["dma32_window"]["size"]):
            notes.append(f"group {pe['iommu_group']}: 32-bit DMA window {w.get('start', 0):#x}+{w.get('size', 0):#x} "
                         f"in the trace, {pe['dma32_window']['start']:#x}+{pe['dma32_window']['size']:#x} here")
    from .format import kernel_config_items
    recorded = header.get("kernel_config")
    if isinstance(recorded, list):
        theirs = dict(str(item).partition("=")[::2] for item in recorded)
        ours = dict(item.partition("=")[::2] for item in kernel_config_items(machine.kernel.config))
        differ = [f"{k}={theirs[k]} in the trace, {k}={v} here" for k, v in ours.items() if theirs.get(k, v) != v]
        if differ:
            notes.append("kernel configuration: " + "; ".join(differ))
    units = [u for u in (header.get("iommu") or {}).get("units") or [] if u.get("address_width")]
    mine = [u for u in topo.get("iommu_units") or [] if "address_width" in u]
    if units and mine and units[0]["address_width"] != mine[0]["address_width"]:
        notes.append(f"the IOMMU's address width is {units[0]['address_width']} bits in the trace, "
                     f"{mine[0]['address_width']} here")
    return notes


def cmd_replay(args: argparse.Namespace) -> int:
    from .format import open_trace
    from .replay import ReplayError, print_progress, replay
    if args.device_module:
        from ..cli import _import_device_module
        for spec in args.device_module:
            _import_device_module(spec)
    out = sys.stdout
    try:
        with open_trace(args.trace) as t:
            machine, why = choose_machine(t.header, args)
            if not args.json:
                out.write(f"replaying {args.trace}: {describe_header(t.header)}\n")
                out.write(f"on the simulated machine {why}: {machine.spec.description}\n")
                for note in machine_check(t.header, machine):
                    out.write(f"  machine check: {note}\n")

            def on_step(step: Any) -> None:
                if not args.verbose:
                    return
                from ..transport.trace import format_record
                labels = sorted({d.label for d in step.divergences})
                mark = "ok" if not labels else "DIFFERS (kernel)" if KERNEL in labels else \
                    f"ok, but the {' and '.join(labels)} differs"
                for rec, sim in zip(step.recorded, step.replayed):
                    out.write(f"  {format_record(rec)}\n      replay: {_answer(sim)}  {mark}\n")

            progress = None if args.json or args.no_progress or not sys.stderr.isatty() and not args.progress \
                else print_progress
            r = replay(machine, t, keep=args.max, context=args.context, output=args.output, on_step=on_step,
                       progress=progress)
            header = t.header
    except TraceError as exc:
        _err("replay", str(exc))
        return EXIT_USAGE
    except ReplayError as exc:
        _err("replay", str(exc))
        return EXIT_USAGE
    if args.json:
        doc = {"trace": args.trace, "header": header, "steps": r.steps, "matched": r.matched, "skipped": r.skipped,
               "counts": r.counts, "families": {k: vars(v) for k, v in r.families.items()},
               "first_by_scenario": {k: v.as_json() for k, v in r.first_by_scenario.items()},
               "divergences": [d.as_json() for d in r.divergences]}
        json.dump(doc, out, indent=1)
        out.write("\n")
        return EXIT_DIVERGED if r.kernel_divergences else 0
    if r.divergences:
        out.write("\ndivergences:\n")
        for d, ctx in zip(r.divergences, r.contexts):
            out.write(f"  {d}\n      recorded: {d.step}\n      replayed: {d.other}\n")
            for line in ctx:
                out.write(f"        (before) {line}\n")
        if sum(r.counts.values()) > len(r.divergences):
            out.write(f"  ... the first {len(r.divergences)} kept (--max N keeps more)\n")
    for note in r.notes:
        out.write(f"\nenvironment: the recording {note}; the replay mirrored it\n")
    out.write("\nper family:\n")
    for fam, fc in sorted(r.families.items()):
        out.write(f"  {fam:<16} {fc.matched}/{fc.steps}\n")
    c = r.counts
    skipped = f" ({r.skipped} recorded as not run)" if r.skipped else ""
    out.write(f"\n{r.matched}/{r.steps} steps match{skipped}; divergences: kernel {c['kernel']}, environment "
              f"{c['environment']}, machine {c['machine']}\n")
    if args.output:
        out.write(f"the simulator's answers: {args.output} (vfiosim trace diff {args.trace} {args.output})\n")
    return EXIT_DIVERGED if r.kernel_divergences else 0


def _answer(rec: dict[str, Any]) -> str:
    text = f"-1 {rec.get('err')}" if rec.get("errno") else str(rec.get("ret"))
    if rec.get("out"):
        from ..transport.trace import _fmt_value
        text += f" => {_fmt_value('', rec['out'])}"
    if rec.get("call") == "read" and rec.get("data"):
        text += f"  [{rec['data'][:64]}{'...' if len(rec['data']) > 64 else ''}]"
    return text


# -- vfiosim record ----------------------------------------------------------------------------------------


def cmd_record(args: argparse.Namespace) -> int:
    from .record import RecordUnavailable, record
    argv = list(args.program)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        _err("record", "name a program: vfiosim record [-o FILE] -- PROGRAM ARGS...")
        return EXIT_USAGE
    try:
        status, summary = record(argv, args.output, scenario=args.scenario, simulated=args.simulated,
                                 append=args.append, kernel_config=args.kernel_config)
    except RecordUnavailable as exc:
        _err("record", str(exc))
        return EXIT_UNAVAILABLE
    except ValueError as exc:                   # no such machine, a configuration Kconfig forbids
        _err("record", str(exc))
        return EXIT_USAGE
    print(f"vfiosim record: {summary}", file=sys.stderr)
    return status


# -- the parsers -----------------------------------------------------------------------------------------


def add_trace_subcommands(tsub: Any) -> None:
    conv = tsub.add_parser("convert", help="write a trace (a reference trace, or an older --trace file) in the "
                                           "format of record")
    conv.add_argument("input")
    conv.add_argument("output", help="the new file (- for standard output)")
    conv.add_argument("--force", action="store_true", help="rewrite a trace that is already in the format")
    conv.set_defaults(func=cmd_convert)
    d = tsub.add_parser("diff", help="compare two traces step by step (real kernel vs simulator, kernel A vs B)")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--json", action="store_true", help="machine-readable result (exit status 1 if they differ)")
    d.add_argument("--all", action="store_true", help="also list environment and machine differences")
    d.add_argument("--max", type=int, default=1000, help="divergences kept in full (default 1000)")
    d.set_defaults(func=cmd_diff)


def add_parsers(sub: Any) -> None:
    from ..kernel.kernel import KERNEL_PROFILES
    from ..machine import preset_names
    r = sub.add_parser("replay", help="re-issue a recorded trace's calls on a simulated machine and compare "
                                      "every step with the recording",
                       usage="vfiosim replay TRACE [--machine NAME|FILE] [--kernel-config OPTIONS] [--output FILE] "
                             "[--json] [-v]")
    r.add_argument("trace")
    r.add_argument("--machine", metavar="NAME|FILE",
                   help=f"a preset ({', '.join(preset_names())}) or a machine file (default: the preset of the "
                        f"trace's platform)")
    r.add_argument("--kernel", default="6.12", choices=KERNEL_PROFILES, help="kernel behaviour to simulate")
    r.add_argument("--kernel-config", metavar="OPTIONS",
                   help="the simulated kernel's options (as for vfiosim run: 'iommufd', 'iommufd-compat', or "
                        "IOMMUFD,VFIO_DEVICE_CDEV,...; default: the trace's kernel_config, else Debian's build)")
    r.add_argument("--page-size", type=int, choices=(4096, 65536),
                   help="the simulated kernel's PAGE_SIZE (default: the trace's, else 4096)")
    r.add_argument("--device-module", metavar="MODULE", action="append", default=[],
                   help="import MODULE first: it registers device models (repeatable)")
    r.add_argument("--output", metavar="FILE", help="write the simulator's answers as a trace to FILE")
    r.add_argument("--json", action="store_true", help="machine-readable result")
    r.add_argument("-v", "--verbose", action="store_true", help="print every step next to the replay's answer")
    r.add_argument("--context", type=int, default=3, help="steps shown before each divergence (default 3)")
    r.add_argument("--max", type=int, default=1000, help="divergences kept in full (default 1000)")
    r.add_argument("--progress", action="store_true", help="show progress even when stderr is not a terminal")
    r.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    r.set_defaults(func=cmd_replay, machine_from_trace=True)

    rec = sub.add_parser("record", help="run a program against this host's real /dev/vfio and record every VFIO "
                                        "call it makes (it changes nothing)",
                         usage="vfiosim record [-o FILE] [--scenario NAME] [--simulated MACHINE "
                               "[--kernel-config OPTIONS]] -- PROGRAM ARGS...")
    rec.add_argument("-o", "--output", default="vfiosim-record.jsonl", help="the trace (default vfiosim-record.jsonl)")
    rec.add_argument("--scenario", help="a name for what the program does (default: the program's name)")
    rec.add_argument("--append", action="store_true", help="add to an existing trace of the same machine")
    rec.add_argument("--simulated", metavar="NAME|FILE",
                     help="record a simulated machine instead (vfiosim run's shim under the recording shim): "
                          "how the recorder is tested on a host without /dev/vfio")
    rec.add_argument("--kernel-config", metavar="OPTIONS",
                     help="with --simulated: the simulated kernel's options, as for vfiosim run ('iommufd', "
                          "'iommufd-compat', IOMMUFD,VFIO_DEVICE_CDEV,...)")
    rec.add_argument("program", nargs=argparse.REMAINDER, help="the program and its arguments, after --")
    rec.set_defaults(func=cmd_record)
