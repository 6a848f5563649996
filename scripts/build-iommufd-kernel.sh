#!/bin/sh
# Build the x86_64 kernel that `vfiosim qemu-record --platform x86-iommufd` boots: Debian's
# 6.12 source (Debian's own kernel has `# CONFIG_IOMMUFD is not set`) with iommufd, the VFIO
# device cdev and everything the q35 + intel-iommu + edu guest needs built in (no modules).
#
#   scripts/build-iommufd-kernel.sh [SOURCE_TARBALL] [BUILD_DIR] [container|compat]
#
# SOURCE_TARBALL defaults to Debian's linux-source-6.12 package
# (`apt-get install linux-source-6.12`: /usr/src/linux-source-6.12.tar.xz).
# "container" (default): the legacy VFIO container (VFIO_CONTAINER=y, Type1) next to iommufd;
# "compat": VFIO_CONTAINER=n, IOMMUFD_VFIO_CONTAINER=y, /dev/vfio/vfio served by iommufd.
# Result: BUILD_DIR/bzImage, BUILD_DIR/config (the guest's /boot/config-*) and
# BUILD_DIR/headers (its uAPI headers), what
#   vfiosim qemu-record --platform x86-iommufd[-compat] --kernel-build BUILD_DIR
# boots (docs/conformance.md).  Slow (half an hour on two shared cores, less when
# BUILD_DIR has a built tree); it stays out of CI.  Needs gcc make flex bison bc
# libelf-dev libssl-dev rsync (headers_install).
set -eu
src=${1:-/usr/src/linux-source-6.12.tar.xz}
build=${2:-/tmp/iommufd_build}
variant=${3:-container}
jobs=${JOBS:-2}
mkdir -p "$build"
tree="$build/$(basename "$src" .tar.xz)"
[ -d "$tree" ] || tar -C "$build" -xf "$src"
cd "$tree"
make -s x86_64_defconfig
c=scripts/config
# What the guest needs, built in.
$c -d MODULES \
   -e PCI -e PCIEPORTBUS -e ACPI -e IOMMU_SUPPORT -e INTEL_IOMMU \
   -e IOMMUFD -e VFIO -e VFIO_PCI -e VFIO_GROUP -e VFIO_DEVICE_CDEV \
   -e SERIAL_8250 -e SERIAL_8250_CONSOLE -e DEVTMPFS -e DEVTMPFS_MOUNT \
   -e BLK_DEV_INITRD -e RD_GZIP -e IKCONFIG -e IKCONFIG_PROC
# As Debian's: interrupt remapping (without it VFIO refuses the devices: MSIs not
# isolated), transparent huge pages (iopt_alloc_iova() aligns an automatic IOVA like
# the user address up to HPAGE_SIZE with them, to PAGE_SIZE without), and the PCI
# options vfio-pci's answers can depend on (hot reset through the slot, AER, SR-IOV,
# VGA).
$c -e IRQ_REMAP -e TRANSPARENT_HUGEPAGE -e TRANSPARENT_HUGEPAGE_ALWAYS -d TRANSPARENT_HUGEPAGE_MADVISE \
   -e INTEL_IOMMU_SVM -e HOTPLUG_PCI -e HOTPLUG_PCI_PCIE -e PCIEAER -e PCI_IOV -e VGA_ARB -e VFIO_PCI_VGA
case $variant in
    container) $c -e VFIO_CONTAINER -e VFIO_IOMMU_TYPE1 -d IOMMUFD_VFIO_CONTAINER ;;
    compat) $c -d VFIO_CONTAINER -e IOMMUFD_VFIO_CONTAINER ;;
    *) echo "variant: container or compat" >&2; exit 2 ;;
esac
# What it does not: a faster build.
$c -d MODULE_SIG -d DEBUG_INFO -d DEBUG_INFO_DWARF5 -d DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT \
   -e DEBUG_INFO_NONE -d DEBUG_INFO_BTF -d DRM -d SOUND -d USB_SUPPORT -d NETDEVICES \
   -d WIRELESS -d WLAN -d NETFILTER -d IPV6 -d HIBERNATION -d KVM \
   -d EFI -d AGP -d INPUT_JOYSTICK -d INPUT_TABLET -d INPUT_TOUCHSCREEN -d MEDIA_SUPPORT \
   -d WERROR
make -s olddefconfig
# olddefconfig drops what a dependency refuses: say so rather than build the wrong kernel.
want="IOMMUFD VFIO VFIO_PCI VFIO_GROUP VFIO_DEVICE_CDEV INTEL_IOMMU IRQ_REMAP TRANSPARENT_HUGEPAGE PCIEPORTBUS SERIAL_8250_CONSOLE DEVTMPFS BLK_DEV_INITRD"
case $variant in
    container) want="$want VFIO_CONTAINER VFIO_IOMMU_TYPE1" ;;
    compat) want="$want IOMMUFD_VFIO_CONTAINER" ;;
esac
for o in $want; do
    grep -qx "CONFIG_$o=y" .config || { echo "CONFIG_$o is not =y after olddefconfig" >&2; exit 1; }
done
nice -n 19 make -s -j"$jobs" bzImage
# Its uAPI headers, for the scenario programs (<linux/iommufd.h>).
rm -rf "$build/headers"
make -s headers_install INSTALL_HDR_PATH="$build/headers"
cp arch/x86/boot/bzImage "$build/bzImage"
cp .config "$build/config"
echo "built $(make -s kernelrelease) in $build: bzImage config headers/"
