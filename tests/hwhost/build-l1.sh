#!/usr/bin/env bash
# Builds the base image of the hardware-virtualization test host ("L1"): a
# Linux guest of QEMU TCG (-cpu max emulates AMD SVM with nested paging) that
# loads Debian's own kvm and kvm-amd modules and so offers a /dev/kvm with
# hardware-virtualization semantics, on which our vmm boots the distribution
# kit as an ordinary VM ("L2"). From Debian packages only, cached outside the
# clone and keyed by its inputs, like the guest kit.
#
# Usage: tests/hwhost/build-l1.sh
#   Prints the directory that holds the two outputs:
#     vmlinuz        Debian's cloud kernel (the L1 kernel)
#     base.cpio.gz   busybox, irqbypass/kvm/kvm-amd, Debian's python3 with its
#                    standard library and qemu.qmp (the QMP client of the
#                    test drivers), the distribution kit (the L2 guest), /init
# What changes with every build (the vmm, the drivers, test binaries) is not
# here: run.sh appends it as a second initramfs segment.
# Environment: VMM_KIT_CACHE (default /var/cache/vmm-guest-kit), VMM_PY_VENV
# (default /var/cache/vmm-venv), VMM_GUEST_KIT (default <repo>/target/guest-kit).
set -euo pipefail
# shellcheck source=../../scripts/lib/usage.sh
. "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib/usage.sh"
case "${1:-}" in -h | --help) print_usage "$0"; exit 0 ;; esac

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${VMM_KIT_CACHE:-/var/cache/vmm-guest-kit}
venv=${VMM_PY_VENV:-/var/cache/vmm-venv}
kit=${VMM_GUEST_KIT:-$repo/target/guest-kit}

say() { echo "hwhost: [l1 $(date +%H:%M:%S)] $*" >&2; }
die() { echo "hwhost: ERROR: $*" >&2; exit 1; }

for tool in apt-get apt-cache dpkg-deb dpkg-query gzip sha256sum flock ldd python3; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found; run scripts/install-deps.sh as root"
done
# Debian's python3 (not a user-installed one): its stdlib and libraries are
# what gets copied into the image.
py=/usr/bin/python3
[ -x "$py" ] || die "$py missing; run scripts/install-deps.sh as root (package python3)"
py_real=$(readlink -f "$py")
py_ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
py_lib=/usr/lib/python$py_ver
[ -d "$py_lib" ] || die "$py_lib missing (Debian's python$py_ver standard library)"
qmp_pkg=$("$venv/bin/python3" -c 'import os, qemu.qmp; print(os.path.dirname(qemu.qmp.__file__))' 2>/dev/null) ||
    die "no qemu.qmp in $venv; run scripts/install-deps.sh as root"
distro_k=$kit/distro/vmlinuz distro_i=$kit/distro/initramfs.cpio.gz
[ -e "$distro_k" ] && [ -e "$distro_i" ] ||
    die "the distribution kit is missing in $kit/distro; run tests/guest/build-kit.sh --distro"

mkdir -p "$cache" 2>/dev/null && [ -w "$cache" ] ||
    die "cache directory $cache is not writable; set VMM_KIT_CACHE to a writable directory"

resolved=$("$repo/tests/guest/build-distro.sh" resolve | sed -n 1p)  # sed reads all: head could SIGPIPE the script under pipefail
image=${resolved%%=*}
key=$({
    for f in "$0" "$here/l1-init.sh" "$here/libs-spec.sh" "$repo/tests/guest/mkcpio.py"; do
        printf 'file %s %s\n' "$(basename "$f")" "$(sha256sum <"$f" | cut -d' ' -f1)"
    done
    printf 'str %s\n' "$resolved" \
        "python=$(dpkg-query -W -f='${Version}' "python$py_ver-minimal" 2>/dev/null || echo "$py_real")" \
        "qemu.qmp=$(cat "$qmp_pkg"/../../qemu_qmp-*.dist-info/METADATA 2>/dev/null | sed -n 's/^Version: //p')" \
        "l2-kernel=$(readlink -f "$distro_k")" "l2-initramfs=$(readlink -f "$distro_i")"
} | sha256sum | cut -c1-16)
out=$cache/hwhost-l1-$key

if [ -f "$out/vmlinuz" ] && [ -f "$out/base.cpio.gz" ]; then
    say "cached ($out)"
    echo "$out"
    exit 0
fi

exec 9>"$cache/.hwhost-lock"
flock 9
t=$(mktemp -d "$cache/.tmp-hwhost-l1.XXXXXX")
trap 'rm -rf "$t"' EXIT
say "building into $out ($resolved, python $py_ver)"

mkdir -p "$t/dl"
chown _apt "$t/dl" 2>/dev/null || true
(cd "$t/dl" && apt-get download -q "$resolved" "$("$repo/tests/guest/build-distro.sh" resolve | sed -n 2p)") \
    >"$t/apt.log" 2>&1 || { cat "$t/apt.log" >&2; die "apt-get download failed (run apt-get update as root?)"; }
dpkg-deb -x "$t"/dl/"$image"_*.deb "$t/image"
dpkg-deb -x "$t"/dl/busybox-static_*.deb "$t/busybox"
kver=${image#linux-image-}
mods=$t/image/lib/modules/$kver/kernel

spec=$t/spec
root=$t/root
mkdir -p "$root"
{
    for d in /bin /sbin /usr /usr/bin /usr/lib /dev /proc /sys /tmp /run /lib /lib/modules \
        /opt /opt/python /kit /kit/distro; do
        echo "dir $d 0755 0 0"
    done
    echo "nod /dev/console 0600 0 0 c 5 1"
    echo "file /bin/busybox $t/busybox/bin/busybox 0755 0 0"
    echo "slink /bin/sh busybox 0777 0 0"
    echo "file /init $here/l1-init.sh 0755 0 0"
    for m in virt/lib/irqbypass arch/x86/kvm/kvm arch/x86/kvm/kvm-amd; do
        [ -f "$mods/$m.ko" ] || die "$image has no $m.ko"
        echo "file /lib/modules/$(basename "$m").ko $mods/$m.ko 0644 0 0"
    done
    echo "file /kit/distro/vmlinuz $(readlink -f "$distro_k") 0644 0 0"
    echo "file /kit/distro/initramfs.cpio.gz $(readlink -f "$distro_i") 0644 0 0"

    # Python: the interpreter, its standard library less what no driver
    # uses, the shared libraries the interpreter and its extension modules
    # link, and qemu.qmp on the path.
    echo "file /usr/bin/python3 $py_real 0755 0 0"
    (cd /usr/lib && find "python$py_ver" \
        \( -name test -o -name tests -o -name idlelib -o -name tkinter -o -name turtledemo \
        -o -name ensurepip -o -name lib2to3 -o -name pydoc_data -o -name distutils \
        -o -name 'config-*' -o -name site-packages -o -name dist-packages \) -prune -o -print) |
        while read -r p; do
            if [ -d "/usr/lib/$p" ]; then
                echo "dir /usr/lib/$p 0755 0 0"
            elif [ -f "/usr/lib/$p" ]; then
                echo "file /usr/lib/$p /usr/lib/$p 0644 0 0"
            fi
        done
    (cd "$(dirname "$qmp_pkg")/.." && find qemu -name '*.py' -o -type d) | while read -r p; do
        if [ -d "$(dirname "$qmp_pkg")/../$p" ]; then
            echo "dir /opt/python/$p 0755 0 0"
        else
            echo "file /opt/python/$p $(dirname "$qmp_pkg")/../$p 0644 0 0"
        fi
    done
    { ldd "$py_real"; find "$py_lib/lib-dynload" -name '*.so' -exec ldd {} \; ; } 2>/dev/null |
        "$here/libs-spec.sh"
} >"$spec"
# Parent directories are named once per library; keep the first of each.
awk '!seen[$1 " " $2]++' "$spec" >"$spec.u"
python3 "$repo/tests/guest/mkcpio.py" "$spec.u" "$t/base.cpio"
gzip -n -6 <"$t/base.cpio" >"$t/out.cpio.gz"
mkdir "$t/out"
mv "$t/out.cpio.gz" "$t/out/base.cpio.gz"
cp "$t/image/boot/vmlinuz-$kver" "$t/out/vmlinuz"
printf '%s\n' "$resolved" "python $py_ver" >"$t/out/packages.txt"
rm -rf "$out"
mv -T "$t/out" "$out"
say "built: base.cpio.gz $(stat -c %s "$out/base.cpio.gz") bytes"
echo "$out"
