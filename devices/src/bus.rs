//! Immutable, sorted address-range tables that dispatch guest accesses to devices.
//!
//! A [`Bus`] maps non-overlapping, non-empty ranges `[base, base + len)` of one address
//! space to devices. The VMM keeps two of them: port I/O (16-bit port numbers widened to
//! `u64`) and MMIO. A `Bus` is never modified in place: [`Bus::with_device`] and
//! [`Bus::without_range`] build a new table and leave the old one valid, so the VMM can
//! publish tables copy-on-write (through RCU) while vCPU threads keep dispatching on the
//! snapshot they hold.
//!
//! Dispatch takes no lock: a lookup is a binary search over an immutable vector. Accesses
//! that no device claims, or that straddle the end of a range, are answered by the bus
//! itself (reads return all-ones, writes are dropped) and counted in counters that every
//! table derived from the same [`Bus::builder`] shares.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

/// A device that answers guest accesses to the ranges it is registered at.
///
/// Both methods run on vCPU threads, possibly on several at once, and may also be called
/// from the VMM's control thread. Implementations keep their own fine-grained
/// synchronisation for their own state (never a lock shared with other devices), must
/// not block for long, and must never panic, whatever `base`, `offset`, `data.len()`
/// (including 0 and odd lengths) or the written bytes are: all of them are under guest
/// control, and the device may also be called directly with values the [`Bus`] would
/// never pass.
///
/// `base` is the start of the range the access hit (a device registered at several
/// ranges can tell them apart) and `offset` is the distance of the first accessed byte
/// from `base`. When the call comes through a [`Bus`], `offset + data.len()` never exceeds
/// the range's length.
pub trait BusDevice: Send + Sync {
    /// Fills `data` with the bytes at `offset` of the range that starts at `base`.
    fn read(&self, base: u64, offset: u64, data: &mut [u8]);

    /// Takes `data` as written to `offset` of the range that starts at `base`.
    fn write(&self, base: u64, offset: u64, data: &[u8]);
}

/// Errors building or querying a [`Bus`].
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum BusError {
    /// A range must cover at least one address.
    #[error("bus range at {base:#x} has zero length")]
    ZeroLength {
        /// Start of the rejected range.
        base: u64,
    },
    /// The range would extend past the end of the 64-bit address space.
    #[error("bus range at {base:#x} with length {len:#x} overflows the address space")]
    Overflow {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The range overlaps one that is already on the bus.
    #[error("bus range {new} overlaps {existing}")]
    Overlap {
        /// The range that was being added.
        new: BusRange,
        /// The range already on the bus.
        existing: BusRange,
    },
    /// No range starts at this address.
    #[error("no bus range starts at {base:#x}")]
    NoRange {
        /// The address that was asked for.
        base: u64,
    },
    /// No range contains this address.
    #[error("no device at {addr:#x}")]
    NoDevice {
        /// The accessed address.
        addr: u64,
    },
    /// The access starts inside a range but runs past its end.
    #[error("access of {len} bytes at {addr:#x} runs past the end of {range}")]
    Straddle {
        /// The accessed address.
        addr: u64,
        /// The length of the access in bytes.
        len: u64,
        /// The range the access starts in.
        range: BusRange,
    },
}

/// A non-empty range of addresses `[base, base + len)` that ends at or before `u64::MAX`.
///
/// Constructed only through checked constructors, so every value is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BusRange {
    base: u64,
    len: u64,
}

impl BusRange {
    /// Returns the range `[base, base + len)`.
    ///
    /// Fails with [`BusError::ZeroLength`] if `len` is 0 and [`BusError::Overflow`] if the
    /// last address `base + len - 1` does not fit in a `u64`. A range may end exactly at
    /// `u64::MAX`.
    pub const fn new(base: u64, len: u64) -> Result<BusRange, BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        match base.checked_add(len - 1) {
            Some(_) => Ok(BusRange { base, len }),
            None => Err(BusError::Overflow { base, len }),
        }
    }

    /// Returns the range holding the single I/O port `port`. Never fails.
    pub const fn port(port: u16) -> BusRange {
        BusRange {
            base: port as u64,
            len: 1,
        }
    }

    /// First address of the range.
    pub const fn base(&self) -> u64 {
        self.base
    }

    /// Number of addresses in the range (at least 1).
    pub const fn len(&self) -> u64 {
        self.len
    }

    /// Always `false`: ranges are never empty. Present for API symmetry with `len`.
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// Last address of the range (inclusive); never overflows.
    pub const fn last(&self) -> u64 {
        // Cannot overflow: checked at construction.
        self.base + (self.len - 1)
    }

    /// Whether `addr` lies in the range.
    pub const fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr <= self.last()
    }

    /// Whether the two ranges share at least one address.
    pub const fn overlaps(&self, other: &BusRange) -> bool {
        self.base <= other.last() && other.base <= self.last()
    }
}

impl fmt::Display for BusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}..={:#x}]", self.base, self.last())
    }
}

/// The device and position that an access resolves to.
#[derive(Clone, Copy)]
pub struct BusTarget<'a> {
    /// The range that contains the whole access.
    pub range: BusRange,
    /// The device registered at `range`.
    pub device: &'a Arc<dyn BusDevice>,
    /// Distance of the accessed address from `range.base()`.
    pub offset: u64,
}

impl fmt::Debug for BusTarget<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusTarget")
            .field("range", &self.range)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

/// A snapshot of the accesses that no device answered (see [`Bus::unclaimed`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnclaimedAccesses {
    /// Reads that hit no range or straddled the end of one.
    pub reads: u64,
    /// Writes that hit no range or straddled the end of one.
    pub writes: u64,
    /// Address of the most recent unclaimed access, if there was any.
    pub last_addr: Option<u64>,
}

#[derive(Debug, Default)]
struct UnclaimedCounters {
    reads: AtomicU64,
    writes: AtomicU64,
    last_addr: AtomicU64,
}

impl UnclaimedCounters {
    fn record(&self, counter: &AtomicU64, addr: u64) {
        // Relaxed: these are statistics; no other memory is published through them.
        self.last_addr.store(addr, Ordering::Relaxed);
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Clone)]
struct BusEntry {
    range: BusRange,
    device: Arc<dyn BusDevice>,
}

/// An immutable table of device ranges, sorted by address.
///
/// Cloning, [`with_device`](Bus::with_device) and [`without_range`](Bus::without_range)
/// cost one vector copy and one reference-count increment per device; they never touch
/// the source table, which stays usable by threads that still hold it. All tables
/// derived from one another share the unclaimed-access counters.
#[derive(Clone, Default)]
pub struct Bus {
    entries: Vec<BusEntry>,
    unclaimed: Arc<UnclaimedCounters>,
}

impl Bus {
    /// Returns a builder for a new, empty bus with fresh counters.
    pub fn builder() -> BusBuilder {
        BusBuilder {
            bus: Bus::default(),
        }
    }

    /// Returns a new bus with `device` added at `range`; `self` is unchanged.
    ///
    /// Fails with [`BusError::Overlap`] (naming both ranges) if `range` overlaps a range
    /// already on the bus.
    pub fn with_device(
        &self,
        range: BusRange,
        device: Arc<dyn BusDevice>,
    ) -> Result<Bus, BusError> {
        let index = self.insertion_point(range)?;
        let mut entries = Vec::with_capacity(self.entries.len() + 1);
        entries.extend_from_slice(&self.entries[..index]);
        entries.push(BusEntry { range, device });
        entries.extend_from_slice(&self.entries[index..]);
        Ok(Bus {
            entries,
            unclaimed: Arc::clone(&self.unclaimed),
        })
    }

    /// Returns a new bus without the range that starts at `base`, and the device that
    /// was registered there; `self` is unchanged.
    ///
    /// Fails with [`BusError::NoRange`] if no range starts exactly at `base`.
    pub fn without_range(&self, base: u64) -> Result<(Bus, Arc<dyn BusDevice>), BusError> {
        let index = self
            .entries
            .binary_search_by_key(&base, |e| e.range.base)
            .map_err(|_| BusError::NoRange { base })?;
        let mut entries = self.entries.clone();
        let removed = entries.remove(index);
        Ok((
            Bus {
                entries,
                unclaimed: Arc::clone(&self.unclaimed),
            },
            removed.device,
        ))
    }

    /// Resolves an access of `len` bytes at `addr` to the device whose range contains
    /// all of it.
    ///
    /// Fails with [`BusError::NoDevice`] if no range contains `addr` and with
    /// [`BusError::Straddle`] if the access starts in a range but does not end in it. A
    /// zero-length access resolves like a one-byte access would. Takes no lock and does
    /// not allocate.
    pub fn lookup(&self, addr: u64, len: usize) -> Result<BusTarget<'_>, BusError> {
        // Index of the first entry whose base is above `addr`; the candidate is before it.
        let after = self.entries.partition_point(|e| e.range.base <= addr);
        let entry = after
            .checked_sub(1)
            .and_then(|i| self.entries.get(i))
            .filter(|e| e.range.contains(addr))
            .ok_or(BusError::NoDevice { addr })?;
        let offset = addr - entry.range.base;
        let len = u64::try_from(len).unwrap_or(u64::MAX);
        // `offset < range.len` because the range contains `addr`.
        if len > entry.range.len - offset {
            return Err(BusError::Straddle {
                addr,
                len,
                range: entry.range,
            });
        }
        Ok(BusTarget {
            range: entry.range,
            device: &entry.device,
            offset,
        })
    }

    /// Dispatches a read of `data.len()` bytes at `addr`.
    ///
    /// Returns `true` if a device answered. Otherwise (no range contains `addr`, or the
    /// access runs past the end of its range) fills `data` with `0xff`, as an undriven
    /// x86 bus reads, counts the access in [`unclaimed`](Bus::unclaimed) and returns
    /// `false`. Takes no lock shared with other devices or vCPUs.
    pub fn dispatch_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr, data.len()) {
            Ok(target) => {
                target.device.read(target.range.base, target.offset, data);
                true
            }
            Err(e) => {
                log::debug!("unclaimed bus read: {e}");
                data.fill(0xff);
                self.unclaimed.record(&self.unclaimed.reads, addr);
                false
            }
        }
    }

    /// Dispatches a write of `data` at `addr`.
    ///
    /// Returns `true` if a device took it. Otherwise (no range contains `addr`, or the
    /// access runs past the end of its range) drops the write, counts it in
    /// [`unclaimed`](Bus::unclaimed) and returns `false`. Takes no lock shared with
    /// other devices or vCPUs.
    pub fn dispatch_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr, data.len()) {
            Ok(target) => {
                target.device.write(target.range.base, target.offset, data);
                true
            }
            Err(e) => {
                log::debug!("unclaimed bus write: {e}");
                self.unclaimed.record(&self.unclaimed.writes, addr);
                false
            }
        }
    }

    /// Returns the unclaimed-access counts of this bus and every bus derived from the
    /// same builder. The three fields are read separately and may be mutually slightly
    /// stale while vCPUs run.
    pub fn unclaimed(&self) -> UnclaimedAccesses {
        let reads = self.unclaimed.reads.load(Ordering::Relaxed);
        let writes = self.unclaimed.writes.load(Ordering::Relaxed);
        let last_addr =
            (reads + writes > 0).then(|| self.unclaimed.last_addr.load(Ordering::Relaxed));
        UnclaimedAccesses {
            reads,
            writes,
            last_addr,
        }
    }

    /// Number of ranges on the bus.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the bus has no ranges.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The ranges and their devices, in increasing address order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (BusRange, &Arc<dyn BusDevice>)> {
        self.entries.iter().map(|e| (e.range, &e.device))
    }

    /// Position at which `range` would be inserted, or the overlap that forbids it.
    fn insertion_point(&self, range: BusRange) -> Result<usize, BusError> {
        let index = self.entries.partition_point(|e| e.range.base < range.base);
        let neighbours = [index.checked_sub(1), Some(index)];
        for entry in neighbours
            .into_iter()
            .flatten()
            .filter_map(|i| self.entries.get(i))
        {
            if entry.range.overlaps(&range) {
                return Err(BusError::Overlap {
                    new: range,
                    existing: entry.range,
                });
            }
        }
        Ok(index)
    }
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field(
                "ranges",
                &self.entries.iter().map(|e| e.range).collect::<Vec<_>>(),
            )
            .field("unclaimed", &self.unclaimed())
            .finish()
    }
}

/// Builds a [`Bus`] by adding devices one at a time.
#[derive(Debug, Default)]
pub struct BusBuilder {
    bus: Bus,
}

impl BusBuilder {
    /// Adds `device` at `range`.
    ///
    /// Fails with [`BusError::Overlap`] (naming both ranges) if `range` overlaps a range
    /// already added; the builder is then unchanged.
    pub fn add(
        &mut self,
        range: BusRange,
        device: Arc<dyn BusDevice>,
    ) -> Result<&mut Self, BusError> {
        let index = self.bus.insertion_point(range)?;
        self.bus.entries.insert(index, BusEntry { range, device });
        Ok(self)
    }

    /// Returns the finished bus.
    pub fn build(self) -> Bus {
        self.bus
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Mutex;

    use proptest::prelude::*;

    use super::*;

    /// One access seen by a device: (is_write, base, offset, bytes).
    type Access = (bool, u64, u64, Vec<u8>);

    /// Records every access and answers reads with `offset + i` per byte.
    #[derive(Default)]
    struct Recorder {
        accesses: Mutex<Vec<Access>>,
    }

    impl BusDevice for Recorder {
        fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
            self.accesses
                .lock()
                .unwrap()
                .push((false, base, offset, data.to_vec()));
        }

        fn write(&self, base: u64, offset: u64, data: &[u8]) {
            self.accesses
                .lock()
                .unwrap()
                .push((true, base, offset, data.to_vec()));
        }
    }

    fn range(base: u64, len: u64) -> BusRange {
        BusRange::new(base, len).unwrap()
    }

    fn dev() -> Arc<Recorder> {
        Arc::new(Recorder::default())
    }

    #[test]
    fn range_constructor_checks() {
        assert_eq!(
            BusRange::new(0x10, 0),
            Err(BusError::ZeroLength { base: 0x10 })
        );
        assert_eq!(
            BusRange::new(u64::MAX, 2),
            Err(BusError::Overflow {
                base: u64::MAX,
                len: 2
            })
        );
        let top = range(u64::MAX, 1);
        assert_eq!(top.last(), u64::MAX);
        assert!(top.contains(u64::MAX));
        let all_but_last = range(0, u64::MAX);
        assert_eq!(all_but_last.last(), u64::MAX - 1);
        assert!(!all_but_last.contains(u64::MAX));
        assert_eq!(BusRange::port(0xffff), range(0xffff, 1));
        assert_eq!(range(0x3f8, 8).to_string(), "[0x3f8..=0x3ff]");
    }

    #[test]
    fn overlap_is_rejected_and_names_both_ranges() {
        let mut b = Bus::builder();
        b.add(range(0x100, 0x10), dev()).unwrap();
        for (base, len) in [
            (0x100, 1),
            (0xf0, 0x11),
            (0x10f, 1),
            (0x108, 0x100),
            (0, u64::MAX),
        ] {
            let err = b.add(range(base, len), dev()).err().unwrap();
            assert_eq!(
                err,
                BusError::Overlap {
                    new: range(base, len),
                    existing: range(0x100, 0x10)
                }
            );
        }
        // Adjacent ranges on both sides are fine.
        b.add(range(0xf0, 0x10), dev()).unwrap();
        b.add(range(0x110, 1), dev()).unwrap();
        let bus = b.build();
        let bases: Vec<u64> = bus.iter().map(|(r, _)| r.base()).collect();
        assert_eq!(bases, vec![0xf0, 0x100, 0x110]);
        let err = bus.with_device(range(0x105, 0x2), dev()).err().unwrap();
        assert!(err.to_string().contains("[0x105..=0x106]"));
        assert!(err.to_string().contains("[0x100..=0x10f]"));
    }

    #[test]
    fn lookup_first_and_last_byte_and_straddle() {
        let d = dev();
        let mut b = Bus::builder();
        b.add(range(0x3f8, 8), d).unwrap();
        let bus = b.build();
        assert_eq!(
            bus.lookup(0x3f7, 1).err(),
            Some(BusError::NoDevice { addr: 0x3f7 })
        );
        let t = bus.lookup(0x3f8, 1).unwrap();
        assert_eq!((t.range, t.offset), (range(0x3f8, 8), 0));
        let t = bus.lookup(0x3ff, 1).unwrap();
        assert_eq!(t.offset, 7);
        assert_eq!(bus.lookup(0x3f8, 8).unwrap().offset, 0);
        assert_eq!(
            bus.lookup(0x3ff, 2).err(),
            Some(BusError::Straddle {
                addr: 0x3ff,
                len: 2,
                range: range(0x3f8, 8)
            })
        );
        assert_eq!(
            bus.lookup(0x3f8, 9)
                .err()
                .map(|e| matches!(e, BusError::Straddle { .. })),
            Some(true)
        );
        assert_eq!(
            bus.lookup(0x400, 1).err(),
            Some(BusError::NoDevice { addr: 0x400 })
        );
        assert_eq!(bus.lookup(0x3fc, 0).unwrap().offset, 4);
        assert_eq!(
            bus.lookup(0x3fc, usize::MAX)
                .err()
                .map(|e| matches!(e, BusError::Straddle { .. })),
            Some(true)
        );
    }

    #[test]
    fn lookup_at_top_of_address_space() {
        let bus = Bus::default()
            .with_device(range(u64::MAX - 0xfff, 0x1000), dev())
            .unwrap();
        assert_eq!(bus.lookup(u64::MAX, 1).unwrap().offset, 0xfff);
        assert!(matches!(
            bus.lookup(u64::MAX, 2),
            Err(BusError::Straddle { .. })
        ));
        assert_eq!(bus.lookup(u64::MAX - 7, 8).unwrap().offset, 0xff8);
        assert!(matches!(
            bus.lookup(0, 1),
            Err(BusError::NoDevice { addr: 0 })
        ));
        assert!(matches!(
            bus.lookup(u64::MAX - 0x1000, 1),
            Err(BusError::NoDevice { .. })
        ));
        let empty = Bus::default();
        assert!(matches!(
            empty.lookup(u64::MAX, 1),
            Err(BusError::NoDevice { .. })
        ));
        assert!(matches!(empty.lookup(0, 1), Err(BusError::NoDevice { .. })));
    }

    #[test]
    fn dispatch_passes_base_and_offset_and_counts_misses() {
        let d = dev();
        let bus = Bus::default()
            .with_device(range(0x1000, 0x200), d.clone())
            .unwrap();
        let mut buf = [0u8; 4];
        assert!(bus.dispatch_read(0x1010, &mut buf));
        assert_eq!(buf, [0x10, 0x11, 0x12, 0x13]);
        assert!(bus.dispatch_write(0x11fc, &[1, 2, 3, 4]));
        assert_eq!(
            *d.accesses.lock().unwrap(),
            vec![
                (false, 0x1000, 0x10, vec![0x10, 0x11, 0x12, 0x13]),
                (true, 0x1000, 0x1fc, vec![1, 2, 3, 4])
            ]
        );
        assert_eq!(bus.unclaimed(), UnclaimedAccesses::default());

        let mut buf = [0u8; 2];
        assert!(
            !bus.dispatch_read(0x11ff, &mut buf),
            "straddling read is rejected"
        );
        assert_eq!(buf, [0xff, 0xff]);
        assert!(!bus.dispatch_write(0x2000, &[0]));
        assert!(!bus.dispatch_write(0x0fff, &[0]));
        assert_eq!(
            d.accesses.lock().unwrap().len(),
            2,
            "the device saw no rejected access"
        );
        assert_eq!(
            bus.unclaimed(),
            UnclaimedAccesses {
                reads: 1,
                writes: 2,
                last_addr: Some(0x0fff)
            }
        );
    }

    #[test]
    fn copy_on_write_keeps_old_tables_and_shares_counters() {
        let a = dev();
        let b = dev();
        let bus1 = Bus::builder().build();
        let bus2 = bus1.with_device(range(0x60, 1), a.clone()).unwrap();
        let bus3 = bus2.with_device(range(0x64, 1), b.clone()).unwrap();
        assert_eq!((bus1.len(), bus2.len(), bus3.len()), (0, 1, 2));

        let (bus4, removed) = bus3.without_range(0x60).unwrap();
        assert!(Arc::ptr_eq(&removed, &(a.clone() as Arc<dyn BusDevice>)));
        assert_eq!(bus4.len(), 1);
        assert_eq!(bus3.len(), 2, "the source table is unchanged");
        assert!(bus3.dispatch_write(0x60, &[1]));
        assert!(!bus4.dispatch_write(0x60, &[1]));
        assert_eq!(
            bus3.without_range(0x61).err(),
            Some(BusError::NoRange { base: 0x61 })
        );
        assert_eq!(
            bus1.without_range(0).err(),
            Some(BusError::NoRange { base: 0 })
        );

        assert_eq!(
            bus1.unclaimed().writes,
            1,
            "counters are shared by derived tables"
        );
        assert!(bus1.is_empty());
        let other = Bus::builder().build();
        assert_eq!(
            other.unclaimed().writes,
            0,
            "a new builder starts new counters"
        );
    }

    #[test]
    fn builder_add_failure_leaves_builder_unchanged() {
        let mut b = Bus::builder();
        b.add(range(0, 0x10), dev()).unwrap();
        assert!(b.add(range(0xf, 0x10), dev()).is_err());
        b.add(range(0x10, 0x10), dev()).unwrap();
        assert_eq!(b.build().len(), 2);
    }

    proptest! {
        /// A bus built from random ranges agrees with a linear scan on every lookup.
        #[test]
        fn lookup_matches_linear_model(
            ranges in prop::collection::vec((any::<u64>(), 1u64..0x1000), 0..24),
            probes in prop::collection::vec((any::<u64>(), 0usize..=16), 0..64),
        ) {
            let mut b = Bus::builder();
            let mut accepted: Vec<BusRange> = Vec::new();
            for (base, len) in ranges {
                let base = base % 0x10000; // dense enough to collide often
                let Ok(r) = BusRange::new(base, len) else { continue };
                let overlapping = accepted.iter().find(|a| a.overlaps(&r)).copied();
                match (b.add(r, dev()), overlapping) {
                    (Ok(_), None) => accepted.push(r),
                    (Err(BusError::Overlap { new, existing }), Some(_)) => {
                        prop_assert_eq!(new, r);
                        prop_assert!(existing.overlaps(&r));
                    }
                    (res, ov) => prop_assert!(false, "add {r}: {:?} vs model {ov:?}", res.err()),
                }
            }
            let bus = b.build();
            let listed: Vec<BusRange> = bus.iter().map(|(r, _)| r).collect();
            let mut sorted = accepted.clone();
            sorted.sort();
            prop_assert_eq!(listed, sorted);
            for (addr, len) in probes {
                let addr = addr % 0x11000;
                let model = accepted.iter().find(|r| r.contains(addr));
                match (bus.lookup(addr, len), model) {
                    (Ok(t), Some(r)) => {
                        prop_assert_eq!(t.range, *r);
                        prop_assert_eq!(t.offset, addr - r.base());
                        prop_assert!(len as u64 <= r.len() - t.offset);
                    }
                    (Err(BusError::Straddle { range, .. }), Some(r)) => {
                        prop_assert_eq!(range, *r);
                        prop_assert!(addr + len as u64 > r.last() + 1);
                    }
                    (Err(BusError::NoDevice { .. }), None) => {}
                    (res, m) => prop_assert!(false, "lookup {addr:#x}/{len}: {res:?} vs {m:?}"),
                }
            }
        }
    }
}
