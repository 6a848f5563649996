"""The Linux VFIO userspace ABI (``<linux/vfio.h>``) in ctypes.

This module is the single source of truth for the VFIO ABI inside vfiosim:
every ``#define``, enum constant, struct/union and ioctl number of
``<linux/vfio.h>`` as Linux 6.12 defines it (Debian's linux-libc-dev 6.12),
plus the s390 zPCI capability structs of ``<linux/vfio_zdev.h>`` that vfio.h
refers to.  The iommufd uAPI (``<linux/iommufd.h>``) is in
:mod:`vfiosim.uapi.iommufd`.
Everything else (the simulated kernel, the user-side helpers, tools) must
import from here instead of repeating numbers or layouts.

``tests/test_uapi_abi.py`` generates a C program from the registries below,
compiles it against Debian's 6.12 headers and checks every ``sizeof``,
``_Alignof``, ``offsetof``, field size and signedness, every constant and every
ioctl number; it also parses the header to make sure nothing is missing here.

Conventions:

* Names are exactly the C names: struct classes are lower-case
  (``vfio_iommu_spapr_tce_info``), fields keep their C names, macros keep
  their upper-case names.
* Flexible array members (``__u8 data[]``) are zero-length ctypes arrays, so
  ``ctypes.sizeof`` equals C ``sizeof`` and the member's offset is where the
  variable part starts.
* Anonymous unions are ``_anonymous_`` members, so attribute access reads like
  C member access: ``vfio_eeh_pe_op().err.mask``.
* ioctl numbers use the encoding of the host this runs on (see
  :mod:`vfiosim.uapi.ioctl`).  VFIO encodes every request with ``_IO`` (no
  size, no direction) because the structs carry their own ``argsz``.
"""

from __future__ import annotations

import ctypes
import functools
from ctypes import POINTER, Structure, Union, c_int32, c_uint8, c_uint16, c_uint32, c_uint64

from vfiosim.uapi.ioctl import _IO, _IOC_NR

# A note on __aligned_u64: it forces 8-byte alignment even on 32-bit ABIs
# (i386) where a plain __u64 is only 4-byte aligned.  ctypes before Python 3.13
# cannot raise a structure's alignment, so the affected structs set
# ``_align_ = 8`` (honoured from 3.13 on, ignored before).  All of them keep
# their 64-bit members at naturally aligned offsets and have sizes that are
# multiples of 8, so offsets and sizes are right on every ABI regardless; only
# ctypes.alignment() of those structs can differ on i386 with Python < 3.13.

VFIO_API_VERSION = 0

# ---------------------------------------------------------------------------
# Extensions (VFIO_CHECK_EXTENSION arguments)
# ---------------------------------------------------------------------------

VFIO_TYPE1_IOMMU = 1
VFIO_SPAPR_TCE_IOMMU = 2
VFIO_TYPE1v2_IOMMU = 3
VFIO_DMA_CC_IOMMU = 4
VFIO_EEH = 5
VFIO_TYPE1_NESTING_IOMMU = 6
VFIO_SPAPR_TCE_v2_IOMMU = 7
VFIO_NOIOMMU_IOMMU = 8
VFIO_UNMAP_ALL = 9
VFIO_UPDATE_VADDR = 10

# C spells the ioctl type as the char literal ';'; as a C int it is 59.
VFIO_TYPE = ord(";")
VFIO_BASE = 100


class vfio_info_cap_header(Structure):
    _fields_ = [
        ("id", c_uint16),
        ("version", c_uint16),
        ("next", c_uint32),
    ]


# ---------------------------------------------------------------------------
# Container fd (/dev/vfio/vfio)
# ---------------------------------------------------------------------------

VFIO_GET_API_VERSION = _IO(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _IO(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU = _IO(VFIO_TYPE, VFIO_BASE + 2)

# ---------------------------------------------------------------------------
# Group fd (/dev/vfio/$GROUP)
# ---------------------------------------------------------------------------


class vfio_group_status(Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
    ]


VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

VFIO_GROUP_GET_STATUS = _IO(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = _IO(VFIO_TYPE, VFIO_BASE + 6)

# ---------------------------------------------------------------------------
# Device fd: device info
# ---------------------------------------------------------------------------


class vfio_device_info(Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("num_regions", c_uint32),
        ("num_irqs", c_uint32),
        ("cap_offset", c_uint32),
        # Linux 6.6 made the struct a multiple of 8 bytes ("vfio: align
        # capability structures"): capabilities start at offset 24.
        ("pad", c_uint32),
    ]


VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_DEVICE_FLAGS_PLATFORM = 1 << 2
VFIO_DEVICE_FLAGS_AMBA = 1 << 3
VFIO_DEVICE_FLAGS_CCW = 1 << 4
VFIO_DEVICE_FLAGS_AP = 1 << 5
VFIO_DEVICE_FLAGS_FSL_MC = 1 << 6
VFIO_DEVICE_FLAGS_CAPS = 1 << 7
VFIO_DEVICE_FLAGS_CDX = 1 << 8

VFIO_DEVICE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 7)

# mdev "device_api" sysfs strings (not integers, so not in CONSTANTS).
VFIO_DEVICE_API_PCI_STRING = "vfio-pci"
VFIO_DEVICE_API_PLATFORM_STRING = "vfio-platform"
VFIO_DEVICE_API_AMBA_STRING = "vfio-amba"
VFIO_DEVICE_API_CCW_STRING = "vfio-ccw"
VFIO_DEVICE_API_AP_STRING = "vfio-ap"

# s390 zPCI device-info capability ids; layouts are in <linux/vfio_zdev.h>
# and declared at the end of this module.
VFIO_DEVICE_INFO_CAP_ZPCI_BASE = 1
VFIO_DEVICE_INFO_CAP_ZPCI_GROUP = 2
VFIO_DEVICE_INFO_CAP_ZPCI_UTIL = 3
VFIO_DEVICE_INFO_CAP_ZPCI_PFIP = 4

# PCIe AtomicOp completion to the root bus (vfio-pci, since Linux 6.2).
VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP = 5


class vfio_device_info_cap_pci_atomic_comp(Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("flags", c_uint32),
        ("reserved", c_uint32),
    ]


VFIO_PCI_ATOMIC_COMP32 = 1 << 0
VFIO_PCI_ATOMIC_COMP64 = 1 << 1
VFIO_PCI_ATOMIC_COMP128 = 1 << 2

# ---------------------------------------------------------------------------
# Device fd: region info and region capabilities
# ---------------------------------------------------------------------------


class vfio_region_info(Structure):
    _align_ = 8  # __aligned_u64, see the note at the top
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("index", c_uint32),
        ("cap_offset", c_uint32),
        ("size", c_uint64),
        ("offset", c_uint64),
    ]


VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

VFIO_DEVICE_GET_REGION_INFO = _IO(VFIO_TYPE, VFIO_BASE + 8)

VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1


class vfio_region_sparse_mmap_area(Structure):
    _align_ = 8  # __aligned_u64, see the note at the top
    _fields_ = [
        ("offset", c_uint64),
        ("size", c_uint64),
    ]


class vfio_region_info_cap_sparse_mmap(Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("nr_areas", c_uint32),
        ("reserved", c_uint32),
        ("areas", vfio_region_sparse_mmap_area * 0),
    ]


VFIO_REGION_INFO_CAP_TYPE = 2


class vfio_region_info_cap_type(Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("type", c_uint32),
        ("subtype", c_uint32),
    ]


# Region types (global per bus driver).  The vendor flag is bit 31 of a
# __u32 "type" field, so it is kept as the unsigned 0x80000000 here (C's
# "1 << 31" is an int and therefore negative).
VFIO_REGION_TYPE_PCI_VENDOR_TYPE = 1 << 31
VFIO_REGION_TYPE_PCI_VENDOR_MASK = 0xFFFF
VFIO_REGION_TYPE_GFX = 1
VFIO_REGION_TYPE_CCW = 2
VFIO_REGION_TYPE_MIGRATION_DEPRECATED = 3

# 8086 vendor PCI sub-types
VFIO_REGION_SUBTYPE_INTEL_IGD_OPREGION = 1
VFIO_REGION_SUBTYPE_INTEL_IGD_HOST_CFG = 2
VFIO_REGION_SUBTYPE_INTEL_IGD_LPC_CFG = 3

# 10de vendor PCI sub-types (deprecated, region no longer provided)
VFIO_REGION_SUBTYPE_NVIDIA_NVLINK2_RAM = 1

# 1014 vendor PCI sub-types (deprecated, region no longer provided)
VFIO_REGION_SUBTYPE_IBM_NVLINK2_ATSD = 1

# sub-types for VFIO_REGION_TYPE_GFX
VFIO_REGION_SUBTYPE_GFX_EDID = 1


class vfio_region_gfx_edid(Structure):
    _fields_ = [
        ("edid_offset", c_uint32),
        ("edid_max_size", c_uint32),
        ("edid_size", c_uint32),
        ("max_xres", c_uint32),
        ("max_yres", c_uint32),
        ("link_state", c_uint32),
    ]


VFIO_DEVICE_GFX_LINK_STATE_UP = 1
VFIO_DEVICE_GFX_LINK_STATE_DOWN = 2

# sub-types for VFIO_REGION_TYPE_CCW
VFIO_REGION_SUBTYPE_CCW_ASYNC_CMD = 1
VFIO_REGION_SUBTYPE_CCW_SCHIB = 2
VFIO_REGION_SUBTYPE_CCW_CRW = 3

# sub-types for VFIO_REGION_TYPE_MIGRATION (v1 migration, deprecated)
VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED = 1


class vfio_device_migration_info(Structure):
    _align_ = 8  # __aligned_u64, see the note at the top
    _fields_ = [
        ("device_state", c_uint32),
        ("reserved", c_uint32),
        ("pending_bytes", c_uint64),
        ("data_offset", c_uint64),
        ("data_size", c_uint64),
    ]


VFIO_DEVICE_STATE_V1_STOP = 0
VFIO_DEVICE_STATE_V1_RUNNING = 1 << 0
VFIO_DEVICE_STATE_V1_SAVING = 1 << 1
VFIO_DEVICE_STATE_V1_RESUMING = 1 << 2
VFIO_DEVICE_STATE_MASK = VFIO_DEVICE_STATE_V1_RUNNING | VFIO_DEVICE_STATE_V1_SAVING | VFIO_DEVICE_STATE_V1_RESUMING


def VFIO_DEVICE_STATE_VALID(state: int) -> bool:
    """v1 migration: RESUMING may not be combined with any other state bit."""
    if state & VFIO_DEVICE_STATE_V1_RESUMING:
        return (state & VFIO_DEVICE_STATE_MASK) == VFIO_DEVICE_STATE_V1_RESUMING
    return True


def VFIO_DEVICE_STATE_IS_ERROR(state: int) -> bool:
    """v1 migration: SAVING|RESUMING together is the error state."""
    return (state & VFIO_DEVICE_STATE_MASK) == (VFIO_DEVICE_STATE_V1_SAVING | VFIO_DEVICE_STATE_V1_RESUMING)


def VFIO_DEVICE_STATE_SET_ERROR(state: int) -> int:
    return (state & ~VFIO_DEVICE_STATE_MASK) | VFIO_DEVICE_STATE_V1_SAVING | VFIO_DEVICE_STATE_V1_RESUMING


VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3

# Deprecated, capability no longer provided.
VFIO_REGION_INFO_CAP_NVLINK2_SSATGT = 4


class vfio_region_info_cap_nvlink2_ssatgt(Structure):
    _align_ = 8  # __aligned_u64, see the note at the top
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("tgt", c_uint64),
    ]


# Deprecated, capability no longer provided.
VFIO_REGION_INFO_CAP_NVLINK2_LNKSPD = 5


class vfio_region_info_cap_nvlink2_lnkspd(Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("link_speed", c_uint32),
        ("__pad", c_uint32),
    ]


# ---------------------------------------------------------------------------
# Device fd: interrupts and reset
# ---------------------------------------------------------------------------


class vfio_irq_info(Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("index", c_uint32),
        ("count", c_uint32),
    ]


VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

VFIO_DEVICE_GET_IRQ_INFO = _IO(VFIO_TYPE, VFIO_BASE + 9)


class vfio_irq_set(Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("index", c_uint32),
        ("start", c_uint32),
        ("count", c_uint32),
        # bool (__u8) or eventfd (__s32) payload, depending on DATA_* flag
        ("data", c_uint8 * 0),
    ]


VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

VFIO_DEVICE_SET_IRQS = _IO(VFIO_TYPE, VFIO_BASE + 10)

VFIO_IRQ_SET_DATA_TYPE_MASK = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_DATA_EVENTFD
VFIO_IRQ_SET_ACTION_TYPE_MASK = VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_ACTION_TRIGGER

VFIO_DEVICE_RESET = _IO(VFIO_TYPE, VFIO_BASE + 11)

# vfio-pci fixed region indexes (anonymous enum).  Indexes >= 9 are device
# specific and described by VFIO_REGION_INFO_CAP_TYPE.
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR1_REGION_INDEX = 1
VFIO_PCI_BAR2_REGION_INDEX = 2
VFIO_PCI_BAR3_REGION_INDEX = 3
VFIO_PCI_BAR4_REGION_INDEX = 4
VFIO_PCI_BAR5_REGION_INDEX = 5
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8
VFIO_PCI_NUM_REGIONS = 9

# vfio-pci IRQ indexes (anonymous enum)
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4
VFIO_PCI_NUM_IRQS = 5

# vfio-ccw region and IRQ indexes (anonymous enums)
VFIO_CCW_CONFIG_REGION_INDEX = 0
VFIO_CCW_NUM_REGIONS = 1

VFIO_CCW_IO_IRQ_INDEX = 0
VFIO_CCW_CRW_IRQ_INDEX = 1
VFIO_CCW_REQ_IRQ_INDEX = 2
VFIO_CCW_NUM_IRQS = 3

# vfio-ap IRQ indexes (anonymous enum)
VFIO_AP_REQ_IRQ_INDEX = 0
VFIO_AP_NUM_IRQS = 1

# ---------------------------------------------------------------------------
# Device fd: PCI hot reset
# ---------------------------------------------------------------------------


class _vfio_pci_dependent_device_anon(Union):
    # group_id for a device opened through its group, devid for a cdev.
    _fields_ = [
        ("group_id", c_uint32),
        ("devid", c_uint32),
    ]


VFIO_PCI_DEVID_OWNED = 0
VFIO_PCI_DEVID_NOT_OWNED = -1       # stored in the __u32 devid as 0xffffffff


class vfio_pci_dependent_device(Structure):
    _anonymous_ = ("_anon",)
    _fields_ = [
        ("_anon", _vfio_pci_dependent_device_anon),
        ("segment", c_uint16),
        ("bus", c_uint8),
        ("devfn", c_uint8),
    ]


class vfio_pci_hot_reset_info(Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("count", c_uint32),
        ("devices", vfio_pci_dependent_device * 0),
    ]


VFIO_PCI_HOT_RESET_FLAG_DEV_ID = 1 << 0
VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED = 1 << 1

VFIO_DEVICE_GET_PCI_HOT_RESET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)


class vfio_pci_hot_reset(Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("count", c_uint32),
        ("group_fds", c_int32 * 0),
    ]


VFIO_DEVICE_PCI_HOT_RESET = _IO(VFIO_TYPE, VFIO_BASE + 13)

# ---------------------------------------------------------------------------
# Device fd: graphics planes, ioeventfd
# ---------------------------------------------------------------------------


class _vfio_device_gfx_plane_info_anon(Union):
    # The unnamed union at the end of vfio_device_gfx_plane_info.
    _fields_ = [
        ("region_index", c_uint32),
        ("dmabuf_id", c_uint32),
    ]


class vfio_device_gfx_plane_info(Structure):
    _align_ = 8  # __aligned_u64, see the note at the top
    _anonymous_ = ("_anon",)
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("drm_plane_type", c_uint32),
        ("drm_format", c_uint32),
        ("drm_format_mod", c_uint64),
        ("width", c_uint32),
        ("height", c_uint32),
        ("stride", c_uint32),
        ("size", c_uint32),
        ("x_pos", c_uint32),
        ("y_pos", c_uint32),
        ("x_hot", c_uint32),
        ("y_hot", c_uint32),
        ("_anon", _vfio_device_gfx_plane_info_anon),
        ("reserved", c_uint32),
    ]


VFIO_GFX_PLANE_TYPE_PROBE = 1 << 0
VFIO_GFX_PLANE_TYPE_DMABUF = 1 << 1
VFIO_GFX_PLANE_TYPE_REGION = 1 << 2

VFIO_DEVICE_QUERY_GFX_PLANE = _IO(VFIO_TYPE, VFIO_BASE + 14)
VFIO_DEVICE_GET_GFX_DMABUF = _IO(VFIO_TYPE, VFIO_BASE + 15)


class vfio_device_ioeventfd(Structure):
    _align_ = 8  # __aligned_u64, see the note at the top
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("offset", c_uint64),
        ("data", c_uint64),
        ("fd", c_int32),
        ("reserved", c_uint32),
    ]


VFIO_DEVICE_IOEVENTFD_8 = 1 << 0
VFIO_DEVICE_IOEVENTFD_16 = 1 << 1
VFIO_DEVICE_IOEVENTFD_32 = 1 << 2
VFIO_DEVICE_IOEVENTFD_64 = 1 << 3
VFIO_DEVICE_IOEVENTFD_SIZE_MASK = 0xF

VFIO_DEVICE_IOEVENTFD = _IO(VFIO_TYPE, VFIO_BASE + 16)

# ---------------------------------------------------------------------------
# Device fd: the VFIO device cdev (/dev/vfio/devices/vfioN) and iommufd
# ---------------------------------------------------------------------------


class vfio_device_bind_iommufd(Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("iommufd", c_int32),
        ("out_devid", c_uint32),
    ]


VFIO_DEVICE_BIND_IOMMUFD = _IO(VFIO_TYPE, VFIO_BASE + 18)


class vfio_device_attach_iommufd_pt(Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("pt_id", c_uint32),
    ]


VFIO_DEVICE_ATTACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 19)


class vfio_device_detach_iommufd_pt(Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
    ]


VFIO_DEVICE_DETACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 20)

# ---------------------------------------------------------------------------
# Device fd: VFIO_DEVICE_FEATURE and its payloads
# ---------------------------------------------------------------------------


class vfio_device_feature(Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("data", c_uint8 * 0),
    ]


VFIO_DEVICE_FEATURE_MASK = 0xFFFF
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18

VFIO_DEVICE_FEATURE = _IO(VFIO_TYPE, VFIO_BASE + 17)

# Payload is a 16-byte UUID (__u8 b[16]); the header declares no struct.
VFIO_DEVICE_FEATURE_PCI_VF_TOKEN = 0


class vfio_device_feature_migration(Structure):
    _align_ = 8  # __aligned_u64, see the note at the top
    _fields_ = [
        ("flags", c_uint64),
    ]


VFIO_MIGRATION_STOP_COPY = 1 << 0
VFIO_MIGRATION_P2P = 1 << 1
VFIO_MIGRATION_PRE_COPY = 1 << 2
VFIO_DEVICE_FEATURE_MIGRATION = 1


class vfio_device_feature_mig_state(Structure):
    _fields_ = [
        ("device_state", c_uint32),  # enum vfio_device_mig_state
        ("data_fd", c_int32),
    ]


VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE = 2

# enum vfio_device_mig_state (the v2 migration FSM states)
VFIO_DEVICE_STATE_ERROR = 0
VFIO_DEVICE_STATE_STOP = 1
VFIO_DEVICE_STATE_RUNNING = 2
VFIO_DEVICE_STATE_STOP_COPY = 3
VFIO_DEVICE_STATE_RESUMING = 4
VFIO_DEVICE_STATE_RUNNING_P2P = 5
VFIO_DEVICE_STATE_PRE_COPY = 6
VFIO_DEVICE_STATE_PRE_COPY_P2P = 7
VFIO_DEVICE_STATE_NR = 8


class vfio_precopy_info(Structure):
    _align_ = 8  # __aligned_u64, see the note at the top
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("initial_bytes", c_uint64),
        ("dirty_bytes", c_uint64),
    ]


# An ioctl of the migration data fd (same number as VFIO_EEH_PE_OP).
VFIO_MIG_GET_PRECOPY_INFO = _IO(VFIO_TYPE, VFIO_BASE + 21)

VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY = 3


class vfio_device_low_power_entry_with_wakeup(Structure):
    _fields_ = [
        ("wakeup_eventfd", c_int32),
        ("reserved", c_uint32),
    ]


VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP = 4
VFIO_DEVICE_FEATURE_LOW_POWER_EXIT = 5


class vfio_device_feature_dma_logging_control(Structure):
    _align_ = 8  # __aligned_u64, see the note at the top
    _fields_ = [
        ("page_size", c_uint64),
        ("num_ranges", c_uint32),
        ("__reserved", c_uint32),
        # user pointer to vfio_device_feature_dma_logging_range[num_ranges],
        # carried as __aligned_u64 so 32-bit userspace has the same layout
        ("ranges", c_uint64),
    ]


class vfio_device_feature_dma_logging_range(Structure):
    _align_ = 8  # __aligned_u64, see the note at the top
    _fields_ = [
        ("iova", c_uint64),
        ("length", c_uint64),
    ]


VFIO_DEVICE_FEATURE_DMA_LOGGING_START = 6
VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP = 7


class vfio_device_feature_dma_logging_report(Structure):
    _align_ = 8  # __aligned_u64, see the note at the top
    _fields_ = [
        ("iova", c_uint64),
        ("length", c_uint64),
        ("page_size", c_uint64),
        ("bitmap", c_uint64),  # user pointer to __u64 bitmap words
    ]


VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT = 8


class vfio_device_feature_mig_data_size(Structure):
    _align_ = 8  # __aligned_u64, see the note at the top
    _fields_ = [
        ("stop_copy_length", c_uint64),
    ]


VFIO_DEVICE_FEATURE_MIG_DATA_SIZE = 9


class vfio_device_feature_bus_master(Structure):
    _fields_ = [
        ("op", c_uint32),
    ]


VFIO_DEVICE_FEATURE_CLEAR_MASTER = 0
VFIO_DEVICE_FEATURE_SET_MASTER = 1
VFIO_DEVICE_FEATURE_BUS_MASTER = 10

# ---------------------------------------------------------------------------
# Type1 IOMMU (container fd)
# ---------------------------------------------------------------------------


class vfio_iommu_type1_info(Structure):
    _align_ = 8  # __aligned_u64, see the note at the top
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("iova_pgsizes", c_uint64),
        ("cap_offset", c_uint32),
        ("pad", c_uint32),
    ]


VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1

VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1


class vfio_iova_range(Structure):
    _fields_ = [
        ("start", c_uint64),
        ("end", c_uint64),
    ]


class vfio_iommu_type1_info_cap_iova_range(Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("nr_iovas", c_uint32),
        ("reserved", c_uint32),
        ("iova_ranges", vfio_iova_range * 0),
    ]


VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION = 2


class vfio_iommu_type1_info_cap_migration(Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("flags", c_uint32),
        ("pgsize_bitmap", c_uint64),
        ("max_dirty_bitmap_size", c_uint64),
    ]


VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3


class vfio_iommu_type1_info_dma_avail(Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("avail", c_uint32),
    ]


VFIO_IOMMU_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)


class vfio_iommu_type1_dma_map(Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("vaddr", c_uint64),
        ("iova", c_uint64),
        ("size", c_uint64),
    ]


VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_DMA_MAP_FLAG_VADDR = 1 << 2

VFIO_IOMMU_MAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 13)


class vfio_bitmap(Structure):
    _fields_ = [
        ("pgsize", c_uint64),
        ("size", c_uint64),
        # A real pointer in the header (not __aligned_u64), so the struct is
        # 20 bytes for 32-bit userspace and 24 bytes for 64-bit.
        ("data", POINTER(c_uint64)),
    ]


class vfio_iommu_type1_dma_unmap(Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("iova", c_uint64),
        ("size", c_uint64),
        ("data", c_uint8 * 0),  # struct vfio_bitmap with GET_DIRTY_BITMAP
    ]


VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1
VFIO_DMA_UNMAP_FLAG_VADDR = 1 << 2

VFIO_IOMMU_UNMAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 14)

VFIO_IOMMU_ENABLE = _IO(VFIO_TYPE, VFIO_BASE + 15)
VFIO_IOMMU_DISABLE = _IO(VFIO_TYPE, VFIO_BASE + 16)


class vfio_iommu_type1_dirty_bitmap(Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("data", c_uint8 * 0),  # struct vfio_iommu_type1_dirty_bitmap_get
    ]


VFIO_IOMMU_DIRTY_PAGES_FLAG_START = 1 << 0
VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP = 1 << 1
VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP = 1 << 2


class vfio_iommu_type1_dirty_bitmap_get(Structure):
    _fields_ = [
        ("iova", c_uint64),
        ("size", c_uint64),
        ("bitmap", vfio_bitmap),
    ]


VFIO_IOMMU_DIRTY_PAGES = _IO(VFIO_TYPE, VFIO_BASE + 17)

# ---------------------------------------------------------------------------
# sPAPR TCE IOMMU (POWER) and EEH
# ---------------------------------------------------------------------------


class vfio_iommu_spapr_tce_ddw_info(Structure):
    _fields_ = [
        ("pgsizes", c_uint64),
        ("max_dynamic_windows_supported", c_uint32),
        ("levels", c_uint32),
    ]


class vfio_iommu_spapr_tce_info(Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("dma32_window_start", c_uint32),
        ("dma32_window_size", c_uint32),
        ("ddw", vfio_iommu_spapr_tce_ddw_info),
    ]


VFIO_IOMMU_SPAPR_INFO_DDW = 1 << 0

# Same number as VFIO_IOMMU_GET_INFO: the container's IOMMU type decides.
VFIO_IOMMU_SPAPR_TCE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)


class vfio_eeh_pe_err(Structure):
    _fields_ = [
        ("type", c_uint32),
        ("func", c_uint32),
        ("addr", c_uint64),
        ("mask", c_uint64),
    ]


class _vfio_eeh_pe_op_anon(Union):
    # The unnamed union in vfio_eeh_pe_op; room for future op arguments.
    _fields_ = [
        ("err", vfio_eeh_pe_err),
    ]


class vfio_eeh_pe_op(Structure):
    _anonymous_ = ("_anon",)
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("op", c_uint32),
        ("_anon", _vfio_eeh_pe_op_anon),
    ]


VFIO_EEH_PE_DISABLE = 0
VFIO_EEH_PE_ENABLE = 1
VFIO_EEH_PE_UNFREEZE_IO = 2
VFIO_EEH_PE_UNFREEZE_DMA = 3
VFIO_EEH_PE_GET_STATE = 4
# results of VFIO_EEH_PE_GET_STATE
VFIO_EEH_PE_STATE_NORMAL = 0
VFIO_EEH_PE_STATE_RESET = 1
VFIO_EEH_PE_STATE_STOPPED = 2
VFIO_EEH_PE_STATE_STOPPED_DMA = 4
VFIO_EEH_PE_STATE_UNAVAIL = 5
VFIO_EEH_PE_RESET_DEACTIVATE = 5
VFIO_EEH_PE_RESET_HOT = 6
VFIO_EEH_PE_RESET_FUNDAMENTAL = 7
VFIO_EEH_PE_CONFIGURE = 8
VFIO_EEH_PE_INJECT_ERR = 9

VFIO_EEH_PE_OP = _IO(VFIO_TYPE, VFIO_BASE + 21)


class vfio_iommu_spapr_register_memory(Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("vaddr", c_uint64),
        ("size", c_uint64),
    ]


VFIO_IOMMU_SPAPR_REGISTER_MEMORY = _IO(VFIO_TYPE, VFIO_BASE + 17)
VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY = _IO(VFIO_TYPE, VFIO_BASE + 18)


class vfio_iommu_spapr_tce_create(Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        # in
        ("page_shift", c_uint32),
        ("__resv1", c_uint32),
        ("window_size", c_uint64),
        ("levels", c_uint32),
        ("__resv2", c_uint32),
        # out
        ("start_addr", c_uint64),
    ]


VFIO_IOMMU_SPAPR_TCE_CREATE = _IO(VFIO_TYPE, VFIO_BASE + 19)


class vfio_iommu_spapr_tce_remove(Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("start_addr", c_uint64),
    ]


VFIO_IOMMU_SPAPR_TCE_REMOVE = _IO(VFIO_TYPE, VFIO_BASE + 20)

# ---------------------------------------------------------------------------
# s390 zPCI device-info capabilities (<linux/vfio_zdev.h>)
# ---------------------------------------------------------------------------


class vfio_device_info_cap_zpci_base(Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("start_dma", c_uint64),
        ("end_dma", c_uint64),
        ("pchid", c_uint16),
        ("vfn", c_uint16),
        ("fmb_length", c_uint16),
        ("pft", c_uint8),
        ("gid", c_uint8),
        # end of version 1
        ("fh", c_uint32),
        # end of version 2
    ]


class vfio_device_info_cap_zpci_group(Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("dasm", c_uint64),
        ("msi_addr", c_uint64),
        ("flags", c_uint64),
        ("mui", c_uint16),
        ("noi", c_uint16),
        ("maxstbl", c_uint16),
        ("version", c_uint8),
        # end of version 1
        ("reserved", c_uint8),
        ("imaxstbl", c_uint16),
        # end of version 2
    ]


VFIO_DEVICE_INFO_ZPCI_FLAG_REFRESH = 1


class vfio_device_info_cap_zpci_util(Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("size", c_uint32),
        ("util_str", c_uint8 * 0),  # EBCDIC, `size` bytes
    ]


class vfio_device_info_cap_zpci_pfip(Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("size", c_uint32),
        ("pfip", c_uint8 * 0),
    ]


# ---------------------------------------------------------------------------
# Registries for tooling and tests
# ---------------------------------------------------------------------------

# Header order; the order also decides how ioctl_name() joins shared numbers.
_IOCTL_NAMES = (
    "VFIO_GET_API_VERSION",
    "VFIO_CHECK_EXTENSION",
    "VFIO_SET_IOMMU",
    "VFIO_GROUP_GET_STATUS",
    "VFIO_GROUP_SET_CONTAINER",
    "VFIO_GROUP_UNSET_CONTAINER",
    "VFIO_GROUP_GET_DEVICE_FD",
    "VFIO_DEVICE_GET_INFO",
    "VFIO_DEVICE_GET_REGION_INFO",
    "VFIO_DEVICE_GET_IRQ_INFO",
    "VFIO_DEVICE_SET_IRQS",
    "VFIO_DEVICE_RESET",
    "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO",
    "VFIO_DEVICE_PCI_HOT_RESET",
    "VFIO_DEVICE_QUERY_GFX_PLANE",
    "VFIO_DEVICE_GET_GFX_DMABUF",
    "VFIO_DEVICE_IOEVENTFD",
    "VFIO_DEVICE_FEATURE",
    "VFIO_DEVICE_BIND_IOMMUFD",
    "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
    "VFIO_DEVICE_DETACH_IOMMUFD_PT",
    "VFIO_MIG_GET_PRECOPY_INFO",
    "VFIO_IOMMU_GET_INFO",
    "VFIO_IOMMU_MAP_DMA",
    "VFIO_IOMMU_UNMAP_DMA",
    "VFIO_IOMMU_ENABLE",
    "VFIO_IOMMU_DISABLE",
    "VFIO_IOMMU_DIRTY_PAGES",
    "VFIO_IOMMU_SPAPR_TCE_GET_INFO",
    "VFIO_EEH_PE_OP",
    "VFIO_IOMMU_SPAPR_REGISTER_MEMORY",
    "VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY",
    "VFIO_IOMMU_SPAPR_TCE_CREATE",
    "VFIO_IOMMU_SPAPR_TCE_REMOVE",
)

#: ioctl name -> host ioctl number
IOCTLS: dict[str, int] = {name: globals()[name] for name in _IOCTL_NAMES}

#: ioctl name -> offset from VFIO_BASE (several names share an offset)
IOCTL_BASE_OFFSETS: dict[str, int] = {name: _IOC_NR(cmd) - VFIO_BASE for name, cmd in IOCTLS.items()}

#: C struct/union name -> ctypes class.  Helper classes for anonymous unions
#: start with an underscore and have no C name, so they are not listed.
STRUCTS: dict[str, type[ctypes.Structure] | type[ctypes.Union]] = {
    name: obj
    for name, obj in globals().items()
    if isinstance(obj, type) and issubclass(obj, (Structure, Union)) and name.startswith("vfio_")
}

#: every integer macro and enum constant that is not an ioctl number
CONSTANTS: dict[str, int] = {
    name: value
    for name, value in globals().items()
    if name.startswith("VFIO_") and type(value) is int and name not in IOCTLS
}

#: string macros (mdev device_api names)
STRING_CONSTANTS: dict[str, str] = {
    name: value for name, value in globals().items() if name.startswith("VFIO_") and isinstance(value, str)
}

_IOCTL_NAME_BY_NUMBER: dict[int, str] = {}
for _name, _cmd in IOCTLS.items():
    _IOCTL_NAME_BY_NUMBER[_cmd] = f"{_IOCTL_NAME_BY_NUMBER[_cmd]}/{_name}" if _cmd in _IOCTL_NAME_BY_NUMBER else _name
del _name, _cmd


def ioctl_name(cmd: int) -> str | None:
    """Name of a host VFIO ioctl number, for logs and traces.

    VFIO reuses numbers across fd types (e.g. base+12 is a device's
    GET_PCI_HOT_RESET_INFO and a container's IOMMU_GET_INFO or
    SPAPR_TCE_GET_INFO), so shared numbers give all names joined with "/".
    """
    return _IOCTL_NAME_BY_NUMBER.get(cmd)


# Which ioctl names each kind of VFIO fd answers to, by prefix.
_FD_KIND_PREFIXES = {
    "vfio-container": ("VFIO_GET_API_VERSION", "VFIO_CHECK_EXTENSION", "VFIO_SET_IOMMU", "VFIO_IOMMU_", "VFIO_EEH_"),
    "vfio-group": ("VFIO_GROUP_",),
    "vfio-device": ("VFIO_DEVICE_",),
    "vfio-migration": ("VFIO_MIG_",),
}


def ioctl_name_for(cmd: int, fd_kind: str) -> str | None:
    """The name ``cmd`` has on an fd of ``fd_kind`` ("vfio-container",
    "vfio-group", "vfio-device"), e.g. base+12 on a container is
    "VFIO_IOMMU_GET_INFO/VFIO_IOMMU_SPAPR_TCE_GET_INFO"."""
    names = [n for n, v in IOCTLS.items() if v == cmd]
    prefixes = _FD_KIND_PREFIXES.get(fd_kind)
    if prefixes:
        names = [n for n in names if n.startswith(prefixes)] or names
    return "/".join(sorted(names)) or None


def _member(cls: type, name: str) -> tuple[int, type] | None:
    # Search _fields_ rather than getattr(): ctypes field descriptors expose
    # offset and size but not the type, which dotted paths need to descend.
    fields: list[tuple[str, type]] = getattr(cls, "_fields_")
    for field_name, field_type, *_ in fields:
        if field_name == name:
            return getattr(cls, field_name).offset, field_type
        if field_name in getattr(cls, "_anonymous_", ()):
            found = _member(field_type, name)
            if found is not None:
                return getattr(cls, field_name).offset + found[0], found[1]
    return None


@functools.lru_cache(maxsize=None)
def offsetofend(struct_cls: type, field: str) -> int:
    """Byte offset just past ``field`` -- the kernel's ``offsetofend()``.

    ``field`` may be a dotted path into nested structs (``"ddw.levels"``) and
    may name members of anonymous unions as C does (``"err.mask"``).  A
    flexible array member ends where it starts.
    """
    offset = 0
    cls = struct_cls
    for part in field.split("."):
        found = _member(cls, part)
        if found is None:
            raise AttributeError(f"{struct_cls.__name__} has no member {field!r}")
        member_offset, cls = found
        offset += member_offset
    return offset + ctypes.sizeof(cls)


def minsz(struct_cls: type, last_field: str) -> int:
    """The ``minsz`` of an ioctl handler: ``offsetofend(struct, last_field)``.

    Kernel handlers reject ``argsz < minsz``; the last field is the final one
    present in the first version of the struct.
    """
    return offsetofend(struct_cls, last_field)
