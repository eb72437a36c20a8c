#!/usr/bin/env bash
# Counts QEMU's call_rcu1() and drain_call_rcu() calls over one VM lifetime,
# attributed to the callback function each call_rcu1() queues, for the
# comparison in docs/rcu-lifetime.md. Same guest kit as our experiment:
# boot, CYCLES virtio-mem plug/unplug cycles of MIB over QMP, quit.
#
# Usage: scripts/qemu-rcu-count.sh [-c CPUS] [-k CYCLES] [-m MIB] [-M MACHINE] [-d] [-o DIR]
#   -d gives virtio-mem-pci dynamic-memslots=on: QEMU then maps the device's
#   memory in memslots as blocks are plugged, as our VMM always does, instead
#   of one memslot for the whole region.
#   -M q35 (default) uses virtio-mem-pci, which needs a guest kernel with
#   CONFIG_VIRTIO_PCI; any other machine (microvm has no memory hot-plug)
#   boots without virtio-mem and skips the cycles. The lifetime starts at
#   QEMU's start; the session begins once the guest runs /init.
#
# How: Debian's qemu-system-x86_64 exports call_rcu1 and drain_call_rcu as
# dynamic symbols, so a kernel uprobe on each counts every call without
# rebuilding QEMU; the probe records call_rcu1's second argument (the
# callback) and its return address, which nm -D turns into names. Needs root
# and tracefs; the probes live in their own tracing instance and are removed
# on exit. Only calls from the QEMU process this script starts are counted.
set -euo pipefail
# shellcheck source=lib/usage.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/usage.sh"
case "${1:-}" in -h | --help) print_usage "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."

cpus=1 cycles=5 size=128 machine=q35 out=target/qemu-rcu-count dynamic=off
while getopts "c:k:m:M:do:" o; do
    case "$o" in
        c) cpus=$OPTARG ;;
        k) cycles=$OPTARG ;;
        m) size=$OPTARG ;;
        M) machine=$OPTARG ;;
        d) dynamic=on ;;
        o) out=$OPTARG ;;
        *) print_usage "$0" >&2; exit 2 ;;
    esac
done

qemu=$(command -v qemu-system-x86_64) || { echo "qemu-rcu-count: qemu-system-x86_64 not found (scripts/install-deps.sh --qemu)" >&2; exit 1; }
kit=${VMM_GUEST_KIT:-target/guest-kit}
[ -e "$kit/vmlinux" ] || { echo "qemu-rcu-count: no guest kit in $kit (tests/guest/build-kit.sh)" >&2; exit 1; }
py=${VMM_PY_VENV:-/var/cache/vmm-venv}/bin/python3

tr=/sys/kernel/tracing
mountpoint -q "$tr" || mount -t tracefs nodev "$tr"
sym_off() { nm -D "$qemu" | awk -v s="$1" '$3 == s { print "0x" $1 }'; }
rcu_off=$(sym_off call_rcu1)
drain_off=$(sym_off drain_call_rcu)
[ -n "$rcu_off" ] || { echo "qemu-rcu-count: $qemu does not export call_rcu1" >&2; exit 1; }
# The uprobe needs a file offset; in Debian's build the text segment's file
# offset equals its address, which nm prints.
while read -r _ off vaddr _; do
    [ $((off)) -eq $((vaddr)) ] \
        || { echo "qemu-rcu-count: $qemu's text segment has an offset that differs from its address" >&2; exit 1; }
done < <(readelf -lW "$qemu" | grep -w LOAD | grep -w E)

inst=$tr/instances/vmm-qemu-rcu
cleanup() {
    [ -d "$inst" ] && { echo 0 > "$inst/events/vmmqemu/enable" 2>/dev/null || true; rmdir "$inst" 2>/dev/null || true; }
    echo "-:vmmqemu/call_rcu1" >> "$tr/uprobe_events" 2>/dev/null || true
    echo "-:vmmqemu/drain_call_rcu" >> "$tr/uprobe_events" 2>/dev/null || true
    [ -n "${qpid:-}" ] && kill "$qpid" 2>/dev/null || true
}
trap cleanup EXIT
cleanup
echo "p:vmmqemu/call_rcu1 $qemu:$rcu_off func=%si:x64 ret=+0(%sp):x64" >> "$tr/uprobe_events"
echo "p:vmmqemu/drain_call_rcu $qemu:$drain_off ret=+0(%sp):x64" >> "$tr/uprobe_events"
mkdir "$inst"
echo 1 > "$inst/options/record-tgid"
echo 4096 > "$inst/buffer_size_kb"
echo 1 > "$inst/events/vmmqemu/enable"

mkdir -p "$out"
rm -f "$out/qmp.sock"
dev=()
mem="256M"
if [ "$machine" = q35 ]; then
    mem="256M,maxmem=2G,slots=1"
    dev=(-object memory-backend-ram,id=mem0,size=1G -device virtio-mem-pci,id=vmem0,memdev=mem0,requested-size=0,dynamic-memslots=$dynamic)
else
    cycles=0
fi
cpu=host
# As tests/guest/qemu-boot.sh: software-nested KVM (PVM) refuses QEMU's
# IA32_ARCH_CAPABILITIES and never returns from the PV IPI hypercall.
# shellcheck source=lib/host-kind.sh
. scripts/lib/host-kind.sh
host_is_pvm && cpu=host,-arch-capabilities,kvm-pv-ipi=off,kvm-pv-sched-yield=off
echo "qemu-rcu-count: $("$qemu" --version | head -1), -M $machine, $cpus vCPUs, $cycles cycles of $size MiB, dynamic-memslots=$dynamic" >&2
"$qemu" -M "$machine" -accel kvm -cpu "$cpu" -smp "$cpus" -m "$mem" "${dev[@]}" \
    -kernel "$kit/vmlinux" -initrd "$kit/initramfs-idle.cpio" \
    -append "$(cat "$kit/cmdline-emulated.txt")" -nographic -nodefaults \
    -serial "file:$out/console.log" -qmp "unix:$out/qmp.sock,server=on,wait=off" -no-reboot \
    >"$out/qemu.log" 2>&1 &
qpid=$!
for _ in $(seq 100); do [ -S "$out/qmp.sock" ] && break; sleep 0.1; done
for _ in $(seq 6000); do
    grep -q "Run /init as init process" "$out/console.log" 2>/dev/null && break
    kill -0 "$qpid" 2>/dev/null || { echo "qemu-rcu-count: QEMU ended early, see $out/qemu.log" >&2; exit 1; }
    sleep 0.1
done
base=$(awk -v q="$qemu" '$6 == q && $3 == "00000000" { split($1, a, "-"); print "0x" a[1]; exit }' "/proc/$qpid/maps")
"$py" tests/qmp/lifetime_session.py "$out/qmp.sock" "$cycles" "$size" >"$out/session.json"
wait "$qpid" || true
tgid=$qpid
qpid=
echo 0 > "$inst/events/vmmqemu/enable"
cat "$inst/trace" > "$out/trace.txt"
nm -D -S --defined-only "$qemu" > "$out/symbols.txt"
python3 - "$out" "$base" "$tgid" <<'EOF'
import bisect, collections, json, re, sys
out, base, tgid = sys.argv[1], int(sys.argv[2], 16), sys.argv[3]
# nm -D -S: address, size, type, name. Only exported functions have names;
# an address past the end of the one before it is in a static function,
# reported as "(static, after NAME)".
syms = sorted((int(f[0], 16), int(f[1], 16), f[3]) for f in (l.split() for l in open(f"{out}/symbols.txt"))
              if len(f) == 4 and f[2] in "Tt")
addrs = [a for a, _, _ in syms]
def name(addr):
    off = addr - base
    i = bisect.bisect_right(addrs, off) - 1
    if i < 0:
        return hex(off)
    start, size, sym = syms[i]
    return sym if off < start + size else f"(static, after {sym})"
calls, callers, drains = collections.Counter(), collections.Counter(), 0
line_re = re.compile(r"\(\s*(\d+|-+)\).*?: (call_rcu1|drain_call_rcu): \(\S+\)(.*)")
for line in open(f"{out}/trace.txt"):
    m = line_re.search(line)
    if not m or m.group(1) != tgid:
        continue
    args = dict(kv.split("=") for kv in m.group(3).split())
    if m.group(2) == "drain_call_rcu":
        drains += 1
        continue
    calls[name(int(args["func"], 16))] += 1
    callers[name(int(args["ret"], 16))] += 1
session = json.load(open(f"{out}/session.json"))
report = {"call_rcu1": sum(calls.values()), "drain_call_rcu": drains,
          "by_callback": dict(calls.most_common()), "by_caller": dict(callers.most_common()),
          "cycles": len(session.get("cycles", [])), "wall_s": session.get("wall_s")}
json.dump(report, open(f"{out}/qemu-rcu.json", "w"), indent=1)
print(f"QEMU call_rcu1 calls over the lifetime: {report['call_rcu1']} "
      f"(drain_call_rcu {drains}), {report['cycles']} plug/unplug cycles, {report['wall_s']:.0f} s")
for cb, n in calls.most_common(12):
    print(f"  {n:6d}  {cb}")
EOF
