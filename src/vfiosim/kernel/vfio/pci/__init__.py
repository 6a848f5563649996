"""vfio-pci (drivers/vfio/pci/), one module per upstream file."""

from .vfio_pci_core import VfioPciDevice

__all__ = ["VfioPciDevice"]
