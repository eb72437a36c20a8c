//! Reading `/proc/PID/maps` lines in tests.

/// The address range `[start, end)` of a `/proc/PID/maps` line
/// (`start-end perms offset ...`, hexadecimal). Panics on a line that is
/// not one: the tests read what the kernel wrote.
pub fn address_range(line: &str) -> (u64, u64) {
    let range = line.split_whitespace().next().unwrap_or_default();
    let parse = |hex: &str| {
        u64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("not a maps line: {line:?}: {e}"))
    };
    let (start, end) = range
        .split_once('-')
        .unwrap_or_else(|| panic!("not a maps line: {line:?}"));
    (parse(start), parse(end))
}

/// Whether the mapping of `line` overlaps `[start, start + len)`.
pub fn overlaps(line: &str, start: u64, len: u64) -> bool {
    let (a, b) = address_range(line);
    a < start + len && start < b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_kernel_line() {
        let l = "7f2a00000000-7f2a08000000 rw-p 00000000 00:00 0   [anon:hotplug-slot]";
        assert_eq!(address_range(l), (0x7f2a_0000_0000, 0x7f2a_0800_0000));
        assert!(overlaps(l, 0x7f2a_07ff_f000, 0x1000));
        assert!(!overlaps(l, 0x7f2a_0800_0000, 0x1000));
    }
}
