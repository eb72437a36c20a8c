#!/usr/bin/env bash
# Fuzzes the QMP input path and the virtio-mem request handling with
# cargo-fuzz (targets in fuzz/, documented in docs/fuzzing.md).
#
#   scripts/fuzz.sh --ci              replay seeds and regressions (stable
#                                     `cargo test`), then fuzz each target
#                                     for 60 s: the short run for CI
#   scripts/fuzz.sh --long            fuzz each target for an hour
#   scripts/fuzz.sh --time 600 qmp    fuzz only `qmp`, for 10 minutes
#
# Options: --ci | --long | --time SECONDS | --jobs N, then target names
# (default: all). Environment: FUZZ_TARGET_DIR (build directory, default
# fuzz/target), FUZZ_NICE (nice level, default 10).
#
# There is no nightly toolchain: cargo-fuzz's `-Z` flags are enabled on
# stable with RUSTC_BOOTSTRAP=1, for the fuzz crate's build only (it is not
# a member of the workspace). cargo-fuzz is installed from crates.io if it
# is missing. The corpus grows in fuzz/corpus/<target> (not committed);
# fuzz/seeds/<target> is read, never written. A crash stops the run with
# exit status 1 and leaves the input in fuzz/artifacts/<target>/.
set -euo pipefail
# shellcheck source=lib/usage.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/usage.sh"
cd "$(dirname "$0")/.."

seconds=60
ci=false
jobs=1
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --ci) ci=true; seconds=60 ;;
        --long) seconds=3600 ;;
        --time) seconds="$2"; shift ;;
        --jobs) jobs="$2"; shift ;;
        -h|--help) print_usage "$0"; exit 0 ;;
        -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1") ;;
    esac
    shift
done
all=(qmp virtio_mem_request virtio_mem_queue)
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

step() { printf '\n==> %s\n' "$*" >&2; }

if ! cargo fuzz --version >/dev/null 2>&1; then
    step "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
target_dir="${FUZZ_TARGET_DIR:-$PWD/fuzz/target}"
nice_level="${FUZZ_NICE:-10}"

if $ci; then
    step "replaying fuzz/seeds and fuzz/regressions (stable cargo test)"
    (cd fuzz && CARGO_TARGET_DIR="$target_dir/replay" cargo test)
fi

step "building the fuzz targets (instrumented, release with debug assertions)"
(cd fuzz && nice -n "$nice_level" cargo fuzz build --target-dir "$target_dir")

parallel=()
[ "$jobs" -le 1 ] || parallel=(-fork="$jobs")
status=0
for t in "${targets[@]}"; do
    step "fuzzing $t for ${seconds} s"
    mkdir -p "fuzz/corpus/$t"
    log="fuzz/artifacts/$t.log"
    mkdir -p fuzz/artifacts
    if (cd fuzz && nice -n "$nice_level" cargo fuzz run --target-dir "$target_dir" "$t" \
            "corpus/$t" "seeds/$t" -- \
            -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 "${parallel[@]}") 2>&1 | tee "$log" | grep --line-buffered -E '^#[0-9]+ +(DONE|pulse)|stat::|Done|ERROR|panicked'; then
        :
    fi
    if grep -qE 'ERROR: libFuzzer|panicked at' "$log"; then
        echo "fuzz.sh: $t found a crash: see $log and fuzz/artifacts/$t/" >&2
        echo "fuzz.sh: make it a regression test as docs/fuzzing.md says" >&2
        status=1
    fi
done
exit $status
