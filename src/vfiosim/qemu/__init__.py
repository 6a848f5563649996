"""An unmodified QEMU pseries guest whose vfio-pci device is a vfiosim device.

``vfiosim qemu-demo`` (docs/qemu.md) fetches Debian's ppc64el guest kernel
and busybox once (``image.py``, cached under ``~/.cache/vfiosim/qemu``),
builds a small initramfs with a statically cross-compiled test program
(``guest/edu_vfio_guest.c``), boots ``qemu-system-ppc64 -M pseries`` under
``vfiosim run`` with ``-device vfio-pci,host=0000:01:00.0`` on the PowerNV
machine, and reports what the guest's own VFIO did and the host-side VFIO
conversation QEMU had (``demo.py``).
"""

from .image import GuestImage, Prerequisites, QemuDemoUnavailable, build_image, check_prerequisites

__all__ = ["GuestImage", "Prerequisites", "QemuDemoUnavailable", "build_image", "check_prerequisites"]
