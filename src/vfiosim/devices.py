"""Write your own PCI device for a simulated machine.

A device model is a :class:`PciDevice` subclass: it declares its identity,
BARs and capabilities in ``__init__`` (``add_bar``, ``add_msi_capability``,
``add_msix_capability``), answers loads and stores to its BARs
(``mmio_read`` / ``mmio_write``), raises interrupts (``set_intx``,
``msi_notify``, ``msix_notify``) and reaches memory only through ``self.bus_master``, the
:class:`BusMaster` interface that the platform installs: bus addresses in,
bytes out or in, translated by the IOMMU of the device's PE (POWER) or
domain (x86).  A transfer the IOMMU refuses raises :class:`DmaError` and
moves nothing; on POWER it also freezes the PE (EEH), as hardware does.

Register the model, then name it in a machine file (``model = "..."``)::

    from vfiosim import devices

    class Copier(devices.PciDevice):
        ...

    devices.register_model("copier", lambda bdf, *, dma_mask: Copier(bdf))
    m = vfiosim.Machine.from_file("copier.toml")

From the command line, ``--device-module MODULE`` imports a module that
registers models before the machine is built.  See docs/devices.md and
examples/copier_device.py.
"""

from __future__ import annotations

from typing import Callable

from .kernel.pci import models as _models
from .kernel.pci.device import Bar, BusMaster, DmaError, Msix, PciDevice, Register
from .kernel.pci.edu import EduDevice
from .kernel.pci.models import DeviceFactory, model_names, unregister_model
from .kernel.pci.net_backends import Loopback, NetBackend, Pcap
from .kernel.pci.virtio import VirtioPciDevice
from .kernel.pci.virtio_net import VirtioNet


def register_model(name: str, factory: Callable[..., PciDevice], *, replace: bool = False) -> None:
    """Make ``model = "<name>"`` in machine files build devices with
    ``factory(bdf, dma_mask=...)``, which returns a new :class:`PciDevice`
    at ``bdf``.  vfio-pci binds such devices by default."""
    from .machine_spec import HOST_DEVICE_MODELS
    _models.register_model(name, factory, replace=replace, reserved=frozenset(HOST_DEVICE_MODELS))


__all__ = ["PciDevice", "Register", "BusMaster", "DmaError", "Bar", "Msix", "EduDevice", "VirtioPciDevice",
           "VirtioNet", "NetBackend", "Loopback", "Pcap", "DeviceFactory", "register_model", "unregister_model",
           "model_names"]
