"""iommufd's locked-memory accounting (drivers/iommu/iommufd/pages.c), which
differs from Type1's as Documentation/userspace-api/iommufd.rst says: per
user by default, per mm with IOMMU_OPTION_RLIMIT_MODE 1 (and always through
/dev/vfio/vfio served by iommufd); pages are charged once however many IOASes
and domains map them (IOMMU_IOAS_COPY shares them), and counted in VmPin."""

from __future__ import annotations

import errno
import resource

import pytest

from iommufdutil import KiB, MiB, attach, bind, cdev_setup, ioas_alloc, ioas_copy, ioas_map, ioas_unmap, machine, \
    option
from vfiosim.uapi import iommufd as iu


def err(fn, *args):
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


def attached(p):
    fd, ioas, dfd, devid = cdev_setup(p)
    attach(p, dfd, ioas)
    return fd, ioas, dfd


def test_pages_are_charged_to_the_user_and_pinned_vm():
    m = machine()
    p = m.spawn(uid=1000, gid=1000, rlimit_memlock=(1 * MiB, 1 * MiB))
    fd, ioas, dfd = attached(p)
    buf = p.mmap(768 * KiB)
    ioas_map(p, fd, ioas, buf, 768 * KiB)
    st = p.status()
    assert m.kernel.users.locked_vm(1000) == 192
    assert st["VmLck"] == 0 and st["VmPin"] == 768          # mm->locked_vm untouched, pinned_vm counts
    # Another process of the same user shares the budget: 256 KiB are left.
    q = m.spawn(uid=1000, gid=1000, rlimit_memlock=(1 * MiB, 1 * MiB))
    qfd = q.open("/dev/iommu")
    qioas = ioas_alloc(q, qfd)
    qd = q.open("/dev/vfio/devices/vfio1")
    bind(q, qd, qfd)
    attach(q, qd, qioas)
    qbuf = q.mmap(512 * KiB)
    assert err(ioas_map, q, qfd, qioas, qbuf, 512 * KiB) == errno.ENOMEM
    assert m.pinned_pages() == 192                           # the failed map unpinned what it pinned
    ioas_map(q, qfd, qioas, qbuf, 256 * KiB)
    assert m.kernel.users.locked_vm(1000) == 256
    p.exit()
    assert m.kernel.users.locked_vm(1000) == 64
    q.exit()
    assert m.kernel.users.locked_vm(1000) == 0 and m.pinned_pages() == 0


def test_copy_shares_pins_and_charges_once():
    m = machine()
    p = m.spawn(uid=1000, gid=1000, rlimit_memlock=(1 * MiB, 1 * MiB))
    fd, ioas, dfd = attached(p)
    d1 = p.open("/dev/vfio/devices/vfio1")
    bind(p, d1, fd)
    other = ioas_alloc(p, fd)
    attach(p, d1, other)                                     # a second IOAS, a second domain
    buf = p.mmap(1 * MiB)
    iova = ioas_map(p, fd, ioas, buf, 512 * KiB)
    ioas_copy(p, fd, other, ioas, iova, 512 * KiB)
    assert m.pinned_pages() == 128 and m.kernel.users.locked_vm(1000) == 128
    # Mapping the same memory again with IOAS_MAP is a new pin and a new charge.
    assert err(ioas_map, p, fd, other, buf, 768 * KiB) == errno.ENOMEM
    ioas_map(p, fd, other, buf, 128 * KiB)
    assert m.pinned_pages() == 160 and m.kernel.users.locked_vm(1000) == 160
    ioas_unmap(p, fd, ioas, iova, 512 * KiB)                 # the copy still holds them
    assert m.pinned_pages() == 160 and m.kernel.users.locked_vm(1000) == 160


def test_rlimit_mode_mm_charges_vmlck_as_vfio_does():
    m = machine()
    root = m.spawn(uid=0)
    fd = root.open("/dev/iommu")
    option(root, fd, iu.IOMMU_OPTION_RLIMIT_MODE, iu.IOMMU_OPTION_OP_SET, 1)
    root.setuid(1000)                                          # keeps the fd, loses the capability
    root.setrlimit(resource.RLIMIT_MEMLOCK, (256 * KiB, 256 * KiB))
    ioas = ioas_alloc(root, fd)
    dfd = root.open("/dev/vfio/devices/vfio0")
    bind(root, dfd, fd)
    attach(root, dfd, ioas)
    buf = root.mmap(512 * KiB)
    ioas_map(root, fd, ioas, buf, 256 * KiB)
    st = root.status()
    assert st["VmLck"] == 256 and st["VmPin"] == 256 and m.kernel.users.locked_vm(1000) == 0
    assert err(ioas_map, root, fd, ioas, buf + 256 * KiB, 4096) == errno.ENOMEM


def test_cap_ipc_lock_charges_nothing_but_pins_count():
    m = machine()
    root = m.spawn(uid=0, rlimit_memlock=(0, 0))
    fd, ioas, dfd = attached(root)
    buf = root.mmap(1 * MiB)
    ioas_map(root, fd, ioas, buf, 1 * MiB)
    assert m.kernel.users.locked_vm(0) == 0 and root.status()["VmLck"] == 0
    assert root.status()["VmPin"] == 1024


def test_a_domain_less_ioas_charges_nothing_until_a_device_attaches():
    m = machine()
    p = m.spawn(uid=1000, gid=1000, rlimit_memlock=(64 * KiB, 64 * KiB))
    fd, ioas, dfd, devid = cdev_setup(p)
    buf = p.mmap(1 * MiB)
    ioas_map(p, fd, ioas, buf, 1 * MiB)                      # over the limit, but nothing is pinned yet
    assert m.kernel.users.locked_vm(1000) == 0 and m.pinned_pages() == 0
    assert err(attach, p, dfd, ioas) == errno.ENOMEM         # the attach pins and charges
    assert m.pinned_pages() == 0 and not m.iommu_units[0].domains
