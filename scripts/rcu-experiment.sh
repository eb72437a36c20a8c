#!/usr/bin/env bash
# The RCU lifetime experiment (docs/rcu-lifetime.md): for 2 and 8 vCPUs and
# both call_rcu wake-up strategies, N VM lifetimes each: boot, 5 plug/unplug
# cycles over QMP, end. Writes every run's RCU report, plot, metrics and
# session timings under $OUT (default target/rcu-experiment), then prints
# the summary table (scripts/rcu-experiment-report.py).
#
# Usage: scripts/rcu-experiment.sh [-n RUNS] [-c "2 8"] [-s "event semaphore"]
#        scripts/rcu-experiment.sh --hwhost [-n RUNS] [-k CYCLES]
# The guest is the kit's minimal kernel with the idle initramfs (kernel-only,
# as on emulation-only hosts); KERNEL/INITRD/CMDLINE override it (for the
# distribution kernel on hardware hosts).
# --hwhost runs the seed's shape on the hardware-virtualization test host
# (tests/hwhost): 8 vCPUs, 4 GiB, the distribution kernel, boot -> shell ->
# poweroff and the same with CYCLES 1 GiB hot-plug cycles, both strategies,
# RUNS runs each, and QEMU q35's call_rcu1 count for the same lifetimes in the
# same test host; prints the tables of docs/rcu-lifetime.md.
set -euo pipefail
# shellcheck source=lib/usage.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/usage.sh"
case "${1:-}" in -h | --help) print_usage "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."

if [ "${1:-}" = --hwhost ]; then
    shift
    runs=3 cycles=5
    while getopts "n:k:" o; do
        case "$o" in
            n) runs=$OPTARG ;;
            k) cycles=$OPTARG ;;
            *) echo "usage: $0 --hwhost [-n RUNS] [-k CYCLES]" >&2; exit 2 ;;
        esac
    done
    scripts/install-deps.sh --qemu
    out=${OUT:-target/rcu-experiment-hwhost}
    mkdir -p "$out"
    tests/hwhost/qemu-files.sh "$out/qemu-files"
    tests/hwhost/run.sh --out "$out" --qemu-files "$out/qemu-files" --timeout 14400 \
        --driver "--runs $runs --cycles $cycles" experiment qemu-count
    exit 0
fi

runs=3 cpus_list="2 8" strategies="event semaphore" cycles=5 size=128
while getopts "n:c:s:k:m:" o; do
    case "$o" in
        n) runs=$OPTARG ;;
        c) cpus_list=$OPTARG ;;
        s) strategies=$OPTARG ;;
        k) cycles=$OPTARG ;;
        m) size=$OPTARG ;;
        *) echo "usage: $0 [-n RUNS] [-c CPUS...] [-s STRATEGIES] [-k CYCLES] [-m MIB]" >&2; exit 2 ;;
    esac
done

scripts/install-deps.sh
cargo build --release --locked --bin vmm
tests/guest/build-kit.sh
kit=${VMM_GUEST_KIT:-target/guest-kit}
kernel=${KERNEL:-$kit/vmlinux}
initrd=${INITRD:-$kit/initramfs-idle.cpio}
cmdline=${CMDLINE:-}
py=${VMM_PY_VENV:-/var/cache/vmm-venv}/bin/python3
out=${OUT:-target/rcu-experiment}
mkdir -p "$out"

for run in $(seq 1 "$runs"); do
    for cpus in $cpus_list; do
        for s in $strategies; do
            dir=$out/cpus$cpus-$s/run$run
            mkdir -p "$dir"
            rm -f "$dir/qmp.sock"
            echo "rcu-experiment: run $run/$runs, $cpus vCPUs, $s wake-up" >&2
            "${CARGO_TARGET_DIR:-target}/release/vmm" --kernel "$kernel" --initrd "$initrd" --cmdline "$cmdline" \
                --cpus "$cpus" --memory 256M --hotplug-memory 1G --qmp "$dir/qmp.sock" \
                --rcu-wakeup "$s" --rcu-stats "$dir/rcu.json" --rcu-plot "$dir/rcu.svg" \
                --metrics "$dir/metrics.json" --quiet \
                </dev/null >"$dir/console.log" 2>"$dir/vmm.err" &
            vmm=$!
            if ! "$py" tests/qmp/lifetime_session.py "$dir/qmp.sock" "$cycles" "$size" \
                >"$dir/session.json" 2>"$dir/session.err"; then
                echo "rcu-experiment: session failed, see $dir" >&2
                kill "$vmm" 2>/dev/null || true
            fi
            wait "$vmm" || echo "rcu-experiment: vmm exited $? in $dir" >&2
        done
    done
done
python3 scripts/rcu-experiment-report.py "$out"
