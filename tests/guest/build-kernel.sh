#!/usr/bin/env bash
# Builds the minimal guest kernel into OUT_DIR (which must not exist yet).
# This file is the kernel-build part of the guest kit: its contents are part of
# the cache key that build-kit.sh computes, so any change here rebuilds.
#
# Usage: build-kernel.sh SOURCE_TARBALL FRAGMENT PATCH_DIR WORK_DIR OUT_DIR
#   SOURCE_TARBALL  Debian's /usr/src/linux-source-6.1.tar.xz
#   FRAGMENT        tests/guest/minimal.config
#   PATCH_DIR       tests/guest/patches (every *.patch, applied in name order)
#   WORK_DIR        scratch directory for the source tree (deleted by the caller)
#   OUT_DIR         receives vmlinux, bzImage, config, System.map, build.log
# Steps: unpack, patch (fails if a patch does not apply exactly), tinyconfig,
# merge the fragment, olddefconfig, verify every fragment line, make -j2.
set -euo pipefail
# shellcheck source=../../scripts/lib/usage.sh
. "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib/usage.sh"
case "${1:-}" in -h | --help) print_usage "$0"; exit 0 ;; esac

if [ "$#" -ne 5 ]; then
    echo "usage: build-kernel.sh SOURCE_TARBALL FRAGMENT PATCH_DIR WORK_DIR OUT_DIR" >&2
    exit 2
fi
tarball=$(realpath "$1") fragment=$(realpath "$2") patch_dir=$(realpath "$3")
work=$(realpath -m "$4") out=$(realpath -m "$5")

say() { echo "kit: [kernel $(date +%H:%M:%S)] $*" >&2; }
die() { echo "kit: ERROR: $*" >&2; exit 1; }

[ -f "$tarball" ] || die "kernel source $tarball missing (scripts/install-deps.sh installs linux-source-6.1)"
[ ! -e "$out" ] || die "output directory $out already exists"
mkdir -p "$work" "$out"
log=$out/build.log
: >"$log"

# Runs a command with its output in the log; on failure shows the log's tail.
logged() {
    if ! "$@" >>"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "'$*' failed (full log: $log)"
    fi
}

say "unpacking $(basename "$tarball")"
tar -xf "$tarball" -C "$work"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'linux-source-*' | head -n 1)
[ -n "$src" ] && [ -f "$src/Makefile" ] || die "no linux-source-* tree in $tarball"

shopt -s nullglob
patches=("$patch_dir"/*.patch)
[ "${#patches[@]}" -gt 0 ] || die "no patches in $patch_dir"
for p in "${patches[@]}"; do
    say "applying $(basename "$p")"
    # --fuzz=0 --forward --batch: apply exactly or fail, never guess.
    if ! (cd "$src" && patch -p1 --fuzz=0 --forward --batch --no-backup-if-mismatch <"$p") >>"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "patch $(basename "$p") does not apply to $(basename "$tarball")"
    fi
done

say "configuring: tinyconfig + $(basename "$fragment") + olddefconfig"
logged make -C "$src" tinyconfig
logged env -C "$src" scripts/kconfig/merge_config.sh -m .config "$fragment"
logged make -C "$src" olddefconfig

# Every line of the fragment must hold in the final .config; "is not set" also
# holds when the option is absent (its dependencies are off).
bad=0
while read -r opt want; do
    got=$(sed -n "s/^$opt=//p" "$src/.config")
    [ -n "$got" ] || got=n
    if [ "$got" != "$want" ]; then
        echo "kit: ERROR: config option $opt: fragment asks for '$want', .config has '$got'" >&2
        bad=1
    fi
done < <(sed -n -e 's/^\(CONFIG_[A-Za-z0-9_]*\)=\(.*\)$/\1 \2/p' \
    -e 's/^# \(CONFIG_[A-Za-z0-9_]*\) is not set$/\1 n/p' "$fragment")
[ "$bad" -eq 0 ] || die "kernel config does not match $(basename "$fragment") (see the options above)"
say "config verified: all $(grep -c '^\(CONFIG_\|# CONFIG_\)' "$fragment") fragment options hold"

say "building vmlinux and bzImage with make -j2 (takes a few minutes)"
start=$SECONDS
nice make -C "$src" -j2 vmlinux bzImage >>"$log" 2>&1 &
make_pid=$!
while kill -0 "$make_pid" 2>/dev/null; do
    for _ in $(seq 30); do
        sleep 1
        kill -0 "$make_pid" 2>/dev/null || break
    done
    if kill -0 "$make_pid" 2>/dev/null; then
        say "still building ($((SECONDS - start)) s): $(tail -n 1 "$log" | cut -c1-70)"
    fi
done
if ! wait "$make_pid"; then
    tail -n 40 "$log" >&2
    die "kernel build failed (full log: $log)"
fi
say "kernel built in $((SECONDS - start)) s"

cp "$src/vmlinux" "$out/vmlinux"
cp "$src/arch/x86/boot/bzImage" "$out/bzImage"
cp "$src/.config" "$out/config"
cp "$src/System.map" "$out/System.map"
make -s -C "$src" kernelrelease >"$out/kernelrelease"
