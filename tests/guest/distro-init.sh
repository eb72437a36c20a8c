#!/bin/sh
# /init of the distribution-kernel initramfs (busybox user space, for hosts with
# hardware virtualization). Mounts proc/sys/devtmpfs and a tmpfs on /tmp, loads
# the modules listed in /etc/modules-order (dependency order, written by
# build-distro.sh), starts busybox acpid (the ACPI power button runs
# /etc/acpi/PWRF/00000080, which powers off), prints one line each
# CPUS_ONLINE=, MEMTOTAL_KB= and UPTIME= for the tests to read, then gives a
# shell on the console; `poweroff -f` ends the VM.
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp

while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "init: insmod $m failed"
done </etc/modules-order

# The power button's input device appears once `button` is loaded. acpid
# logs to /var/log/acpid.log and cannot start without the directory.
mkdir -p /var/log /var/run
if ls /dev/input/event* >/dev/null 2>&1; then
    acpid -c /etc/acpi || echo "init: acpid failed to start"
    pidof acpid >/dev/null || echo "init: acpid is not running"
else
    echo "init: no input event device; the ACPI power button will not work"
fi

echo "CPUS_ONLINE=$(grep -c '^processor' /proc/cpuinfo)"
echo "MEMTOTAL_KB=$(sed -n 's/^MemTotal: *\([0-9]*\) kB$/\1/p' /proc/meminfo)"
echo "UPTIME=$(cut -d' ' -f1 /proc/uptime)"

# PID 1 must not exit; a shell that ends is replaced by a new one.
while :; do
    setsid cttyhack sh
    echo "init: shell exited, starting a new one"
done
