//! An allow-list under construction: system calls allowed with any
//! arguments, or only when their arguments match one of several rules.

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// System calls and the arguments they may have. Every argument check
/// compares the low 32 bits (`Dword`): the values checked (ioctl requests,
/// flags, commands, signal numbers, pids) are all 32-bit in the kernel.
#[derive(Debug, Default)]
pub(crate) struct AllowList {
    /// `None`: any arguments. `Some(rules)`: one of the rules must match.
    calls: BTreeMap<i64, Option<Vec<SeccompRule>>>,
}

impl AllowList {
    /// Allows each of `calls` with any arguments (this overrides argument
    /// rules given for the same call).
    pub(crate) fn any(&mut self, calls: &[i64]) -> &mut Self {
        for &nr in calls {
            self.calls.insert(nr, None);
        }
        self
    }

    /// Allows `nr` when every one of `conditions` holds (one more
    /// alternative, besides the rules already given for `nr`).
    pub(crate) fn when(
        &mut self,
        nr: i64,
        conditions: Vec<SeccompCondition>,
    ) -> Result<&mut Self, BackendError> {
        let rule = SeccompRule::new(conditions)?;
        // `None`: already allowed with any arguments.
        if let Some(rules) = self.calls.entry(nr).or_insert_with(|| Some(Vec::new())) {
            rules.push(rule);
        }
        Ok(self)
    }

    /// Allows `nr` when argument `index` is one of `values`.
    pub(crate) fn when_arg_in(
        &mut self,
        nr: i64,
        index: u8,
        values: &[u64],
    ) -> Result<&mut Self, BackendError> {
        for &v in values {
            self.when(nr, vec![arg_eq(index, v)?])?;
        }
        Ok(self)
    }

    /// Whether `nr` is allowed at all (with any or some arguments).
    #[cfg(test)]
    pub(crate) fn contains(&self, nr: i64) -> bool {
        self.calls.contains_key(&nr)
    }

    /// Compiles the list: allowed calls proceed, every other call (or an
    /// allowed call with other arguments, or a call of another ABI) traps
    /// with `SIGSYS`, whose handler (module `sigsys`) names the thread and
    /// the call and ends the process; without the handler, `SIGSYS`'s
    /// default action ends it all the same.
    pub(crate) fn compile(self) -> Result<BpfProgram, BackendError> {
        let rules = self
            .calls
            .into_iter()
            .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
            .collect();
        SeccompFilter::new(
            rules,
            SeccompAction::Trap,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )?
        .try_into()
    }
}

/// Argument `index` equals `value`.
pub(crate) fn arg_eq(index: u8, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

/// Argument `index`, masked with `mask`, equals `value`.
pub(crate) fn arg_masked_eq(
    index: u8,
    mask: u64,
    value: u64,
) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_arguments_wins_over_argument_rules_in_either_order() {
        let mut a = AllowList::default();
        a.when(libc::SYS_ioctl, vec![arg_eq(1, 7).unwrap()])
            .unwrap();
        a.any(&[libc::SYS_ioctl]);
        a.when(libc::SYS_ioctl, vec![arg_eq(1, 8).unwrap()])
            .unwrap();
        assert_eq!(a.calls.get(&libc::SYS_ioctl), Some(&None));
    }

    #[test]
    fn argument_rules_accumulate_as_alternatives() {
        let mut a = AllowList::default();
        a.when_arg_in(libc::SYS_ioctl, 1, &[1, 2, 3]).unwrap();
        assert_eq!(
            a.calls
                .get(&libc::SYS_ioctl)
                .cloned()
                .flatten()
                .map(|r| r.len()),
            Some(3)
        );
        assert!(a.contains(libc::SYS_ioctl));
        assert!(!a.contains(libc::SYS_socket));
    }

    #[test]
    fn bad_argument_index_is_an_error() {
        assert!(arg_eq(6, 0).is_err());
        assert!(arg_masked_eq(5, 1, 1).is_ok());
    }
}
