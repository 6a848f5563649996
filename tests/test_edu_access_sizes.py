"""edu's BAR0 access sizes, as QEMU has them (hw/misc/edu.c).

edu_mmio_ops declares 4- and 8-byte accesses (``valid`` and ``impl``), no
unaligned ones.  QEMU's memory core refuses anything else before edu sees it
(memory_region_access_valid()) and answers it as unassigned memory: a read
returns 0, a write is dropped.  On a real VFIO host with QEMU's edu, a 1- or
2-byte read of BAR0 returns 0 through the mmap and through pread (vfio-pci
splits a pread into aligned 1/2/4/8-byte accesses).  Of the accesses edu
sees, an 8-byte one below 0x80 reads all-ones and writes nothing.
"""

from __future__ import annotations

import sys

import pytest

import vfiosim
from runutil import ThreadedDaemon
from vfioutil import open_device, reg_read, setup_v1


@pytest.fixture
def dev():
    m = vfiosim.Machine.preset("pseries")
    p = m.spawn()
    c, g = setup_v1(p, 0)
    return p, open_device(p, g, "0000:00:00.0")


def pread(p, d, size: int, offset: int) -> int:
    return int.from_bytes(p.pread(d, size, offset), "little")


@pytest.mark.parametrize("offset", [0x00, 0x01, 0x02, 0x04, 0x08, 0x20, 0x80, 0x98])
@pytest.mark.parametrize("size", [1, 2])
def test_one_and_two_byte_reads_return_0(dev, size, offset):
    p, d = dev
    assert pread(p, d, size, offset) == 0


def test_sub_word_and_unaligned_writes_are_dropped(dev):
    p, d = dev
    p.pwrite(d, (0x12345678).to_bytes(4, "little"), 0x04)        # liveness: reads back inverted
    assert reg_read(p, d, 0x04) == 0xEDCBA987
    p.pwrite(d, b"\x00\x00", 0x04)                              # 2 bytes: no edu access
    p.pwrite(d, b"\x00", 0x07)                                  # 1 byte
    assert reg_read(p, d, 0x04) == 0xEDCBA987
    p.pwrite(d, (5).to_bytes(4, "little"), 0x08)               # a 4-byte write still computes 5!
    assert reg_read(p, d, 0x08) == 120


def test_a_word_split_by_pread_alignment_reads_0(dev):
    """pread(4 bytes at 0x02): vfio-pci makes two 2-byte accesses, both invalid."""
    p, d = dev
    assert pread(p, d, 4, 0x02) == 0
    assert pread(p, d, 4, 0x00) == 0x010000ED


def test_valid_sizes_behave_as_edu_mmio_read_says(dev):
    p, d = dev
    assert pread(p, d, 8, 0x00) == (1 << 64) - 1                # 8 bytes below 0x80: all-ones
    assert pread(p, d, 4, 0x10) == 0xFFFFFFFF                   # no register there: all-ones
    p.pwrite(d, (0x1122334455667788).to_bytes(8, "little"), 0x80)
    assert pread(p, d, 8, 0x80) == 0x1122334455667788           # the DMA registers take 8
    assert pread(p, d, 4, 0x80) == 0x55667788 and pread(p, d, 4, 0x84) == 0xFFFFFFFF


def test_the_model_refuses_unaligned_accesses_as_qemus_memory_core_does():
    """A CPU load through a BAR mapping is one access, aligned or not: QEMU refuses an unaligned one."""
    edu = vfiosim.Machine.preset("pseries").device("0000:00:00.0")
    assert edu.mmio_read(0, 0x00, 4) == 0x010000ED
    assert edu.mmio_read(0, 0x02, 4) == 0                       # unaligned 4 bytes
    assert edu.mmio_read(0, 0x84, 8) == 0                       # unaligned 8 bytes
    edu.mmio_write(0, 0x04, 4, 0)
    edu.mmio_write(0, 0x02, 4, 0xFFFFFFFF)                      # dropped: liveness keeps ~0
    assert edu.mmio_read(0, 0x04, 4) == 0xFFFFFFFF


def test_through_the_mapping_under_run(tmp_path):
    code = r"""
import os, fcntl, ctypes, mmap
IO = lambda n: (ord(";") << 8) | (100 + n)
c = os.open("/dev/vfio/vfio", os.O_RDWR)
g = os.open("/dev/vfio/0", os.O_RDWR)
fcntl.ioctl(g, IO(4), ctypes.c_int32(c))
fcntl.ioctl(c, IO(2), 2)
libc = ctypes.CDLL(None, use_errno=True)
d = libc.ioctl(g, ctypes.c_ulong(IO(6)), ctypes.c_char_p(b"0000:00:00.0"))
bar = mmap.mmap(d, 1 << 20, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
b, h, w = memoryview(bar), memoryview(bar).cast("H"), memoryview(bar).cast("I")
w[1] = 0x12345678
b[4] = 0                                   # a byte store: dropped
print(hex(w[0]), hex(w[1]), b[0], b[5], h[0], h[2])
"""
    d = ThreadedDaemon(vfiosim.Machine.preset("pseries"), tmp_path)
    try:
        proc = d.run([sys.executable, "-c", code])
    finally:
        d.close()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0x10000ed", "0xedcba987", "0", "0", "0", "0"]
