//! cargo-fuzz entry point; the target's logic and checks are in
//! `vmm_fuzz::virtio_mem_request::run`, which the crate's tests also use to replay
//! `regressions/virtio_mem_request/`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::virtio_mem_request::run(data));
