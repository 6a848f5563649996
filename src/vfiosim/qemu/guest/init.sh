#!/bin/sh
# /init of the `vfiosim qemu-demo` guest: load VFIO, run the edu DMA test, power off.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "vfiosim-guest: booted $(uname -r) $(uname -m)"
for m in $(cat /lib/modules/load-order); do
    insmod /lib/modules/$m || echo "vfiosim-guest: insmod $m failed"
done
echo "vfiosim-guest: modules loaded:" $(cat /lib/modules/load-order)

case " $(cat /proc/cmdline) " in
*" vfiosim.mode=dma-api "*)
    # `vfiosim qemu-demo --dma-api`: no VFIO in the guest; its kernel's own DMA API maps
    # the buffers of a virtio-blk disk on the edu's PHB into the same TCE table
    # (H_PUT_TCE_INDIRECT for multi-page segments), and QEMU relays them to the host.
    if [ -b /dev/vda ] && dd if=/dev/vda of=/dev/null bs=256k count=4 iflag=direct 2>/dev/null; then
        echo "vfiosim-guest: PASS mode=dma-api bytes=1048576 read from virtio-blk with O_DIRECT"
    else
        echo "vfiosim-guest: FAIL mode=dma-api: no /dev/vda or reading it failed"
        dmesg | tail -n 20
    fi
    poweroff -f
    ;;
esac

# `vfiosim qemu-demo --guest-iommu v1|v2` passes vfiosim.iommu= on the command line.
iommu=auto
for arg in $(cat /proc/cmdline); do
    case "$arg" in vfiosim.iommu=*) iommu="${arg#vfiosim.iommu=}" ;; esac
done
/bin/edu_vfio_guest "$iommu"
status=$?
echo "vfiosim-guest: test exit status $status"
if [ $status -ne 0 ]; then
    echo "vfiosim-guest: the guest kernel's last messages:"
    dmesg | tail -n 40
fi
poweroff -f
