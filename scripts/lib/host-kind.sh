#!/usr/bin/env bash
# What kind of KVM this host has, by the rule the VMM uses
# (vmm/src/kvm/host.rs, `vmm --host-kind`; docs/hosts.md):
#   hardware        vmx or svm in /proc/cpuinfo and no kvm_pvm module
#   emulation-only  the kvm_pvm module is loaded, or neither vmx nor svm:
#                   guest kernel code runs in KVM's instruction emulator and
#                   guest user space cannot make system calls
#
# Sourced by the scripts (`. scripts/lib/host-kind.sh`), it defines
#   host_kind      prints hardware or emulation-only
#   host_is_pvm    true when the kvm_pvm module is loaded (QEMU then needs
#                  CPU-model workarounds, see tests/guest/qemu-boot.sh)
# Run directly, it prints host_kind. HOST_KIND_ROOT (default /) is where
# sys/module and proc/cpuinfo are read, for tests.
#
# Usage: scripts/lib/host-kind.sh [-h|--help]

host_is_pvm() {
    [ -e "${HOST_KIND_ROOT:-}/sys/module/kvm_pvm" ]
}

host_kind() {
    local root=${HOST_KIND_ROOT:-}
    if host_is_pvm; then
        echo emulation-only
    elif [ ! -r "$root/proc/cpuinfo" ]; then
        # Without the information assume the common case, as the VMM does.
        echo hardware
    elif grep -E '^flags' "$root/proc/cpuinfo" | grep -qwE 'vmx|svm'; then
        echo hardware
    else
        echo emulation-only
    fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    case "${1:-}" in
        -h | --help) sed -n '2,/^$/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
        "") host_kind ;;
        *) echo "host-kind.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
fi
