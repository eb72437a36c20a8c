//! The liburcu shim's timed loops reach liburcu's thread-local reader state
//! through `%fs` (initial-exec TLS), with no `__tls_get_addr` call: the
//! benchmark would otherwise charge liburcu a function call per section.

use rcu_bench::{NO_LIBURCU, SHIM_ARCHIVES, find, functions, objdump, tls_use};
use std::path::Path;

#[test]
fn shim_loops_use_initial_exec_tls() {
    let archives = SHIM_ARCHIVES.unwrap_or_else(|| panic!("{NO_LIBURCU}"));
    for (archive, prefix) in archives.into_iter().zip(["shim_", "shim_mb_"]) {
        let dump = objdump(Path::new(archive)).unwrap_or_else(|e| panic!("{e}"));
        let funcs = functions(&dump);
        for loop_name in ["read_loop", "page_read_until", "busy_reader"] {
            let name = format!("{prefix}{loop_name}");
            let f = find(&funcs, &name).unwrap_or_else(|| panic!("{name} not found in {archive}"));
            let u = tls_use(&f.body);
            println!("{name}: {u:?}");
            assert_eq!(u.tls_get_addr, 0, "{name} calls __tls_get_addr");
            assert!(u.fs_accesses > 0, "{name} never reaches TLS through %fs");
        }
    }
}
