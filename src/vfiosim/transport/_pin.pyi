"""HostMM.pin_fast() and its windows' unpin (_pin.c)."""

from typing import Literal

from vfiosim.kernel.mm import PhysicalMemory
from vfiosim.transport.host import HostMemoryObject

WINDOW_SHIFT: int

def pin_run(maps_fd: int, addr: int, npages: int, write: bool, longterm: bool, obj: HostMemoryObject,
            ram: PhysicalMemory) -> tuple[int, int, int] | None | Literal[False]: ...
def unpin_run(obj: HostMemoryObject, p0: int, n: int) -> bool: ...
