//! cargo-fuzz entry point; the target's logic and checks are in
//! `vmm_fuzz::qmp::run`, which the crate's tests also use to replay
//! `regressions/qmp/`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::qmp::run(data));
