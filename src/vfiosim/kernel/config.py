"""The kernel's build configuration: which VFIO and iommufd options are built in.

What a program finds under /dev depends on them, and so does every probe a
VFIO program makes before it picks an interface:

=========================  ====================================================
``VFIO_GROUP``             ``/dev/vfio/<group>`` (the group interface)
``VFIO_CONTAINER``         ``/dev/vfio/vfio`` served by VFIO, with the Type1 or
                           sPAPR TCE IOMMU driver
``IOMMUFD``                ``/dev/iommu``; a group can be given an iommufd
                           instead of a container (VFIO_GROUP_SET_CONTAINER)
``VFIO_DEVICE_CDEV``       ``/dev/vfio/devices/vfio<N>``: the device cdev, bound
                           to an iommufd with VFIO_DEVICE_BIND_IOMMUFD
``IOMMUFD_VFIO_CONTAINER`` ``/dev/vfio/vfio`` served by iommufd's Type1
                           emulation (drivers/iommu/iommufd/vfio_compat.c)
=========================  ====================================================

The default is Debian's 6.12 build, which the reference machines model:
``VFIO_GROUP=y``, ``VFIO_CONTAINER=y``, ``# CONFIG_IOMMUFD is not set``.  A
configuration is written as the symbols that differ, Kconfig-style:
``["IOMMUFD", "VFIO_DEVICE_CDEV"]`` (``NAME`` or ``NAME=y`` turns an option on,
``NAME=n`` off, a ``CONFIG_`` prefix is allowed).  The Kconfig rules of
drivers/vfio/Kconfig and drivers/iommu/iommufd/Kconfig (Linux 6.12) decide
what may be combined; a configuration they forbid is refused with the rule:

* ``VFIO_DEVICE_CDEV`` depends on ``IOMMUFD && !SPAPR_TCE_IOMMU``: no cdev on
  POWER, where the sPAPR TCE IOMMU is always built.
* ``IOMMUFD_VFIO_CONTAINER`` depends on ``VFIO_GROUP && !VFIO_CONTAINER``;
  asking for it turns ``VFIO_CONTAINER`` off unless the list says otherwise.
* ``VFIO`` selects ``VFIO_CONTAINER`` if ``IOMMUFD=n``, and ``VFIO_GROUP`` if
  ``SPAPR_TCE_IOMMU || IOMMUFD=n``; without ``VFIO_GROUP`` it selects
  ``VFIO_DEVICE_CDEV``, and ``VFIO_CONTAINER`` depends on ``VFIO_GROUP``.
* The 3.10 profile predates iommufd (Linux 6.2) and the cdev (6.6).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable

SYMBOLS = ("VFIO_GROUP", "VFIO_CONTAINER", "IOMMUFD", "VFIO_DEVICE_CDEV", "IOMMUFD_VFIO_CONTAINER")
# The POWER platforms: their kernels always build SPAPR_TCE_IOMMU (arch/powerpc).
POWER_PLATFORMS = ("powernv", "pseries")


class KernelConfigError(ValueError):
    """A configuration Kconfig would not produce; the message names the rule."""


@dataclass(frozen=True)
class KernelConfig:
    vfio_group: bool = True
    vfio_container: bool = True
    iommufd: bool = False
    vfio_device_cdev: bool = False
    iommufd_vfio_container: bool = False

    @classmethod
    def parse(cls, items: Iterable[str], *, platform: str = "x86", legacy: bool = False) -> "KernelConfig":
        """Debian's configuration with ``items`` applied (see the module doc)."""
        values = {s: getattr(DEBIAN, s.lower()) for s in SYMBOLS}
        explicit: dict[str, bool] = {}
        for item in items:
            if not isinstance(item, str):
                raise KernelConfigError(f"{item!r}: a kernel option is a string like \"IOMMUFD\" or \"VFIO_CONTAINER=n\"")
            name, _, value = item.strip().partition("=")
            name = name.strip().upper()
            if name.startswith("CONFIG_"):
                name = name[len("CONFIG_"):]
            if name not in SYMBOLS:
                raise KernelConfigError(f"{item!r}: unknown option; vfiosim models {', '.join(SYMBOLS)}")
            value = value.strip().lower() or "y"
            if value not in ("y", "n"):
                raise KernelConfigError(f"{item!r}: {name} is a bool option: y or n, not {value!r}")
            explicit[name] = value == "y"
        values.update(explicit)
        spapr = platform in POWER_PLATFORMS
        # Selects and defaults that follow from what was asked for.
        if values["IOMMUFD_VFIO_CONTAINER"] and values["IOMMUFD"] and "VFIO_CONTAINER" not in explicit:
            values["VFIO_CONTAINER"] = False
        if not values["VFIO_GROUP"]:
            if "VFIO_CONTAINER" not in explicit:
                values["VFIO_CONTAINER"] = False
            if "VFIO_DEVICE_CDEV" not in explicit:
                values["VFIO_DEVICE_CDEV"] = True
        config = cls(**{s.lower(): v for s, v in values.items()})
        config.check(spapr=spapr, legacy=legacy)
        return config

    def check(self, *, spapr: bool, legacy: bool) -> None:
        def refuse(rule: str) -> None:
            asked = ", ".join(self.differences()) or "Debian's defaults"
            raise KernelConfigError(f"{rule} (asked for: {asked})")

        if legacy and (self.iommufd or self.vfio_device_cdev or not self.vfio_group or not self.vfio_container):
            refuse("the 3.10 profile has the VFIO group and container only: iommufd came in Linux 6.2, the VFIO "
                   "device cdev in 6.6")
        if not self.vfio_group and (spapr or not self.iommufd):
            refuse("VFIO selects VFIO_GROUP if SPAPR_TCE_IOMMU || IOMMUFD=n")
        if not self.vfio_container and not self.iommufd:
            refuse("VFIO selects VFIO_CONTAINER if IOMMUFD=n")
        if self.vfio_container and not self.vfio_group:
            refuse("VFIO_CONTAINER depends on VFIO_GROUP")
        if not self.vfio_group and not self.vfio_device_cdev:
            refuse("VFIO selects VFIO_DEVICE_CDEV if !VFIO_GROUP")
        if self.vfio_device_cdev and not self.iommufd:
            refuse("VFIO_DEVICE_CDEV depends on IOMMUFD")
        if self.vfio_device_cdev and spapr:
            refuse("VFIO_DEVICE_CDEV depends on !SPAPR_TCE_IOMMU, which POWER machines always build: there is no "
                   "device cdev on POWER")
        if self.iommufd_vfio_container and not self.iommufd:
            refuse("IOMMUFD_VFIO_CONTAINER depends on IOMMUFD")
        if self.iommufd_vfio_container and (self.vfio_container or not self.vfio_group):
            refuse("IOMMUFD_VFIO_CONTAINER depends on VFIO_GROUP && !VFIO_CONTAINER (one /dev/vfio/vfio only)")

    def symbols(self) -> list[str]:
        """The options as a .config has them (``CONFIG_IOMMUFD=y``, ``# CONFIG_IOMMUFD is not set``)."""
        out = []
        for f in fields(self):
            name = f"CONFIG_{f.name.upper()}"
            out.append(f"{name}=y" if getattr(self, f.name) else f"# {name} is not set")
        return out

    def differences(self) -> list[str]:
        """The options that differ from Debian's build, as the machine-file list writes them."""
        return [f"{f.name.upper()}{'' if getattr(self, f.name) else '=n'}" for f in fields(self)
                if getattr(self, f.name) != getattr(DEBIAN, f.name)]


#: Debian 12's linux 6.12 (and the 3.10 profile): groups and containers, no iommufd.
DEBIAN = KernelConfig()
