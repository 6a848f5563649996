"""HostMM.pin_fast() of one page, and its unpin (_pin.c)."""

from typing import Literal

from vfiosim.kernel.mm import PhysicalMemory
from vfiosim.transport.host import HostMemoryObject

WINDOW_SHIFT: int

def pin_page(maps_fd: int, addr: int, write: bool, longterm: bool, obj: HostMemoryObject,
             ram: PhysicalMemory) -> tuple[int, int, int] | None | Literal[False]: ...
def unpin_page(obj: HostMemoryObject, p0: int) -> bool: ...
