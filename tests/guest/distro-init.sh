#!/bin/sh
# /init of the distribution-kernel initramfs (busybox user space, for hosts with
# hardware virtualization). Mounts proc/sys/devtmpfs, loads the virtio modules
# listed in /etc/modules-order (dependency order, written by build-distro.sh),
# prints one line each CPUS_ONLINE=, MEMTOTAL_KB= and UPTIME= for the tests to
# read, then gives a shell on the console; `poweroff -f` ends the VM.
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "init: insmod $m failed"
done </etc/modules-order

echo "CPUS_ONLINE=$(grep -c '^processor' /proc/cpuinfo)"
echo "MEMTOTAL_KB=$(sed -n 's/^MemTotal: *\([0-9]*\) kB$/\1/p' /proc/meminfo)"
echo "UPTIME=$(cut -d' ' -f1 /proc/uptime)"

# PID 1 must not exit; a shell that ends is replaced by a new one.
while :; do
    setsid cttyhack sh
    echo "init: shell exited, starting a new one"
done
