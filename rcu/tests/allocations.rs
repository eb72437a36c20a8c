//! What `RcuCell::replace` costs the allocator: one allocation per value
//! published (the value, with the header that later carries it to the
//! call_rcu thread), and nothing more when the old value is retired.
//! liburcu's `call_rcu` embeds its `rcu_head` in the object the same way.

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

#[test]
fn replace_allocates_once_per_value() {
    let cell = rcu::RcuCell::new([0u64; 512]);
    // Start the call_rcu thread and register this thread first.
    cell.replace([1; 512]);
    drop(rcu::read_lock());
    rcu::drain_call_rcu();
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
