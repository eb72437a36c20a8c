//! Builds the liburcu comparison shim for the benchmark, and only for it.
//!
//! The shim runs liburcu's inline read side (`_LGPL_SOURCE`) in loops
//! written in C, so the benchmark measures what a C program gets. It is
//! built twice: for the memb flavour (`urcu/urcu-memb.h`, readers without
//! fences, the peer of our membarrier reader mode) and, with `SHIM_MB`, for
//! the mb flavour (`urcu/urcu-mb.h`, readers with fences, the peer of our
//! fenced mode), whose entry points are named `shim_mb_*`. It is compiled with `-O2` and
//! `-ftls-model=initial-exec`, so the reader's thread-local is reached
//! through `%fs` like the Rust side's, never through a `__tls_get_addr`
//! call (the benchmark and `tests/shim_tls.rs` check the machine code).
//!
//! Silent by design: a plain `cargo build` on a machine without
//! `liburcu-dev` prints nothing. The cfg `have_liburcu` is then unset and the
//! benchmark (and the shim test) fail at run time, saying what to install.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(have_liburcu)");
    println!("cargo::rerun-if-changed=benches/urcu_shim.c");
    println!("cargo::rerun-if-changed=build.rs");
    let found = std::process::Command::new("pkg-config")
        .args(["--exists", "liburcu-memb", "liburcu-mb"])
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        return;
    }
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    cc::Build::new()
        .file("benches/urcu_shim.c")
        .opt_level(2)
        .flag("-ftls-model=initial-exec")
        .cargo_metadata(false)
        .compile("urcushim");
    cc::Build::new()
        .file("benches/urcu_shim.c")
        .define("SHIM_MB", None)
        .opt_level(2)
        .flag("-ftls-model=initial-exec")
        .cargo_metadata(false)
        .compile("urcushim_mb");
    println!("cargo::rustc-link-arg-benches={out}/liburcushim.a");
    println!("cargo::rustc-link-arg-benches={out}/liburcushim_mb.a");
    println!("cargo::rustc-link-arg-benches=-lurcu-memb");
    println!("cargo::rustc-link-arg-benches=-lurcu-mb");
    println!("cargo::rustc-link-arg-benches=-lurcu-common");
    println!("cargo::rustc-link-arg-benches=-lpthread");
    println!("cargo::rustc-cfg=have_liburcu");
}
