"""The VFIO core: container, group and device fds, errno for errno.

Sources: drivers/vfio/container.c (vfio_fops_unl_ioctl, vfio_ioctl_set_iommu,
vfio_container_ioctl_check_extension, vfio_group_detach_container),
drivers/vfio/group.c (vfio_group_fops_open, vfio_group_ioctl_set_container,
vfio_group_ioctl_unset_container, vfio_group_ioctl_get_status,
vfio_group_ioctl_get_device_fd), drivers/vfio/vfio_main.c.
"""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

import vfiosim
from vfiosim import uapi
from vfioutil import dma_map, open_device, setup_v1

BDF = "0000:01:00.0"


def err(excinfo) -> str:
    return errno.errorcode[excinfo.value.errno]


def status(p, g):
    s = uapi.vfio_group_status(argsz=8)
    p.ioctl(g, uapi.VFIO_GROUP_GET_STATUS, s)
    return s.flags


@pytest.fixture
def p(powernv):
    return powernv.spawn()


# -- /dev/vfio/vfio ----------------------------------------------------------------------------

def test_each_container_open_is_a_new_container(p):
    c1, c2 = p.open("/dev/vfio/vfio"), p.open("/dev/vfio/vfio")
    g = p.open("/dev/vfio/0")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c1))
    assert p.ioctl(c1, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_IOMMU) == 0
    with pytest.raises(OSError) as e:            # c2 has no group
        p.ioctl(c2, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_IOMMU)
    assert err(e) == "EINVAL"


def test_api_version_is_zero_and_extensions_need_no_group(p):
    c = p.open("/dev/vfio/vfio")
    assert p.ioctl(c, uapi.VFIO_GET_API_VERSION) == uapi.VFIO_API_VERSION == 0
    answers = {i: p.ioctl(c, uapi.VFIO_CHECK_EXTENSION, i) for i in range(12)}
    # sPAPR v1, v2, and EEH (available on PowerNV) -- and nothing of Type1.
    assert {i for i, a in answers.items() if a} == {uapi.VFIO_SPAPR_TCE_IOMMU, uapi.VFIO_SPAPR_TCE_v2_IOMMU, uapi.VFIO_EEH}


def test_pseries_has_no_eeh_extension(pseries):
    p = pseries.spawn()
    c = p.open("/dev/vfio/vfio")
    assert p.ioctl(c, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_EEH) == 0


def test_set_iommu_needs_a_group_and_only_once(p):
    c = p.open("/dev/vfio/vfio")
    with pytest.raises(OSError) as e:
        p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_IOMMU)
    assert err(e) == "EINVAL"
    g = p.open("/dev/vfio/0")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    with pytest.raises(OSError) as e:
        p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1_IOMMU)        # no Type1 driver on POWER
    assert err(e) == "ENODEV"
    with pytest.raises(OSError) as e:
        p.ioctl(c, uapi.VFIO_SET_IOMMU, 99)
    assert err(e) == "ENODEV"
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_IOMMU)
    with pytest.raises(OSError) as e:
        p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_IOMMU)
    assert err(e) == "EINVAL"


def test_unknown_container_ioctl_is_einval_without_driver_and_enotty_with(p):
    c = p.open("/dev/vfio/vfio")
    raw = uapi.VFIO_GET_API_VERSION + 50
    with pytest.raises(OSError) as e:
        p.ioctl(c, raw)
    assert err(e) == "EINVAL"
    with pytest.raises(OSError) as e:
        p.ioctl(c, uapi.VFIO_IOMMU_ENABLE)
    assert err(e) == "EINVAL"
    g = p.open("/dev/vfio/0")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_IOMMU)
    with pytest.raises(OSError) as e:
        p.ioctl(c, raw)
    assert err(e) == "ENOTTY"


def test_closed_and_never_opened_fds_are_ebadf(p):
    c = p.open("/dev/vfio/vfio")
    p.close(c)
    for fd in (c, 99, -1):
        with pytest.raises(OSError) as e:
            p.ioctl(fd, uapi.VFIO_GET_API_VERSION)
        assert err(e) == "EBADF"


# -- /dev/vfio/<N> --------------------------------------------------------------------------------

def test_group_opens_once(p):
    p.open("/dev/vfio/0")
    with pytest.raises(OSError) as e:
        p.open("/dev/vfio/0")
    assert err(e) == "EBUSY"
    with pytest.raises(OSError) as e:
        p.open("/dev/vfio/5")
    assert err(e) == "ENOENT"


def test_group_is_exclusive_between_processes(powernv):
    a, b = powernv.spawn(), powernv.spawn()
    g = a.open("/dev/vfio/0")
    with pytest.raises(OSError) as e:
        b.open("/dev/vfio/0")
    assert err(e) == "EBUSY"
    a.close(g)
    b.open("/dev/vfio/0")


def test_group_node_is_root_only_by_default(powernv):
    user = powernv.spawn(uid=1000, gid=1000)
    with pytest.raises(OSError) as e:
        user.open("/dev/vfio/0")
    assert err(e) == "EACCES"
    user.open("/dev/vfio/vfio")


def test_group_status_flags_follow_the_container(p):
    c = p.open("/dev/vfio/vfio")
    g = p.open("/dev/vfio/0")
    assert status(p, g) == uapi.VFIO_GROUP_FLAGS_VIABLE
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    assert status(p, g) == uapi.VFIO_GROUP_FLAGS_VIABLE | uapi.VFIO_GROUP_FLAGS_CONTAINER_SET
    p.ioctl(g, uapi.VFIO_GROUP_UNSET_CONTAINER)
    assert status(p, g) == uapi.VFIO_GROUP_FLAGS_VIABLE


def test_group_status_small_argsz_leaves_the_struct_alone(p):
    g = p.open("/dev/vfio/0")
    s = uapi.vfio_group_status(argsz=7, flags=0x5A5A)
    with pytest.raises(OSError) as e:
        p.ioctl(g, uapi.VFIO_GROUP_GET_STATUS, s)
    assert err(e) == "EINVAL" and s.flags == 0x5A5A
    with pytest.raises(OSError) as e:
        p.ioctl(g, uapi.VFIO_GROUP_GET_STATUS, 0x1000)      # a bad pointer
    assert err(e) == "EFAULT"


def test_set_container_errors_in_kernel_order(p):
    c = p.open("/dev/vfio/vfio")
    g = p.open("/dev/vfio/0")
    with pytest.raises(OSError) as e:
        p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, 0x1000)
    assert err(e) == "EFAULT"
    with pytest.raises(OSError) as e:
        p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(77))
    assert err(e) == "EBADF"
    efd = p.eventfd()
    with pytest.raises(OSError) as e:                       # not a container: EBADFD since 6.2
        p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(efd))
    assert err(e) == "EBADFD"
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    with pytest.raises(OSError) as e:
        p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    assert err(e) == "EINVAL"
    with pytest.raises(OSError) as e:                       # the EBADF check comes first
        p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(77))
    assert err(e) == "EBADF"


def test_unset_container(p):
    g = p.open("/dev/vfio/0")
    with pytest.raises(OSError) as e:
        p.ioctl(g, uapi.VFIO_GROUP_UNSET_CONTAINER)
    assert err(e) == "EINVAL"
    c, g2 = setup_v1(p, group_id=1)
    d = open_device(p, g2, "0001:01:00.0")
    with pytest.raises(OSError) as e:
        p.ioctl(g2, uapi.VFIO_GROUP_UNSET_CONTAINER)
    assert err(e) == "EBUSY"
    p.close(d)
    assert p.ioctl(g2, uapi.VFIO_GROUP_UNSET_CONTAINER) == 0


def test_get_device_fd_checks_name_then_container_then_iommu(p):
    g = p.open("/dev/vfio/0")
    with pytest.raises(OSError) as e:
        open_device(p, g, "0000:99:00.0")
    assert err(e) == "ENODEV"
    with pytest.raises(OSError) as e:
        open_device(p, g, BDF)                               # no container
    assert err(e) == "EINVAL"
    c = p.open("/dev/vfio/vfio")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    with pytest.raises(OSError) as e:
        open_device(p, g, BDF)                               # no IOMMU driver yet
    assert err(e) == "EINVAL"
    with pytest.raises(OSError) as e:
        p.ioctl(g, uapi.VFIO_GROUP_GET_DEVICE_FD, 0x1000)
    assert err(e) == "EFAULT"
    with pytest.raises(OSError) as e:                        # no NUL within PAGE_SIZE
        p.ioctl(g, uapi.VFIO_GROUP_GET_DEVICE_FD, b"x" * 8192)
    assert err(e) == "EINVAL"
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_IOMMU)
    d1 = open_device(p, g, BDF)
    d2 = open_device(p, g, BDF)                              # several fds per device are allowed
    assert d1 != d2


def test_device_fds_keep_the_group_attached_after_group_close(p):
    c, g = setup_v1(p)
    d = open_device(p, g, BDF)
    p.close(g)
    p.close(c)
    # The group file lives on in the device fd; the group is still in the
    # container, so another open of the group is refused.
    with pytest.raises(OSError) as e:
        p.open("/dev/vfio/0")
    assert err(e) == "EBUSY"
    assert p.status()["VmLck"] > 0
    p.close(d)
    assert p.status()["VmLck"] == 0
    p.open("/dev/vfio/0")


def test_closing_the_container_keeps_it_while_a_group_holds_it(p):
    c, g = setup_v1(p)
    buf = p.mmap(1 << 16)
    dma_map(p, c, buf, 0, 1 << 16)
    locked = p.status()["VmLck"]
    p.close(c)
    assert p.status()["VmLck"] == locked                    # trace memlock-v2-user does the same
    p.close(g)
    assert p.status()["VmLck"] == 0


def test_second_group_in_a_v1_container_is_ebusy(p):
    c = p.open("/dev/vfio/vfio")
    g0, g1 = p.open("/dev/vfio/0"), p.open("/dev/vfio/1")
    p.ioctl(g0, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    p.ioctl(g1, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    # SET_IOMMU attaches every group; the v1 driver refuses the second.
    with pytest.raises(OSError) as e:
        p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_IOMMU)
    assert err(e) == "EBUSY"
    p.ioctl(g1, uapi.VFIO_GROUP_UNSET_CONTAINER)
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_IOMMU)
    with pytest.raises(OSError) as e:                        # and once the driver is set
        p.ioctl(g1, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    assert err(e) == "EBUSY"
    assert status(p, g1) == uapi.VFIO_GROUP_FLAGS_VIABLE     # nothing changed for g1


def test_last_group_leaving_returns_the_container_to_no_iommu(p):
    c, g = setup_v1(p, enable=False)
    p.ioctl(g, uapi.VFIO_GROUP_UNSET_CONTAINER)
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    with pytest.raises(OSError) as e:
        p.ioctl(c, uapi.VFIO_IOMMU_ENABLE)
    assert err(e) == "EINVAL"                               # no driver until SET_IOMMU again
    assert p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_IOMMU) == 0


def test_group_ioctls_unknown_is_enotty(p):
    g = p.open("/dev/vfio/0")
    with pytest.raises(OSError) as e:
        p.ioctl(g, uapi.VFIO_IOMMU_MAP_DMA, 0)
    assert err(e) == "ENOTTY"


# -- the device fd (vfio-pci) ---------------------------------------------------------------

def test_device_info_regions_and_irqs_on_powernv(p):
    c, g = setup_v1(p)
    d = open_device(p, g, BDF)
    info = uapi.vfio_device_info(argsz=ctypes.sizeof(uapi.vfio_device_info))
    p.ioctl(d, uapi.VFIO_DEVICE_GET_INFO, info)
    # Behind a root port the device can be bus-reset: RESET is advertised.
    assert (info.flags, info.num_regions, info.num_irqs) == (
        uapi.VFIO_DEVICE_FLAGS_PCI | uapi.VFIO_DEVICE_FLAGS_RESET, 9, 5)
    r = uapi.vfio_region_info(argsz=32, index=0)
    p.ioctl(d, uapi.VFIO_DEVICE_GET_REGION_INFO, r)
    assert (r.flags, r.size, r.offset) == (7, 1 << 20, 0)
    r = uapi.vfio_region_info(argsz=32, index=uapi.VFIO_PCI_CONFIG_REGION_INDEX)
    p.ioctl(d, uapi.VFIO_DEVICE_GET_REGION_INFO, r)
    assert (r.flags, r.size, r.offset) == (3, 256, 7 << 40)
    for index in (uapi.VFIO_PCI_VGA_REGION_INDEX, 9, 1000):
        with pytest.raises(OSError) as e:
            p.ioctl(d, uapi.VFIO_DEVICE_GET_REGION_INFO, uapi.vfio_region_info(argsz=32, index=index))
        assert err(e) == "EINVAL"
    assert p.ioctl(d, uapi.VFIO_DEVICE_RESET) == 0
    # VFIO_IOMMU_MAP_DMA has VFIO_DEVICE_PCI_HOT_RESET's number (VFIO_BASE + 13): on a
    # device fd it is a hot reset, whose header cannot be read from address 0.
    assert uapi.VFIO_IOMMU_MAP_DMA == uapi.VFIO_DEVICE_PCI_HOT_RESET
    with pytest.raises(OSError) as e:
        p.ioctl(d, uapi.VFIO_IOMMU_MAP_DMA, 0)
    assert err(e) == "EFAULT"
    with pytest.raises(OSError) as e:
        p.ioctl(d, uapi.VFIO_IOMMU_ENABLE)             # VFIO_BASE + 15: no device ioctl has it
    assert err(e) == "ENOTTY"


def test_pseries_device_cannot_reset(pseries):
    p = pseries.spawn()
    c, g = setup_v1(p)
    d = open_device(p, g, "0000:00:00.0")
    info = uapi.vfio_device_info(argsz=16)
    p.ioctl(d, uapi.VFIO_DEVICE_GET_INFO, info)
    assert info.flags == uapi.VFIO_DEVICE_FLAGS_PCI         # as the trace shows
    with pytest.raises(OSError) as e:
        p.ioctl(d, uapi.VFIO_DEVICE_RESET)
    assert err(e) == "EINVAL"


def test_device_region_access(p):
    c, g = setup_v1(p)
    d = open_device(p, g, BDF)
    cfg = uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40
    assert p.pread(d, 4, cfg) == bytes.fromhex("3412e811")
    assert p.pread(d, 1, cfg + 0x3D) == b"\x01"             # INTx pin A
    with pytest.raises(OSError) as e:
        p.pread(d, 4, cfg + 254)                            # past the end of config space
    assert err(e) == "EFAULT"
    with pytest.raises(OSError) as e:
        p.pread(d, 4, (1 << 20) + 0)                         # BAR0 offset beyond its size
    assert err(e) == "EINVAL"
    with pytest.raises(OSError) as e:
        p.pread(d, 4, 1 << 40)                              # BAR1 is not implemented
    assert err(e) == "EINVAL"
    with pytest.raises(OSError) as e:
        p.pread(d, 4, 20 << 40)                             # no such region
    assert err(e) == "EINVAL"
    # BAR sizing through the virtualized BAR register.
    p.pwrite(d, b"\xff\xff\xff\xff", cfg + 0x10)
    assert int.from_bytes(p.pread(d, 4, cfg + 0x10), "little") == 0xFFF00000
    # A read at the end of BAR0 is clipped to the BAR.
    assert len(p.pread(d, 16, (1 << 20) - 8)) == 8


def test_device_feature_probe(p):
    c, g = setup_v1(p)
    d = open_device(p, g, BDF)
    f = uapi.vfio_device_feature(argsz=ctypes.sizeof(uapi.vfio_device_feature),
                                 flags=uapi.VFIO_DEVICE_FEATURE_PROBE | uapi.VFIO_DEVICE_FEATURE_GET
                                 | uapi.VFIO_DEVICE_FEATURE_MIGRATION)
    with pytest.raises(OSError) as e:
        p.ioctl(d, uapi.VFIO_DEVICE_FEATURE, f)
    assert err(e) == "ENOTTY"
    f.flags = 1 << 30
    with pytest.raises(OSError) as e:
        p.ioctl(d, uapi.VFIO_DEVICE_FEATURE, f)
    assert err(e) == "EINVAL"


def _feature(p, d, flags, payload=b""):
    hdr = uapi.vfio_device_feature(argsz=ctypes.sizeof(uapi.vfio_device_feature) + len(payload), flags=flags)
    return p.ioctl(d, uapi.VFIO_DEVICE_FEATURE, bytearray(bytes(hdr) + payload))


def test_low_power_features_check_their_flags_as_vfio_pci_does(p):
    """vfio_pci_core_ioctl_feature() of 6.12: the three low-power features are SET-only
    (vfio_check_feature: GET is EINVAL, PROBE answers 0), entry twice is EINVAL, exit
    always 0; the VF token (feature 0) is ENOTTY for a device that is no SR-IOV PF.
    A pseries guest's Linux 6.12 answered these (tests/data/conformance, families)."""
    c, g = setup_v1(p)
    d = open_device(p, g, BDF)
    F = uapi
    for feat in (F.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY, F.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP,
                 F.VFIO_DEVICE_FEATURE_LOW_POWER_EXIT):
        assert _feature(p, d, F.VFIO_DEVICE_FEATURE_PROBE | F.VFIO_DEVICE_FEATURE_SET | feat) == 0
        for flags in (F.VFIO_DEVICE_FEATURE_PROBE | F.VFIO_DEVICE_FEATURE_SET | F.VFIO_DEVICE_FEATURE_GET,
                      F.VFIO_DEVICE_FEATURE_GET):
            with pytest.raises(OSError) as e:
                _feature(p, d, flags | feat)
            assert err(e) == "EINVAL"
    with pytest.raises(OSError) as e:
        _feature(p, d, F.VFIO_DEVICE_FEATURE_PROBE | F.VFIO_DEVICE_FEATURE_SET | F.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN)
    assert err(e) == "ENOTTY"
    set_ = F.VFIO_DEVICE_FEATURE_SET
    assert _feature(p, d, set_ | F.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY) == 0
    with pytest.raises(OSError) as e:
        _feature(p, d, set_ | F.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY)
    assert err(e) == "EINVAL" and "already" in str(e.value)
    assert _feature(p, d, set_ | F.VFIO_DEVICE_FEATURE_LOW_POWER_EXIT) == 0
    assert _feature(p, d, set_ | F.VFIO_DEVICE_FEATURE_LOW_POWER_EXIT) == 0
    # With a wakeup eventfd: the argument must be there, and be an eventfd.
    wake = F.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP
    with pytest.raises(OSError) as e:
        _feature(p, d, set_ | wake)                                    # argsz too small
    assert err(e) == "EINVAL"
    for fd, expected in ((-1, "EINVAL"), (c, "EINVAL"), (999, "EBADF")):
        with pytest.raises(OSError) as e:
            _feature(p, d, set_ | wake, bytes(F.vfio_device_low_power_entry_with_wakeup(wakeup_eventfd=fd)))
        assert err(e) == expected
    efd = p.eventfd()
    assert _feature(p, d, set_ | wake, bytes(F.vfio_device_low_power_entry_with_wakeup(wakeup_eventfd=efd))) == 0
    p.close(d)                                 # the close leaves low power (vfio_pci_core_disable)
    d = open_device(p, g, BDF)
    assert _feature(p, d, set_ | F.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY) == 0


def test_exit_closes_everything_and_frees_the_group(powernv):
    a = powernv.spawn()
    c, g = setup_v1(a)
    d = open_device(a, g, BDF)
    buf = a.mmap(1 << 20)
    dma_map(a, c, buf, 0, 1 << 20)
    assert powernv.pinned_pages() == 256
    a.exit()
    assert a.mm.locked_vm == 0 and powernv.pinned_pages() == 0
    b = powernv.spawn()
    c2, g2 = setup_v1(b)
    assert open_device(b, g2, BDF) >= 3
    assert not a.alive
    with pytest.raises(ProcessLookupError):
        a.open("/dev/vfio/vfio")


def test_dup_shares_the_open_file(p):
    c = p.open("/dev/vfio/vfio")
    c2 = p.dup(c)
    p.close(c)
    assert p.ioctl(c2, uapi.VFIO_GET_API_VERSION) == 0


def test_generic_fd_ioctls(p):
    import termios
    c = p.open("/dev/vfio/vfio")
    assert p.ioctl(c, termios.FIOCLEX) == 0
    assert p.ioctl(c, termios.FIONCLEX) == 0
    assert p.ioctl(c, termios.FIONBIO, ctypes.c_int(1)) == 0
    with pytest.raises(OSError) as e:
        p.ioctl(c, termios.FIONBIO, 0x10)
    assert err(e) == "EFAULT"


def test_open_flags_are_checked_against_the_node_mode(powernv):
    user = powernv.spawn(uid=1000, gid=1000)
    fd = user.open("/dev/vfio/vfio", os.O_RDONLY)
    assert user.ioctl(fd, uapi.VFIO_GET_API_VERSION) == 0
