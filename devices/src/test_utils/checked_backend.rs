//! [`CheckedBackend`]: a fake [`MemoryBackend`] that checks the contract.

use std::collections::BTreeSet;
use std::sync::Mutex;

use crate::virtio::mem_backend::{MemoryBackend, MemoryBackendError};

/// One backend call, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendCall {
    /// `plug(gpa, len)`.
    Plug(u64, u64),
    /// `unplug(gpa, len)`.
    Unplug(u64, u64),
}

/// What a [`CheckedBackend`] does with a call that breaks the
/// [`MemoryBackend`] contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnViolation {
    /// Counts it ([`CheckedBackend::contract_violations`]) and carries on.
    Count,
    /// Panics, naming it (for fuzz targets: the input that caused it fails).
    Panic,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<BackendCall>,
    plugged: BTreeSet<u64>,
    /// Blocks unplugged after having been plugged: read-only, as the VMM's
    /// backend leaves them.
    read_only: BTreeSet<u64>,
    fail_next: usize,
    fail_after: Option<usize>,
    fail_all: bool,
    contract_violations: usize,
}

/// A [`MemoryBackend`] that records its calls, tracks which blocks it backs,
/// checks every call against the contract, and fails when told to.
///
/// Checks, per call: `len > 0`; `gpa` and `len` multiples of the block size;
/// the range inside the region (when one is given with
/// [`with_region`](Self::with_region)); no block of a plug already plugged,
/// no block of an unplug already unplugged. A violation is counted or
/// panics ([`OnViolation`]); the call then goes on as if it were valid.
///
/// Injected failures (checked in this order, after the contract):
/// [`fail_next`](Self::fail_next), [`fail_after`](Self::fail_after),
/// [`set_fail`](Self::set_fail). A failed call changes no block.
///
/// Blocks unplugged after having been plugged are read-only, as the VMM
/// leaves them: [`writable`](MemoryBackend::writable) answers `false` for a
/// range that touches one.
///
/// Safe to share between threads (one lock around its state).
#[derive(Debug)]
pub struct CheckedBackend {
    block: u64,
    region: Option<(u64, u64)>,
    on_violation: OnViolation,
    state: Mutex<State>,
}

impl CheckedBackend {
    /// A backend for blocks of `block` bytes anywhere, that counts
    /// violations.
    pub fn new(block: u64) -> CheckedBackend {
        CheckedBackend {
            block,
            region: None,
            on_violation: OnViolation::Count,
            state: Mutex::new(State::default()),
        }
    }

    /// Also checks that every call lies in `[addr, addr + size)`.
    pub fn with_region(mut self, addr: u64, size: u64) -> CheckedBackend {
        self.region = Some((addr, size));
        self
    }

    /// Sets what a contract violation does.
    pub fn on_violation(mut self, on_violation: OnViolation) -> CheckedBackend {
        self.on_violation = on_violation;
        self
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<BackendCall> {
        self.lock().calls.clone()
    }

    /// How many calls so far.
    pub fn call_count(&self) -> usize {
        self.lock().calls.len()
    }

    /// The block addresses the backend currently backs.
    pub fn plugged(&self) -> BTreeSet<u64> {
        self.lock().plugged.clone()
    }

    /// Fails the next `n` calls.
    pub fn fail_next(&self, n: usize) {
        self.lock().fail_next = n;
    }

    /// Lets `n` more calls succeed, then fails one.
    pub fn fail_after(&self, n: usize) {
        self.lock().fail_after = Some(n);
    }

    /// Makes every later call fail (`true`) or stops doing so (`false`).
    pub fn set_fail(&self, fail: bool) {
        self.lock().fail_all = fail;
    }

    /// How many calls broke the contract (always 0 with
    /// [`OnViolation::Panic`]: the first one panics).
    pub fn contract_violations(&self) -> usize {
        self.lock().contract_violations
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panicking check (OnViolation::Panic) poisons the lock; the state
        // is still what the calls made it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What is wrong with `call` given the blocks plugged now, if anything.
    fn violation(&self, st: &State, call: BackendCall) -> Option<String> {
        let (gpa, len, plug) = match call {
            BackendCall::Plug(g, l) => (g, l, true),
            BackendCall::Unplug(g, l) => (g, l, false),
        };
        if len == 0 || !len.is_multiple_of(self.block) || !gpa.is_multiple_of(self.block) {
            return Some(format!("{call:?}: {gpa:#x}+{len:#x} is not whole blocks"));
        }
        if let Some((addr, size)) = self.region
            && (gpa < addr || gpa.checked_add(len).is_none_or(|end| end > addr + size))
        {
            return Some(format!("{call:?}: outside the region"));
        }
        (0..len / self.block)
            .map(|i| gpa + i * self.block)
            .find(|b| st.plugged.contains(b) == plug)
            .map(|b| format!("{call:?}: block {b:#x} already in that state"))
    }

    fn apply(&self, call: BackendCall) -> Result<(), MemoryBackendError> {
        let mut st = self.lock();
        st.calls.push(call);
        if let Some(what) = self.violation(&st, call) {
            match self.on_violation {
                OnViolation::Count => st.contract_violations += 1,
                OnViolation::Panic => {
                    drop(st);
                    panic!("MemoryBackend contract broken: {what}");
                }
            }
        }
        if st.fail_next > 0 {
            st.fail_next -= 1;
            return Err(MemoryBackendError::new("injected failure"));
        }
        match st.fail_after {
            Some(0) => {
                st.fail_after = None;
                return Err(MemoryBackendError::new("injected failure"));
            }
            Some(n) => st.fail_after = Some(n - 1),
            None => {}
        }
        if st.fail_all {
            return Err(MemoryBackendError::new("injected failure"));
        }
        let (gpa, len, plug) = match call {
            BackendCall::Plug(g, l) => (g, l, true),
            BackendCall::Unplug(g, l) => (g, l, false),
        };
        for b in (0..len / self.block).map(|i| gpa + i * self.block) {
            if plug {
                st.plugged.insert(b);
                st.read_only.remove(&b);
            } else {
                st.plugged.remove(&b);
                st.read_only.insert(b);
            }
        }
        Ok(())
    }
}

impl MemoryBackend for CheckedBackend {
    fn plug(&self, gpa: u64, len: u64) -> Result<(), MemoryBackendError> {
        self.apply(BackendCall::Plug(gpa, len))
    }

    fn unplug(&self, gpa: u64, len: u64) -> Result<(), MemoryBackendError> {
        self.apply(BackendCall::Unplug(gpa, len))
    }

    fn writable(&self, gpa: u64, len: u64) -> bool {
        let first = gpa - gpa % self.block;
        let end = gpa.saturating_add(len);
        !self.lock().read_only.range(first..end).any(|_| true)
    }
}
