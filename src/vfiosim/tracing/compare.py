"""One step of a trace against another: what differs, and what the difference means.

Used by ``vfiosim replay`` (the recording against the simulator's answer to the same
call) and ``vfiosim trace diff`` (two recordings).  A difference is labelled:

* ``kernel``: the two kernels answered differently: a fidelity bug, or a real
  difference between two kernel versions.  Only these count as failures.
* ``environment``: the host the recording ran on, not its kernel: process limits and
  capabilities the recorder could not choose (a container's hard RLIMIT_MEMLOCK, no
  CAP_IPC_LOCK), memory locked outside VFIO, addresses and fd numbers.
* ``machine``: the hardware behind the kernel: the device model's registers and the
  addresses and interrupt lines firmware assigned, as config space shows them.

User addresses and fd numbers are never compared as numbers (a replay substitutes its
own memory, matched by mapping, and its own fds); an fd result is compared as "an fd".
"""

from __future__ import annotations

import errno as E
from dataclasses import asdict, dataclass, field
from typing import Any

from ..uapi import vfio as uapi
from . import ioctls

KERNEL = "kernel"
ENVIRONMENT = "environment"
MACHINE = "machine"
LABELS = (KERNEL, ENVIRONMENT, MACHINE)

#: calls whose success value is a new fd (compared as "an fd", not by number)
_FD_RESULT = {("open", None), ("dup", None), ("ioctl", "VFIO_GROUP_GET_DEVICE_FD"),
              ("ioctl", "VFIO_DEVICE_GET_GFX_DMABUF"), ("eventfd", None)}

#: vfio-pci's region index lives in the top bits of the file offset (VFIO_PCI_OFFSET_SHIFT)
PCI_OFFSET_SHIFT = 40
CONFIG_REGION = uapi.VFIO_PCI_CONFIG_REGION_INDEX
#: Config-space bits that firmware and the platform set, per byte offset: the BARs and the
#: ROM BAR (addresses), the interrupt line (an IRQ number), cache line size and latency
#: timer, and the command register's I/O, PARITY and SERR enables (SLOF and SeaBIOS set
#: them; vfio-pci passes them through from the device).
_FIRMWARE_CONFIG = {0x04: 0x41, 0x05: 0x01, 0x0C: 0xFF, 0x0D: 0xFF, **{o: 0xFF for o in range(0x10, 0x28)},
                    **{o: 0xFF for o in range(0x30, 0x34)}, 0x3C: 0xFF}


@dataclass
class Divergence:
    seq: int
    scenario: str
    what: str                  # "call", "result", "out.<field>", "VmLck kB", "VmPin kB", "data"
    expected: Any              # the recording (trace A)
    got: Any                   # the replay (trace B)
    label: str = KERNEL
    why: str = ""              # for environment and machine differences: the reason
    case: str = ""
    step: str = ""             # the step as `vfiosim trace show` prints it (trace A)
    other: str = ""            # and its counterpart (the replay, or trace B)

    def __str__(self) -> str:
        where = f"step {self.seq}" + (f" [{self.scenario}" + (f"/{self.case}" if self.case else "") + "]"
                                      if self.scenario else (f" [{self.case}]" if self.case else ""))
        text = f"{where} {self.what}: recorded {_short(self.expected)}, got {_short(self.got)}"
        if self.label != KERNEL:
            text += f"  ({self.label}: {self.why})" if self.why else f"  ({self.label})"
        return text

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _short(v: Any) -> str:
    text = repr(v) if not isinstance(v, str) else v
    return text if len(text) <= 200 else text[:197] + "..."


def result_text(rec: dict[str, Any]) -> str:
    if rec.get("errno"):
        return f"-1 {E.errorcode.get(rec['errno'], rec['errno'])}"
    return str(rec.get("ret"))


def after_state(rec: dict[str, Any]) -> dict[str, Any]:
    args = rec.get("args")
    return {**(args if isinstance(args, dict) else {}), **(rec.get("out") or {})}


@dataclass
class Context:
    """What a comparison knows about the two traces beyond the records."""
    baseline_a: tuple[int, int] = (0, 0)        # VmLck/VmPin kB before the first call
    baseline_b: tuple[int, int] = (0, 0)
    environment_notes: list[str] = field(default_factory=list)


def family(rec: dict[str, Any], iommu: str = "") -> str:
    """The ioctl family a record belongs to, for per-family tables."""
    call = str(rec.get("call", ""))
    cmd = str(rec.get("cmd") or "")
    if call in ("open", "close", "dup"):
        return "files"
    if call in ("read", "write", "mmap", "munmap", "mmio"):
        return "region access"
    if call in ("setrlimit", "setuid", "chown", "fork", "exec"):
        return "process"
    if call != "ioctl":
        return call
    if cmd in ("VFIO_GET_API_VERSION", "VFIO_CHECK_EXTENSION", "VFIO_SET_IOMMU") or cmd.startswith("VFIO_BASE+"):
        return "container"
    if cmd.startswith("VFIO_GROUP_"):
        return "group"
    if cmd == "VFIO_EEH_PE_OP":
        return "EEH"
    if cmd in ("VFIO_DEVICE_GET_INFO", "VFIO_DEVICE_GET_REGION_INFO", "VFIO_DEVICE_GET_IRQ_INFO"):
        return "device info"
    if cmd in ("VFIO_DEVICE_SET_IRQS",):
        return "interrupts"
    if cmd in ("VFIO_DEVICE_RESET", "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", "VFIO_DEVICE_PCI_HOT_RESET"):
        return "reset"
    if cmd == "VFIO_DEVICE_FEATURE":
        return "device features"
    if cmd == "VFIO_DEVICE_IOEVENTFD":
        return "ioeventfd"
    if cmd in ("VFIO_DEVICE_BIND_IOMMUFD", "VFIO_DEVICE_ATTACH_IOMMUFD_PT", "VFIO_DEVICE_DETACH_IOMMUFD_PT"):
        return "device cdev"
    if cmd.startswith("VFIO_DEVICE_"):
        return "device (other)"
    if cmd.startswith("IOMMU_"):
        return "iommufd"
    if "SPAPR" in cmd or iommu == "spapr" and cmd.startswith("VFIO_IOMMU_"):
        return "IOMMU (sPAPR)"
    if cmd.startswith("VFIO_IOMMU_"):
        return "IOMMU (Type1)"
    return "other"


def _is_fd_result(rec: dict[str, Any]) -> bool:
    call = rec.get("call")
    return (call, rec.get("cmd") if call == "ioctl" else None) in _FD_RESULT


def _same_but_firmware(offset: int, a: bytes, b: bytes) -> bool:
    """Whether two config-space reads at ``offset`` differ only in bits firmware set."""
    base = offset & ((1 << PCI_OFFSET_SHIFT) - 1)
    if len(a) != len(b):
        return False
    return all((x ^ y) & ~_FIRMWARE_CONFIG.get(base + i, 0) & 0xFF == 0 for i, (x, y) in enumerate(zip(a, b)))


def compare(a: dict[str, Any], b: dict[str, Any], ctx: Context | None = None) -> list[Divergence]:
    """The differences between recorded step ``a`` and step ``b`` (empty: they match)."""
    ctx = ctx or Context()
    out: list[Divergence] = []

    def diverge(what: str, exp: Any, got: Any, label: str = KERNEL, why: str = "") -> None:
        out.append(Divergence(a.get("seq", -1), a.get("scenario", ""), what, exp, got, label, why,
                              a.get("case", "")))

    call_a, call_b = a.get("call"), b.get("call")
    if call_a != call_b or (call_a == "ioctl" and a.get("cmd") != b.get("cmd")):
        diverge("call", _call_name(a), _call_name(b))
        return out
    if call_a == "exit":
        return out

    # -- the result ----------------------------------------------------------------------------------
    ea, eb = a.get("errno") or 0, b.get("errno") or 0
    if call_a != "note":
        if ea or eb:
            if ea != eb:
                label, why = _result_label(a, b, ctx)
                diverge("result", result_text(a), result_text(b), label, why)
        elif _is_fd_result(a):
            if not (isinstance(b.get("ret"), int) and b["ret"] >= 0):
                diverge("result", "an fd", result_text(b))
        elif call_a == "mmap":
            pass                                            # an address, or a mapping handle
        elif a.get("ret") != b.get("ret"):
            diverge("result", result_text(a), result_text(b))

    # -- what the kernel wrote back ---------------------------------------------------------------------
    if call_a == "ioctl" and "out" in a and "out" in b and ea == eb:
        after_a, after_b = after_state(a), after_state(b)
        cmd = a.get("cmd", "")
        skip = set(ioctls.ADDRESS_FIELDS.get(cmd, ()))
        fds = set(ioctls.FD_OUT_FIELDS.get(cmd, ()))
        for key in sorted(set(a["out"]) | set(b["out"])):
            if key in skip:
                continue
            if key in ioctls.USER_KEYS and (key not in after_a or key not in after_b):
                continue                # one side did not look at the buffer
            va, vb = after_a.get(key), after_b.get(key)
            if key in fds and isinstance(va, int) and isinstance(vb, int) and va >= 0 and vb >= 0:
                continue                # a new fd either side
            if va != vb:
                diverge(f"out.{key}", va, vb)
    if call_a in ("read", "mmio") and not ea and "data" in a and "data" in b and a["data"] != b["data"]:
        label, why = _data_label(a, b)
        diverge("data", a["data"], b["data"], label, why)
    if call_a == "mmio" and not a.get("write") and "value" in a and "value" in b and a["value"] != b["value"]:
        diverge("value", a["value"], b["value"], MACHINE, "a load from the device's BAR: the device model's register")

    # -- locked and pinned memory ------------------------------------------------------------------------
    for key, name, i in (("vmlck_kb", "VmLck kB", 0), ("vmpin_kb", "VmPin kB", 1)):
        if a.get(key) is None or b.get(key) is None:
            continue
        va, vb = a[key] - ctx.baseline_a[i], b[key] - ctx.baseline_b[i]
        if va != vb:
            diverge(name, va, vb)
    return out


def _call_name(rec: dict[str, Any]) -> str:
    call = rec.get("call", "?")
    return f"ioctl {rec.get('cmd')}" if call == "ioctl" else call


def _result_label(a: dict[str, Any], b: dict[str, Any], ctx: Context) -> tuple[str, str]:
    """ENOMEM or EPERM on one side only, where a trace's process ran with limits or
    capabilities its environment imposed, is the environment's doing."""
    if ctx.environment_notes and (a.get("errno") in (E.ENOMEM, E.EPERM) or b.get("errno") in (E.ENOMEM, E.EPERM)):
        return ENVIRONMENT, "; ".join(ctx.environment_notes)
    return KERNEL, ""


CAP_IPC_LOCK, CAP_SYS_RESOURCE = 14, 24


def header_notes(head: dict[str, Any], side: str = "") -> list[str]:
    """What a trace's header says about an environment that limits its process."""
    proc = head.get("process") or {}
    notes = []
    cap = proc.get("cap_eff")
    if proc.get("uid") == 0 and isinstance(cap, str) and cap:
        caps = int(cap, 16)
        missing = [n for n, bit in (("CAP_IPC_LOCK", CAP_IPC_LOCK), ("CAP_SYS_RESOURCE", CAP_SYS_RESOURCE))
                   if not caps >> bit & 1]
        if missing:
            notes.append(f"{side}ran as root without {' and '.join(missing)} (a container?): locked memory is "
                         f"checked against RLIMIT_MEMLOCK {proc.get('rlimit_memlock')}, which it cannot raise")
    return notes


def record_note(rec: dict[str, Any], side: str = "") -> str | None:
    """A context record that shows the environment refusing the process something."""
    if rec.get("call") == "setrlimit" and rec.get("errno"):
        return (f"{side}could not set RLIMIT_MEMLOCK to {rec.get('cur')}/{rec.get('max')} "
                f"({E.errorcode.get(rec['errno'], rec['errno'])}); it stayed {rec.get('now')}")
    return None


def _data_label(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, str]:
    offset = a.get("offset")
    if offset is None:
        return MACHINE, "the device's registers (the device model, not the kernel)"
    region = offset >> PCI_OFFSET_SHIFT
    if region == CONFIG_REGION:
        if _same_but_firmware(offset, bytes.fromhex(a["data"]), bytes.fromhex(b["data"])):
            return MACHINE, "config-space bits firmware set (BAR addresses, interrupt line, I/O, SERR and PARITY enables)"
        return KERNEL, ""
    if region <= uapi.VFIO_PCI_BAR5_REGION_INDEX or region == uapi.VFIO_PCI_ROM_REGION_INDEX:
        return MACHINE, "BAR contents: the device model's registers, not the kernel's answer"
    return KERNEL, ""
