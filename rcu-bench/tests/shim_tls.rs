//! The liburcu shim's timed loops reach liburcu's thread-local reader state
//! through `%fs` (initial-exec TLS), with no `__tls_get_addr` call: the
//! benchmark would otherwise charge liburcu a function call per section.

use rcu_bench::{NO_LIBURCU, SHIM_ARCHIVE, find, functions, objdump, tls_use};
use std::path::Path;

#[test]
fn shim_loops_use_initial_exec_tls() {
    let archive = SHIM_ARCHIVE.unwrap_or_else(|| panic!("{NO_LIBURCU}"));
    let dump = objdump(Path::new(archive)).unwrap_or_else(|e| panic!("{e}"));
    let funcs = functions(&dump);
    for name in ["shim_read_loop", "shim_page_read_until", "shim_busy_reader"] {
        let f = find(&funcs, name).unwrap_or_else(|| panic!("{name} not found in {archive}"));
        let u = tls_use(&f.body);
        println!("{name}: {u:?}");
        assert_eq!(u.tls_get_addr, 0, "{name} calls __tls_get_addr");
        assert!(u.fs_accesses > 0, "{name} never reaches TLS through %fs");
    }
}
