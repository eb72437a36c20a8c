//! Fuzz targets of the VMM, as plain functions so that the crate's tests can
//! replay inputs without libFuzzer (`cargo test` in this directory, stable
//! toolchain, no instrumentation):
//!
//! - [`qmp`]: a client's bytes through the QMP splitter, request parsing and
//!   dispatch, against a fake VM that checks the `VmOps` calling rules.
//! - [`virtio_mem_request`]: virtio-mem requests in well-formed and malformed
//!   descriptor chains, answers compared with a model.
//! - [`virtio_mem_queue`]: raw queue memory and register writes against the
//!   virtio-mem device and its virtio-mmio transport.
//!
//! `fuzz_targets/*.rs` are the libFuzzer entry points. `regressions/<target>/`
//! holds inputs that once failed (minimised) and `seeds/<target>/` the seed
//! corpus; the tests below replay both. See `docs/fuzzing.md`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Fuzz checks panic on purpose.

pub mod qmp;
pub mod virtio;
pub mod virtio_mem_queue;
pub mod virtio_mem_request;

/// A target's logic: runs one input, panics if a check fails.
pub type Target = fn(&[u8]);

/// The targets by name, as `cargo fuzz` knows them.
pub const TARGETS: [(&str, Target); 3] = [
    ("qmp", qmp::run),
    ("virtio_mem_request", virtio_mem_request::run),
    ("virtio_mem_queue", virtio_mem_queue::run),
];

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Runs every file under `dir/<target>/` through its target; returns how
    /// many were replayed.
    fn replay(dir: &str) -> usize {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut n = 0;
        for (name, run) in super::TARGETS {
            let Ok(entries) = std::fs::read_dir(root.join(name)) else {
                continue;
            };
            let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
            files.sort();
            for file in files.into_iter().filter(|f| f.is_file()) {
                let data = std::fs::read(&file).unwrap();
                eprintln!("replaying {}", file.display());
                run(&data);
                n += 1;
            }
        }
        n
    }

    #[test]
    fn regressions_replay_cleanly() {
        replay("regressions");
    }

    #[test]
    fn seeds_replay_cleanly() {
        assert!(replay("seeds") > 0, "the seed corpus is empty");
    }
}
