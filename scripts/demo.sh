#!/usr/bin/env bash
# The main job, from a fresh machine: install what is needed, build the VMM
# and the guest kit, boot a Linux guest with 2 vCPUs (serial console on this
# terminal), hot-plug and unplug memory over QMP with QEMU's own client, end
# the VM, and print the RCU lifetime report. Run as root.
#
# On a host with hardware virtualization the guest is Debian's distribution
# kernel with a busybox user space. On a host whose KVM only emulates guest
# kernel code (software-nested, e.g. kvm_pvm) guest user space cannot make
# system calls, so the guest is the kit's minimal kernel, kernel-only: its
# virtio-mem driver plugs and unplugs by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'demo: %s\n' "$*" >&2; }

scripts/install-deps.sh
say "building the VMM (release)"
cargo build --release --locked --bin vmm
out=${DEMO_OUT:-target/demo}
mkdir -p "$out"

if [ -e /sys/module/kvm_pvm ] || ! grep -qwE 'vmx|svm' /proc/cpuinfo; then
    tests/guest/build-kit.sh
    kit=${VMM_GUEST_KIT:-target/guest-kit}
    say "this host's KVM has no hardware virtualization: guest kernel code is emulated"
    say "and guest user space cannot make system calls, so the guest is the kit's"
    say "minimal kernel, kernel-only (it boots to /init and idles; its virtio-mem"
    say "driver plugs and unplugs memory by itself)"
    kernel=$kit/vmlinux initrd=$kit/initramfs-idle.cpio memory=128M cmdline=""
else
    tests/guest/build-kit.sh --distro
    kit=${VMM_GUEST_KIT:-target/guest-kit}
    kernel=$kit/distro/vmlinuz initrd=$kit/distro/initramfs.cpio.gz memory=512M cmdline="quiet"
fi

sock=$out/qmp.sock
rm -f "$sock"
say "booting $kernel with 2 vCPUs, $memory of RAM and a 1G hot-plug region; QMP on $sock"
"${CARGO_TARGET_DIR:-target}/release/vmm" --kernel "$kernel" --initrd "$initrd" --cpus 2 --memory "$memory" \
    --hotplug-memory 1G --qmp "$sock" --cmdline "$cmdline" \
    --rcu-stats "$out/rcu.json" --rcu-plot "$out/rcu.svg" --metrics "$out/metrics.json" \
    </dev/null &
vmm=$!
trap 'kill "$vmm" 2>/dev/null || true' EXIT

"${VMM_PY_VENV:-/var/cache/vmm-venv}/bin/python3" tests/qmp/demo.py "$sock" 256
status=0
wait "$vmm" || status=$?
trap - EXIT
say "the VMM exited with status $status"
say "RCU lifetime report: $out/rcu.json (JSON), $out/rcu.svg (plot); VMM costs: $out/metrics.json"
exit "$status"
