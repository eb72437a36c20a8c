//! What the VMM appends to the user's kernel command line.

use crate::kvm::host::HostKind;

/// Arguments the VMM's devices need, each added only if the user did not set
/// the same parameter: the serial console, how to reset (through the i8042,
/// which every host turns into a plain port write), rebooting on panic, and
/// not probing i8042 features the VMM does not emulate.
const DEVICE_DEFAULTS: &[&str] = &[
    "console=ttyS0",
    "reboot=k",
    "panic=1",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
];

/// Hot-plugged memory must come online by itself, movable so it can be
/// unplugged again (the distribution kernel defaults to offline).
const HOTPLUG_ARGS: &[&str] = &["memhp_default_state=online_movable"];

/// The parameter name of `arg` (`console` for `console=ttyS0`).
fn key(arg: &str) -> &str {
    arg.split_once('=').map_or(arg, |(k, _)| k)
}

/// Whether the user's command line (before any ` -- ` init arguments) sets
/// parameter `k`.
fn user_sets(user: &str, k: &str) -> bool {
    user.split(" -- ")
        .next()
        .unwrap_or("")
        .split_whitespace()
        .any(|a| key(a) == k)
}

/// The arguments to append to `user` for this host and VM.
pub(crate) fn appended_args(user: &str, host: HostKind, hotplug: bool) -> Vec<&'static str> {
    let mut v: Vec<&'static str> = DEVICE_DEFAULTS
        .iter()
        .copied()
        .filter(|a| !user_sets(user, key(a)))
        .collect();
    if hotplug {
        v.extend(HOTPLUG_ARGS.iter().filter(|a| !user_sets(user, key(a))));
    }
    v.extend(
        host.kernel_args()
            .iter()
            .filter(|a| !user_sets(user, key(a))),
    );
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_defaults_the_user_did_not_set() {
        let v = appended_args("console=hvc0 quiet", HostKind::Hardware, false);
        assert!(!v.contains(&"console=ttyS0"));
        assert!(v.contains(&"reboot=k"));
        assert!(!v.iter().any(|a| a.starts_with("memhp")));
        let v = appended_args("", HostKind::EmulationOnly, true);
        assert!(v.contains(&"console=ttyS0"));
        assert!(v.contains(&"memhp_default_state=online_movable"));
        assert!(v.contains(&"noxsave"));
    }

    #[test]
    fn init_arguments_do_not_count_as_kernel_parameters() {
        let v = appended_args("quiet -- console=foo", HostKind::Hardware, false);
        assert!(v.contains(&"console=ttyS0"));
    }
}
