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
#
# Usage: scripts/demo.sh [--hwhost]
#   --hwhost runs the users' path on any host: inside the hardware-
#   virtualization test host (QEMU TCG with emulated AMD SVM, see
#   tests/hwhost/README.md) the vmm boots the distribution kernel, its shell
#   answers, 1 GiB is plugged, a guest program fills and verifies 768 MiB of
#   it, the memory is unplugged, and the report comes back to target/demo/.
set -euo pipefail
# shellcheck source=lib/usage.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/usage.sh"
case "${1:-}" in -h | --help) print_usage "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."

say() { printf 'demo: %s\n' "$*" >&2; }

case "${1:-}" in
    "") hwhost=0 ;;
    --hwhost) hwhost=1 ;;
    *) echo "usage: scripts/demo.sh [--hwhost]" >&2; exit 2 ;;
esac

if [ "$hwhost" -eq 1 ]; then
    scripts/install-deps.sh --qemu
    out=${DEMO_OUT:-target/demo}
    mkdir -p "$out"
    say "running the demo inside the hardware-virtualization test host (QEMU TCG);"
    say "everything there runs under emulation: times are long and mean little"
    status=0
    tests/hwhost/run.sh --follow --out "$out/hwhost" demo || status=$?
    python3 - "$out" <<'EOF'
import json, sys
out = sys.argv[1]
for line in open(f"{out}/hwhost/data.jsonl"):
    rec = json.loads(line)
    name, value = rec["name"], rec["value"]
    if name == "vmm-stderr":
        print("\nthe vmm's stderr (its RCU lifetime table):\n" + value, file=sys.stderr)
        continue
    with open(f"{out}/{name}", "w") as f:
        f.write(value if isinstance(value, str) else json.dumps(value, indent=1))
EOF
    say "RCU lifetime report: $out/rcu.json (JSON), $out/rcu.svg (plot); VMM costs: $out/metrics.json"
    exit "$status"
fi

scripts/install-deps.sh
say "building the VMM (release)"
cargo build --release --locked --bin vmm
out=${DEMO_OUT:-target/demo}
mkdir -p "$out"

# shellcheck source=lib/host-kind.sh
. scripts/lib/host-kind.sh
if [ "$(host_kind)" = emulation-only ]; then
    tests/guest/build-kit.sh
    kit=${VMM_GUEST_KIT:-target/guest-kit}
    say "this host's KVM has no hardware virtualization: guest kernel code is emulated"
    say "and guest user space cannot make system calls, so the guest is the kit's"
    say "minimal kernel, kernel-only (it boots to /init and idles; its virtio-mem"
    say "driver plugs and unplugs memory by itself); scripts/demo.sh --hwhost shows the"
    say "users' path (distribution kernel, shell, a program using hot-plugged memory)"
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
