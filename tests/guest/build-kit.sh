#!/usr/bin/env bash
# Builds the guest kit: the minimal guest kernel (vmlinux for PVH entry and
# bzImage), two tiny initramfs images, and with --distro Debian's cloud kernel
# with a busybox initramfs. Everything is cached outside the clone, keyed by a
# hash of its inputs; a run with unchanged inputs does no build work at all.
#
# Usage: tests/guest/build-kit.sh [--distro]
# Environment:
#   VMM_KIT_CACHE  cache directory      (default /var/cache/vmm-guest-kit)
#   VMM_GUEST_KIT  where outputs appear (default <repo>/target/guest-kit)
# Outputs (in VMM_GUEST_KIT): vmlinux, bzImage, initramfs-halt.cpio,
# initramfs-idle.cpio, config, cmdline-emulated.txt, kit.env, and with
# --distro: distro/vmlinuz, distro/initramfs.cpio.gz. See README.md.
set -euo pipefail
# shellcheck source=../../scripts/lib/usage.sh
. "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib/usage.sh"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
kit=${VMM_GUEST_KIT:-$repo/target/guest-kit}
cache=${VMM_KIT_CACHE:-/var/cache/vmm-guest-kit}
kernel_tarball=/usr/src/linux-source-6.1.tar.xz

want_distro=0
for arg in "$@"; do
    case "$arg" in
        --distro) want_distro=1 ;;
        -h | --help) print_usage "$0"; exit 0 ;;
        *) echo "build-kit: unknown argument: $arg (usage: build-kit.sh [--distro])" >&2; exit 2 ;;
    esac
done

say() { echo "kit: $*" >&2; }
die() { echo "kit: ERROR: $*" >&2; exit 1; }

need=(make gcc patch tar xz lz4 bc bison flex as ld objdump objcopy python3 sha256sum flock)
[ "$want_distro" -eq 0 ] || need+=(apt-get apt-cache dpkg-deb gzip)
for tool in "${need[@]}"; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "'$tool' not found; run scripts/install-deps.sh as root"
done
[ -f "$kernel_tarball" ] ||
    die "$kernel_tarball missing; run scripts/install-deps.sh as root (package linux-source-6.1)"

mkdir -p "$cache" 2>/dev/null && [ -w "$cache" ] ||
    die "cache directory $cache is not writable; set VMM_KIT_CACHE to a writable directory"

# One builder at a time per cache; whoever holds the lock owns the .tmp-* dirs,
# so any left over were abandoned by an interrupted run.
exec 9>"$cache/.lock"
if ! flock -n 9; then
    say "waiting for another build-kit.sh using $cache"
    flock 9
fi
rm -rf "$cache"/.tmp-*
tmp_dirs=()
cleanup() { [ "${#tmp_dirs[@]}" -eq 0 ] || rm -rf "${tmp_dirs[@]}"; }
trap cleanup EXIT

# Prints a short hash of the named files (names and contents) and of the
# extra strings given after "--".
hash_inputs() {
    local f
    {
        while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
            printf 'file %s %s\n' "$(basename "$1")" "$(sha256sum <"$1" | cut -d' ' -f1)"
            shift
        done
        [ "$#" -eq 0 ] || shift
        for f in "$@"; do printf 'str %s\n' "$f"; done
    } | sha256sum | cut -c1-16
}

# Sets $t to a fresh scratch directory in the cache, removed when the script
# ends (not called in a subshell, so that tmp_dirs sees it).
new_tmp() {
    t=$(mktemp -d "$cache/.tmp-$1.XXXXXX")
    tmp_dirs+=("$t")
}

# ---------------------------------------------------------------- kernel
shopt -s nullglob
patches=("$here"/patches/*.patch)
[ "${#patches[@]}" -gt 0 ] || die "no patches in $here/patches"
source_version=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null) ||
    die "linux-source-6.1 is not installed; run scripts/install-deps.sh as root"
kernel_key=$(hash_inputs "$here/minimal.config" "${patches[@]}" "$here/build-kernel.sh" -- \
    "linux-source-6.1=$source_version" "$(gcc --version | head -n 1)")
kernel_dir=$cache/kernel-$kernel_key

if [ -f "$kernel_dir/vmlinux" ] && [ -f "$kernel_dir/bzImage" ]; then
    say "kernel: cached ($kernel_dir)"
else
    say "kernel: building into $kernel_dir (linux-source-6.1 $source_version)"
    new_tmp "kernel-$kernel_key"
    "$here/build-kernel.sh" "$kernel_tarball" "$here/minimal.config" "$here/patches" \
        "$t/work" "$t/out"
    rm -rf "$t/work"
    mv -T "$t/out" "$kernel_dir"
    say "kernel: done ($kernel_dir)"
fi

# ---------------------------------------------------------------- initramfs
init_key=$(hash_inputs "$here"/init/*.S "$here/mkcpio.py" "$here/build-kit.sh" -- "$(as --version | head -n 1)")
init_dir=$cache/initramfs-$init_key

# Assembles init/NAME.S into a static ELF that must contain no system call.
build_init() {
    local name=$1 t=$2
    as --64 -o "$t/$name.o" "$here/init/$name.S"
    ld -static -nostdlib --build-id=none -e _start -s -o "$t/$name" "$t/$name.o"
    if objdump -d "$t/$name" | grep -Eq '\s(syscall|sysenter|int)\s'; then
        die "init/$name.S makes a system call; guest user space cannot make any here"
    fi
    printf 'dir /dev 0755 0 0\nnod /dev/console 0600 0 0 c 5 1\nfile /init %s 0755 0 0\n' \
        "$t/$name" | python3 "$here/mkcpio.py" - "$t/out/initramfs-$name.cpio"
}

if [ -f "$init_dir/initramfs-halt.cpio" ] && [ -f "$init_dir/initramfs-idle.cpio" ]; then
    say "initramfs: cached ($init_dir)"
else
    new_tmp "initramfs-$init_key"
    mkdir "$t/out"
    build_init halt "$t"
    build_init idle "$t"
    mv -T "$t/out" "$init_dir"
    say "initramfs: built ($init_dir)"
fi

# ---------------------------------------------------------------- distro
distro_dir=
if [ "$want_distro" -eq 1 ]; then
    resolved=$("$here/build-distro.sh" resolve)
    distro_key=$(hash_inputs "$here/build-distro.sh" "$here/distro-init.sh" "$here/mkcpio.py" \
        "$here/memcheck.c" "$here/memscan.c" -- "$resolved" "$(gcc --version | head -n 1)")
    distro_dir=$cache/distro-$distro_key
    if [ -f "$distro_dir/vmlinuz" ] && [ -f "$distro_dir/initramfs.cpio.gz" ]; then
        say "distro: cached ($distro_dir)"
    else
        say "distro: building into $distro_dir ($(echo "$resolved" | tr '\n' ' '))"
        new_tmp "distro-$distro_key"
        "$here/build-distro.sh" build "$t/work" "$t/out"
        rm -rf "$t/work"
        mv -T "$t/out" "$distro_dir"
        say "distro: done ($distro_dir)"
    fi
fi

# ---------------------------------------------------------------- publish
mkdir -p "$kit"
ln -sfn "$kernel_dir/vmlinux" "$kit/vmlinux"
ln -sfn "$kernel_dir/bzImage" "$kit/bzImage"
ln -sfn "$kernel_dir/config" "$kit/config"
ln -sfn "$init_dir/initramfs-halt.cpio" "$kit/initramfs-halt.cpio"
ln -sfn "$init_dir/initramfs-idle.cpio" "$kit/initramfs-idle.cpio"
cp "$here/cmdline-emulated.txt" "$kit/.cmdline-emulated.txt.new"
mv -f "$kit/.cmdline-emulated.txt.new" "$kit/cmdline-emulated.txt"
if [ -n "$distro_dir" ]; then
    mkdir -p "$kit/distro"
    ln -sfn "$distro_dir/vmlinuz" "$kit/distro/vmlinuz"
    ln -sfn "$distro_dir/initramfs.cpio.gz" "$kit/distro/initramfs.cpio.gz"
    ln -sfn "$distro_dir/packages.txt" "$kit/distro/packages.txt"
fi

{
    echo "# Guest kit paths, written by tests/guest/build-kit.sh (shell-style KEY=path)."
    printf 'VMM_KIT_VMLINUX=%q\n' "$kit/vmlinux"
    printf 'VMM_KIT_BZIMAGE=%q\n' "$kit/bzImage"
    printf 'VMM_KIT_KERNEL_CONFIG=%q\n' "$kit/config"
    printf 'VMM_KIT_INITRAMFS_HALT=%q\n' "$kit/initramfs-halt.cpio"
    printf 'VMM_KIT_INITRAMFS_IDLE=%q\n' "$kit/initramfs-idle.cpio"
    printf 'VMM_KIT_CMDLINE_EMULATED=%q\n' "$kit/cmdline-emulated.txt"
    # A distro kernel built by an earlier --distro run stays listed while it exists.
    if [ -e "$kit/distro/vmlinuz" ] && [ -e "$kit/distro/initramfs.cpio.gz" ]; then
        printf 'VMM_KIT_DISTRO_VMLINUZ=%q\n' "$kit/distro/vmlinuz"
        printf 'VMM_KIT_DISTRO_INITRAMFS=%q\n' "$kit/distro/initramfs.cpio.gz"
    fi
} >"$kit/.kit.env.new"
mv -f "$kit/.kit.env.new" "$kit/kit.env"
say "kit ready in $kit (kernel key $kernel_key)"
