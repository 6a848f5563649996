#!/usr/bin/env python3
"""A userspace driver for QEMU's "edu" PCI device (1234:11e8), written only
against vfiosim.client: the same file drives a simulated machine and a real one.

It checks the device is alive, computes a factorial and waits for the
completion interrupt, and moves a buffer through the device by DMA and back
(memory -> device buffer -> memory, through the IOMMU), then compares.

On the simulator (no hardware, no root):

    python3 examples/edu_driver.py                       # the default machine (PowerNV)
    VFIOSIM_MACHINE=pseries python3 examples/edu_driver.py
    VFIOSIM_MACHINE=x86 python3 examples/edu_driver.py

On a real machine: a Linux guest of QEMU started with ``-device edu`` (and,
on x86, ``-device intel-iommu,caching-mode=on`` with ``intel_iommu=on`` on
the guest's command line), with the edu device bound to vfio-pci
(docs/tutorial.md, "On real hardware"):

    sudo VFIOSIM_BACKEND=real python3 examples/edu_driver.py [BDF]
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

import numpy as np

from vfiosim import client

EDU_IDS = "1234:11e8"
EDU_DMA_MASK = (1 << 28) - 1        # QEMU's edu masks bus addresses to 28 bits

# BAR0 registers (QEMU docs/specs/edu.rst)
IDENT = 0x00            # 0x010000ed: major 1, minor 0, 0xed
LIVENESS = 0x04         # reads back the inverse of what was written
FACTORIAL = 0x08
STATUS = 0x20           # 0x01 computing, 0x80 raise an interrupt after a factorial
IRQ_STATUS = 0x24
IRQ_ACK = 0x64
DMA_SRC = 0x80
DMA_DST = 0x88
DMA_COUNT = 0x90
DMA_CMD = 0x98

STATUS_COMPUTING = 0x01
STATUS_IRQ_FACT = 0x80
FACT_IRQ = 0x001
DMA_IRQ = 0x100
DMA_RUN, DMA_TO_RAM, DMA_IRQ_ENABLE = 0x1, 0x2, 0x4
DMA_BUFFER = 0x40000    # the device's own 4 KiB buffer, as DMA addresses see it
DMA_BUFFER_SIZE = 4096


class EduError(Exception):
    pass


class Edu:
    """The driver: one edu device, its BAR0, its MSI and its DMA."""

    def __init__(self, dev: client.Device, *, timeout: float = 5.0) -> None:
        self.dev = dev
        self.bar = dev.bar(0)
        self.timeout = timeout
        ident = self.bar.read32(IDENT)
        if ident & 0xFF != 0xED:
            raise EduError(f"{dev.name} is not an edu device (identification {ident:#010x})")
        self.version = (ident >> 24, (ident >> 16) & 0xFF)
        dev.enable_bus_master()                 # memory decoding and DMA
        self.irq = dev.irq("msi")

    def close(self) -> None:
        self.irq.close()

    def __enter__(self) -> "Edu":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _acknowledge(self, expected: int) -> None:
        status = self.bar.read32(IRQ_STATUS)
        if not status & expected:
            raise EduError(f"interrupt status {status:#x} lacks {expected:#x}")
        self.bar.write32(IRQ_ACK, status)

    def _wait_irq(self, expected: int, what: str) -> None:
        if not self.irq.wait(self.timeout):
            raise EduError(f"no interrupt within {self.timeout} s after {what}")
        self._acknowledge(expected)

    def liveness(self, value: int = 0x12345678) -> bool:
        self.bar.write32(LIVENESS, value)
        return self.bar.read32(LIVENESS) == ~value & 0xFFFFFFFF

    def factorial(self, n: int) -> int:
        """n! mod 2^32, computed by the device; waits for its interrupt."""
        self.bar.write32(STATUS, STATUS_IRQ_FACT)
        self.bar.write32(FACTORIAL, n)
        self._wait_irq(FACT_IRQ, f"factorial({n})")
        if self.bar.read32(STATUS) & STATUS_COMPUTING:
            raise EduError("the interrupt came but the device is still computing")
        return self.bar.read32(FACTORIAL)

    def _dma(self, src: int, dst: int, count: int, to_ram: bool) -> None:
        self.bar.write64(DMA_SRC, src)
        self.bar.write64(DMA_DST, dst)
        self.bar.write64(DMA_COUNT, count)
        self.bar.write64(DMA_CMD, DMA_RUN | DMA_IRQ_ENABLE | (DMA_TO_RAM if to_ram else 0))
        self._wait_irq(DMA_IRQ, f"DMA {'to' if to_ram else 'from'} iova {dst if to_ram else src:#x}")

    def dma_round_trip(self, container: client.Container, size: int = DMA_BUFFER_SIZE) -> bool:
        """Pattern -> device buffer -> second buffer; True when they match."""
        if not 0 < size <= DMA_BUFFER_SIZE:
            raise EduError(f"the edu buffer holds {DMA_BUFFER_SIZE} bytes, not {size}")
        with container.dma_alloc(size, max_iova=EDU_DMA_MASK, write=False) as src, \
                container.dma_alloc(size, max_iova=EDU_DMA_MASK, read=False) as dst:
            pattern = (np.arange(size, dtype=np.uint32) * 2654435761 >> 24).astype(np.uint8)
            src.array()[:] = pattern                    # the device reads this memory...
            self._dma(src.iova, DMA_BUFFER, size, to_ram=False)
            self._dma(DMA_BUFFER, dst.iova, size, to_ram=True)
            return bool(np.array_equal(dst.array(), pattern))   # ...and wrote this one


def run(name: str = EDU_IDS, backend: "client.Backend | str | None" = None, out: TextIO | None = None) -> int:
    """Drive the device; 0 when every check passed."""
    stream = out if out is not None else sys.stdout

    def say(text: str) -> None:
        print(text, file=stream)

    with client.open_device(name, backend) as dev:
        c = dev.container
        info = c.iommu_info()
        say(f"{dev.name}: {dev.pci or 'edu'}")
        say(f"  {c.backend.describe()}; IOMMU {info.name}, DMA ranges {', '.join(str(r) for r in info.ranges)}")
        with Edu(dev) as edu:
            say(f"  edu version {edu.version[0]}.{edu.version[1]}")
            ok = edu.liveness()
            say(f"  liveness check: {'ok' if ok else 'FAILED'}")
            fact = edu.factorial(10)
            say(f"  10! = {fact} (interrupt received)")
            ok = ok and fact == 3628800
            same = edu.dma_round_trip(c)
            say(f"  DMA round trip of {DMA_BUFFER_SIZE} bytes: {'ok' if same else 'MISMATCH'}")
            ok = ok and same
    say("OK" if ok else "FAILED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("device", nargs="?", default=EDU_IDS, help="PCI address or vendor:device (default 1234:11e8)")
    ap.add_argument("--backend", choices=("sim", "real"), default=None,
                    help="default: $VFIOSIM_BACKEND, else sim")
    args = ap.parse_args(argv)
    try:
        return run(args.device, args.backend)
    except (client.VfioError, EduError) as exc:
        print(f"edu_driver: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
