"""vfiosim: the Linux VFIO kernel side, with the POWER sPAPR TCE IOMMU, in software.

Run VFIO userspace code (VMMs, userspace drivers, test suites) against a
simulated machine, without POWER or IOMMU hardware and without root::

    import vfiosim
    m = vfiosim.Machine.default()            # PowerNV POWER9 with two edu devices
    p = m.spawn(uid=0)
    container = p.open("/dev/vfio/vfio")
"""

from .kernel.mm import PROT_EXEC, PROT_NONE, PROT_READ, PROT_WRITE
from .machine import KERNEL_PROFILES, Machine, Process, preset_names
from .machine_spec import MachineFileError
from .uapi import vfio as uapi

__version__ = "0.1.0"

__all__ = ["Machine", "Process", "MachineFileError", "KERNEL_PROFILES", "preset_names", "uapi",
           "PROT_NONE", "PROT_READ", "PROT_WRITE", "PROT_EXEC", "__version__"]
