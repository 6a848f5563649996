"""What a platform tells the rest of the system about itself.

The kernel holds one :class:`Platform`: the machine's IOMMU hardware (POWER
PEs, x86 VT-d units) and what only the platform knows -- its part of the
topology, the IOMMU mappings that are live now, its comparable state, and
the EEH PE of a group.  Generic code (topology, the fuzzer's invariants,
the tests' snapshots, the sPAPR driver's EEH ioctl) asks it instead of
telling platforms apart by their attributes.  A machine with no IOMMU is
the base class itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

if TYPE_CHECKING:
    from ..iommu.iommu import IommuDomain, IommuGroup, IommuOps
    from .eeh import EehPe
    from .pe import Pe


@dataclass(frozen=True)
class IommuMapping:
    """A live translation: DMA to [iova, iova+length) reaches host memory at
    ``hpa`` (``where`` names the table or domain, for messages)."""

    where: str
    iova: int
    hpa: int
    length: int


class Platform:
    """A machine without an IOMMU: nothing to describe, nothing mapped."""

    name = "none"

    def __init__(self) -> None:
        # POWER: the Partitionable Endpoints (none elsewhere).
        self.pes: list["Pe"] = []

    @property
    def iommu_units(self) -> Sequence["IommuOps"]:
        """The IOMMU hardware units that implement the IOMMU API (x86: VT-d)."""
        return ()

    @property
    def eeh_enabled(self) -> bool:
        """eeh_enabled(): the platform recovers PEs with EEH."""
        return False

    def eeh_pe(self, group: "IommuGroup") -> "EehPe | None":
        """eeh_iommu_group_to_pe(): the EEH PE of a group's devices, if any."""
        return None

    def describe(self) -> dict[str, Any]:
        """The platform's part of the topology: ``pes`` and, where it has
        them, ``iommu_units`` (plain data).  Each unit has at least ``name``,
        ``model``, ``page_sizes`` (a bitmap), ``domains`` (each with ``id``,
        ``groups`` and ``mapped_bytes``) and ``faults`` (a count): what
        `vfiosim topology` prints of a unit it does not know (VT-d, model
        ``intel-iommu``, says more)."""
        return {"pes": [pe.describe() for pe in self.pes]}

    def describe_group(self, group: "IommuGroup") -> dict[str, Any]:
        """What the topology says about a group beyond its devices."""
        return {}

    def mappings(self, limit: int | None = None) -> Iterator[IommuMapping]:
        """The translations the IOMMU hardware would make now, one per IOMMU
        page, at most ``limit`` of each table or domain (they can be large)."""
        for pe in self.pes:
            yield from pe.mappings(limit)

    def state(self) -> Any:
        """Everything the IOMMU hardware and the platform's kernel code hold,
        as comparable plain data (what a failed call must leave unchanged)."""
        return {pe.name: pe.state() for pe in self.pes}

    def paging_domains(self) -> list["IommuDomain"]:
        """Paging domains allocated on the platform's IOMMUs (none: POWER)."""
        return []
