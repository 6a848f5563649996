"""The device models a machine can hold, by name.

A machine file's ``model = "edu"`` names a factory here.  Users add their
own with :func:`register_model` (public as ``vfiosim.devices``), much as a
QEMU device type is registered before a machine can instantiate it.
"""

from __future__ import annotations

import re
from typing import Callable, Protocol

from .device import PciDevice, parse_bdf
from .edu import EduDevice
from .ioat import IoatDevice
from .virtio_net import VirtioNet


class DeviceFactory(Protocol):
    def __call__(self, bdf: str, *, dma_mask: int) -> PciDevice:
        """A new, finished device at ``bdf``; ``dma_mask`` is the bus address
        bits the device drives (the machine file's ``dma_mask``)."""
        ...


_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
BUILTIN: dict[str, Callable[..., PciDevice]] = {"edu": EduDevice, "virtio-net": VirtioNet.from_options,
                                                "ioat": IoatDevice}
# A machine file's dma_mask when it gives none: edu drives 28 address bits
# (QEMU's default); a virtio device and IOAT drive all 64.
DEFAULT_DMA_MASK = (1 << 28) - 1
_MODEL_DMA_MASK = {"virtio-net": (1 << 64) - 1, "ioat": (1 << 64) - 1}
# Machine-file keys a built-in model takes besides the common ones.
MODEL_OPTIONS = {"virtio-net": ("backend", "pcap_rx", "pcap_tx", "mac")}


def default_dma_mask(name: str) -> int:
    return _MODEL_DMA_MASK.get(name, DEFAULT_DMA_MASK)


_factories: dict[str, Callable[..., PciDevice]] = dict(BUILTIN)


def register_model(name: str, factory: Callable[..., PciDevice], *, replace: bool = False,
                   reserved: frozenset[str] = frozenset()) -> None:
    """Make ``model = "<name>"`` in machine files build devices with ``factory``;
    ``reserved`` names are taken by something else (the host device models)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"device model name {name!r}: lower-case letters, digits, '_', '.', '-'; "
                         f"starting with a letter; at most 64 characters")
    if name in BUILTIN or name in reserved:
        raise ValueError(f"device model {name!r} is built in and cannot be replaced")
    if name in _factories and not replace:
        raise ValueError(f"device model {name!r} is already registered (pass replace=True to replace it)")
    if not callable(factory):
        raise TypeError(f"device model {name!r}: the factory must be callable, not {type(factory).__name__}")
    _factories[name] = factory


def unregister_model(name: str) -> None:
    if name in BUILTIN:
        raise ValueError(f"device model {name!r} is built in")
    if _factories.pop(name, None) is None:
        raise KeyError(f"device model {name!r} is not registered")


def model_names() -> list[str]:
    """Endpoint models vfio-pci can own: the built-in ones, then registered ones."""
    return list(_factories)


def is_endpoint_model(name: str) -> bool:
    return name in _factories


def create_device(name: str, bdf: str, *, dma_mask: int, options: dict[str, object] | None = None) -> PciDevice:
    """Build a device; a factory that returns something else is an error
    naming the model, not a failure deep inside the machine.  ``options`` are
    the model's own machine-file keys (MODEL_OPTIONS)."""
    dev = _factories[name](bdf, dma_mask=dma_mask, **(options or {}))
    if not isinstance(dev, PciDevice):
        raise TypeError(f"device model {name!r} returned {type(dev).__name__}, not a vfiosim.devices.PciDevice")
    if parse_bdf(dev.bdf) != parse_bdf(bdf):
        raise ValueError(f"device model {name!r} built a device at {dev.bdf}, not at {bdf}")
    if dev._reset_config is None:
        dev.finish()           # the power-on state reset returns to
    return dev
