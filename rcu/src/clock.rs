//! Cheap timestamps for call-to-callback latency.
//!
//! Every `call_rcu` takes a timestamp, so its cost matters: on virtual
//! machines `clock_gettime` (what `Instant::now` uses) costs tens of ns,
//! while reading the time-stamp counter costs a few. When the kernel itself
//! trusts the TSC (its clocksource is `tsc`, so the counter is invariant and
//! synchronised across CPUs), stamps are TSC ticks, converted to ns with a
//! ratio the call_rcu thread measures once at start. Otherwise, and under
//! loom, stamps are nanoseconds from `Instant`.
//!
//! The TSC rate is derived from the time since the clock's first use (ticks
//! against `Instant`); the two reads of that base are a few ns apart, so the
//! rate is accurate to a fraction of a percent after 100 us and is fixed
//! once 50 ms have passed. Nothing ever waits for a calibration.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Once this much time has passed since the base, the rate is fixed.
const FIX_AFTER_NS: u128 = 50_000_000;

struct Clock {
    tsc: bool,
    base: Instant,
    base_tsc: u64,
    /// Nanoseconds per tick, as 32.32 fixed point; 0 until fixed.
    ns_per_tick: AtomicU64,
}

static CLOCK: OnceLock<Clock> = OnceLock::new();

fn clock() -> &'static Clock {
    CLOCK.get_or_init(|| {
        let tsc = cfg!(all(target_arch = "x86_64", not(loom)))
            && std::fs::read_to_string(
                "/sys/devices/system/clocksource/clocksource0/current_clocksource",
            )
            .is_ok_and(|s| s.trim() == "tsc");
        Clock {
            tsc,
            base: Instant::now(),
            base_tsc: rdtsc(),
            ns_per_tick: AtomicU64::new(0),
        }
    })
}

#[inline]
fn rdtsc() -> u64 {
    #[cfg(all(target_arch = "x86_64", not(loom)))]
    {
        // SAFETY: RDTSC has no memory effects and exists on every x86-64 CPU.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(all(target_arch = "x86_64", not(loom))))]
    {
        0
    }
}

/// A timestamp, in clock-specific units.
#[inline]
pub(crate) fn now() -> u64 {
    let c = clock();
    if c.tsc {
        rdtsc()
    } else {
        u64::try_from(c.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Nanoseconds from the stamp `since` to now.
pub(crate) fn elapsed_ns(since: u64) -> u64 {
    let c = clock();
    let now = now();
    let d = now.saturating_sub(since);
    if !c.tsc {
        return d;
    }
    let mut r = c.ns_per_tick.load(Ordering::Relaxed);
    if r == 0 {
        let ns = c.base.elapsed().as_nanos();
        let ticks = now.wrapping_sub(c.base_tsc).max(1);
        r = u64::try_from((ns << 32) / u128::from(ticks))
            .unwrap_or(1 << 32)
            .max(1);
        if ns >= FIX_AFTER_NS {
            c.ns_per_tick.store(r, Ordering::Relaxed);
        }
    }
    u64::try_from((u128::from(d) * u128::from(r)) >> 32).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elapsed_follows_real_time() {
        let s = now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let ns = elapsed_ns(s);
        assert!(ns >= 19_000_000, "{ns} ns");
        assert!(ns < 20_000_000_000, "{ns} ns");
    }
}
