//! Which blocks of a virtio-mem region are plugged: one bit per block.

/// A fixed-length bitmap of block states (set = plugged) with a population count.
///
/// Ranges are `(first, count)` in blocks. Every method checks its range: a range that
/// does not fit answers `false` to queries and leaves the bitmap unchanged on updates,
/// so no input makes it panic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BlockBitmap {
    words: Vec<u64>,
    len: usize,
    set: usize,
}

impl BlockBitmap {
    /// A bitmap of `len` clear bits.
    pub(crate) fn new(len: usize) -> BlockBitmap {
        BlockBitmap {
            words: vec![0; len.div_ceil(64)],
            len,
            set: 0,
        }
    }

    /// Number of set (plugged) blocks.
    pub(crate) fn count_set(&self) -> usize {
        self.set
    }

    /// Whether block `index` is set; `false` outside the bitmap.
    pub(crate) fn is_set(&self, index: usize) -> bool {
        self.words
            .get(index / 64)
            .is_some_and(|w| index < self.len && w & (1 << (index % 64)) != 0)
    }

    fn fits(&self, first: usize, count: usize) -> bool {
        first.checked_add(count).is_some_and(|end| end <= self.len)
    }

    /// Whether all `count` blocks from `first` are set (`false` if the range does not fit).
    pub(crate) fn all_set(&self, first: usize, count: usize) -> bool {
        self.fits(first, count) && (first..first + count).all(|i| self.is_set(i))
    }

    /// Whether none of the `count` blocks from `first` is set (`false` if the range does
    /// not fit).
    pub(crate) fn all_clear(&self, first: usize, count: usize) -> bool {
        self.fits(first, count) && (first..first + count).all(|i| !self.is_set(i))
    }

    /// Sets or clears the `count` blocks from `first`; returns `false` and changes nothing
    /// if the range does not fit.
    pub(crate) fn assign(&mut self, first: usize, count: usize, value: bool) -> bool {
        if !self.fits(first, count) {
            return false;
        }
        for i in first..first + count {
            let Some(word) = self.words.get_mut(i / 64) else {
                return false;
            };
            let bit = 1u64 << (i % 64);
            let was = *word & bit != 0;
            if was != value {
                *word ^= bit;
                if value {
                    self.set += 1;
                } else {
                    self.set -= 1;
                }
            }
        }
        true
    }

    /// The maximal runs of set blocks, as `(first, count)`, in ascending order.
    pub(crate) fn set_runs(&self) -> Vec<(usize, usize)> {
        let mut runs = Vec::new();
        let mut start = None;
        for i in 0..self.len {
            match (self.is_set(i), start) {
                (true, None) => start = Some(i),
                (false, Some(s)) => {
                    runs.push((s, i - s));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            runs.push((s, self.len - s));
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn assign_and_query_ranges() {
        let mut b = BlockBitmap::new(130);
        assert!(b.all_clear(0, 130));
        assert!(b.assign(62, 4, true), "crosses a word boundary");
        assert_eq!(b.count_set(), 4);
        assert!(b.all_set(62, 4));
        assert!(!b.all_set(61, 2));
        assert!(!b.all_clear(65, 2));
        assert!(
            b.assign(60, 4, true),
            "overlapping set counts new bits only"
        );
        assert_eq!(b.count_set(), 6);
        assert_eq!(b.set_runs(), vec![(60, 6)]);
        assert!(b.assign(129, 1, true));
        assert_eq!(b.set_runs(), vec![(60, 6), (129, 1)]);
        assert!(b.assign(0, 130, false));
        assert_eq!(b.count_set(), 0);
    }

    #[test]
    fn ranges_that_do_not_fit_change_nothing() {
        let mut b = BlockBitmap::new(10);
        assert!(!b.assign(8, 3, true));
        assert!(!b.assign(usize::MAX, 2, true));
        assert_eq!(b.count_set(), 0);
        assert!(!b.all_clear(5, 6));
        assert!(!b.all_set(usize::MAX, 1));
        assert!(!b.is_set(10));
        assert!(b.all_clear(10, 0), "an empty range at the end fits");
        let empty = BlockBitmap::new(0);
        assert!(empty.set_runs().is_empty());
        assert!(!empty.is_set(0));
    }

    proptest! {
        #[test]
        fn matches_a_vector_of_bools(
            len in 0usize..200,
            ops in prop::collection::vec((any::<bool>(), 0usize..210, 0usize..70), 0..40),
        ) {
            let mut b = BlockBitmap::new(len);
            let mut model = vec![false; len];
            for (value, first, count) in ops {
                let fits = first + count <= len;
                prop_assert_eq!(b.assign(first, count, value), fits);
                if fits {
                    model[first..first + count].fill(value);
                }
                prop_assert_eq!(b.count_set(), model.iter().filter(|&&x| x).count());
            }
            let mut from_runs = vec![false; len];
            for (s, n) in b.set_runs() {
                prop_assert!(n > 0);
                from_runs[s..s + n].fill(true);
            }
            prop_assert_eq!(from_runs, model);
        }
    }
}
