"""The trace format of record: one JSON object per line, a header first.

docs/trace-format.md is the schema.  In short::

    {"format": "vfiosim-trace", "version": 1, "source": "kernel", "system": {...}, ...}   <- header
    {"seq": 0, "pid": 812, "call": "open", "path": "/dev/vfio/vfio", "flags": 2, "fd": 3, "ret": 3, ...}
    {"seq": 1, "pid": 812, "call": "ioctl", "fd": 3, "fd_kind": "vfio-container",
     "cmd": "VFIO_CHECK_EXTENSION", "args": {"extension": 7}, "ret": 1, "errno": 0, ...}

Every reader goes through :func:`open_trace`, which streams (a trace of a QEMU boot
has hundreds of thousands of lines; nothing here holds more than one record) and
also takes the two older shapes of trace, so that every tool reads all of them:

* a ``--trace`` file of vfiosim before this format (records only, no header);
* a real-kernel reference trace (``tests/data/reference_traces``: one ``op`` per
  step, symbolic buffer addresses), converted on the fly by :mod:`.convert`.

Records in ``raw`` form (what ``vfiosim record``'s shim writes: argument bytes,
not fields) are decoded here, so a tool never sees the difference.
"""

from __future__ import annotations

import errno as E
import json
import os
import time
from typing import IO, Any, Iterator

from . import ioctls

FORMAT = "vfiosim-trace"
VERSION = 1

#: what produced a trace's answers
SOURCES = ("kernel", "simulator", "reference")


class TraceError(ValueError):
    """A file that cannot be read as a trace: the message names the file and line."""


# -- the header ---------------------------------------------------------------------------------------


def make_header(source: str, recorder: str, **fields: Any) -> dict[str, Any]:
    """A header for a new trace (``source`` is one of :data:`SOURCES`)."""
    assert source in SOURCES
    head: dict[str, Any] = {"format": FORMAT, "version": VERSION, "source": source, "recorder": recorder,
                            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    head.update({k: v for k, v in fields.items() if v is not None})
    return head


def kernel_config_items(config: Any) -> list[str]:
    """A kernel configuration (kernel/config.py's KernelConfig) as a trace header has it:
    every option vfiosim models, ``NAME=y`` or ``NAME=n`` (what
    ``Machine.preset(..., kernel_config=...)`` takes)."""
    from ..kernel.config import SYMBOLS
    return [f"{name}={'y' if getattr(config, name.lower()) else 'n'}" for name in SYMBOLS]


def simulator_header(machine: Any, recorder: str) -> dict[str, Any]:
    """The header of a trace whose answers come from a simulated machine: its
    description in the same terms ``vfiosim record`` uses for a real one."""
    from .. import __version__
    topo = machine.topology()
    system = {"kernel": f"vfiosim {__version__} (Linux {topo['kernel']} profile)", "machine": "simulated",
              "page_size": topo["page_size"], "platform": topo["platform"]}
    groups = [{"id": g["id"], "devices": g["devices"]} for g in topo["iommu_groups"] if g["node"]]
    devices = [{"bdf": d["bdf"], "vendor": d["vendor"], "device": d["device"], "class": d["class"],
                "driver": d["driver"] or "", "iommu_group": d["iommu_group"]} for d in topo["devices"]]
    windows = [{"pe": pe["name"], "iommu_group": pe["iommu_group"], "start": pe["dma32_window"]["start"],
                "size": pe["dma32_window"]["size"]} for pe in topo["pes"]]
    iommu: dict[str, Any] = {"drivers": topo["iommu_drivers"]}
    u = (topo.get("iommu_units") or [{}])[0]
    if u.get("model") == "intel-iommu":
        iommu["vtd"] = {"address_width": u["address_width"], "caching_mode": u["caching_mode"]}
    return make_header("simulator", recorder, system=system, kernel_config=kernel_config_items(machine.kernel.config),
                       iommu=iommu, groups=groups, devices=devices, windows=windows,
                       simulator={"machine": topo["machine"], "kernel": topo["kernel"]})


def describe_header(head: dict[str, Any]) -> str:
    """One line: where and how a trace was made."""
    system = head.get("system") or {}
    where = system.get("kernel") or "?"
    plat = system.get("platform") or system.get("machine") or ""
    what = {"kernel": "a real kernel", "simulator": "vfiosim", "reference": "a real kernel (reference trace)"}.get(
        head.get("source", ""), head.get("source", "?"))
    text = f"vfiosim trace v{head.get('version')}: answers from {what}, {where}"
    if plat:
        text += f" ({plat})"
    if head.get("recorder"):
        text += f"; written by {head['recorder']}"
    if head.get("scenario"):
        text += f"; scenario {head['scenario']}"
    return text


def decode_header(head: dict[str, Any]) -> dict[str, Any]:
    """What ``vfiosim record``'s shim wrote raw, decoded (in place): a pseries PHB's
    ``ibm,dma-window`` (LIOBN, bus address, size: two-cell addresses and sizes, as PAPR
    has them) with the IOMMU group behind it, and a VT-d unit's address width."""
    windows = head.get("windows") or []
    by_domain: dict[int, int] = {}
    for d in head.get("devices") or []:
        try:
            by_domain.setdefault(int(str(d["bdf"]).split(":")[0], 16), d["iommu_group"])
        except (KeyError, ValueError):
            pass
    raw = [w for w in windows if isinstance(w, dict) and "ibm,dma-window" in w]
    for i, w in enumerate(sorted(raw, key=lambda w: w.get("node", ""))):
        b = bytes.fromhex(w["ibm,dma-window"])
        if len(b) >= 20 and "size" not in w:
            w["liobn"] = int.from_bytes(b[0:4], "big")
            w["start"] = int.from_bytes(b[4:12], "big")
            w["size"] = int.from_bytes(b[12:20], "big")
            domain = w.get("domain", i)           # linux,pci-domain, else the PHBs' order
            if domain in by_domain:
                w["iommu_group"] = by_domain[domain]
    for unit in (head.get("iommu") or {}).get("units") or []:
        if isinstance(unit, dict) and unit.get("cap") and "address_width" not in unit:
            try:
                unit["address_width"] = ((int(unit["cap"], 16) >> 16) & 0x3F) + 1      # MGAW
            except ValueError:
                pass
    return head


# -- reading --------------------------------------------------------------------------------------------


class Trace:
    """A trace file, read as a stream: ``header``, then iterate over the records.

    Use as a context manager (or call :meth:`close`).  Iterating more than once
    reads the file again from the start."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._f: IO[str] = open(self.path, encoding="utf-8", errors="surrogateescape")
        except IsADirectoryError:
            raise TraceError(f"{self.path}: is a directory, not a trace") from None
        except OSError as exc:
            raise TraceError(f"{self.path}: {exc.strerror}") from None
        self.kind = ""                 # "v1", "legacy" or "reference"
        self.size = os.fstat(self._f.fileno()).st_size
        self.bytes_read = 0            # how far iteration has come (for progress)
        self.header: dict[str, Any] = {}
        try:
            self._read_header()
        finally:
            self._f.close()            # iterating opens the file again

    def __enter__(self) -> "Trace":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays open between iterations; here for ``with``."""

    # -- lines ----------------------------------------------------------------------------------------

    def _lines(self, f: IO[str], start: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        lineno = start
        for line in f:
            lineno += 1
            self.bytes_read += len(line)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                if lineno == 1:
                    raise TraceError(f"{self.path}:1: not a trace: the first line is not JSON ({exc})") from None
                raise TraceError(f"{self.path}:{lineno}: not JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{self.path}:{lineno}: a trace line is a JSON object, this is {type(obj).__name__}")
            yield lineno, obj

    def _read_header(self) -> None:
        try:
            first = next(self._lines(self._f), None)
        except UnicodeDecodeError:
            raise TraceError(f"{self.path}:1: not a trace: not text") from None
        if first is None:
            raise TraceError(f"{self.path}: empty: no header and no records")
        lineno, obj = first
        if obj.get("format") == FORMAT:
            version = obj.get("version")
            if not isinstance(version, int) or version < 1:
                raise TraceError(f"{self.path}:{lineno}: header has no valid version ({version!r})")
            if version > VERSION:
                raise TraceError(f"{self.path}:{lineno}: trace format version {version} is newer than this vfiosim "
                                 f"reads (up to {VERSION}): upgrade vfiosim")
            self.kind = "v1"
            self.header = decode_header(obj)
        elif obj.get("op") == "meta" and "scenario" in obj:
            from .convert import reference_header
            self.kind = "reference"
            self.header = reference_header(obj)
        elif "call" in obj and "pid" in obj:
            self.kind = "legacy"
            self.header = make_header("simulator", "vfiosim run --trace (before trace format 1)")
            self.header["version"] = 0
        else:
            keys = ", ".join(sorted(obj)[:6])
            raise TraceError(f"{self.path}:{lineno}: not a vfiosim trace: the first line is neither a header "
                             f"(\"format\": \"{FORMAT}\") nor a call record (keys: {keys})")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The records, normalised (``raw`` decoded, ``seq`` set), one at a time."""
        with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
            self.bytes_read = 0
            lines = self._lines(f)
            if self.kind != "legacy":
                next(lines, None)                       # the header (or the reference's meta step)
            if self.kind == "reference":
                from .convert import reference_records
                yield from reference_records(self.header, (obj for _, obj in lines))
                return
            seq = 0
            # A container whose VFIO_SET_IOMMU the recorder did not see (an exec'd image's)
            # has the platform's IOMMU: sPAPR on POWER, Type1 elsewhere.
            platform = (self.header.get("system") or {}).get("platform")
            iommu = "spapr" if platform in ("pseries", "powernv") else ""
            for lineno, rec in lines:
                if "call" not in rec:
                    if rec.get("format") == FORMAT:
                        raise TraceError(f"{self.path}:{lineno}: a second header: two traces joined into one file?")
                    raise TraceError(f"{self.path}:{lineno}: a record needs \"call\" (keys: "
                                     f"{', '.join(sorted(rec)[:6])})")
                if rec["call"] != "exit":                  # an event, not a step: no number needed
                    if "seq" not in rec:
                        rec["seq"] = seq
                    seq = rec["seq"] + 1 if isinstance(rec["seq"], int) else seq + 1
                try:
                    normalize(rec, iommu)
                except (ValueError, KeyError, TypeError) as exc:
                    raise TraceError(f"{self.path}:{lineno}: cannot decode this record: {exc}") from None
                yield rec


def open_trace(path: str | os.PathLike[str]) -> Trace:
    return Trace(path)


# -- raw records ----------------------------------------------------------------------------------------


def normalize(rec: dict[str, Any], platform_iommu: str = "") -> dict[str, Any]:
    """Fill in the decoded fields of a ``raw`` ioctl record (in place);
    ``platform_iommu``: the IOMMU family of a container of unknown type."""
    if rec.get("call") == "ioctl" and "cmd" not in rec and "request" in rec:
        iommu = ioctls.iommu_family(rec.get("iommu_type")) or platform_iommu
        rec["cmd"] = ioctls.ioctl_label(int(rec["request"]), rec.get("fd_kind", ""), iommu)
    raw = rec.get("raw")
    if rec.get("call") == "ioctl" and isinstance(raw, dict) and "args" not in rec:
        name = rec.get("cmd", "")
        layout = ioctls.LAYOUTS.get(name)
        if layout is None:
            if raw.get("arg"):
                rec["args"] = {"arg": raw["arg"]}
        elif layout.kind == ioctls.VALUE:
            rec["args"] = {layout.value_field: raw.get("arg", 0)}
        elif raw.get("fault"):
            rec["args"] = {"ptr": raw.get("arg", 0), "fault": True}
        elif layout.kind == ioctls.FD_PTR and "in" in raw:
            b = bytes.fromhex(raw["in"])
            rec["args"] = {"fd": int.from_bytes(b[:4].ljust(4, b"\0"), "little", signed=True)}
        elif layout.kind == ioctls.STRING and "in" in raw:
            rec["args"] = {"name": bytes.fromhex(raw["in"]).split(b"\0", 1)[0].decode("utf-8", "replace")}
        elif layout.kind == ioctls.STRUCT and "in" in raw:
            before = bytes.fromhex(raw["in"])
            user = raw.get("user")
            buf = ioctls.USER_BUFFERS.get(name)
            kept = user.get(buf.field) if buf is not None and isinstance(user, dict) else None
            user_in = bytes.fromhex(kept["in"]) if isinstance(kept, dict) and "in" in kept else None
            user_out = bytes.fromhex(kept["out"]) if isinstance(kept, dict) and "out" in kept and \
                ioctls.wrote_user(name, int(rec.get("errno") or 0)) else None
            rec["args"] = ioctls.decode(name, before, user=user_in)
            if "out" in raw:
                bitmap = bytes.fromhex(raw["bitmap"]) if raw.get("bitmap") else None
                after = ioctls.decode(name, bytes.fromhex(raw["out"]), after=True, bitmap=bitmap, user=user_out)
                rec["out"] = ioctls.changed(rec["args"], after)
    if "errno" in rec and "err" not in rec:
        rec["err"] = E.errorcode.get(rec["errno"], "") if rec["errno"] else ""
    return rec


# -- writing ------------------------------------------------------------------------------------------


class TraceWriter:
    """Writes a trace of record: the header, then one line per record."""

    def __init__(self, target: str | IO[str], header: dict[str, Any]) -> None:
        if isinstance(target, str):
            self.f: IO[str] = open(target, "w", buffering=1 << 16)
            self._own = True
        else:
            self.f = target
            self._own = False
        self.write(header)

    def write(self, rec: dict[str, Any]) -> None:
        self.f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if self._own:
            self.f.close()
        else:
            self.f.flush()
