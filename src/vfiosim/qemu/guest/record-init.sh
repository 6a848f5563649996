#!/bin/sh
# /init of the `vfiosim qemu-record` guests: load VFIO, bind QEMU's edu devices to
# vfio-pci, run each scenario under the recording shim (what `vfiosim record` does),
# send the traces out on the second serial line, power off.
export PATH=/bin LD_LIBRARY_PATH=/lib64
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "vfiosim-guest: booted $(uname -r) $(uname -m)"
for m in $(cat /lib/modules/load-order); do
    insmod /lib/modules/$m || echo "vfiosim-guest: insmod $m failed"
done
echo 1234 11e8 > /sys/bus/pci/drivers/vfio-pci/new_id
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor)" = 0x1234 ] && [ "$(cat $d/device)" = 0x11e8 ]; then
        echo "vfiosim-guest: $(basename $d) group $(basename $(readlink $d/iommu_group))" \
             "driver $(basename $(readlink $d/driver))"
    fi
done
echo "vfiosim-guest: /dev/vfio:" $(ls /dev/vfio)
# The nodes' numbers (dynamic majors and minors), for the console log.
ls -l /dev/iommu /dev/vfio /dev/vfio/devices 2>/dev/null | grep "^c" | while read -r line; do
    echo "vfiosim-guest: node: $line"
done
grep -E "vfio|iommu" /proc/devices /proc/misc | while read -r line; do echo "vfiosim-guest: $line"; done

while IFS='|' read -r name cmd; do
    [ -n "$name" ] || continue
    echo "vfiosim-guest: scenario $name: $cmd"
    VFIOSIM_RECORD=/traces/$name.jsonl VFIOSIM_RECORD_SCENARIO=$name LD_PRELOAD=/lib/libvfiosim_record.so \
        sh -c "$cmd" > /tmp/$name.out 2>&1
    status=$?
    tail -n 3 /tmp/$name.out | while read -r line; do echo "vfiosim-guest:   $line"; done
    echo "vfiosim-guest: scenario $name exit $status"
done < /etc/scenarios

# What the kernel said of it (its warnings too), for the console log.
dmesg | grep -E "WARNING|Call Trace|vfio|iommu|PE#|TCE|EEH" | tail -n 60 | while read -r line; do
    echo "vfiosim-guest: dmesg: $line"
done

out=$(cat /etc/out-tty)
# Where the console is the only line out (powernv), nothing else may write to it now.
dmesg -n 1
stty -F $out raw -echo 2>/dev/null
cd /traces
{
    echo "=== vfiosim-traces begin ==="
    tar c *.jsonl | gzip | base64
    echo "=== vfiosim-traces end ==="
} > $out
sync
sleep 1
echo "vfiosim-guest: done"
poweroff -f
