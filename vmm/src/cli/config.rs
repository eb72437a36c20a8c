//! The VM's configuration: the command line, parsed and checked, as plain data.
//!
//! Everything a user can get wrong on the command line is caught here, with a
//! one-line message, before any KVM object exists.

use crate::cli::size::{SizeError, format_size, parse_size};
use crate::memory::memory_backing::{Backend, BackingConfigError, BackingOptions, MemoryBacking};
use clap::Parser;
use rcu::WakeupStrategy;
use std::path::PathBuf;
use thiserror::Error;

/// Most vCPUs a VM may have: the ACPI MADT describes xAPIC IDs 0..=254.
pub(crate) const MAX_CPUS: u32 = 254;

/// The command line, as clap parses it (strings for sizes, so that errors
/// can be reported in our words).
#[derive(Debug, Parser)]
#[command(
    name = "vmm",
    version,
    about = "Boot a Linux kernel under KVM; hot-plug memory over QMP",
    long_about = None,
    after_help = "`vmm --host-kind` alone prints what kind of KVM this host has: \
                  hardware or emulation-only (docs/hosts.md)."
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
    /// A virtio-mem device and its hot-plug region: its size (0: none), or
    /// QEMU-style options `size=SIZE[,id=ID][,node=N][,backend=ram|memfd]
    /// [,hugetlb=on|off][,hugetlbsize=2M][,prealloc=on|off][,thp=on|off]`
    /// (a first item without `=` is the size). Give it once per device (at
    /// most 8); ids default to vmem0, vmem1, ... in order.
    #[arg(long, value_name = "SIZE|OPTIONS")]
    pub hotplug_memory: Vec<String>,
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
    /// Number of vCPUs, 1 to 254 (`MAX_CPUS`).
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// The virtio-mem devices, in command-line order (empty: none).
    pub hotplug: Vec<HotplugDeviceConfig>,
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

/// Most virtio-mem devices a VM may have (`--hotplug-memory` given this
/// many times at most); each takes a GSI of the IOAPIC.
pub(crate) const MAX_HOTPLUG_DEVICES: usize = 8;

/// Most NUMA nodes (`node=0` to `node=7`): node 0 holds the vCPUs and boot
/// RAM, each other node at least one device.
pub(crate) const MAX_NUMA_NODES: u16 = 8;

/// One virtio-mem device, as `--hotplug-memory` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotplugDeviceConfig {
    /// Its QMP id (`vmem0`, ... by default), unique among the devices.
    pub id: String,
    /// Region size in bytes (non-zero, a multiple of 4 KiB).
    pub size: u64,
    /// How the region is backed.
    pub backing: MemoryBacking,
    /// Its NUMA node, if `node=` was given (below [`MAX_NUMA_NODES`]; with
    /// any node given, the nodes in use are contiguous from 0).
    pub node: Option<u16>,
}

/// One `--hotplug-memory` option, parsed alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HotplugMemoryOption {
    /// Region size in bytes (0: none).
    pub size: u64,
    /// How the region is backed.
    pub backing: MemoryBacking,
    /// `id=`, if given.
    pub id: Option<String>,
    /// `node=`, if given.
    pub node: Option<u16>,
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
    /// `--hotplug-memory` options that do not parse or do not go together.
    #[error("invalid --hotplug-memory: {0}")]
    HotplugOption(#[source] HotplugOptionError),
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

/// What is wrong with `--hotplug-memory`'s options (beyond its size, whose
/// errors are those of every size flag).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HotplugOptionError {
    /// A key nobody knows.
    #[error("unknown option '{0}' (known: {HOTPLUG_KEYS})")]
    UnknownKey(String),
    /// A key given twice.
    #[error("option '{0}' given twice")]
    Duplicate(String),
    /// An item that is not `key=value` (only the first may be a bare size).
    #[error("'{0}' is not key=value")]
    NotKeyValue(String),
    /// A value the key does not take.
    #[error("{key}={value}: expected {expected}")]
    BadValue {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What it takes.
        expected: &'static str,
    },
    /// Options but no size.
    #[error("size= is missing")]
    NoSize,
    /// Options beyond the size for a region of size 0 (no device).
    #[error("options other than size= given for a region of size 0 (no device)")]
    OptionsWithoutRegion,
    /// The backing options do not go together.
    #[error(transparent)]
    Backing(#[from] BackingConfigError),
    /// Two devices with the same id.
    #[error("id '{0}' is given to two devices")]
    DuplicateId(String),
    /// More devices than the VMM supports.
    #[error("{0} devices, at most {MAX_HOTPLUG_DEVICES}")]
    TooManyDevices(usize),
    /// A node in use leaves a gap below it.
    #[error(
        "node={used} but no device is in node {missing}: NUMA nodes are numbered from 0 \
         without gaps (node 0 holds the vCPUs and boot RAM)"
    )]
    NodeGap {
        /// The highest node given.
        used: u16,
        /// The first node without a device.
        missing: u16,
    },
}

/// The keys `--hotplug-memory` knows, as listed in its errors.
const HOTPLUG_KEYS: &str = "size, id, node, backend, hugetlb, hugetlbsize, prealloc, thp";

/// Whether `id` is a QEMU device id: a letter, then letters, digits, `-`,
/// `.` or `_` (QEMU's `id_wellformed`), so it is one QOM path component.
fn id_wellformed(id: &str) -> bool {
    let mut c = id.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '.' | '_'))
}

/// Checks every `--hotplug-memory` option and gives each device its id: the
/// options in order, those of size 0 left out (no device); ids default to
/// `vmem<N>` for the N-th option. Refuses duplicate ids, more than
/// [`MAX_HOTPLUG_DEVICES`] devices, and NUMA nodes that are not contiguous
/// from 0 (node 0 always exists: it holds the vCPUs and boot RAM).
pub(crate) fn hotplug_devices(options: &[String]) -> Result<Vec<HotplugDeviceConfig>, ConfigError> {
    let opt = ConfigError::HotplugOption;
    let mut devices: Vec<HotplugDeviceConfig> = Vec::new();
    for (n, text) in options.iter().enumerate() {
        let o = parse_hotplug_memory(text)?;
        if o.size == 0 {
            continue;
        }
        let id = o.id.unwrap_or_else(|| format!("vmem{n}"));
        if devices.iter().any(|d| d.id == id) {
            return Err(opt(HotplugOptionError::DuplicateId(id)));
        }
        devices.push(HotplugDeviceConfig {
            id,
            size: o.size,
            backing: o.backing,
            node: o.node,
        });
    }
    if devices.len() > MAX_HOTPLUG_DEVICES {
        return Err(opt(HotplugOptionError::TooManyDevices(devices.len())));
    }
    if let Some(used) = devices.iter().filter_map(|d| d.node).max() {
        // Node 0 exists without a device; every node above needs one.
        if let Some(missing) = (1..used).find(|k| !devices.iter().any(|d| d.node == Some(*k))) {
            return Err(opt(HotplugOptionError::NodeGap { used, missing }));
        }
    }
    Ok(devices)
}

/// Parses one `--hotplug-memory`: a size, or comma-separated `key=value`
/// options (a first item without `=` is the size). Each key is handled by
/// its own arm; unknown keys, repeated keys, bad values and backings that
/// cannot work are refused with one line naming the problem.
pub(crate) fn parse_hotplug_memory(text: &str) -> Result<HotplugMemoryOption, ConfigError> {
    const FLAG: &str = "hotplug-memory";
    let opt = ConfigError::HotplugOption;
    if !text.contains('=') && !text.contains(',') {
        return Ok(HotplugMemoryOption {
            size: size(FLAG, text)?,
            backing: MemoryBacking::default(),
            id: None,
            node: None,
        });
    }
    let mut id = None;
    let mut node = None;
    let on_off = |key: &str, value: &str| match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(opt(HotplugOptionError::BadValue {
            key: key.into(),
            value: value.into(),
            expected: "on or off",
        })),
    };
    let mut seen: Vec<&str> = Vec::new();
    let mut region = None;
    let mut o = BackingOptions::default();
    let mut backing_given = false;
    for (n, item) in text.split(',').enumerate() {
        let item = item.trim();
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None if n == 0 => ("size", item),
            None => return Err(opt(HotplugOptionError::NotKeyValue(item.into()))),
        };
        if seen.contains(&key) {
            return Err(opt(HotplugOptionError::Duplicate(key.into())));
        }
        seen.push(key);
        match key {
            "size" => region = Some(size(FLAG, value)?),
            "id" => {
                if !id_wellformed(value) {
                    return Err(opt(HotplugOptionError::BadValue {
                        key: key.into(),
                        value: value.into(),
                        expected: "a letter, then letters, digits, '-', '.' or '_'",
                    }));
                }
                id = Some(value.to_string());
            }
            "node" => {
                node = Some(
                    value
                        .parse::<u16>()
                        .ok()
                        .filter(|n| *n < MAX_NUMA_NODES)
                        .ok_or_else(|| {
                            opt(HotplugOptionError::BadValue {
                                key: key.into(),
                                value: value.into(),
                                expected: "a NUMA node number from 0 to 7",
                            })
                        })?,
                )
            }
            "backend" => {
                o.backend = match value {
                    "ram" => Backend::Ram,
                    "memfd" => Backend::Memfd,
                    _ => {
                        return Err(opt(HotplugOptionError::BadValue {
                            key: key.into(),
                            value: value.into(),
                            expected: "ram or memfd",
                        }));
                    }
                }
            }
            "hugetlb" => o.hugetlb = on_off(key, value)?,
            "hugetlbsize" => {
                o.hugetlbsize = Some(parse_size(value).map_err(|_| {
                    opt(HotplugOptionError::BadValue {
                        key: key.into(),
                        value: value.into(),
                        expected: "a page size such as 2M",
                    })
                })?)
            }
            "prealloc" => o.prealloc = on_off(key, value)?,
            "thp" => o.thp = on_off(key, value)?,
            _ => return Err(opt(HotplugOptionError::UnknownKey(key.into()))),
        }
        backing_given |= key != "size";
    }
    let region = region.ok_or(opt(HotplugOptionError::NoSize))?;
    if region == 0 && backing_given {
        return Err(opt(HotplugOptionError::OptionsWithoutRegion));
    }
    let backing = MemoryBacking::try_from(o).map_err(|e| opt(e.into()))?;
    Ok(HotplugMemoryOption {
        size: region,
        backing,
        id,
        node,
    })
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
        let hotplug = hotplug_devices(&a.hotplug_memory)?;
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
            hotplug,
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
        assert_eq!(c.hotplug.len(), 1);
        assert_eq!(c.hotplug[0].size, 1 << 30);
        assert_eq!(c.hotplug[0].id, "vmem0");
        assert_eq!(c.hotplug[0].node, None);
        assert!(args(&[]).unwrap().hotplug.is_empty());
        assert!(args(&["--hotplug-memory", "0"]).unwrap().hotplug.is_empty());
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
    fn hotplug_memory_takes_a_size_or_qemu_style_options() {
        let hp = |v: &str| {
            let c = args(&["--hotplug-memory", v]).unwrap();
            c.hotplug
                .first()
                .map_or((0, MemoryBacking::default()), |d| (d.size, d.backing))
        };
        assert_eq!(hp("4G"), (4 << 30, MemoryBacking::default()));
        assert_eq!(hp("size=4G"), (4 << 30, MemoryBacking::default()));
        assert_eq!(hp("size=1G,backend=ram").1, MemoryBacking::default());
        let (size, b) = hp("1G,backend=memfd,prealloc=on,thp=on");
        assert_eq!(size, 1 << 30);
        assert_eq!(b.backend(), Backend::Memfd);
        assert!(b.prealloc() && b.thp() && b.hugetlb().is_none());
        let (_, b) = hp("size=1G,backend=memfd,hugetlb=on,hugetlbsize=2M,prealloc=on");
        assert_eq!(b.hugetlb(), Some(2 << 20));
        assert_eq!(
            b.to_string(),
            "backend=memfd,hugetlb=on,hugetlbsize=2M,prealloc=on,thp=off"
        );
        let (_, b) = hp("size=1G, backend=memfd, hugetlb=on, prealloc=on");
        assert_eq!(b.hugetlb(), Some(2 << 20), "the page size defaults to 2M");
        assert_eq!(hp("size=0").0, 0);
    }

    #[test]
    fn hotplug_memory_errors_are_one_clear_line_each() {
        let err = |v: &str| args(&["--hotplug-memory", v]).unwrap_err().to_string();
        let cases = [
            (
                "size=1G,shared=on",
                "invalid --hotplug-memory: unknown option 'shared' (known: size, id, node, \
                 backend, hugetlb, hugetlbsize, prealloc, thp)",
            ),
            (
                "size=1G,id=1st",
                "invalid --hotplug-memory: id=1st: expected a letter, then letters, digits, \
                 '-', '.' or '_'",
            ),
            (
                "size=1G,id=a/b",
                "invalid --hotplug-memory: id=a/b: expected a letter, then letters, digits, \
                 '-', '.' or '_'",
            ),
            (
                "size=1G,node=8",
                "invalid --hotplug-memory: node=8: expected a NUMA node number from 0 to 7",
            ),
            (
                "size=1G,node=-1",
                "invalid --hotplug-memory: node=-1: expected a NUMA node number from 0 to 7",
            ),
            (
                "size=0,id=vmem3",
                "invalid --hotplug-memory: options other than size= given for a region of \
                 size 0 (no device)",
            ),
            (
                "size=1G,size=2G",
                "invalid --hotplug-memory: option 'size' given twice",
            ),
            (
                "1G,memfd",
                "invalid --hotplug-memory: 'memfd' is not key=value",
            ),
            (
                "size=1G,backend=file",
                "invalid --hotplug-memory: backend=file: expected ram or memfd",
            ),
            (
                "size=1G,prealloc=yes",
                "invalid --hotplug-memory: prealloc=yes: expected on or off",
            ),
            (
                "size=1G,thp=1",
                "invalid --hotplug-memory: thp=1: expected on or off",
            ),
            (
                "size=1G,backend=memfd,hugetlb=maybe",
                "invalid --hotplug-memory: hugetlb=maybe: expected on or off",
            ),
            (
                "size=1G,backend=memfd,hugetlb=on,hugetlbsize=big,prealloc=on",
                "invalid --hotplug-memory: hugetlbsize=big: expected a page size such as 2M",
            ),
            (
                "backend=memfd",
                "invalid --hotplug-memory: size= is missing",
            ),
            (
                "size=0,backend=memfd",
                "invalid --hotplug-memory: options other than size= given for a region of \
                 size 0 (no device)",
            ),
            (
                "size=1G,hugetlb=on,prealloc=on",
                "invalid --hotplug-memory: hugetlb=on needs backend=memfd (backend=ram is \
                 anonymous memory)",
            ),
            (
                "size=1G,backend=memfd,hugetlbsize=2M",
                "invalid --hotplug-memory: hugetlbsize= needs hugetlb=on",
            ),
            (
                "size=1G,backend=memfd,hugetlb=on,prealloc=on,thp=on",
                "invalid --hotplug-memory: thp=on and hugetlb=on exclude each other \
                 (hugetlb pages are huge already)",
            ),
            (
                "size=1G,backend=memfd,hugetlb=on",
                "invalid --hotplug-memory: hugetlb=on needs prealloc=on: a huge page the pool \
                 cannot supply at first touch is SIGBUS, not an error the plug can report",
            ),
            (
                "size=1G,backend=memfd,hugetlb=on,hugetlbsize=1G,prealloc=on",
                "invalid --hotplug-memory: hugetlbsize=1G is not supported: the only size is \
                 2M (pages must divide the 2 MiB block the guest plugs and unplugs, and be \
                 larger than 4 KiB)",
            ),
            ("size=1G,", "invalid --hotplug-memory: '' is not key=value"),
            (
                "size=1000,backend=memfd",
                "invalid --hotplug-memory 1000: not a multiple of 4 KiB",
            ),
        ];
        for (given, want) in cases {
            assert_eq!(err(given), want, "--hotplug-memory {given}");
        }
        assert!(err("size=lots").starts_with("invalid --hotplug-memory: "));
    }

    #[test]
    fn several_devices_get_ids_in_order_or_their_own() {
        let c = args(&[
            "--hotplug-memory",
            "1G",
            "--hotplug-memory",
            "size=2G,node=1,backend=memfd",
            "--hotplug-memory",
            "size=512M,id=big",
        ])
        .unwrap();
        let ids: Vec<(&str, u64, Option<u16>)> = c
            .hotplug
            .iter()
            .map(|d| (d.id.as_str(), d.size, d.node))
            .collect();
        assert_eq!(
            ids,
            [
                ("vmem0", 1 << 30, None),
                ("vmem1", 2 << 30, Some(1)),
                ("big", 512 << 20, None)
            ]
        );
        assert_eq!(c.hotplug[1].backing.backend(), Backend::Memfd);
        // A device of size 0 is none, but keeps its place in the default ids.
        let c = args(&["--hotplug-memory", "0", "--hotplug-memory", "1G"]).unwrap();
        assert_eq!(c.hotplug.len(), 1);
        assert_eq!(c.hotplug[0].id, "vmem1");
    }

    #[test]
    fn duplicate_ids_gaps_in_nodes_and_too_many_devices_are_refused() {
        let err = |v: &[&str]| {
            let mut a = Vec::new();
            for o in v {
                a.extend(["--hotplug-memory", o]);
            }
            args(&a).unwrap_err().to_string()
        };
        assert_eq!(
            err(&["1G", "size=1G,id=vmem0"]),
            "invalid --hotplug-memory: id 'vmem0' is given to two devices"
        );
        assert_eq!(
            err(&["size=1G,id=a", "size=1G,id=a"]),
            "invalid --hotplug-memory: id 'a' is given to two devices"
        );
        assert_eq!(
            err(&["size=1G,node=2", "size=1G,node=0"]),
            "invalid --hotplug-memory: node=2 but no device is in node 1: NUMA nodes are \
             numbered from 0 without gaps (node 0 holds the vCPUs and boot RAM)"
        );
        assert_eq!(
            err(&["128M"; MAX_HOTPLUG_DEVICES + 1]),
            "invalid --hotplug-memory: 9 devices, at most 8"
        );
        // Node 0 needs no device; 1 and 2 are both used.
        let ok = args(&[
            "--hotplug-memory",
            "size=1G,node=2",
            "--hotplug-memory",
            "size=1G,node=1",
        ])
        .unwrap();
        assert_eq!(ok.hotplug.len(), 2);
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
