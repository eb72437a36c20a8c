#!/usr/bin/env bash
# The distribution-kernel part of the guest kit (for hosts with hardware
# virtualization): Debian's cloud kernel and a busybox initramfs that loads the
# kernel's own virtio, virtio_ring, virtio_mmio, virtio_pci (for QEMU q35 in
# the comparisons) and virtio_mem modules, evdev and button for the ACPI power
# button (busybox acpid runs a handler that powers off), memcheck, a static
# program that fills and verifies memory (memcheck.c), and memscan, which
# reads guest physical memory through /proc/kcore (memscan.c); both built
# here with the host's gcc.
# The packages are fetched with `apt-get download` and unpacked with
# `dpkg-deb -x`; nothing is installed on the host. This file's contents are part
# of the cache key that build-kit.sh computes.
#
# Usage: build-distro.sh resolve
#            prints the packages and versions the build would use, one per line
#        build-distro.sh build WORK_DIR OUT_DIR
#            OUT_DIR (must not exist) receives vmlinuz, initramfs.cpio.gz,
#            config, packages.txt
set -euo pipefail
# shellcheck source=../../scripts/lib/usage.sh
. "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib/usage.sh"
case "${1:-}" in -h | --help) print_usage "$0"; exit 0 ;; esac

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
meta=linux-image-cloud-amd64
# Loaded in dependency order (computed below from each module's modinfo).
modules=(virtio virtio_ring virtio_mmio virtio_pci virtio_mem evdev button)

say() { echo "kit: [distro $(date +%H:%M:%S)] $*" >&2; }
die() { echo "kit: ERROR: $*" >&2; exit 1; }

candidate() {
    apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p' | grep -v '^(none)$' || true
}

# Prints "package=version" for the kernel image and busybox-static.
resolve() {
    local image image_version busybox_version
    image=$(apt-cache depends "$meta" 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-.*-cloud-amd64\)$/\1/p' | head -n 1)
    [ -n "$image" ] || die "cannot resolve $meta to a kernel package (apt-get update?)"
    image_version=$(candidate "$image")
    busybox_version=$(candidate busybox-static)
    [ -n "$image_version" ] || die "no candidate version for $image (apt-get update?)"
    [ -n "$busybox_version" ] || die "no candidate version for busybox-static (apt-get update?)"
    echo "$image=$image_version"
    echo "busybox-static=$busybox_version"
}

# Prints the modules that module file $1 depends on, from its .modinfo section.
module_depends() {
    objcopy -O binary -j .modinfo "$1" /dev/stdout | tr '\0' '\n' |
        sed -n 's/^depends=//p' | tr ',' '\n' | sed '/^$/d'
}

build() {
    local work=$1 out=$2 pkgs image kver moddir spec
    [ ! -e "$out" ] || die "output directory $out already exists"
    mkdir -p "$work/dl" "$out"
    mapfile -t pkgs < <(resolve)
    image=${pkgs[0]%%=*}

    say "downloading ${pkgs[*]}"
    # apt drops privileges to _apt for downloads when it can reach the directory.
    chown _apt "$work/dl" 2>/dev/null || true
    (cd "$work/dl" && apt-get download -q "${pkgs[@]}") >"$work/apt.log" 2>&1 || {
        cat "$work/apt.log" >&2
        die "apt-get download failed (run apt-get update as root?)"
    }
    dpkg-deb -x "$work"/dl/"$image"_*.deb "$work/image"
    dpkg-deb -x "$work"/dl/busybox-static_*.deb "$work/busybox"

    kver=${image#linux-image-}
    moddir=$work/image/lib/modules/$kver
    [ -f "$work/image/boot/vmlinuz-$kver" ] || die "$image has no boot/vmlinuz-$kver"
    [ -x "$work/busybox/bin/busybox" ] || die "busybox-static has no bin/busybox"

    # Locate each module (Debian 6.1 ships plain .ko; later kernels .ko.xz or
    # .ko.zst, which are unpacked here so busybox insmod needs no decompressor).
    mkdir -p "$work/root/lib/modules"
    declare -A file_of=()
    local m f
    locate() {
        local name=$1 found
        found=$(find "$moddir/kernel" \( -name "$name.ko" -o -name "$name.ko.xz" -o -name "$name.ko.zst" \
            -o -name "${name//_/-}.ko" -o -name "${name//_/-}.ko.xz" -o -name "${name//_/-}.ko.zst" \) |
            head -n 1)
        [ -n "$found" ] || {
            if grep -q "/${name}.ko" "$moddir/modules.builtin" 2>/dev/null; then
                echo builtin
                return
            fi
            die "module $name is neither in $image nor built into it"
        }
        case "$found" in
            *.ko.xz) xz -dc "$found" >"$work/root/lib/modules/$name.ko" ;;
            *.ko.zst) zstd -qdc "$found" >"$work/root/lib/modules/$name.ko" ;;
            *) cp "$found" "$work/root/lib/modules/$name.ko" ;;
        esac
        echo "$work/root/lib/modules/$name.ko"
    }
    # Depth-first: a module's dependencies come before it.
    local order=()
    declare -A state=()
    visit() {
        local name=$1 dep
        case "${state[$name]:-}" in
            done) return ;;
            active) die "module dependency cycle at $name" ;;
        esac
        state[$name]=active
        file_of[$name]=$(locate "$name")
        if [ "${file_of[$name]}" != builtin ]; then
            for dep in $(module_depends "${file_of[$name]}"); do
                visit "$dep"
            done
            order+=("$name")
        fi
        state[$name]=done
    }
    for m in "${modules[@]}"; do visit "$m"; done
    say "module load order: ${order[*]}"

    gcc -static -O2 -Wall -Wextra -Werror -o "$work/memcheck" "$here/memcheck.c" ||
        die "building memcheck.c failed (gcc and libc6-dev: scripts/install-deps.sh)"
    gcc -static -O2 -Wall -Wextra -Werror -o "$work/memscan" "$here/memscan.c" ||
        die "building memscan.c failed (gcc and libc6-dev: scripts/install-deps.sh)"
    # busybox acpid runs /etc/acpi/PWRF/00000080 when the power button
    # (ACPI's PWRF event, code 0x80) is pressed.
    # acpid runs it with its log file as stdout: say it on the console.
    printf '#!/bin/sh\necho "acpid: power button pressed, powering off" >/dev/console\npoweroff -f\n' \
        >"$work/power-button"

    # The initramfs: busybox, /init, the modules and their order.
    spec=$work/initramfs.spec
    {
        for d in /bin /sbin /usr /usr/bin /usr/sbin /dev /proc /sys /tmp /etc /etc/acpi \
            /etc/acpi/PWRF /lib /lib/modules /var; do
            echo "dir $d 0755 0 0"
        done
        echo "file /bin/memcheck $work/memcheck 0755 0 0"
        echo "file /bin/memscan $work/memscan 0755 0 0"
        echo "file /etc/acpi/PWRF/00000080 $work/power-button 0755 0 0"
        echo "nod /dev/console 0600 0 0 c 5 1"
        echo "file /bin/busybox $work/busybox/bin/busybox 0755 0 0"
        echo "slink /bin/sh busybox 0777 0 0"
        echo "file /init $here/distro-init.sh 0755 0 0"
        printf '%s\n' "${order[@]}" >"$work/modules-order"
        echo "file /etc/modules-order $work/modules-order 0644 0 0"
        for m in "${order[@]}"; do
            echo "file /lib/modules/$m.ko ${file_of[$m]} 0644 0 0"
        done
    } >"$spec"
    python3 "$here/mkcpio.py" "$spec" "$work/initramfs.cpio"
    gzip -n -9 <"$work/initramfs.cpio" >"$out/initramfs.cpio.gz"

    cp "$work/image/boot/vmlinuz-$kver" "$out/vmlinuz"
    cp "$work/image/boot/config-$kver" "$out/config"
    {
        printf '%s\n' "${pkgs[@]}"
        echo "modules=${order[*]}"
    } >"$out/packages.txt"
    say "built: vmlinuz $(stat -c %s "$out/vmlinuz") bytes," \
        "initramfs $(stat -c %s "$out/initramfs.cpio.gz") bytes"
}

case "${1:-}" in
    resolve) [ "$#" -eq 1 ] || die "usage: build-distro.sh resolve"; resolve ;;
    build) [ "$#" -eq 3 ] || die "usage: build-distro.sh build WORK_DIR OUT_DIR"; build "$2" "$3" ;;
    *) die "usage: build-distro.sh resolve | build WORK_DIR OUT_DIR" ;;
esac
