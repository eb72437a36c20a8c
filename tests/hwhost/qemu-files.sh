#!/usr/bin/env bash
# Collects the host's QEMU for the test host, so that QEMU runs beside our
# vmm there (the side-by-side boot benchmark and QEMU's call_rcu count):
# qemu-system-x86_64, the shared libraries ldd names, the firmware files
# the machines used there need, and its dynamic symbol table (to place
# uprobes on call_rcu1 and drain_call_rcu and name their callbacks).
#
# Usage: tests/hwhost/qemu-files.sh DIR
#   DIR receives `spec` (mkcpio.py lines that put QEMU at /opt/qemu in the
#   test host; pass DIR to run.sh --qemu-files) and `symbols.txt`.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "hwhost: ERROR: $*" >&2; exit 1; }
[ "$#" -eq 1 ] || die "usage: qemu-files.sh DIR"
out=$1
qemu=$(command -v qemu-system-x86_64) ||
    die "qemu-system-x86_64 not found: scripts/install-deps.sh --qemu (as root)"
qemu=$(readlink -f "$qemu")
fw=/usr/share/qemu
mkdir -p "$out"

# The uprobe needs a file offset; in Debian's build the text segment's file
# offset equals its address, which nm prints.
while read -r _ off vaddr _; do
    [ $((off)) -eq $((vaddr)) ] || die "$qemu's text segment's file offset differs from its address"
done < <(readelf -lW "$qemu" | grep -w LOAD | grep -w E)
nm -D -S --defined-only "$qemu" >"$out/symbols.txt"
grep -qw call_rcu1 "$out/symbols.txt" || die "$qemu does not export call_rcu1"

{
    for d in /opt/qemu /opt/qemu/share; do echo "dir $d 0755 0 0"; done
    echo "file /opt/qemu/qemu-system-x86_64 $qemu 0755 0 0"
    echo "file /opt/qemu/symbols.txt $out/symbols.txt 0644 0 0"
    # q35 and microvm firmware, the Linux loader option ROMs, and the PVH
    # loader.
    # (Debian's SeaBIOS lives in its own package's directory.)
    for f in bios-256k.bin qboot.rom linuxboot_dma.bin linuxboot.bin kvmvapic.bin pvh.bin \
        multiboot_dma.bin; do
        src=
        for d in "$fw" /usr/share/seabios; do
            [ -e "$d/$f" ] && { src=$d/$f; break; }
        done
        [ -n "$src" ] || die "QEMU firmware file $f not found in $fw or /usr/share/seabios"
        echo "file /opt/qemu/share/$f $(readlink -f "$src") 0644 0 0"
    done
    ldd "$qemu" | "$here/libs-spec.sh"
} >"$out/spec"
echo "hwhost: QEMU files for the test host in $out ($("$qemu" --version | head -n 1))" >&2
