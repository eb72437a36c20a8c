#!/usr/bin/env bash
# Boots a guest-kit kernel under QEMU (10, from scripts/install-deps.sh --qemu)
# the way the benchmarks compare our VMM against it: machine microvm without
# ACPI (SMP through the MP table) plus an i8042 for the reboot=k reset, KVM,
# the serial console on stdout, and -no-reboot so that a guest reset
# (panic=-1 after the halt initramfs's ud2) ends QEMU with status 0.
# QEMU's exit status is this script's.
#
# Usage: tests/guest/qemu-boot.sh [options] [-- extra QEMU arguments]
#   -k, --kernel PATH    kernel (default: the kit's vmlinux, entered via PVH)
#   -i, --initrd PATH    initramfs (default: the kit's initramfs-halt.cpio)
#   -c, --cpus N         vCPUs (default 2)
#   -m, --memory SIZE    guest RAM, QEMU syntax (default 128M)
#   -a, --append ARGS    extra kernel arguments, after the kit's
#       --cmdline ARGS   replace the kit's kernel arguments entirely
#   -M, --machine SPEC   QEMU machine (default microvm,acpi=off). With
#                        microvm,acpi=on add pic=off under KVM: Linux takes
#                        the hardware-reduced FADT as "no 8259", leaves it
#                        unprogrammed, and its interrupts then arrive as
#                        vectors 0-15 (#DE, #OF, ... at boot)
#       --accel ACCEL    kvm (default) or tcg
#       --cpu MODEL      QEMU CPU model (default host with kvm, without the
#                        arch-capabilities MSR on software-nested PVM hosts;
#                        max with tcg)
#       --dry-run        print the QEMU command line instead of running it
# Kit location: VMM_GUEST_KIT (default <repo>/target/guest-kit), made by
# tests/guest/build-kit.sh; the kernel arguments come from its
# cmdline-emulated.txt.
set -euo pipefail
# shellcheck source=../../scripts/lib/usage.sh
. "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib/usage.sh"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../../scripts/lib/host-kind.sh
. "$here/../../scripts/lib/host-kind.sh"
repo=$(cd "$here/../.." && pwd)
kit=${VMM_GUEST_KIT:-$repo/target/guest-kit}

kernel=$kit/vmlinux
initrd=$kit/initramfs-halt.cpio
cpus=2
memory=128M
machine=microvm,acpi=off
accel=kvm
cpu=
extra_append=
cmdline=
dry_run=0

die() { echo "qemu-boot: $*" >&2; exit 2; }
need_arg() { [ "$#" -ge 2 ] || die "$1 needs an argument"; }

while [ "$#" -gt 0 ]; do
    case "$1" in
        -k | --kernel) need_arg "$@"; kernel=$2; shift 2 ;;
        -i | --initrd) need_arg "$@"; initrd=$2; shift 2 ;;
        -c | --cpus) need_arg "$@"; cpus=$2; shift 2 ;;
        -m | --memory) need_arg "$@"; memory=$2; shift 2 ;;
        -a | --append) need_arg "$@"; extra_append=$2; shift 2 ;;
        --cmdline) need_arg "$@"; cmdline=$2; shift 2 ;;
        -M | --machine) need_arg "$@"; machine=$2; shift 2 ;;
        --accel) need_arg "$@"; accel=$2; shift 2 ;;
        --cpu) need_arg "$@"; cpu=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) print_usage "$0"; exit 0 ;;
        --) shift; break ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
done

[ -f "$kernel" ] || die "kernel $kernel not found; run tests/guest/build-kit.sh"
[ -f "$initrd" ] || die "initramfs $initrd not found; run tests/guest/build-kit.sh"
if [ -z "$cmdline" ]; then
    [ -f "$kit/cmdline-emulated.txt" ] || die "$kit/cmdline-emulated.txt not found; run tests/guest/build-kit.sh"
    cmdline=$(tr '\n' ' ' <"$kit/cmdline-emulated.txt" | sed 's/ *$//')
fi
[ -z "$extra_append" ] || cmdline="$cmdline $extra_append"
if [ -z "$cpu" ]; then
    if [ "$accel" != kvm ]; then
        cpu=max
    elif host_is_pvm; then
        # Software-nested KVM (PVM) refuses the IA32_ARCH_CAPABILITIES value
        # QEMU derives for "host" (QEMU aborts on "failed to set MSR 0x10a"),
        # and a guest's KVM_HC_SEND_IPI hypercall never returns there (SMP
        # bring-up hangs in kvm_send_ipi_mask), so PV IPIs (and the PV
        # sched-yield hypercall) are hidden from the guest.
        cpu=host,-arch-capabilities,kvm-pv-ipi=off,kvm-pv-sched-yield=off
    else
        cpu=host
    fi
fi
qemu=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 not found; run scripts/install-deps.sh --qemu"

cmd=("$qemu" -nodefaults -no-user-config -display none -no-reboot
    -M "$machine" -accel "$accel" -cpu "$cpu" -smp "$cpus" -m "$memory"
    -kernel "$kernel" -initrd "$initrd" -append "$cmdline"
    -serial stdio)
case "$machine" in
    # microvm has no keyboard controller; reboot=k resets the guest by writing
    # 0xfe to its port 0x64, which then ends QEMU (-no-reboot).
    microvm*) cmd+=(-device i8042) ;;
esac
cmd+=("$@")
if [ "$dry_run" -eq 1 ]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
