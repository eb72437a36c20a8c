#!/usr/bin/env bash
# Installs the host packages the build, the guest kit and the tests need.
# Idempotent: installs only what is missing, and touches the network only then.
# Usage: scripts/install-deps.sh [--qemu]   (--qemu also installs QEMU 10 from
# bookworm-backports, which the hardware-virtualization test host, the boot
# benchmarks and the QEMU comparisons need; scripts/test.sh passes it).
set -euo pipefail
# shellcheck source=lib/usage.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/usage.sh"
case "${1:-}" in -h | --help) print_usage "$0"; exit 0 ;; esac

want_qemu=0
for arg in "$@"; do
    case "$arg" in
        --qemu) want_qemu=1 ;;
        *) echo "install-deps: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: run as root (it installs Debian packages)" >&2
    exit 1
fi

packages=(
    # Build of the workspace; liburcu-dev for rcu-bench's C shim (liburcu's
    # memb flavour), which only `cargo bench -p rcu-bench` and its test need.
    build-essential pkg-config liburcu-dev
    # Guest kit: the minimal kernel from Debian's kernel source package.
    linux-source-6.1 bc bison flex libelf-dev libssl-dev cpio xz-utils lz4 dwarves patch
    # Guest kit: tiny initramfs /init programs and the busybox user space;
    # objdump, with which rcu-bench checks its loops' machine code.
    binutils
    # Python QMP client used by the end-to-end tests.
    python3 python3-venv
)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

export DEBIAN_FRONTEND=noninteractive
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}" >&2
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "$want_qemu" -eq 1 ]; then
    # QEMU 10 lives in bookworm-backports; installing it from there keeps the
    # machine's backported qemu-utils consistent.
    if ! command -v qemu-system-x86_64 >/dev/null 2>&1 ||
        ! qemu-system-x86_64 --version | grep -q 'version 1[0-9]\.'; then
        list=/etc/apt/sources.list.d/bookworm-backports.list
        if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
            echo 'deb http://deb.debian.org/debian bookworm-backports main' >"$list"
        fi
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
    fi
fi
# The QEMU QMP client the end-to-end tests drive the VMM with (PyPI's
# qemu.qmp), in a virtual environment outside the clone so CI runs reuse it.
venv=${VMM_PY_VENV:-/var/cache/vmm-venv}
if ! "$venv/bin/python3" -c 'import qemu.qmp' 2>/dev/null; then
    echo "install-deps: creating $venv with qemu.qmp" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'qemu.qmp==0.0.6'
fi
echo "install-deps: host packages ready" >&2
