//! The VM's configuration: the command line, parsed and checked, as plain data.
//!
//! Everything a user can get wrong on the command line is caught here, with a
//! one-line message, before any KVM object exists.

use crate::size::{SizeError, format_size, parse_size};
use clap::Parser;
use rcu::WakeupStrategy;
use std::path::PathBuf;
use thiserror::Error;

/// Most vCPUs a VM may have: the ACPI MADT describes xAPIC IDs 0..=254.
pub const MAX_CPUS: u32 = 254;

/// The command line, as clap parses it (strings for sizes, so that errors
/// can be reported in our words).
#[derive(Debug, Parser)]
#[command(
    name = "vmm",
    version,
    about = "Boot a Linux kernel under KVM; hot-plug memory over QMP",
    long_about = None
)]
pub struct Args {
    /// Kernel image: a bzImage, or an uncompressed ELF vmlinux with a PVH note.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk (initramfs) image.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (the VMM appends what its devices need).
    #[arg(long, value_name = "STR", default_value = "")]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value = "1")]
    pub cpus: String,
    /// Guest RAM, e.g. 512M, 4G, or bytes.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    pub memory: String,
    /// Size of the virtio-mem hot-plug region (0: none).
    #[arg(long, value_name = "SIZE", default_value = "0")]
    pub hotplug_memory: String,
    /// Path of a QMP control socket to create.
    #[arg(long, value_name = "PATH")]
    pub qmp: Option<PathBuf>,
    /// Write the RCU statistics as JSON to this file at exit.
    #[arg(long, value_name = "PATH")]
    pub rcu_stats: Option<PathBuf>,
    /// The call_rcu thread's wake-up strategy.
    #[arg(long, value_name = "event|semaphore", default_value = "event")]
    pub rcu_wakeup: String,
    /// Write a plot (SVG) of the RCU counts over the VM's lifetime, with
    /// boot, plugs, unplugs and the end marked, to this file at exit.
    #[arg(long, value_name = "PATH")]
    pub rcu_plot: Option<PathBuf>,
    /// Write the VMM's own costs (set-up time, exits, CPU time, memory) as
    /// JSON to this file at exit.
    #[arg(long, value_name = "PATH")]
    pub metrics: Option<PathBuf>,
    /// Do not print the RCU report at exit.
    #[arg(long)]
    pub quiet: bool,
    /// Run without seccomp filters (for debugging: a system call a thread
    /// is not expected to make then runs instead of killing the VMM).
    #[arg(long)]
    pub no_seccomp: bool,
    /// What a guest reset (reboot, triple fault) and QMP `system_reset` do:
    /// end the VMM with status 0 (`exit`, QEMU's -no-reboot), or reboot the
    /// guest in place (`restart`).
    #[arg(long, value_name = "restart|exit", default_value = "exit")]
    pub on_reset: String,
}

/// What a machine reset does (`--on-reset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnReset {
    /// The VMM ends, status 0 (QEMU's `-no-reboot`, Firecracker).
    #[default]
    Exit,
    /// The guest reboots in place: vCPUs and devices back to their
    /// power-on state, RAM as it was before the first instruction, the
    /// hot-plugged memory unplugged; same process, same QMP clients.
    Restart,
}

impl std::str::FromStr for OnReset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "exit" => Ok(Self::Exit),
            "restart" => Ok(Self::Restart),
            other => Err(format!("'{other}' is neither 'restart' nor 'exit'")),
        }
    }
}

/// A checked VM configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// Kernel image path (exists and is readable when checked).
    pub kernel: PathBuf,
    /// Initrd path, if any (readable when checked).
    pub initrd: Option<PathBuf>,
    /// The user's part of the kernel command line.
    pub cmdline: String,
    /// Number of vCPUs, 1..=[`MAX_CPUS`].
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Hot-plug region size in bytes (0: none).
    pub hotplug_memory: u64,
    /// QMP socket path.
    pub qmp: Option<PathBuf>,
    /// Where to write the RCU statistics at exit.
    pub rcu_stats: Option<PathBuf>,
    /// The call_rcu thread's wake-up strategy.
    pub rcu_wakeup: WakeupStrategy,
    /// Where to write the RCU lifetime plot at exit.
    pub rcu_plot: Option<PathBuf>,
    /// Where to write the VMM's own metrics at exit.
    pub metrics: Option<PathBuf>,
    /// Suppress the RCU report at exit.
    pub quiet: bool,
    /// Confine every thread to its seccomp allow-list (on unless
    /// `--no-seccomp`).
    pub seccomp: bool,
    /// What a machine reset does.
    pub on_reset: OnReset,
}

/// A command line that cannot describe a VM.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// A size flag did not parse.
    #[error("invalid --{flag}: {source}")]
    Size {
        /// The flag.
        flag: &'static str,
        /// Why.
        #[source]
        source: SizeError,
    },
    /// `--cpus` is not a number.
    #[error("invalid --cpus '{0}': not a number")]
    CpusNotANumber(String),
    /// `--cpus` is out of range.
    #[error("invalid --cpus {0}: must be between 1 and {MAX_CPUS}")]
    CpusOutOfRange(u64),
    /// `--rcu-wakeup` is unknown.
    #[error("invalid --rcu-wakeup: {0}")]
    Wakeup(String),
    /// `--on-reset` is unknown.
    #[error("invalid --on-reset: {0}")]
    OnReset(String),
    /// A file given on the command line cannot be opened.
    #[error("cannot open {what} '{path}'")]
    File {
        /// Which file ("kernel", "initrd").
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file given on the command line is a directory or empty.
    #[error("{what} '{path}' is {problem}")]
    NotAFile {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// "a directory" or "empty".
        problem: &'static str,
    },
    /// The memory size is not a whole number of pages.
    #[error("invalid --{flag} {size}: not a multiple of 4 KiB")]
    Unaligned {
        /// The flag.
        flag: &'static str,
        /// The size as given back to the user.
        size: String,
    },
}

fn size(flag: &'static str, text: &str) -> Result<u64, ConfigError> {
    let v = parse_size(text).map_err(|source| ConfigError::Size { flag, source })?;
    if v % 4096 != 0 {
        return Err(ConfigError::Unaligned {
            flag,
            size: format_size(v),
        });
    }
    Ok(v)
}

fn check_file(what: &'static str, path: &std::path::Path) -> Result<(), ConfigError> {
    let file = std::fs::File::open(path).map_err(|source| ConfigError::File {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| ConfigError::File {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let problem = if meta.is_dir() {
        Some("a directory")
    } else if meta.len() == 0 {
        Some("empty")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(ConfigError::NotAFile {
            what,
            path: path.to_path_buf(),
            problem,
        }),
        None => Ok(()),
    }
}

impl TryFrom<Args> for VmConfig {
    type Error = ConfigError;

    /// Checks everything that can be checked without KVM: numbers, sizes,
    /// and that the kernel and initrd files can be opened.
    fn try_from(a: Args) -> Result<Self, ConfigError> {
        let cpus: u64 = a
            .cpus
            .trim()
            .parse()
            .map_err(|_| ConfigError::CpusNotANumber(a.cpus.clone()))?;
        if cpus == 0 || cpus > u64::from(MAX_CPUS) {
            return Err(ConfigError::CpusOutOfRange(cpus));
        }
        let memory = size("memory", &a.memory)?;
        let hotplug_memory = size("hotplug-memory", &a.hotplug_memory)?;
        let rcu_wakeup: WakeupStrategy = a.rcu_wakeup.parse().map_err(ConfigError::Wakeup)?;
        let on_reset: OnReset = a.on_reset.parse().map_err(ConfigError::OnReset)?;
        check_file("kernel", &a.kernel)?;
        if let Some(initrd) = &a.initrd {
            check_file("initrd", initrd)?;
        }
        Ok(VmConfig {
            kernel: a.kernel,
            initrd: a.initrd,
            cmdline: a.cmdline,
            // Checked against MAX_CPUS above.
            cpus: cpus as u32,
            memory,
            hotplug_memory,
            qmp: a.qmp,
            rcu_stats: a.rcu_stats,
            rcu_wakeup,
            rcu_plot: a.rcu_plot,
            metrics: a.metrics,
            quiet: a.quiet,
            seccomp: !a.no_seccomp,
            on_reset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<VmConfig, ConfigError> {
        let exe = std::env::current_exe().unwrap();
        let mut v = vec!["vmm", "--kernel", exe.to_str().unwrap()];
        v.extend_from_slice(extra);
        VmConfig::try_from(Args::try_parse_from(v).unwrap())
    }

    #[test]
    fn defaults_and_sizes() {
        let c = args(&["--cpus", "2", "--memory", "128M", "--hotplug-memory", "1G"]).unwrap();
        assert_eq!(c.cpus, 2);
        assert_eq!(c.memory, 128 << 20);
        assert_eq!(c.hotplug_memory, 1 << 30);
        assert_eq!(c.rcu_wakeup, WakeupStrategy::Event);
        assert!(c.seccomp, "seccomp is on by default");
        assert_eq!(c.on_reset, OnReset::Exit, "a reset ends the VMM by default");
        assert_eq!(
            args(&["--on-reset", "restart"]).unwrap().on_reset,
            OnReset::Restart
        );
        let e = args(&["--on-reset", "reboot"]).unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid --on-reset: 'reboot' is neither 'restart' nor 'exit'"
        );
        let c = args(&["--rcu-wakeup", "semaphore", "--no-seccomp"]).unwrap();
        assert_eq!(c.rcu_wakeup, WakeupStrategy::Semaphore);
        assert!(!c.seccomp);
    }

    #[test]
    fn rejects_bad_numbers_with_clear_messages() {
        let e = args(&["--cpus", "0"]).unwrap_err().to_string();
        assert_eq!(e, "invalid --cpus 0: must be between 1 and 254");
        let e = args(&["--cpus", "many"]).unwrap_err().to_string();
        assert_eq!(e, "invalid --cpus 'many': not a number");
        assert!(matches!(
            args(&["--cpus", "255"]),
            Err(ConfigError::CpusOutOfRange(255))
        ));
        let e = args(&["--memory", "12Q"]).unwrap_err();
        assert!(e.to_string().starts_with("invalid --memory"), "{e}");
        let e = args(&["--memory", "1000"]).unwrap_err().to_string();
        assert_eq!(e, "invalid --memory 1000: not a multiple of 4 KiB");
        assert!(matches!(
            args(&["--rcu-wakeup", "futex"]),
            Err(ConfigError::Wakeup(_))
        ));
    }

    #[test]
    fn rejects_missing_and_unusable_files() {
        let e = VmConfig::try_from(
            Args::try_parse_from(["vmm", "--kernel", "/nonexistent/bzImage"]).unwrap(),
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::File { what: "kernel", .. }), "{e}");
        let e = VmConfig::try_from(Args::try_parse_from(["vmm", "--kernel", "/tmp"]).unwrap())
            .unwrap_err();
        assert!(matches!(
            e,
            ConfigError::NotAFile {
                problem: "a directory",
                ..
            }
        ));
        let e = args(&["--initrd", "/nonexistent/initrd"]).unwrap_err();
        assert!(matches!(e, ConfigError::File { what: "initrd", .. }));
    }
}
