#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, unit and integration
# tests, the users' path on the hardware-virtualization test host (the
# distribution kernel with user space, under QEMU TCG's emulated AMD SVM),
# the RCU torture test (release), the RCU loom models and a short fuzzing
# run of the QMP and virtio-mem input paths.
# This is the README's test command; .ci/run runs exactly this.
# Needs root (it installs Debian packages) and /dev/kvm for the VM tests.
set -euo pipefail
# shellcheck source=lib/usage.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/usage.sh"
case "${1:-}" in -h | --help) print_usage "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }
started=$(date +%s)

step "host packages (QEMU 10 for the test host)"
scripts/install-deps.sh --qemu

step "guest kit (cached outside the clone; a kernel build takes minutes once)"
tests/guest/build-kit.sh --distro

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The workspace build turns vmm's test-utils feature on (the tests crate
# needs it); without it, code only tests use is dead and the compiler says so.
cargo clippy -p vmm --lib --bins --locked -- -D warnings

step "unit and integration tests"
cargo test --workspace --locked

step "users' path: the hardware-virtualization test host (tests/hwhost/README.md)"
tests/hwhost/run.sh --ci --timeout 1500 --stall 600

step "RCU torture test, 10 s, release"
RCU_TORTURE_SECS=10 cargo test --release --locked -p rcu --test torture -- --nocapture

step "RCU loom models (release, bounded to 3 preemptions, 2 for the no-lost-wake-up pair)"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
    cargo test --release --locked -p rcu --lib loom

step "fuzzing: replay seeds and regressions, then 60 s per target (docs/fuzzing.md)"
scripts/fuzz.sh --ci

step "all tests passed in $(( $(date +%s) - started )) s"
