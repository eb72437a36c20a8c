//! Builds the liburcu comparison shim for the benchmarks, and only for them.
//!
//! The shim wraps liburcu's inline memb-flavour read side
//! (`urcu/urcu-memb.h`) so the benchmark measures the same fast path a C
//! program gets. Nothing here is linked into the library: the archive and
//! `-lurcu-memb` are passed to benchmark targets only. Without
//! `liburcu-dev` the cfg `have_liburcu` is not set and the benchmark refuses
//! to run, saying what to install.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(have_liburcu)");
    println!("cargo::rerun-if-changed=benches/urcu_shim.c");
    println!("cargo::rerun-if-changed=build.rs");
    let found = std::process::Command::new("pkg-config")
        .args(["--exists", "liburcu-memb"])
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        println!(
            "cargo::warning=liburcu-dev not found: `cargo bench -p rcu` will not run \
             (scripts/install-deps.sh installs it)"
        );
        return;
    }
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    cc::Build::new()
        .file("benches/urcu_shim.c")
        .opt_level(2)
        .cargo_metadata(false)
        .compile("urcushim");
    println!("cargo::rustc-link-arg-benches={out}/liburcushim.a");
    println!("cargo::rustc-link-arg-benches=-lurcu-memb");
    println!("cargo::rustc-link-arg-benches=-lurcu-common");
    println!("cargo::rustc-link-arg-benches=-lpthread");
    println!("cargo::rustc-cfg=have_liburcu");
}
