"""``vfiosim qemu-demo``: an unmodified QEMU pseries guest DMAs through a vfiosim device.

The host is vfiosim's PowerNV machine (``Machine.default()``, 4 KiB pages);
``qemu-system-ppc64 -M pseries`` (TCG) runs under the ``vfiosim run`` transport
with ``-device vfio-pci,host=0000:01:00.0``.  Inside the guest, the program of
``guest/edu_vfio_guest.c`` makes the edu device DMA through the guest's own
VFIO (docs/qemu.md walks through it).  Three records come out of a run:

* the guest console (``vfiosim-guest:`` lines, the PASS/FAIL verdict);
* QEMU's own trace of the guest's TCE hypercalls (``-trace spapr_iommu_pci_*``);
* vfiosim's trace of the host-side VFIO conversation (``--trace`` JSON lines).

``run_demo`` puts them side by side: how many host ioctls each guest TCE update
and each hypercall cost.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable

from ..transport.summary import HostConversation, summarize_trace
from .image import GuestImage, Prerequisites, QemuDemoUnavailable, build_image, cache_dir, check_prerequisites

HOST_BDF = "0000:01:00.0"
# The PHB keeps QEMU's default DMA window (1 GiB). Every full clear of the guest's TCE
# table costs one host ioctl per 4 KiB entry: about a million per run (docs/qemu.md, "Costs").
QEMU_DEFAULT_WINDOW = 1 << 30
GUEST_RAM = "512M"
DISK_SIZE = 1 << 20
TIMEOUT = 900.0
MARK = "vfiosim-guest:"

QEMU_TRACE_EVENTS = ["spapr_iommu_pci_*", "spapr_iommu_ddw_*", "vfio_spapr_*", "vfio_prereg_*",
                     "vfio_listener_region_add_iommu", "vfio_listener_region_del"]


def qemu_argv(qemu: str, image: GuestImage, console: str, qemu_trace: str, *,
              ram: str = GUEST_RAM, disk: str | None = None,
              no_mmap: bool = False, guest_iommu: str = "auto", extra: Iterable[str] = ()) -> list[str]:
    """The QEMU command line: pseries, TCG, one CPU, the host's edu passed through;
    with ``disk``, also a virtio-blk disk on the same PHB whose driver uses the DMA API
    (VIRTIO_F_ACCESS_PLATFORM), so the guest kernel's own TCE hypercalls show too."""
    argv = [qemu,
            "-M", "pseries,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,cap-ccf-assist=off",
            "-accel", "tcg", "-smp", "1", "-m", ram,
            "-display", "none", "-nodefaults", "-monitor", "none", "-no-reboot",
            "-serial", f"file:{console}",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            # The guest stalls while QEMU relays a whole-table clear, one ioctl per TCE:
            # its lockup and RCU stall detectors would only report that.
            "-append", "console=hvc0 quiet panic=-1 nowatchdog rcupdate.rcu_cpu_stall_suppress=1",
            "-device", f"vfio-pci,host={HOST_BDF}" + (",x-no-mmap=true" if no_mmap else "")]
    if guest_iommu != "auto":
        argv[argv.index("-append") + 1] += f" vfiosim.iommu={guest_iommu}"
    if disk:
        argv[argv.index("-append") + 1] += " vfiosim.mode=dma-api"
        argv += ["-drive", f"if=none,id=vd0,format=raw,readonly=on,file={disk}",
                 "-device", "virtio-blk-pci,drive=vd0,disable-legacy=on,iommu_platform=on"]
    for ev in QEMU_TRACE_EVENTS:
        argv += ["-trace", ev]
    argv += ["-D", qemu_trace, *extra]
    return argv


# -- the run ----------------------------------------------------------------------------------------------

def _ram_bytes(ram: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(ram[:-1]) * units[ram[-1].upper()] if ram[-1:].upper() in units else int(ram)


def memlock_needed(ram: str = GUEST_RAM) -> int:
    """What QEMU locks on the host: all guest RAM (VFIO_IOMMU_SPAPR_REGISTER_MEMORY
    charges it to locked_vm) and the TCE tables of its windows (a little slack)."""
    return _ram_bytes(ram) + (16 << 20)


def check_memlock(ram: str = GUEST_RAM) -> None:
    """As on a real host, QEMU without CAP_IPC_LOCK needs RLIMIT_MEMLOCK for all guest
    RAM; the simulated kernel enforces it (ENOMEM).  Root needs nothing; otherwise the
    hard limit must allow it (the soft one is raised for QEMU)."""
    import resource
    if os.geteuid() == 0:
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    need = memlock_needed(ram)
    if hard != resource.RLIM_INFINITY and hard < need:
        raise QemuDemoUnavailable(
            f"QEMU must lock all {ram} of guest RAM for VFIO (VFIO_IOMMU_SPAPR_REGISTER_MEMORY), as on a real "
            f"host, and RLIMIT_MEMLOCK allows {hard >> 10} KiB (needed: {need >> 10} KiB): run as root, or raise "
            f"the limit (`ulimit -l {need >> 10}` in a shell whose hard limit allows it)")


def _raise_memlock() -> None:
    import resource
    _soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
    except (ValueError, OSError):
        pass


def demo_machine() -> "Any":
    """The PowerNV machine (see preset_machine)."""
    return preset_machine("powernv", HOST_BDF)


def preset_machine(preset: str, bdf: str) -> "Any":
    """A preset machine.  For a user other than root, the group of ``bdf`` belongs to
    that user, as an administrator (or libvirt) would chown it for the user that runs
    QEMU."""
    from ..machine import Machine
    if os.geteuid() == 0:
        return Machine.preset(preset)
    import tempfile
    from importlib import resources
    text = resources.files("vfiosim").joinpath(f"presets/{preset}.toml").read_text()
    line = f'bdf = "{bdf}"'
    if line not in text:
        return Machine.preset(preset)
    text = text.replace(line, f"{line}\ngroup_uid = {os.geteuid()}\ngroup_gid = {os.getegid()}", 1)
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        return Machine.from_file(f.name)
    finally:
        os.unlink(f.name)


def run_under_vfiosim(argv: list[str], trace: str, *, timeout: float = TIMEOUT,
                      on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
                      stderr: IO[str] | None = None, machine: "Any" = None) -> tuple[int, "Any"]:
    """Run ``argv`` as ``vfiosim run --trace TRACE`` does, on ``machine`` (default:
    the PowerNV machine), with a time limit.  Returns (exit status, machine)."""
    from ..transport.run import private_daemon

    err = stderr or sys.stderr
    machine = machine if machine is not None else demo_machine()
    timed_out: list[bool] = []
    with private_daemon(machine, trace, err) as (daemon, env):
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_raise_memlock)
        if on_start is not None:
            on_start(proc)
        out_lines: list[str] = []

        def pump() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                out_lines.append(line)
                print(f"qemu: {line}", file=err, flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout

        def done() -> bool:
            if proc.poll() is None and time.monotonic() > deadline and not timed_out:
                timed_out.append(True)
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.poll() is not None and not daemon.states

        daemon.serve(until=done)
        rc = proc.wait()
        reader.join(5)
    machine.qemu_output = out_lines
    machine.timed_out = bool(timed_out)
    return rc, machine


# -- reading the records -----------------------------------------------------------------------------------

@dataclass
class Hcalls:
    """The guest's TCE hypercalls as QEMU traced them (PCI LIOBNs only)."""
    put: int = 0                      # H_PUT_TCE
    get: int = 0                      # H_GET_TCE (no TCE changes)
    stuff_calls: int = 0              # H_STUFF_TCE
    stuff_tces: int = 0
    indirect_calls: int = 0           # H_PUT_TCE_INDIRECT
    indirect_tces: int = 0
    ddw: collections.Counter[str] = field(default_factory=collections.Counter)   # RTAS DDW calls

    @property
    def calls(self) -> int:
        return self.put + self.stuff_calls + self.indirect_calls

    @property
    def tces(self) -> int:
        return self.put + self.stuff_tces + self.indirect_tces


_EVENT = re.compile(r"^(?:\d+@[\d.]+:)?(\w+)\s*(.*)$")


def _fields(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"(\w+)=(\S+)", text)}


def parse_qemu_trace(path: str) -> Hcalls:
    h = Hcalls()
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return h
    for line in lines:
        m = _EVENT.match(line.strip())
        if not m:
            continue
        ev, rest = m.groups()
        f = _fields(rest)
        if ev == "spapr_iommu_pci_put":
            h.put += 1
        elif ev == "spapr_iommu_pci_get":
            h.get += 1
        elif ev == "spapr_iommu_pci_stuff":
            h.stuff_calls += 1
            h.stuff_tces += int(f.get("npages", "0"), 0)
        elif ev == "spapr_iommu_pci_indirect":
            # QEMU traces the index of the last entry it wrote (iobaN) and the result.
            h.indirect_calls += 1
            if f.get("ret", "0") == "0":
                h.indirect_tces += int(f.get("iobaN", "0"), 0) + 1
        elif ev.startswith("spapr_iommu_ddw_"):
            h.ddw[ev[len("spapr_iommu_ddw_"):]] += 1
    return h


@dataclass
class DemoResult:
    ok: bool
    reason: str
    seconds: float
    guest: list[str]
    verdict: str
    hcalls: Hcalls
    host: HostConversation
    trace: str
    qemu_trace: str
    console: str
    image: GuestImage | None = None
    prereq: Prerequisites | None = None
    exit_status: int = 0
    dmesg: list[str] = field(default_factory=list)
    edu: dict[str, int] = field(default_factory=dict)      # the host edu's registers and DMA count at the end
    oopses: list[str] = field(default_factory=list)

    def verdict_fields(self) -> dict[str, str]:
        return dict(re.findall(r"(\w+)=(\S+)", self.verdict))


def _guest_lines(console: str) -> list[str]:
    try:
        text = Path(console).read_text(errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        at = line.find(MARK)
        if at >= 0:
            out.append(line[at:].rstrip())
    return out


def run_demo(*, trace: str | None = None, workdir: str | None = None, install: bool = True,
             timeout: float = TIMEOUT, log: Callable[[str], None] | None = None,
             dma_api: bool = False, no_mmap: bool = False,
             guest_iommu: str = "auto") -> DemoResult:
    """Build (once) and boot the guest under vfiosim; raises QemuDemoUnavailable
    when the tools or packages cannot be had here.

    ``dma_api``: instead of the guest's VFIO test, a virtio-blk disk on the same PHB
    is read by the guest kernel, whose DMA API maps its buffers with H_PUT_TCE_INDIRECT.
    (Not both in one boot: the disk's 64-bit DMA mask makes Linux 6.12 try a dynamic DMA
    window for the PHB, and once that failed it refuses VFIO windows there, ENODEV.)
    ``no_mmap``: QEMU does not map BAR0 (``x-no-mmap=true``) and reaches it with
    pread/pwrite on the device fd instead.
    ``guest_iommu``: "v1" or "v2" makes the guest program use that sPAPR IOMMU type
    (default: v2 when the guest kernel offers it, as QEMU chooses on the host)."""
    say = log or (lambda text: None)
    check_memlock()
    prereq = check_prerequisites(install=install, log=say)
    image = build_image(install=install, log=say, prereq=prereq)
    # The traces of a run are large (a JSON line per host ioctl): by default the last
    # run's are kept in the cache and replaced by the next run's.
    work = workdir or str(cache_dir() / "last-run")
    os.makedirs(work, exist_ok=True)
    trace = trace or os.path.join(work, "vfio-trace.jsonl")
    console = os.path.join(work, "console.log")
    qemu_trace = os.path.join(work, "qemu-trace.log")
    for p in (trace, console, qemu_trace):
        if os.path.exists(p):
            os.unlink(p)
    disk = None
    if dma_api:
        disk = os.path.join(work, "disk.img")
        with open(disk, "wb") as f:
            f.write(os.urandom(DISK_SIZE))
    argv = qemu_argv(prereq.qemu, image, console, qemu_trace, disk=disk, no_mmap=no_mmap,
                     guest_iommu=guest_iommu)
    say("$ vfiosim run --trace " + trace + " -- " + " ".join(argv[:1] + [a if " " not in a else repr(a) for a in argv[1:]]))
    t0 = time.monotonic()
    stop = threading.Event()
    tail = threading.Thread(target=_tail_console, args=(console, say, stop), daemon=True)
    tail.start()
    try:
        rc, machine = run_under_vfiosim(argv, trace, timeout=timeout, stderr=_LogStream(say))  # type: ignore[arg-type]
    finally:
        stop.set()
        tail.join(5)
    seconds = time.monotonic() - t0
    guest = _guest_lines(console)
    verdict = next((line for line in reversed(guest) if line.startswith(f"{MARK} PASS")
                    or line.startswith(f"{MARK} FAIL")), "")
    hcalls = parse_qemu_trace(qemu_trace)
    host = summarize_trace(trace)
    ok = verdict.startswith(f"{MARK} PASS") and rc == 0 and not machine.oopses
    if ok and dma_api:
        reason = "the guest kernel's DMA API mapped the disk's buffers into the PHB's TCE table, relayed to vfiosim"
    elif ok:
        reason = "the guest's edu DMA, INTx and MSI went through its VFIO, QEMU and vfiosim"
    elif machine.timed_out:
        reason = f"QEMU did not finish within {timeout:.0f} s"
    elif machine.oopses:
        reason = f"vfiosim reported {len(machine.oopses)} internal error(s): {machine.oopses[0].splitlines()[0]}"
    elif verdict:
        reason = verdict[len(MARK):].strip()
    else:
        last = [line for line in machine.qemu_output if line.strip()][-3:]
        reason = f"QEMU exited with status {rc} before the guest test reported" + (f": {' | '.join(last)}" if last else "")
    edu = machine.device(HOST_BDF)
    return DemoResult(ok, reason, seconds, guest, verdict, hcalls, host, trace, qemu_trace, console, image, prereq,
                      rc, machine.dmesg()[-20:], dict(edu.snapshot()), list(machine.oopses))


def _tail_console(console: str, say: Callable[[str], None], stop: threading.Event) -> None:
    """Pass the guest's ``vfiosim-guest:`` lines on as they appear."""
    pos = 0
    pending = ""
    while True:
        finished = stop.wait(0.5)
        try:
            with open(console, "rb") as f:
                f.seek(pos)
                chunk = f.read()
        except OSError:
            chunk = b""
        pos += len(chunk)
        pending += chunk.decode(errors="replace")
        *lines, pending = pending.split("\n")
        for line in lines:
            at = line.find(MARK)
            if at >= 0:
                say(line[at:].rstrip())
        if finished:
            return


class _LogStream:
    """A file-like object for the daemon's messages and QEMU's output."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say

    def write(self, text: str) -> int:
        for line in text.rstrip("\n").splitlines():
            self.say(line)
        return len(text)

    def flush(self) -> None:
        pass


# -- the report --------------------------------------------------------------------------------------------

def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}" if b else "-"


def host_ioctl_rate(r: Any) -> str:
    """How fast the host side went: QEMU's ioctls per second of the whole run
    (boot and guest included), what the demo's time is mostly made of."""
    n = sum(r.host.ioctls.values())
    rate = n / r.seconds if r.seconds > 0 else 0.0
    return f"{n:,} in {r.seconds:.1f} s, {rate:,.0f} per second"


def report_counts(r: Any, out: IO[str]) -> None:
    """The host calls by kind, and their rate (``r``: a demo's result, either platform's)."""
    p, h = out.write, r.host
    p("\nCounts:\n")
    for cmd, n in sorted(h.ioctls.items(), key=lambda kv: -kv[1]):
        p(f"  {n:9d}  {cmd}\n")
    p(f"  {h.config_rw:9d}  config space pread/pwrite\n  {h.bar_rw:9d}  BAR pread/pwrite\n"
      f"  {h.mmio:9d}  BAR loads/stores (mmio)\n")
    p(f"  host ioctls: {host_ioctl_rate(r)}\n")


def report(r: DemoResult, out: IO[str], *, brief: bool = False) -> None:
    """The demo's summary; ``brief`` leaves out the condensed host conversation."""
    p = out.write
    status = "PASS" if r.ok else "FAIL"
    p(f"vfiosim qemu-demo: {status} in {r.seconds:.1f} s: {r.reason}\n")
    if r.prereq and r.image:
        p(f"  host:  vfiosim PowerNV (POWER9, PHB4, 4 KiB pages), {r.prereq.qemu_version}, "
          f"-M pseries (TCG) -device vfio-pci,host={HOST_BDF}\n")
        p(f"  guest: {r.image.kernel_package}, {r.image.busybox_package}; modules {' '.join(r.image.modules)}\n")
    p("\nInside the guest:\n")
    for line in r.guest:
        p(f"  {line}\n")
    if r.edu:
        p(f"\nOn the host, vfiosim's edu {HOST_BDF} completed {r.edu.get('dma_count', 0)} DMA transfers "
          f"(the guest started them; each crossed the host TCE table into QEMU's memory).\n")
    h = r.host
    if not brief:
        p("\nThe host-side VFIO conversation QEMU had (vfiosim's trace, condensed):\n")
        for step in h.steps:
            p(f"  {step}\n")
    report_counts(r, out)
    if h.windows:
        p(f"  DMA windows created: {'; '.join(h.windows)}\n")
    if h.registered:
        p(f"  memory registered: {'; '.join(h.registered)}\n")
    c = r.hcalls
    per_page = h.page_maps + h.page_unmaps
    p("\nThe guest's TCE hypercalls (QEMU's trace) and the host ioctls they became:\n")
    p(f"  {'hypercall':<20}{'calls':>9}{'TCEs':>10}{'ioctls/call':>13}\n")
    for name, calls, tces in (("H_PUT_TCE", c.put, c.put), ("H_STUFF_TCE", c.stuff_calls, c.stuff_tces),
                              ("H_PUT_TCE_INDIRECT", c.indirect_calls, c.indirect_tces)):
        p(f"  {name:<20}{calls:>9}{tces:>10}{_ratio(tces, calls):>13}\n")
    p(f"  {'H_GET_TCE':<20}{c.get:>9}{'-':>10}{'0':>13}   (a read: no ioctl)\n")
    if c.ddw:
        p(f"  RTAS DDW calls: {', '.join(f'{k} {v}' for k, v in sorted(c.ddw.items()))}\n")
    p(f"  host MAP_DMA/UNMAP_DMA of one page: {per_page} ({h.page_maps} maps, {h.page_unmaps} unmaps) for "
      f"{c.tces} guest TCE updates: {_ratio(per_page, c.tces)} ioctl per TCE, so ioctls/call above is TCEs/call\n")
    p(f"  whole-window UNMAP_DMA (QEMU dropping a window): {h.window_unmaps}\n")
    if h.failures:
        p("\nHost calls that failed (as they would on Linux):\n")
        for f in h.failures:
            p(f"  {f}\n")
    p(f"\nFiles: {r.trace} (vfiosim trace show), {r.qemu_trace} (QEMU's trace), {r.console} (guest console)\n")
