//! What `RcuCell::replace` and `replace_with` cost the allocator: one
//! allocation per value published (the value, with the header that later
//! carries it to the call_rcu thread), and nothing more when the old value
//! is retired. liburcu's `call_rcu` embeds its `rcu_head` in the object the
//! same way.

#![cfg(not(loom))] // The public API is not built under loom.
#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Counts the allocations made by the calling thread.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counter is a const-initialised thread-local, which allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded; `ptr` came from `System.alloc` above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// A cell of 4 KiB values, with the call_rcu thread started and this
/// thread registered, so that neither allocates inside a measurement. Its
/// replacements are counted under `label`.
fn warm_cell(label: &'static str) -> rcu::RcuCell<[u64; 512]> {
    let cell = rcu::RcuCell::with_label([0u64; 512], label);
    cell.replace([1; 512]);
    drop(rcu::read_lock());
    rcu::drain_call_rcu();
    cell
}

#[test]
fn replace_allocates_once_per_value() {
    let cell = warm_cell("replace test");
    let before = allocations();
    for i in 0..1000 {
        cell.replace([i; 512]);
    }
    let made = allocations() - before;
    rcu::drain_call_rcu();
    assert_eq!(
        made, 1000,
        "1000 replaces made {made} allocations on the writer's thread"
    );
    assert_eq!(cell.with(|v| v[0]), 999);
}

#[test]
fn replace_with_allocates_once_per_value() {
    let cell = warm_cell("replace_with test");
    let before = allocations();
    for i in 0..1000 {
        cell.replace_with(|| [i; 512]);
    }
    let made = allocations() - before;
    rcu::drain_call_rcu();
    assert_eq!(
        made, 1000,
        "1000 replace_with calls made {made} allocations on the writer's thread"
    );
    assert_eq!(cell.with(|v| (v[0], v[511])), (999, 999));
    let here = format!("{}:", file!());
    let counted: u64 = labelled("replace_with test")
        .iter()
        .filter(|s| s.site.starts_with(&here))
        .map(|s| s.calls)
        .sum();
    assert_eq!(
        counted, 1001,
        "each replace is counted at its caller in this file"
    );
}

/// The sites counted under `label`.
fn labelled(label: &str) -> Vec<rcu::SiteStats> {
    let mut sites = rcu::stats().by_site;
    sites.retain(|s| s.label == label);
    sites
}
