#!/bin/sh
# /init of the hardware-virtualization test host (L1), a guest of QEMU TCG.
# Loads Debian's irqbypass, kvm and kvm-amd (TCG's -cpu max emulates AMD SVM
# with nested paging), checks /dev/kvm, then runs the scenarios named on the
# kernel command line (hwhost.scenarios=a,b,c; hwhost.args=... is passed to
# the driver) with the driver that run.sh put in /opt/vmm, and powers off.
# Results go to the second serial port (/dev/ttyS1) as JSON lines; the first
# carries this host's console and the L2 consoles the driver echoes.
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=90% tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null
# KVM's per-VM statistics (exits, page faults fixed, ...) for bench-hotplug.
mount -t debugfs nodev /sys/kernel/debug 2>/dev/null
mkdir -p /root
stty -F /dev/ttyS1 raw -echo 2>/dev/null
results=/dev/ttyS1

fatal() {
    # Plain text JSON: no python needed for this path.
    printf '{"t": "fatal", "msg": "%s"}\n' "$1" >"$results"
    echo "hwhost: FATAL: $1"
    poweroff -f
}

for m in irqbypass kvm kvm-amd; do
    insmod "/lib/modules/$m.ko" 2>/tmp/insmod.err ||
        fatal "insmod $m failed: $(tr -d '\"\\\n' </tmp/insmod.err) (this QEMU does not emulate AMD SVM?)"
done
[ -c /dev/kvm ] || fatal "kvm-amd loaded but /dev/kvm is missing"
grep -qw svm /proc/cpuinfo || fatal "the L1 CPU has no svm flag: QEMU must run with -cpu max (TCG)"
[ -x /opt/vmm/vmm ] || fatal "no /opt/vmm/vmm: the run segment of the initramfs is missing"

scenarios=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^hwhost\.scenarios=//p' | tr ',' ' ')
args=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^hwhost\.args=//p' | tr ',' ' ')
echo "hwhost: L1 ready after $(cut -d' ' -f1 /proc/uptime) s: $(nproc) CPUs," \
    "$(sed -n 's/^MemTotal: *//p' /proc/meminfo), $(dmesg | grep -c 'Nested Paging enabled') x nested paging"
export PYTHONPATH=/opt/python PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# shellcheck disable=SC2086 # word splitting is wanted
python3 /opt/vmm/driver/hwhost_driver.py --results "$results" $args -- $scenarios ||
    echo "hwhost: the driver exited with status $?"
sync
poweroff -f
