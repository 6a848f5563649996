"""``vfiosim dpdk-demo``: Debian's unmodified ``dpdk-testpmd`` forwards frames through vfiosim's virtio-net.

The machine is ``powernv-virtio`` (POWER9 PowerNV: DPDK's EAL falls back from
Type1 to the sPAPR TCE v2 IOMMU), ``x86-virtio`` (q35 with VT-d: Type1), or
a machine file with a ``virtio-net`` device bound to vfio-pci.  testpmd runs
under the ``vfiosim run`` transport without hugepages (``--no-huge``: an
ordinary user cannot set hugepages up, and without them EAL has no physical
addresses, so ``--iova-mode=va``: bus addresses are the process's virtual
addresses, which the IOMMU window or domain covers).  Its virtio PMD binds
the NIC through VFIO, and ``start tx_first`` sends one burst that io
forwarding then keeps circulating through the NIC's loopback.  The demo
drives testpmd's command line (docs/dpdk.md):

1. ``start tx_first``; after a second ``show port stats all`` (a baseline),
   after the measured seconds ``show port stats all`` again: testpmd's own
   Rx-pps over that interval;
2. ``stop``, then ``set fwd rxonly`` / ``start`` / ``stop``: the frames
   still in flight are received, not sent again, so RX equals TX;
3. ``show port stats all`` and ``quit``.

Then it checks what the NIC saw (every frame testpmd sent back was byte for
byte one the NIC had handed it; the first burst is well-formed
Ethernet/IPv4/UDP), condenses vfiosim's trace of the VFIO conversation, and
checks that nothing is left once testpmd is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Sequence

from ..cachedir import user_cache
from ..kernel.config import POWER_PLATFORMS
from ..kernel.mm import AddressSpace
from ..transport.summary import HostConversation, iommu_type_name, summarize_trace

Log = Callable[[str], None]

TESTPMD = "dpdk-testpmd"
PACKAGES = ["dpdk"]                         # Debian: dpdk-testpmd and the PMDs (net_virtio, net_null)
MACHINES = {"powernv": "powernv-virtio", "x86": "x86-virtio"}
MEMORY_MB = 64                              # EAL's -m: 16384 pages of 4 KiB without hugepages
MBUFS = 2048
MIN_MEMORY_MB = 20                          # testpmd's floor with MBUFS (check_memory)
SECONDS = 5.0
TIMEOUT = 300.0
PROMPT = b"testpmd> "


class DpdkDemoUnavailable(RuntimeError):
    """The demo cannot run here; the message says exactly what is missing and why."""


def _quiet(text: str) -> None:
    pass


# -- prerequisites ------------------------------------------------------------------------------------------


@dataclass
class Prerequisites:
    testpmd: str
    version: str


def _can_install() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def _dpdk_version() -> str:
    if shutil.which("dpkg-query"):
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "dpdk"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return f"DPDK {out.stdout.strip()} (Debian package dpdk)"
    return "DPDK (version unknown)"


def check_prerequisites(*, install: bool = True, log: Log = _quiet) -> Prerequisites:
    """dpdk-testpmd, installed with apt-get when missing and allowed (root)."""
    testpmd = shutil.which(TESTPMD)
    if testpmd is None:
        pkgs = " ".join(PACKAGES)
        if not install:
            raise DpdkDemoUnavailable(f"{TESTPMD} is missing (Debian package: {pkgs}); this run may not install "
                                      f"it: run `apt-get install {pkgs}` as root")
        if not _can_install():
            raise DpdkDemoUnavailable(f"{TESTPMD} is missing (Debian package: {pkgs}) and cannot be installed here "
                                      f"(needs root and apt-get): run `apt-get install {pkgs}` as root")
        log(f"installing {pkgs}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
        # A mirror that fails for one index makes `apt-get update` exit 100; the install decides.
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env)
        proc = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
                              capture_output=True, text=True, env=env)
        testpmd = shutil.which(TESTPMD)
        if proc.returncode != 0 or testpmd is None:
            raise DpdkDemoUnavailable(f"`apt-get install {pkgs}` failed (exit status {proc.returncode}): "
                                      f"{(proc.stderr or proc.stdout).strip()[-600:]}")
    return Prerequisites(testpmd, _dpdk_version())


# -- the machine ---------------------------------------------------------------------------------------------


def load_machine(name: str) -> tuple[Any, str]:
    """The machine and the PCI address of its virtio-net NIC.  ``name`` is
    ``powernv``, ``x86``, a preset or a machine file.  For a user other than
    root the NIC's /dev/vfio/N is given to that user, as an administrator
    would chown it for the user that runs DPDK."""
    from importlib import resources

    from ..machine import PRESET_ALIASES, PRESETS, Machine
    from ..machine_spec import load_spec_file, load_spec_text
    key = MACHINES.get(name, name)
    key = PRESET_ALIASES.get(key, key)
    if key in PRESETS and not Path(name).exists():
        spec = load_spec_text(resources.files("vfiosim.presets").joinpath(PRESETS[key]).read_text(),
                              f"preset {key} ({PRESETS[key]})")
    else:
        spec = load_spec_file(name)
    nics = [d for d in spec.devices if d.model == "virtio-net" and d.driver == "vfio-pci"]
    if not nics:
        raise ValueError(f"{spec.source}: no virtio-net device bound to vfio-pci; the demo needs one "
                         f"(`model = \"virtio-net\"` in a [[device]] table, see docs/dpdk.md)")
    nic = nics[0]
    if os.geteuid() != 0:
        for d in spec.devices:
            if d.iommu_group == nic.iommu_group:
                d.group_uid, d.group_gid = os.geteuid(), os.getegid()
    return Machine(spec), nic.bdf


def memlock_needed(memory_mb: int = MEMORY_MB, *, spapr: bool = True) -> int:
    """What DPDK locks: all its memory (REGISTER_MEMORY on sPAPR, MAP_DMA on
    Type1), and on sPAPR the TCE table of its window with the table of user
    addresses beside it (2 x 8 bytes per 4 KiB page of an 8 GiB window: 32 MiB),
    with a margin.  Type1 locks the mapped memory only."""
    return (memory_mb << 20) + ((48 << 20) if spapr else 0)


def check_memory(memory_mb: int) -> None:
    """testpmd's own floor: below it EAL starts, then testpmd fails to create
    its 2048-mbuf pool ("Cannot allocate memory") -- measured: 16 MiB fails,
    20 MiB forwards, on both machines."""
    if memory_mb < MIN_MEMORY_MB:
        raise DpdkDemoUnavailable(
            f"--memory {memory_mb}: testpmd needs at least {MIN_MEMORY_MB} MiB for its {MBUFS} mbufs and port "
            f"tables (EAL's -m; the default is {MEMORY_MB})")


def check_memlock(memory_mb: int = MEMORY_MB, *, spapr: bool = True) -> None:
    import resource
    if os.geteuid() == 0:
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    need = memlock_needed(memory_mb, spapr=spapr)
    if hard != resource.RLIM_INFINITY and hard < need:
        what = " and its window's TCE table" if spapr else ""
        raise DpdkDemoUnavailable(
            f"DPDK locks its {memory_mb} MiB{what} for DMA, as on a real host, and RLIMIT_MEMLOCK allows "
            f"{hard >> 10} KiB (needed: {need >> 10} KiB): run as root, or raise the limit "
            f"(`ulimit -l {need >> 10}` in a shell whose hard limit allows it; limits.conf's memlock)")


def _raise_memlock() -> None:
    import resource
    _soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
    except (ValueError, OSError):
        pass


# -- testpmd -----------------------------------------------------------------------------------------------------


def testpmd_argv(testpmd: str, *, bdf: str | None = None, vdev: str | None = None, memory_mb: int = MEMORY_MB,
                 mbufs: int = MBUFS, extra_eal: Sequence[str] = (), extra: Sequence[str] = ()) -> list[str]:
    """The command line: no hugepages, IOVA as VA, no shared files or telemetry
    socket (nothing left in /var/run/dpdk), one forwarding core, interactive."""
    cores = ["-l", "0-1"] if (os.cpu_count() or 1) >= 2 else ["--lcores", "(0,1)@0"]
    argv = [testpmd, "--no-huge", "-m", str(memory_mb), "--iova-mode=va", "--no-shconf", "--no-telemetry", *cores]
    argv += ["-a", bdf] if bdf else ["--no-pci"]
    if vdev:
        argv += ["--vdev", vdev]
    argv += [*extra_eal, "--", "-i", f"--total-num-mbufs={mbufs}", *extra]
    return argv


@dataclass
class PortStats:
    """One block of ``show port stats all``."""
    rx_packets: int = 0
    rx_missed: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0
    rx_nombuf: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_bytes: int = 0
    rx_pps: int = 0
    tx_pps: int = 0


_STAT_FIELDS = {"RX-packets": "rx_packets", "RX-missed": "rx_missed", "RX-bytes": "rx_bytes",
                "RX-errors": "rx_errors", "RX-nombuf": "rx_nombuf", "TX-packets": "tx_packets",
                "TX-errors": "tx_errors", "TX-bytes": "tx_bytes", "Rx-pps": "rx_pps", "Tx-pps": "tx_pps"}


def parse_port_stats(text: str) -> list[PortStats]:
    """Every "NIC statistics for port" block in testpmd's output, in order."""
    out = []
    for block in re.split(r"#+ NIC statistics for port \d+ +#+", text)[1:]:
        block = block.split("############", 1)[0]
        st = PortStats()
        for key, value in re.findall(r"([RT]X-\w+|[RT]x-pps):\s+(\d+)", block):
            if key in _STAT_FIELDS:
                setattr(st, _STAT_FIELDS[key], int(value))
        out.append(st)
    return out


@dataclass
class Run:
    """One testpmd run under vfiosim: its output and what the machine saw."""
    argv: list[str]
    exit_status: int
    output: str
    seconds: float
    machine: Any
    stats: list[PortStats]
    timed_out: bool
    peak_locked: int = 0           # bytes: the largest locked_vm the simulated kernel charged testpmd
    peak_pinned: int = 0
    after: dict[str, Any] = field(default_factory=dict)


def run_testpmd(machine: Any, argv: list[str], script: Sequence[tuple[str, float]], *,
                trace: str | None = None, timeout: float = TIMEOUT, log: Log = _quiet,
                kill_after: str | None = None) -> Run:
    """Run testpmd under a private vfiosim daemon for ``machine`` and type
    ``script`` at its prompt: each (command, seconds to wait after it).
    ``kill_after``: SIGKILL testpmd once that command has been typed (and its
    wait passed) instead of going on.  Afterwards, check what is left."""
    from ..transport.run import private_daemon

    out = bytearray()
    prompt = threading.Event()
    done_typing = threading.Event()
    peak = [0, 0]
    timed_out = [False]
    t0 = time.monotonic()
    err_lines: list[str] = []

    class _Err:
        def write(self, text: str) -> int:
            for line in text.rstrip("\n").splitlines():
                err_lines.append(line)
                log(line)
            return len(text)

        def flush(self) -> None:
            pass

    with private_daemon(machine, trace, _Err()) as (daemon, env):  # type: ignore[arg-type]
        root = daemon.root
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_raise_memlock)
        assert proc.stdin is not None and proc.stdout is not None

        def pump() -> None:
            pending = b""
            fd = proc.stdout.fileno()  # type: ignore[union-attr]
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                out.extend(chunk)
                pending += chunk
                if PROMPT in pending:
                    prompt.set()
                    pending = pending[pending.rindex(PROMPT) + len(PROMPT):]
                *lines, rest = pending.split(b"\n")
                for line in lines:
                    log(line.decode(errors="replace"))
                pending = rest
            prompt.set()

        def typist() -> None:
            try:
                for command, wait in script:
                    while not prompt.wait(0.2):
                        if proc.poll() is not None:
                            return
                    prompt.clear()
                    if proc.poll() is not None:
                        return
                    log(f"testpmd> {command}")
                    proc.stdin.write(command.encode() + b"\n")  # type: ignore[union-attr]
                    proc.stdin.flush()  # type: ignore[union-attr]
                    time.sleep(wait)
                    if kill_after is not None and command == kill_after:
                        os.killpg(proc.pid, signal.SIGKILL)
                        return
            except OSError:
                pass
            finally:
                done_typing.set()

        reader = threading.Thread(target=pump, daemon=True)
        typer = threading.Thread(target=typist, daemon=True)
        reader.start()
        typer.start()
        deadline = t0 + timeout

        def finished() -> bool:
            for st in daemon.states.values():
                mm = st.task.mm
                peak[0] = max(peak[0], mm.locked_vm * mm.page_size)
                peak[1] = max(peak[1], mm.pinned_vm * mm.page_size)
            if proc.poll() is None and time.monotonic() > deadline and not timed_out[0]:
                timed_out[0] = True
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.poll() is not None and not daemon.states

        mms: list[AddressSpace] = []

        def remember_mms() -> bool:
            mms.extend(st.task.mm for st in daemon.states.values() if st.task.mm not in mms)
            return finished()

        daemon.serve(until=remember_mms, poll=0.1)
        rc = proc.wait()
        reader.join(5)
        typer.join(5)
    after = leftovers(machine, mms, root)
    text = out.decode(errors="replace")
    return Run(argv, rc, text, time.monotonic() - t0, machine, parse_port_stats(text), timed_out[0],
               peak[0], peak[1], after)


def leftovers(machine: Any, mms: list[Any], root: str) -> dict[str, Any]:
    """What testpmd left behind once it was gone: tasks, pins, locked memory
    of its mm (its VmLck and VmPin), open groups, the daemon's files."""
    k = machine.kernel
    groups_open = [g.id for g in k.vfio.groups.values() if g.opened_file is not None or g.container is not None]
    return {"tasks": len(k.tasks), "pinned_pages": machine.pinned_pages(),
            "locked_bytes": sum(mm.locked_vm * mm.page_size for mm in mms),
            "pinned_bytes": sum(mm.pinned_vm * mm.page_size for mm in mms),
            "groups_open": groups_open, "daemon_files": os.path.exists(root), "oopses": list(machine.oopses)}


def clean(after: dict[str, Any]) -> bool:
    return (after["tasks"] == 0 and after["pinned_pages"] == 0 and after["locked_bytes"] == 0
            and after["pinned_bytes"] == 0 and not after["groups_open"] and not after["daemon_files"]
            and not after["oopses"])


# -- the frames -------------------------------------------------------------------------------------------------


def ipv4_checksum(header: bytes) -> int:
    total = sum(int.from_bytes(header[i:i + 2], "big") for i in range(0, len(header), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def describe_frame(f: bytes) -> str:
    """What testpmd's txonly engine builds: Ethernet, IPv4 (checksum), UDP."""
    if len(f) < 14:
        return f"runt ({len(f)} bytes)"
    ethertype = int.from_bytes(f[12:14], "big")
    if ethertype != 0x0800 or len(f) < 34:
        return f"EtherType {ethertype:#06x}, {len(f)} bytes"
    ihl = (f[14] & 0xF) * 4
    ip = f[14:14 + ihl]
    proto = {17: "UDP", 6: "TCP"}.get(ip[9], f"IP protocol {ip[9]}")
    ok = "valid" if ipv4_checksum(ip) == 0 else "WRONG"
    src, dst = ".".join(map(str, ip[12:16])), ".".join(map(str, ip[16:20]))
    return f"Ethernet IPv4 {proto} {src} -> {dst}, {len(f)} bytes, IPv4 header checksum {ok}"


# -- the demo ---------------------------------------------------------------------------------------------------


def demo_script(seconds: float) -> list[tuple[str, float]]:
    return [("start tx_first", 1.0), ("show port stats all", seconds), ("show port stats all", 0.0),
            ("stop", 0.0), ("set fwd rxonly", 0.0), ("start", 0.5), ("stop", 0.0),
            ("show port stats all", 0.0), ("quit", 0.0)]


@dataclass
class DemoResult:
    ok: bool
    reason: str
    run: Run
    bdf: str
    prereq: Prerequisites
    host: HostConversation
    trace: str
    checks: list[tuple[bool, str]]
    frames: dict[str, Any]
    nic: dict[str, int]

    @property
    def pps(self) -> int:
        return self.run.stats[1].rx_pps if len(self.run.stats) >= 2 else 0

    @property
    def final(self) -> Any:
        return self.run.stats[-1] if self.run.stats else None


def cache_dir() -> Path:
    return user_cache("dpdk")


def run_demo(*, machine: str = "powernv", seconds: float = SECONDS, install: bool = True, trace: str | None = None,
             workdir: str | None = None, timeout: float = TIMEOUT, log: Log = _quiet,
             memory_mb: int = MEMORY_MB) -> DemoResult:
    """Run the demo; raises DpdkDemoUnavailable when it cannot run here."""
    check_memory(memory_mb)
    m, bdf = load_machine(machine)
    check_memlock(memory_mb, spapr=m.platform in POWER_PLATFORMS)
    prereq = check_prerequisites(install=install, log=log)
    work = Path(workdir) if workdir else cache_dir() / "last-run"
    work.mkdir(parents=True, exist_ok=True)
    trace = trace or str(work / "vfio-trace.jsonl")
    if os.path.exists(trace):
        os.unlink(trace)
    argv = testpmd_argv(prereq.testpmd, bdf=bdf, memory_mb=memory_mb)
    log("$ vfiosim run --machine " + machine + " --trace " + trace + " -- " + " ".join(argv))
    run = run_testpmd(m, argv, demo_script(seconds), trace=trace, timeout=timeout, log=log)
    (work / "testpmd.log").write_text(run.output)
    host = summarize_trace(trace)
    nic = m.device(bdf)
    stats = dict(nic.snapshot())
    backend = nic.backend
    frames: dict[str, Any] = dict(backend.stats())
    new_frames = getattr(backend, "new_frames", [])
    frames["kinds"] = sorted({describe_frame(f) for f in new_frames})
    checks: list[tuple[bool, str]] = []

    def check(cond: bool, text: str) -> None:
        checks.append((bool(cond), text))

    final = run.stats[-1] if run.stats else PortStats()
    check(run.exit_status == 0 and not run.timed_out,
          "testpmd exited normally" if run.exit_status == 0 else
          f"testpmd {'timed out' if run.timed_out else f'exited with status {run.exit_status}'}")
    check(len(run.stats) >= 3, f"testpmd printed its port statistics ({len(run.stats)} times)")
    check(final.tx_packets > 0 and final.rx_packets == final.tx_packets,
          f"RX = TX: {final.rx_packets} frames received, {final.tx_packets} sent")
    check(final.rx_errors == final.tx_errors == final.rx_missed == final.rx_nombuf == 0,
          f"no errors (RX-errors {final.rx_errors}, RX-missed {final.rx_missed}, RX-nombuf {final.rx_nombuf}, "
          f"TX-errors {final.tx_errors})")
    check(stats.get("tx_frames") == final.tx_packets and stats.get("rx_frames") == final.rx_packets,
          f"the NIC moved the same frames: {stats.get('tx_frames')} sent by the driver, {stats.get('rx_frames')} "
          f"delivered to it")
    if "returned" in frames:
        check(frames["new"] > 0 and frames["returned"] == frames["sent"] - frames["new"],
              f"end to end: {frames['returned']} frames came back byte for byte as the NIC had delivered them; "
              f"{frames['new']} new (testpmd's first burst)")
        check(frames["new"] <= 512 and all("checksum valid" in k for k in frames["kinds"]),
              f"the first burst is well formed: {'; '.join(frames['kinds']) or 'nothing'}")
    check(not stats.get("broken") and not nic.errors, "the NIC reported no device error" if not nic.errors
          else f"the NIC reported: {nic.errors[0]}")
    check(clean(run.after), "nothing left once testpmd exited: " + describe_after(run))
    ok = all(c for c, _ in checks)
    failed = [t for c, t in checks if not c]
    reason = (f"testpmd forwarded {final.tx_packets} frames through the virtio-net NIC and its IOMMU, "
              f"and got every one back" if ok else failed[0])
    return DemoResult(ok, reason, run, bdf, prereq, host, trace, checks, frames, stats)


def describe_after(run: Run) -> str:
    a = run.after
    return (f"{a['tasks']} tasks, {a['pinned_pages']} pinned pages, VmLck {a['locked_bytes'] >> 10} kB and "
            f"VmPin {a['pinned_bytes'] >> 10} kB (peak {run.peak_locked >> 10} kB and {run.peak_pinned >> 10} kB), "
            f"{len(a['groups_open'])} groups open, daemon files {'left' if a['daemon_files'] else 'gone'}")


def _mib(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} bytes"


def report(r: DemoResult, out: IO[str]) -> None:
    p = out.write
    m = r.run.machine
    p(f"vfiosim dpdk-demo: {'PASS' if r.ok else 'FAIL'} in {r.run.seconds:.1f} s: {r.reason}\n")
    p(f"  host:  vfiosim {m.name} ({m.platform}, {m.page_size // 1024} KiB pages), NIC {r.bdf} virtio-net "
      f"1af4:1041, {getattr(m.device(r.bdf).backend, 'name', '?')} backend\n")
    p(f"  DPDK:  {r.prereq.version}, unmodified; PMD net_virtio\n")
    p(f"  $ vfiosim run -- {' '.join(r.run.argv)}\n")
    st = r.run.stats
    if len(st) >= 2:
        p(f"\nForwarding rate: {st[1].rx_pps} frames/s received and {st[1].tx_pps} sent (testpmd's Rx-pps/Tx-pps "
          f"over the measured interval)\n")
    if st:
        f = st[-1]
        p("\ntestpmd> show port stats all   (after the frames in flight were received)\n")
        p(f"  RX-packets: {f.rx_packets}  RX-missed: {f.rx_missed}  RX-bytes: {f.rx_bytes}\n")
        p(f"  RX-errors: {f.rx_errors}  RX-nombuf: {f.rx_nombuf}\n")
        p(f"  TX-packets: {f.tx_packets}  TX-errors: {f.tx_errors}  TX-bytes: {f.tx_bytes}\n")
    fr = r.frames
    if "returned" in fr:
        p("\nThe frames, end to end (the NIC's loopback compares each frame testpmd sends with those it delivered):\n")
        p(f"  {fr['new']} new frames (testpmd's tx_first burst): {'; '.join(fr['kinds'])}\n")
        p(f"  {fr['returned']} frames sent back byte for byte as delivered; {fr['sent']} sent, {fr['received']} "
          f"received, {fr['dropped']} dropped\n")
    n = r.nic
    p(f"  the NIC: {n.get('notifications')} queue notifications (BAR stores), {n.get('interrupts')} interrupts, "
      f"{n.get('ctrl_commands')} control commands\n")
    h = r.host
    p("\nThe VFIO conversation (vfiosim's trace, condensed):\n")
    tried = [f for f in h.failures if f.startswith("VFIO_SET_IOMMU")]
    p(f"  IOMMU type: {iommu_type_name(h.iommu_type)}" + (f" (refused first: {'; '.join(tried)})" if tried else "")
      + "\n")
    if h.default_window is not None:
        p(f"  default DMA window {h.default_window[0]:#x}+{h.default_window[1]:#x} "
          f"({_mib(h.default_window[1])}), removed: {', '.join(h.removed_windows) or 'no'}\n")
    for w in h.windows:
        size = int(w.split("+")[1].split()[0], 16)
        p(f"  window created: {w} = {_mib(size)}\n")
    for start, size, calls in h.registered_runs:
        p(f"  memory registered: {start:#x}+{size:#x} ({_mib(size)}) in {calls} VFIO_IOMMU_SPAPR_REGISTER_MEMORY\n")
    maps = h.ioctls["VFIO_IOMMU_MAP_DMA"]
    p(f"  VFIO_IOMMU_MAP_DMA: {maps} call{'s' if maps != 1 else ''}, {_mib(h.map_bytes)}; "
      f"VFIO_IOMMU_UNMAP_DMA: {h.ioctls['VFIO_IOMMU_UNMAP_DMA']}\n")
    p(f"  device: {h.config_rw} config space reads/writes, {h.mmio} BAR loads/stores through the mapping, "
      f"{h.ioctls['VFIO_DEVICE_SET_IRQS']} VFIO_DEVICE_SET_IRQS, {h.ioctls['VFIO_DEVICE_RESET']} VFIO_DEVICE_RESET\n")
    if h.failures:
        p("  calls that failed, as on Linux:\n")
        for failure in h.failures:
            p(f"    {failure}\n")
    p("\nChecks:\n")
    for ok, text in r.checks:
        p(f"  [{'ok' if ok else 'FAIL'}] {text}\n")
    p(f"\nFiles: {r.trace} (vfiosim trace summary/show), {Path(r.trace).parent / 'testpmd.log'}\n")
