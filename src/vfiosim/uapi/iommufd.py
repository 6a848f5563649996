"""The iommufd userspace ABI (``<linux/iommufd.h>``, Linux 6.12) in ctypes.

The only declaration of ``/dev/iommu``'s ioctls and structures inside
vfiosim; the VFIO side of iommufd (``VFIO_DEVICE_BIND_IOMMUFD`` and the
attach/detach ioctls of the device cdev) is in :mod:`vfiosim.uapi.vfio`.
``tests/test_uapi_abi.py`` compiles a C program generated from the registries
below against Debian's 6.12 ``linux-libc-dev`` and compares every size,
offset, constant and ioctl number, as it does for ``<linux/vfio.h>``.

Conventions are vfio.py's: C names, ``__aligned_u64`` as ``c_uint64`` with
``_align_ = 8``, anonymous members as ``_anonymous_``.  Members whose C name
starts with two underscores (``__reserved``) must be read with ``getattr``
inside a class body (Python would mangle ``obj.__reserved`` there).

Every iommufd ioctl is ``_IO(';', 0x80 + n)``: no size or direction bits,
because each structure begins with its own ``size``, which the kernel reads
with ``copy_struct_from_user()`` (a larger structure is accepted if the bytes
the kernel does not know are zero, E2BIG otherwise).
"""

from __future__ import annotations

import ctypes
from ctypes import Structure, Union, c_uint8, c_uint16, c_uint32, c_uint64

from .ioctl import _IO
from .vfio import minsz, offsetofend

__all__ = ["IOCTLS", "STRUCTS", "CONSTANTS", "ioctl_name", "offsetofend", "minsz"]

# C spells it (';'), the same type as VFIO's: iommufd numbers start at 0x80
# so that they cannot collide with VFIO_BASE (100) + n on /dev/vfio/vfio.
IOMMUFD_TYPE = ord(";")

# anonymous enum of command numbers
IOMMUFD_CMD_BASE = 0x80
IOMMUFD_CMD_DESTROY = IOMMUFD_CMD_BASE
IOMMUFD_CMD_IOAS_ALLOC = 0x81
IOMMUFD_CMD_IOAS_ALLOW_IOVAS = 0x82
IOMMUFD_CMD_IOAS_COPY = 0x83
IOMMUFD_CMD_IOAS_IOVA_RANGES = 0x84
IOMMUFD_CMD_IOAS_MAP = 0x85
IOMMUFD_CMD_IOAS_UNMAP = 0x86
IOMMUFD_CMD_OPTION = 0x87
IOMMUFD_CMD_VFIO_IOAS = 0x88
IOMMUFD_CMD_HWPT_ALLOC = 0x89
IOMMUFD_CMD_GET_HW_INFO = 0x8A
IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING = 0x8B
IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP = 0x8C
IOMMUFD_CMD_HWPT_INVALIDATE = 0x8D
IOMMUFD_CMD_FAULT_QUEUE_ALLOC = 0x8E


class iommu_destroy(Structure):
    _fields_ = [
        ("size", c_uint32),
        ("id", c_uint32),
    ]


IOMMU_DESTROY = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_DESTROY)


class iommu_ioas_alloc(Structure):
    _fields_ = [
        ("size", c_uint32),
        ("flags", c_uint32),
        ("out_ioas_id", c_uint32),
    ]


IOMMU_IOAS_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOC)


class iommu_iova_range(Structure):
    _align_ = 8
    _fields_ = [
        ("start", c_uint64),
        ("last", c_uint64),
    ]


class iommu_ioas_iova_ranges(Structure):
    _align_ = 8
    _fields_ = [
        ("size", c_uint32),
        ("ioas_id", c_uint32),
        ("num_iovas", c_uint32),
        ("__reserved", c_uint32),
        ("allowed_iovas", c_uint64),      # user pointer to struct iommu_iova_range[num_iovas]
        ("out_iova_alignment", c_uint64),
    ]


IOMMU_IOAS_IOVA_RANGES = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_IOVA_RANGES)


class iommu_ioas_allow_iovas(Structure):
    _align_ = 8
    _fields_ = [
        ("size", c_uint32),
        ("ioas_id", c_uint32),
        ("num_iovas", c_uint32),
        ("__reserved", c_uint32),
        ("allowed_iovas", c_uint64),
    ]


IOMMU_IOAS_ALLOW_IOVAS = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOW_IOVAS)

# enum iommufd_ioas_map_flags
IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2


class iommu_ioas_map(Structure):
    _align_ = 8
    _fields_ = [
        ("size", c_uint32),
        ("flags", c_uint32),
        ("ioas_id", c_uint32),
        ("__reserved", c_uint32),
        ("user_va", c_uint64),
        ("length", c_uint64),
        ("iova", c_uint64),
    ]


IOMMU_IOAS_MAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP)


class iommu_ioas_copy(Structure):
    _align_ = 8
    _fields_ = [
        ("size", c_uint32),
        ("flags", c_uint32),
        ("dst_ioas_id", c_uint32),
        ("src_ioas_id", c_uint32),
        ("length", c_uint64),
        ("dst_iova", c_uint64),
        ("src_iova", c_uint64),
    ]


IOMMU_IOAS_COPY = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_COPY)


class iommu_ioas_unmap(Structure):
    _align_ = 8
    _fields_ = [
        ("size", c_uint32),
        ("ioas_id", c_uint32),
        ("iova", c_uint64),
        ("length", c_uint64),
    ]


IOMMU_IOAS_UNMAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_UNMAP)

# enum iommufd_option
IOMMU_OPTION_RLIMIT_MODE = 0
IOMMU_OPTION_HUGE_PAGES = 1

# enum iommufd_option_ops
IOMMU_OPTION_OP_SET = 0
IOMMU_OPTION_OP_GET = 1


class iommu_option(Structure):
    _align_ = 8
    _fields_ = [
        ("size", c_uint32),
        ("option_id", c_uint32),
        ("op", c_uint16),
        ("__reserved", c_uint16),
        ("object_id", c_uint32),
        ("val64", c_uint64),
    ]


IOMMU_OPTION = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_OPTION)

# enum iommufd_vfio_ioas_op
IOMMU_VFIO_IOAS_GET = 0
IOMMU_VFIO_IOAS_SET = 1
IOMMU_VFIO_IOAS_CLEAR = 2


class iommu_vfio_ioas(Structure):
    _fields_ = [
        ("size", c_uint32),
        ("ioas_id", c_uint32),
        ("op", c_uint16),
        ("__reserved", c_uint16),
    ]


IOMMU_VFIO_IOAS = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_VFIO_IOAS)

# enum iommufd_hwpt_alloc_flags
IOMMU_HWPT_ALLOC_NEST_PARENT = 1 << 0
IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 1 << 1
IOMMU_HWPT_FAULT_ID_VALID = 1 << 2

# enum iommu_hwpt_vtd_s1_flags
IOMMU_VTD_S1_SRE = 1 << 0
IOMMU_VTD_S1_EAFE = 1 << 1
IOMMU_VTD_S1_WPE = 1 << 2


class iommu_hwpt_vtd_s1(Structure):
    _align_ = 8
    _fields_ = [
        ("flags", c_uint64),
        ("pgtbl_addr", c_uint64),
        ("addr_width", c_uint32),
        ("__reserved", c_uint32),
    ]


# enum iommu_hwpt_data_type
IOMMU_HWPT_DATA_NONE = 0
IOMMU_HWPT_DATA_VTD_S1 = 1


class iommu_hwpt_alloc(Structure):
    _align_ = 8
    _fields_ = [
        ("size", c_uint32),
        ("flags", c_uint32),
        ("dev_id", c_uint32),
        ("pt_id", c_uint32),
        ("out_hwpt_id", c_uint32),
        ("__reserved", c_uint32),
        ("data_type", c_uint32),
        ("data_len", c_uint32),
        ("data_uptr", c_uint64),
        ("fault_id", c_uint32),
        ("__reserved2", c_uint32),
    ]


IOMMU_HWPT_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_ALLOC)

# enum iommu_hw_info_vtd_flags
IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17 = 1 << 0


class iommu_hw_info_vtd(Structure):
    _align_ = 8
    _fields_ = [
        ("flags", c_uint32),
        ("__reserved", c_uint32),
        ("cap_reg", c_uint64),
        ("ecap_reg", c_uint64),
    ]


# enum iommu_hw_info_type
IOMMU_HW_INFO_TYPE_NONE = 0
IOMMU_HW_INFO_TYPE_INTEL_VTD = 1

# enum iommufd_hw_capabilities
IOMMU_HW_CAP_DIRTY_TRACKING = 1 << 0
IOMMU_HW_CAP_PCI_PASID_EXEC = 1 << 1
IOMMU_HW_CAP_PCI_PASID_PRIV = 1 << 2


class iommu_hw_info(Structure):
    _align_ = 8
    _fields_ = [
        ("size", c_uint32),
        ("flags", c_uint32),
        ("dev_id", c_uint32),
        ("data_len", c_uint32),
        ("data_uptr", c_uint64),
        ("out_data_type", c_uint32),
        ("out_max_pasid_log2", c_uint8),
        ("__reserved", c_uint8 * 3),
        ("out_capabilities", c_uint64),
    ]


IOMMU_GET_HW_INFO = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_GET_HW_INFO)

# enum iommufd_hwpt_set_dirty_tracking_flags
IOMMU_HWPT_DIRTY_TRACKING_ENABLE = 1


class iommu_hwpt_set_dirty_tracking(Structure):
    _fields_ = [
        ("size", c_uint32),
        ("flags", c_uint32),
        ("hwpt_id", c_uint32),
        ("__reserved", c_uint32),
    ]


IOMMU_HWPT_SET_DIRTY_TRACKING = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING)

# enum iommufd_hwpt_get_dirty_bitmap_flags
IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR = 1


class iommu_hwpt_get_dirty_bitmap(Structure):
    _align_ = 8
    _fields_ = [
        ("size", c_uint32),
        ("hwpt_id", c_uint32),
        ("flags", c_uint32),
        ("__reserved", c_uint32),
        ("iova", c_uint64),
        ("length", c_uint64),
        ("page_size", c_uint64),
        ("data", c_uint64),               # user pointer to __u64 bitmap words
    ]


IOMMU_HWPT_GET_DIRTY_BITMAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP)

# enum iommu_hwpt_invalidate_data_type
IOMMU_HWPT_INVALIDATE_DATA_VTD_S1 = 0

# enum iommu_hwpt_vtd_s1_invalidate_flags
IOMMU_VTD_INV_FLAGS_LEAF = 1 << 0


class iommu_hwpt_vtd_s1_invalidate(Structure):
    _align_ = 8
    _fields_ = [
        ("addr", c_uint64),
        ("npages", c_uint64),
        ("flags", c_uint32),
        ("__reserved", c_uint32),
    ]


class iommu_hwpt_invalidate(Structure):
    _align_ = 8
    _fields_ = [
        ("size", c_uint32),
        ("hwpt_id", c_uint32),
        ("data_uptr", c_uint64),
        ("data_type", c_uint32),
        ("entry_len", c_uint32),
        ("entry_num", c_uint32),
        ("__reserved", c_uint32),
    ]


IOMMU_HWPT_INVALIDATE = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_INVALIDATE)

# enum iommu_hwpt_pgfault_flags
IOMMU_PGFAULT_FLAGS_PASID_VALID = 1 << 0
IOMMU_PGFAULT_FLAGS_LAST_PAGE = 1 << 1

# enum iommu_hwpt_pgfault_perm
IOMMU_PGFAULT_PERM_READ = 1 << 0
IOMMU_PGFAULT_PERM_WRITE = 1 << 1
IOMMU_PGFAULT_PERM_EXEC = 1 << 2
IOMMU_PGFAULT_PERM_PRIV = 1 << 3


class iommu_hwpt_pgfault(Structure):
    _align_ = 8
    _fields_ = [
        ("flags", c_uint32),
        ("dev_id", c_uint32),
        ("pasid", c_uint32),
        ("grpid", c_uint32),
        ("perm", c_uint32),
        ("__reserved", c_uint32),
        ("addr", c_uint64),
        ("length", c_uint32),
        ("cookie", c_uint32),
    ]


# enum iommufd_page_response_code
IOMMUFD_PAGE_RESP_SUCCESS = 0
IOMMUFD_PAGE_RESP_INVALID = 1


class iommu_hwpt_page_response(Structure):
    _fields_ = [
        ("cookie", c_uint32),
        ("code", c_uint32),
    ]


class iommu_fault_alloc(Structure):
    _fields_ = [
        ("size", c_uint32),
        ("flags", c_uint32),
        ("out_fault_id", c_uint32),
        ("out_fault_fd", c_uint32),
    ]


IOMMU_FAULT_QUEUE_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_FAULT_QUEUE_ALLOC)

# ---------------------------------------------------------------------------
# Registries for tooling and tests
# ---------------------------------------------------------------------------

# Header order.
_IOCTL_NAMES = (
    "IOMMU_DESTROY",
    "IOMMU_IOAS_ALLOC",
    "IOMMU_IOAS_IOVA_RANGES",
    "IOMMU_IOAS_ALLOW_IOVAS",
    "IOMMU_IOAS_MAP",
    "IOMMU_IOAS_COPY",
    "IOMMU_IOAS_UNMAP",
    "IOMMU_OPTION",
    "IOMMU_VFIO_IOAS",
    "IOMMU_HWPT_ALLOC",
    "IOMMU_GET_HW_INFO",
    "IOMMU_HWPT_SET_DIRTY_TRACKING",
    "IOMMU_HWPT_GET_DIRTY_BITMAP",
    "IOMMU_HWPT_INVALIDATE",
    "IOMMU_FAULT_QUEUE_ALLOC",
)

#: ioctl name -> host ioctl number
IOCTLS: dict[str, int] = {name: globals()[name] for name in _IOCTL_NAMES}

#: C struct name -> ctypes class
STRUCTS: dict[str, type[ctypes.Structure] | type[ctypes.Union]] = {
    name: obj
    for name, obj in globals().items()
    if isinstance(obj, type) and issubclass(obj, (Structure, Union)) and name.startswith("iommu_")
}

#: every integer macro and enum constant that is not an ioctl number
CONSTANTS: dict[str, int] = {
    name: value
    for name, value in globals().items()
    if name.startswith(("IOMMU_", "IOMMUFD_")) and type(value) is int and name not in IOCTLS
}

#: string macros (the header has none)
STRING_CONSTANTS: dict[str, str] = {}

_IOCTL_NAME_BY_NUMBER = {cmd: name for name, cmd in IOCTLS.items()}


def ioctl_name(cmd: int) -> str | None:
    """Name of a host iommufd ioctl number (for logs and traces)."""
    return _IOCTL_NAME_BY_NUMBER.get(cmd)
