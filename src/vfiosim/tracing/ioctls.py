"""What each VFIO ioctl's argument is, for traces: decode it, encode it again.

A trace holds an ioctl's argument in two forms.  ``raw`` is the bytes the program
passed and the bytes the kernel left (what ``vfiosim record``'s shim copies, knowing
only each ioctl's kind); ``args``/``out`` are those bytes decoded into the struct's
fields (what ``vfiosim trace show`` prints and what a replay compares).  This module
turns one into the other, with ``vfiosim.uapi`` as the only source of layouts.

Ioctl numbers are compared by their ``_IOC_TYPE``/``_IOC_NR`` only: VFIO encodes
every request with ``_IO()``, whose direction bits differ by architecture (ppc64
sets one that x86 does not), so a trace recorded on POWER names the same ioctls.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from dataclasses import dataclass
from typing import Any

from ..kernel.uaccess import struct_layout
from ..uapi import iommufd as iu
from ..uapi import vfio as uapi

# -- kinds of argument ------------------------------------------------------------------------------

NONE = "none"          # no argument (VFIO_GET_API_VERSION, VFIO_IOMMU_ENABLE, ...)
VALUE = "value"        # an integer passed by value (VFIO_CHECK_EXTENSION, VFIO_SET_IOMMU)
FD_PTR = "fd_ptr"      # a pointer to an int holding an fd (VFIO_GROUP_SET_CONTAINER)
STRING = "string"      # a pointer to a NUL-terminated string (VFIO_GROUP_GET_DEVICE_FD)
STRUCT = "struct"      # a pointer to a struct that starts with argsz


@dataclass(frozen=True)
class Layout:
    kind: str
    struct: type | None = None
    value_field: str = ""


LAYOUTS: dict[str, Layout] = {
    "VFIO_GET_API_VERSION": Layout(NONE),
    "VFIO_CHECK_EXTENSION": Layout(VALUE, value_field="extension"),
    "VFIO_SET_IOMMU": Layout(VALUE, value_field="type"),
    "VFIO_GROUP_GET_STATUS": Layout(STRUCT, uapi.vfio_group_status),
    "VFIO_GROUP_SET_CONTAINER": Layout(FD_PTR),
    "VFIO_GROUP_UNSET_CONTAINER": Layout(NONE),
    "VFIO_GROUP_GET_DEVICE_FD": Layout(STRING),
    "VFIO_DEVICE_GET_INFO": Layout(STRUCT, uapi.vfio_device_info),
    "VFIO_DEVICE_GET_REGION_INFO": Layout(STRUCT, uapi.vfio_region_info),
    "VFIO_DEVICE_GET_IRQ_INFO": Layout(STRUCT, uapi.vfio_irq_info),
    "VFIO_DEVICE_SET_IRQS": Layout(STRUCT, uapi.vfio_irq_set),
    "VFIO_DEVICE_RESET": Layout(NONE),
    "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO": Layout(STRUCT, uapi.vfio_pci_hot_reset_info),
    "VFIO_DEVICE_PCI_HOT_RESET": Layout(STRUCT, uapi.vfio_pci_hot_reset),
    "VFIO_DEVICE_IOEVENTFD": Layout(STRUCT, uapi.vfio_device_ioeventfd),
    "VFIO_DEVICE_FEATURE": Layout(STRUCT, uapi.vfio_device_feature),
    "VFIO_IOMMU_GET_INFO": Layout(STRUCT, uapi.vfio_iommu_type1_info),
    "VFIO_IOMMU_MAP_DMA": Layout(STRUCT, uapi.vfio_iommu_type1_dma_map),
    "VFIO_IOMMU_UNMAP_DMA": Layout(STRUCT, uapi.vfio_iommu_type1_dma_unmap),
    "VFIO_IOMMU_ENABLE": Layout(NONE),
    "VFIO_IOMMU_DISABLE": Layout(NONE),
    "VFIO_IOMMU_DIRTY_PAGES": Layout(STRUCT, uapi.vfio_iommu_type1_dirty_bitmap),
    "VFIO_IOMMU_SPAPR_TCE_GET_INFO": Layout(STRUCT, uapi.vfio_iommu_spapr_tce_info),
    "VFIO_EEH_PE_OP": Layout(STRUCT, uapi.vfio_eeh_pe_op),
    "VFIO_IOMMU_SPAPR_REGISTER_MEMORY": Layout(STRUCT, uapi.vfio_iommu_spapr_register_memory),
    "VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY": Layout(STRUCT, uapi.vfio_iommu_spapr_register_memory),
    "VFIO_IOMMU_SPAPR_TCE_CREATE": Layout(STRUCT, uapi.vfio_iommu_spapr_tce_create),
    "VFIO_IOMMU_SPAPR_TCE_REMOVE": Layout(STRUCT, uapi.vfio_iommu_spapr_tce_remove),
    # the device cdev (drivers/vfio/device_cdev.c)
    "VFIO_DEVICE_BIND_IOMMUFD": Layout(STRUCT, uapi.vfio_device_bind_iommufd),
    "VFIO_DEVICE_ATTACH_IOMMUFD_PT": Layout(STRUCT, uapi.vfio_device_attach_iommufd_pt),
    "VFIO_DEVICE_DETACH_IOMMUFD_PT": Layout(STRUCT, uapi.vfio_device_detach_iommufd_pt),
}
# /dev/iommu: struct iommu_<name> of IOMMU_<NAME> (two are named otherwise); each
# starts with its size, which the reader takes as it takes VFIO's argsz.
_IOMMUFD_STRUCTS = {"IOMMU_GET_HW_INFO": "iommu_hw_info", "IOMMU_FAULT_QUEUE_ALLOC": "iommu_fault_alloc"}
LAYOUTS.update({name: Layout(STRUCT, iu.STRUCTS[_IOMMUFD_STRUCTS.get(name, name.lower())]) for name in iu.IOCTLS})
_IOMMUFD_BY_NR = {cmd & 0xFF: name for name, cmd in iu.IOCTLS.items()}

@dataclass(frozen=True)
class UserBuffer:
    """A buffer an ioctl's argument points to (``field``), which the kernel reads
    (``out`` False) or writes.  ``vfiosim record`` keeps its bytes (``raw.user``);
    readers decode them into ``key`` (in ``args``, or in ``out``), a replay gives
    the call a buffer of the same length and contents."""
    field: str
    out: bool
    key: str
    count: str = ""          # its length: ``count`` elements of ``unit`` bytes,
    unit: int = 1            # or ``count`` times ``unit_field``,
    unit_field: str = ""
    bitmap: bool = False     # or one bit per page_size of length, in __u64 words

    def length(self, fields: dict[str, Any]) -> int:
        if self.bitmap:          # iova_bitmap_alloc(): a bit per 1 << __ffs(page_size) bytes
            page = int(fields.get("page_size", 0) or 0)
            pages = int(fields.get("length", 0) or 0) >> ((page & -page).bit_length() - 1) if page else 0
            return min((pages + 63) // 64 * 8, MAX_ARG)
        n = int(fields.get(self.count, 0) or 0)
        n *= int(fields.get(self.unit_field, 0) or 0) if self.unit_field else self.unit
        return min(n, MAX_ARG)

    def reaches(self, name: str, fields: dict[str, Any]) -> bool:
        """Whether the struct, by its own size, has the pointer (the kernel ignores it otherwise)."""
        return int(fields.get("size", 0) or 0) >= field_offset(name, self.field) + 8


#: The buffers of <linux/iommufd.h>'s ioctls (the same table is in vfiosim_record.c).
USER_BUFFERS: dict[str, UserBuffer] = {
    "IOMMU_IOAS_ALLOW_IOVAS": UserBuffer("allowed_iovas", False, "iovas", "num_iovas", 16),
    "IOMMU_IOAS_IOVA_RANGES": UserBuffer("allowed_iovas", True, "iovas", "num_iovas", 16),
    "IOMMU_HWPT_ALLOC": UserBuffer("data_uptr", False, "data_in", "data_len"),
    "IOMMU_GET_HW_INFO": UserBuffer("data_uptr", True, "hw_info", "data_len"),
    "IOMMU_HWPT_GET_DIRTY_BITMAP": UserBuffer("data", True, "dirty_pages", bitmap=True),
    "IOMMU_HWPT_INVALIDATE": UserBuffer("data_uptr", False, "data_in", "entry_num", unit_field="entry_len"),
}
#: What readers decode from those buffers: compared only when both sides kept them
#: (a trace of ``vfiosim run`` keeps the argument, not what it points to).
USER_KEYS = frozenset({"iovas", "data_in", "hw_info", "dirty_pages", "bitmap_head"})

#: Fields that hold an address in the program's memory: a replay substitutes its own
#: memory (matched by mapping), and a comparison never compares them as numbers.
ADDRESS_FIELDS: dict[str, tuple[str, ...]] = {
    "VFIO_IOMMU_MAP_DMA": ("vaddr",),
    "VFIO_IOMMU_SPAPR_REGISTER_MEMORY": ("vaddr",),
    "VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY": ("vaddr",),
    "IOMMU_IOAS_MAP": ("user_va",),
    **{name: (buf.field,) for name, buf in USER_BUFFERS.items()},
}
#: Fields that hold an fd the kernel made: compared as "an fd", not by number.
FD_OUT_FIELDS = {"IOMMU_FAULT_QUEUE_ALLOC": ("out_fault_fd",)}


def wrote_user(name: str, err: int) -> bool:
    """Whether the kernel wrote the buffer of a call that answered ``err``: on success;
    IOMMU_IOAS_IOVA_RANGES fills what fits before its EMSGSIZE (iommufd_ioas_iova_ranges()).
    A failed call leaves the buffer as it was, which says nothing of the kernel."""
    return not err or (name == "IOMMU_IOAS_IOVA_RANGES" and err == errno.EMSGSIZE)


def address_span(name: str, key: str, fields: dict[str, Any]) -> int:
    """How many bytes at address field ``key`` the call uses."""
    buf = USER_BUFFERS.get(name)
    if buf is not None and buf.field == key:
        return buf.length(fields)
    return int(fields.get("length" if name.startswith("IOMMU_") else "size", 0) or 0)


def field_offset(name: str, key: str) -> int:
    """The offset of field ``key`` in ``name``'s argument struct."""
    cls = LAYOUTS[name].struct
    assert cls is not None
    return int(getattr(cls, key).offset)
#: The dirty bitmap's buffer: the replay's own, always (its contents are compared).
BITMAP_CMDS = ("VFIO_IOMMU_DIRTY_PAGES", "VFIO_IOMMU_UNMAP_DMA")

_TYPE1_TYPES = {uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU, uapi.VFIO_TYPE1_NESTING_IOMMU}
_SPAPR_TYPES = {uapi.VFIO_SPAPR_TCE_IOMMU, uapi.VFIO_SPAPR_TCE_v2_IOMMU}

#: The largest argument a trace keeps (a GET_INFO buffer is 4 KiB in the reference traces).
MAX_ARG = 65536


def iommu_family(iommu_type: int | None) -> str:
    """"type1", "spapr" or "" for a VFIO_SET_IOMMU type."""
    if iommu_type in _TYPE1_TYPES:
        return "type1"
    if iommu_type in _SPAPR_TYPES:
        return "spapr"
    return ""


def base_offset(request: int) -> int | None:
    """A VFIO request's offset from VFIO_BASE, whatever the architecture's _IO()
    direction bits (None for a request that is not VFIO's)."""
    if (request >> 8) & 0xFF != uapi.VFIO_TYPE:
        return None
    return (request & 0xFF) - uapi.VFIO_BASE


def ioctl_name(request: int, fd_kind: str, iommu: str = "") -> str | None:
    """The name of ``request`` on an fd of ``fd_kind``; ``iommu`` ("type1"/"spapr")
    settles the container numbers the two IOMMU families share.  An iommufd
    ("iommufd") answers its own numbers (0x80 and up) and the container's."""
    off = base_offset(request)
    if off is None:
        return None
    if fd_kind == "iommufd":
        if (request & 0xFF) in _IOMMUFD_BY_NR:
            return _IOMMUFD_BY_NR[request & 0xFF]
        fd_kind = "vfio-container"
    key = (off, fd_kind, iommu == "spapr")
    if key not in _NAME_CACHE:
        names = [n for n, o in uapi.IOCTL_BASE_OFFSETS.items() if o == off]
        prefixes = uapi._FD_KIND_PREFIXES.get(fd_kind)
        if prefixes:
            names = [n for n in names if n.startswith(prefixes)] or names
        if len(names) > 1:
            spapr = [n for n in names if "SPAPR" in n or n.startswith("VFIO_EEH")]
            other = [n for n in names if n not in spapr]
            names = (spapr or names) if iommu == "spapr" else (other or names)
        _NAME_CACHE[key] = names[0] if names else None
    return _NAME_CACHE[key]


_NAME_CACHE: dict[tuple[int, str, bool], str | None] = {}


def ioctl_label(request: int, fd_kind: str, iommu: str = "") -> str:
    """What a trace calls a request: its name, ``VFIO_BASE+N`` for a VFIO number with no
    name there, the number in hex for anything else."""
    name = ioctl_name(request, fd_kind, iommu)
    if name:
        return name
    off = base_offset(request)
    return f"VFIO_BASE+{off}" if off is not None else f"{request:#x}"


def request_number(name: str) -> int:
    """The host's number for an ioctl name (<linux/vfio.h>'s or <linux/iommufd.h>'s)."""
    return uapi.IOCTLS[name] if name in uapi.IOCTLS else iu.IOCTLS[name]


# -- decoding -----------------------------------------------------------------------------------------


def struct_fields(obj: Any) -> dict[str, Any]:
    """A ctypes struct as a dict of its named fields (nested structs as dicts,
    flexible arrays left out, reserved ``__`` fields and the 6.12 headers'
    explicit tail ``pad`` skipped: they carry nothing)."""
    out: dict[str, Any] = {}
    for name, _ftype, *_ in obj._fields_:
        anonymous = name in getattr(obj, "_anonymous_", ())
        if (name.startswith("_") or name == "pad") and not anonymous:
            continue
        value = getattr(obj, name)
        if anonymous:
            out.update(struct_fields(value))
        elif isinstance(value, (ctypes.Structure, ctypes.Union)):
            out[name] = struct_fields(value)
        elif isinstance(value, ctypes.Array):
            if len(value):
                out[name] = list(value)
        elif isinstance(value, ctypes._Pointer):          # vfio_bitmap.data
            out[name] = ctypes.cast(value, ctypes.c_void_p).value or 0
        else:
            out[name] = value
    return out


class _FlatStruct:
    """A struct of integer fields only (most ioctl arguments): struct_fields()
    of its bytes with one precompiled unpack, no ctypes object.  Traced calls
    decode their argument twice (before and after), so this is on the path of
    every traced ioctl."""

    __slots__ = ("layout", "size", "names", "picks")

    def __init__(self, cls: type[ctypes.Structure]) -> None:
        fields: list[Any] = list(cls._fields_)
        while fields and issubclass(fields[-1][1], ctypes.Array) and getattr(fields[-1][1], "_length_", 1) == 0:
            fields.pop()                # a flexible array (data[]): struct_fields() leaves it out
        anonymous: tuple[str, ...] = tuple(getattr(cls, "_anonymous_", ()))
        if not fields or any(len(f) > 2 for f in fields) or anonymous:
            raise TypeError(f"{cls.__name__} has bit fields or anonymous members")
        self.layout = struct_layout(cls, fields[-1][0])        # TypeError unless all integers
        self.size = ctypes.sizeof(cls)
        kept = [(i, name) for i, (name, *_rest) in enumerate(fields)
                if not (name.startswith("_") or name == "pad")]
        self.names = tuple(name for _i, name in kept)
        self.picks = tuple(i for i, _name in kept)

    def decode(self, raw: bytes | bytearray) -> dict[str, Any]:
        if len(raw) < self.size:
            raw = bytes(raw).ljust(self.size, b"\0")
        values = self.layout.unpack_from(raw)
        return {name: values[i] for name, i in zip(self.names, self.picks)}


_FLAT: dict[type, _FlatStruct | None] = {}


def _struct(cls: type[ctypes.Structure], raw: bytes) -> dict[str, Any]:
    if cls in _FLAT:
        flat = _FLAT[cls]
    else:
        try:
            flat = _FlatStruct(cls)
        except TypeError:
            flat = None
        _FLAT[cls] = flat
    if flat is not None:
        return flat.decode(raw)
    size = ctypes.sizeof(cls)
    return struct_fields(cls.from_buffer_copy(bytes(raw[:size]).ljust(size, b"\0")))


#: The ioctls whose argument decodes to more fields after the call than its bytes
#: alone give (decode()'s ``after`` branch): for the others, bytes the kernel left
#: unchanged decode to what the program passed.
DECODED_AFTER_ONLY = frozenset({"VFIO_IOMMU_GET_INFO", "VFIO_DEVICE_GET_INFO", "VFIO_DEVICE_GET_REGION_INFO",
                                "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO"})


def decode(name: str, raw: bytes, *, after: bool = False, bitmap: bytes | None = None,
           user: bytes | None = None) -> dict[str, Any]:
    """An argument buffer's fields: what the program passed (``after`` False) or
    what the kernel left (``after`` True: also capability chains, the dependent
    devices of a hot-reset query and the dirty bitmap's words).  ``user``: the
    bytes of the buffer the argument points to (USER_BUFFERS), as the kernel read
    them (before) or left them (after)."""
    layout = LAYOUTS.get(name)
    if layout is None or layout.kind != STRUCT or layout.struct is None:
        return {}
    cls = layout.struct
    fields = _struct(cls, raw)
    base = ctypes.sizeof(cls)
    if name == "VFIO_DEVICE_SET_IRQS":
        count = fields.get("count", 0)
        flags = fields.get("flags", 0)
        n = min(count, max(0, (len(raw) - base)), 1024)
        if flags & uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            n = min(count, (len(raw) - base) // 4, 1024)
            fields["data"] = list(struct.unpack_from(f"<{n}i", raw, base))
        elif flags & uapi.VFIO_IRQ_SET_DATA_BOOL:
            fields["data"] = list(raw[base:base + n])
    elif name == "VFIO_DEVICE_PCI_HOT_RESET":
        n = min(fields.get("count", 0), (len(raw) - base) // 4, 1024)
        fields["group_fds"] = list(struct.unpack_from(f"<{n}i", raw, base))
    elif name in ("VFIO_IOMMU_DIRTY_PAGES", "VFIO_IOMMU_UNMAP_DMA"):
        get_bitmap = fields.get("flags", 0) & (uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP
                                               if name == "VFIO_IOMMU_DIRTY_PAGES"
                                               else uapi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP)
        if get_bitmap:
            if name == "VFIO_IOMMU_DIRTY_PAGES":
                fields.update(_struct(uapi.vfio_iommu_type1_dirty_bitmap_get, raw[base:]))
            else:
                fields["bitmap"] = _struct(uapi.vfio_bitmap, raw[base:])
    if after:
        if name == "VFIO_IOMMU_GET_INFO":
            fields.update(type1_info_fields(raw))
        elif name in ("VFIO_DEVICE_GET_INFO", "VFIO_DEVICE_GET_REGION_INFO"):
            caps = capability_chain(raw, fields.get("flags", 0), fields.get("cap_offset", 0),
                                    uapi.VFIO_DEVICE_FLAGS_CAPS if name == "VFIO_DEVICE_GET_INFO"
                                    else uapi.VFIO_REGION_INFO_FLAG_CAPS)
            if caps:
                fields["caps"] = caps
        elif name == "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO":
            n = min(fields.get("count", 0), (len(raw) - base) // 8, 1024)
            fields["devices"] = [list(struct.unpack_from("<IHBB", raw, base + 8 * i)) for i in range(n)]
        if bitmap is not None:
            fields.update(bitmap_fields(bitmap))
    buf = USER_BUFFERS.get(name)
    if buf is not None and user is not None and buf.out == after:
        fields.update(decode_user(name, fields, user))
    return fields


def bitmap_fields(bitmap: bytes) -> dict[str, Any]:
    """A dirty bitmap: how many pages are dirty, and its words."""
    words = struct.unpack(f"<{len(bitmap) // 8}Q", bitmap[:len(bitmap) // 8 * 8])
    return {"dirty_pages": sum(bin(w).count("1") for w in words), "bitmap_head": [hex(w) for w in words]}


def decode_user(name: str, fields: dict[str, Any], data: bytes) -> dict[str, Any]:
    """A USER_BUFFERS buffer's bytes, decoded (``fields``: the struct's, on the same side of the call)."""
    if name in ("IOMMU_IOAS_ALLOW_IOVAS", "IOMMU_IOAS_IOVA_RANGES"):
        n = len(data) // 16
        if name == "IOMMU_IOAS_IOVA_RANGES":          # the kernel filled the first num_iovas of them
            n = min(n, int(fields.get("num_iovas", 0) or 0))
        return {"iovas": [list(struct.unpack_from("<QQ", data, 16 * i)) for i in range(n)]}
    if name == "IOMMU_HWPT_GET_DIRTY_BITMAP":
        return bitmap_fields(data)
    if name == "IOMMU_GET_HW_INFO" and fields.get("out_data_type") == iu.IOMMU_HW_INFO_TYPE_INTEL_VTD:
        return {"hw_info": _struct(iu.iommu_hw_info_vtd, data)}
    key = USER_BUFFERS[name].key
    return {key: data.hex()}


def changed(args: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``after`` that differ from ``args``."""
    return {k: v for k, v in after.items() if args.get(k) != v}


_TYPE1_CAP_NAMES = {uapi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: "IOVA_RANGE",
                    uapi.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION: "MIGRATION",
                    uapi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL: "DMA_AVAIL"}


def type1_info_fields(buf: bytes | bytearray) -> dict[str, Any]:
    """struct vfio_iommu_type1_info and its capability chain, as the traces record them."""
    argsz, flags, pgsizes, cap_offset = struct.unpack_from("<IIQI", bytes(buf).ljust(24, b"\0"))
    out: dict[str, Any] = {"argsz": argsz, "flags": flags, "iova_pgsizes": pgsizes, "cap_offset": cap_offset}
    if not flags & uapi.VFIO_IOMMU_INFO_CAPS or not cap_offset or cap_offset >= len(buf):
        return out
    caps: list[dict[str, Any]] = []
    offset = cap_offset
    while offset and offset + 8 <= len(buf) and len(caps) < 64:
        cap_id, version, nxt = struct.unpack_from("<HHI", buf, offset)
        cap: dict[str, Any] = {"offset": offset, "id": cap_id, "version": version, "next": nxt,
                               "name": _TYPE1_CAP_NAMES.get(cap_id, str(cap_id))}
        if cap_id == uapi.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION and offset + 32 <= len(buf):
            cap["flags"], cap["pgsize_bitmap"], cap["max_dirty_bitmap_size"] = \
                struct.unpack_from("<I4xQQ", buf, offset + 8)
        elif cap_id == uapi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL and offset + 12 <= len(buf):
            cap["avail"] = struct.unpack_from("<I", buf, offset + 8)[0]
        elif cap_id == uapi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE and offset + 12 <= len(buf):
            nr = struct.unpack_from("<I", buf, offset + 8)[0]
            cap["nr_iovas"] = nr
            cap["ranges"] = [list(struct.unpack_from("<QQ", buf, offset + 16 + 16 * i))
                             for i in range(min(nr, max(0, (len(buf) - offset - 16) // 16)))]
        caps.append(cap)
        offset = nxt
    out["caps"] = caps
    return out


def capability_chain(buf: bytes, flags: int, cap_offset: int, caps_flag: int) -> list[dict[str, Any]]:
    """A GET_INFO/GET_REGION_INFO capability chain: each capability's header and
    its bytes (up to the next one, or the end of the buffer, at most 256)."""
    if not flags & caps_flag or not cap_offset:
        return []
    caps: list[dict[str, Any]] = []
    offset = cap_offset
    while offset and offset + 8 <= len(buf) and len(caps) < 64:
        cap_id, version, nxt = struct.unpack_from("<HHI", buf, offset)
        end = nxt if offset < nxt <= len(buf) else len(buf)
        caps.append({"offset": offset, "id": cap_id, "version": version, "next": nxt,
                     "data": buf[offset + 8:min(end, offset + 8 + 256)].hex()})
        if nxt <= offset:
            break
        offset = nxt
    return caps


# -- encoding (a replay builds the argument from a decoded record) -----------------------------------


def _assign(obj: Any, fields: dict[str, Any]) -> None:
    for key, value in fields.items():
        if not hasattr(obj, key):
            continue
        current = getattr(obj, key)
        if isinstance(current, (ctypes.Structure, ctypes.Union)) and isinstance(value, dict):
            _assign(current, value)
        elif isinstance(value, int) and not isinstance(value, bool) and not isinstance(current, ctypes.Array):
            try:
                setattr(obj, key, value)
            except TypeError:                          # a pointer field: as an address
                setattr(obj, key, ctypes.cast(value, type(current)))


def encode(name: str, args: dict[str, Any], *, fill: int = 0) -> bytearray:
    """The argument buffer a program would have passed for ``args``: the struct,
    its variable part, ``argsz`` bytes long (at least the struct), the rest ``fill``."""
    layout = LAYOUTS[name]
    assert layout.kind == STRUCT and layout.struct is not None
    cls = layout.struct
    base = ctypes.sizeof(cls)
    obj = cls()
    _assign(obj, args)
    head = bytearray(bytes(obj))
    tail = b""
    if name == "VFIO_DEVICE_SET_IRQS" and isinstance(args.get("data"), list):
        fmt = "i" if args.get("flags", 0) & uapi.VFIO_IRQ_SET_DATA_EVENTFD else "B"
        tail = struct.pack(f"<{len(args['data'])}{fmt}", *args["data"])
    elif name == "VFIO_DEVICE_PCI_HOT_RESET" and isinstance(args.get("group_fds"), list):
        tail = struct.pack(f"<{len(args['group_fds'])}i", *args["group_fds"])
    elif name == "VFIO_IOMMU_DIRTY_PAGES" and "bitmap" in args:
        get = uapi.vfio_iommu_type1_dirty_bitmap_get()
        _assign(get, args)
        tail = bytes(get)
    elif name == "VFIO_IOMMU_UNMAP_DMA" and isinstance(args.get("bitmap"), dict):
        bm = uapi.vfio_bitmap()
        _assign(bm, args["bitmap"])
        tail = bytes(bm)
    declared = args.get("size", 0) if name.startswith("IOMMU_") else args.get("argsz", 0)
    size = max(base + len(tail), min(int(declared or 0), MAX_ARG))
    buf = bytearray([fill & 0xFF]) * size
    buf[:base] = head
    buf[base:base + len(tail)] = tail
    return buf
