"""``vfiosim qemu-demo --platform x86``: QEMU as a VFIO client on the x86 machine.

Debian's ``qemu-system-x86_64`` (unmodified, TCG) runs a q35 guest with an emulated
VT-d in caching mode, the device assignment set-up QEMU documents for a vIOMMU,
under ``vfiosim run`` on the x86 preset.  Its ``-device vfio-pci`` is that
machine's edu (0000:01:00.0): QEMU opens the group and a Type1v2 container, maps
all guest RAM while the guest has not enabled DMA remapping, then, once the guest's
intel-iommu driver has, relays each mapping the guest's IOMMU gets as a host
``VFIO_IOMMU_MAP_DMA``/``UNMAP_DMA`` (its IOMMU notifier, caching mode).  Inside
the guest, Debian's Linux binds the device to its own vfio-pci and
``type1_edu_dma`` (the x86 recording image's scenario) makes it DMA through the
guest's Type1 container: guest IOVA -> vIOMMU -> host IOVA -> vfiosim's VT-d ->
QEMU's memory.  A second, emulated edu stays in the guest (QEMU's own), where the
recording guest has its pair.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

from ..transport.summary import HostConversation, summarize_trace
from .demo import TIMEOUT, check_memlock, preset_machine, report_counts, run_under_vfiosim
from .image import cache_dir
from .record import PLATFORMS, RecordImage, build_record_image, check_tools

HOST_BDF = "0000:01:00.0"        # the x86 preset's first edu (IOMMU group 4)
GUEST_BDF = "0000:02:00.0"       # where it appears in the guest: behind the second root port
MARK = "vfiosim-guest:"
SCENARIO = "type1_edu_dma"


def _platform() -> Any:
    """The x86 recording guest with one scenario: type1_edu_dma on the assigned device."""
    x86 = PLATFORMS["x86"]
    scenario = next(s for s in x86.scenarios if s.name == SCENARIO)
    assert GUEST_BDF in scenario.command
    return dataclasses.replace(x86, name="x86-vfio-client", scenarios=(scenario,))


def qemu_argv(p: Any, img: RecordImage, console: str, traces: str) -> list[str]:
    """The recording guest's command line with its second edu replaced by the host's."""
    args = p.qemu_args()
    at = args.index("edu,bus=rp2")
    args[at] = f"vfio-pci,host={HOST_BDF},bus=rp2"
    return [p.qemu, *args, "-accel", "tcg", "-smp", "1", "-m", p.memory, "-display", "none", "-nodefaults",
            "-monitor", "none", "-no-reboot", *p.serial_args(console, traces),
            "-kernel", str(img.kernel), "-initrd", str(img.initrd), "-append", p.append]


@dataclass
class X86DemoResult:
    ok: bool
    reason: str
    seconds: float
    guest: list[str]
    host: HostConversation
    trace: str
    console: str
    image: RecordImage | None
    rc: int
    dmesg: list[str] = field(default_factory=list)
    edu: dict[str, Any] = field(default_factory=dict)
    oopses: list[str] = field(default_factory=list)
    pinned_after: int = 0             # pages still pinned once QEMU is gone (0: nothing leaked)


def _guest_lines(console: str) -> list[str]:
    try:
        text = Path(console).read_text(errors="replace")
    except OSError:
        return []
    return [line[line.index(MARK):].rstrip() for line in text.splitlines()
            if MARK in line and "dmesg:" not in line]


def run_x86_demo(*, trace: str | None = None, workdir: str | None = None, install: bool = True,
                 timeout: float = TIMEOUT, log: Callable[[str], None] | None = None) -> X86DemoResult:
    """Build (once) and boot the guest under vfiosim's x86 machine; raises
    QemuDemoUnavailable when the tools or packages cannot be had here."""
    say = log or (lambda text: None)
    p = _platform()
    check_memlock(p.memory)
    check_tools(p, install=install, log=say)
    img = build_record_image(p, log=say)
    work = workdir or str(cache_dir() / "last-run-x86")
    os.makedirs(work, exist_ok=True)
    trace = trace or os.path.join(work, "vfio-trace.jsonl")
    console, traces = os.path.join(work, "console.log"), os.path.join(work, "guest-traces.out")
    for f in (trace, console, traces):
        if os.path.exists(f):
            os.unlink(f)
    argv = qemu_argv(p, img, console, traces)
    say("$ vfiosim run --machine x86 --trace " + trace + " -- " + " ".join(argv))
    t0 = time.monotonic()
    machine = preset_machine("x86", HOST_BDF)
    rc, machine = run_under_vfiosim(argv, trace, timeout=timeout, machine=machine)
    seconds = time.monotonic() - t0
    guest = _guest_lines(console)
    host = summarize_trace(trace)
    verified = any("DMA round trip" in line and "verified" in line for line in guest)
    passed = any(line == f"{MARK} scenario {SCENARIO} exit 0" for line in guest)
    edu = dict(machine.device(HOST_BDF).snapshot())
    pinned = machine.pinned_pages()
    ok = verified and passed and rc == 0 and not machine.oopses and not pinned and edu.get("dma_count", 0) > 0
    if machine.oopses:
        reason = f"vfiosim reported {len(machine.oopses)} internal error(s): {machine.oopses[0].splitlines()[0]}"
    elif machine.timed_out:
        reason = f"QEMU did not finish within {timeout:.0f} s"
    elif pinned:
        reason = f"{pinned} pages were still pinned after QEMU exited"
    elif ok:
        reason = ("the guest's edu DMA went through its own VFIO and vIOMMU, QEMU's Type1 container and "
                  "vfiosim's VT-d")
    elif not guest:
        last = [line for line in machine.qemu_output if line.strip()][-3:]
        reason = f"QEMU exited with status {rc} before the guest reported" + (f": {' | '.join(last)}" if last else "")
    else:
        reason = f"the guest's {SCENARIO} did not verify its DMA round trip"
    return X86DemoResult(ok, reason, seconds, guest, host, trace, console, img, rc,
                         machine.dmesg()[-20:], edu, list(machine.oopses), pinned)


def report_x86(r: X86DemoResult, out: IO[str]) -> None:
    p = out.write
    p(f"vfiosim qemu-demo --platform x86: {'PASS' if r.ok else 'FAIL'} in {r.seconds:.1f} s: {r.reason}\n")
    p(f"  host:  vfiosim x86 (q35, Intel VT-d), -M q35 -device intel-iommu,caching-mode=on (TCG) "
      f"-device vfio-pci,host={HOST_BDF}\n")
    if r.image is not None:
        p(f"  guest: {r.image.kernel_package}, the guest's own vfio-pci and Type1 on its vIOMMU\n")
    p("\nInside the guest:\n")
    for line in r.guest:
        p(f"  {line}\n")
    h = r.host
    p(f"\nOn the host, vfiosim's edu {HOST_BDF} completed {r.edu.get('dma_count', 0)} DMA transfers "
      f"(each crossed vfiosim's VT-d into QEMU's memory); pages pinned after QEMU exited: {r.pinned_after}.\n")
    report_counts(r, out)
    p(f"  bytes mapped by VFIO_IOMMU_MAP_DMA: {h.map_bytes:,}\n")
    if h.failures:
        p("\nHost calls that failed (as they would on Linux):\n")
        for f in h.failures:
            p(f"  {f}\n")
    p(f"\nFiles: {r.trace} (vfiosim trace show), {r.console} (guest console)\n")
