//! Support for the same-run benchmark of the `rcu` crate against
//! liburcu (memb and mb flavours) and Rust peers (`benches/peers.rs`): per-thread CPU time and
//! a check of the machine code of the timed loops.
//!
//! Nothing here is linked into the VMM.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The archives holding the compiled liburcu shim (`benches/urcu_shim.c`),
/// memb flavour then mb flavour, when `liburcu-dev` was found at build
/// time; `None` otherwise.
#[cfg(have_liburcu)]
pub const SHIM_ARCHIVES: Option<[&str; 2]> = Some([
    concat!(env!("OUT_DIR"), "/liburcushim.a"),
    concat!(env!("OUT_DIR"), "/liburcushim_mb.a"),
]);
/// The archives holding the compiled liburcu shim (`benches/urcu_shim.c`),
/// memb flavour then mb flavour, when `liburcu-dev` was found at build
/// time; `None` otherwise.
#[cfg(not(have_liburcu))]
pub const SHIM_ARCHIVES: Option<[&str; 2]> = None;

/// What to tell a user when the shim could not be built.
pub const NO_LIBURCU: &str = "liburcu-dev (pkg-config liburcu-memb liburcu-mb) was not found when rcu-bench \
     was built: run scripts/install-deps.sh as root, then rebuild";

/// CPU time consumed so far by the calling thread
/// (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`). It advances only while the
/// thread runs, so time spent preempted or asleep is not counted.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call writes only it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_THREAD_CPUTIME_ID is supported on Linux");
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// The kernel's id of the calling thread (`gettid`).
pub fn thread_id() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Voluntary context switches so far of every thread of this process,
/// by thread id (`voluntary_ctxt_switches` in `/proc/self/task/*/status`).
/// A thread that sleeps and is woken again counts one per sleep, so the
/// difference of two samples, over the threads present in both, counts
/// wake-ups. Threads whose status cannot be read (they just exited) are
/// left out.
pub fn voluntary_switches() -> std::collections::HashMap<i32, u64> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        if let Some(n) = status_field(&status, "voluntary_ctxt_switches:") {
            out.insert(tid, n);
        }
    }
    out
}

/// The calling thread's context switches so far: (voluntary, involuntary),
/// from `/proc/thread-self/status`. A voluntary switch is a sleep (a futex
/// wait on a lock, say); an involuntary one is a preemption by another
/// thread or process. `(0, 0)` if the file cannot be read.
pub fn own_switches() -> (u64, u64) {
    let Ok(status) = std::fs::read_to_string("/proc/thread-self/status") else {
        return (0, 0);
    };
    let field = |name| status_field(&status, name).unwrap_or(0);
    (
        field("voluntary_ctxt_switches:"),
        field("nonvoluntary_ctxt_switches:"),
    )
}

/// The number after `name` (with its colon) in a `/proc/.../status` text.
fn status_field(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
}

/// Wake-ups between two [`voluntary_switches`] samples of the threads
/// present in both, leaving out the threads in `exclude`.
pub fn wakeups_between(
    before: &std::collections::HashMap<i32, u64>,
    after: &std::collections::HashMap<i32, u64>,
    exclude: &[i32],
) -> u64 {
    after
        .iter()
        .filter(|(tid, _)| !exclude.contains(tid))
        .filter_map(|(tid, n)| before.get(tid).map(|b| n.saturating_sub(*b)))
        .sum()
}

/// How one function's machine code reaches thread-local storage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsUse {
    /// Instructions addressing through `%fs` (initial- or local-exec TLS).
    pub fs_accesses: usize,
    /// Calls to, or relocations naming, `__tls_get_addr` (general- or
    /// local-dynamic TLS), and `R_X86_64_TLSGD`/`TLSLD` relocations.
    pub tls_get_addr: usize,
    /// Instructions in the function.
    pub instructions: usize,
    /// Address and name of the functions it calls directly (from `call`
    /// operands).
    pub callees: Vec<(u64, String)>,
}

/// Runs `objdump -d -r -C --no-show-raw-insn` on `path` (an object, archive
/// or executable) and returns its output.
pub fn objdump(path: &Path) -> Result<String, String> {
    let out = Command::new("objdump")
        .args(["-d", "-r", "-C", "--no-show-raw-insn"])
        .arg(path)
        .output()
        .map_err(|e| format!("cannot run objdump (binutils) on {}: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!(
            "objdump {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One function of a disassembly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    /// Its start address (0 for every function of an object file built with
    /// `-ffunction-sections`: each has its own section).
    pub addr: u64,
    /// Its label, as objdump prints it between `<` and `>` (demangled).
    pub name: String,
    /// Instruction and relocation lines.
    pub body: Vec<String>,
}

/// Splits objdump output into functions, in order. Names repeat (every
/// instantiation of a generic has the same demangled name): look callees up
/// by address.
pub fn functions(objdump: &str) -> Vec<Function> {
    let mut all = Vec::new();
    let mut current: Option<Function> = None;
    for line in objdump.lines() {
        let label = line
            .strip_suffix(">:")
            .and_then(|l| l.split_once(" <"))
            .and_then(|(addr, name)| Some((u64::from_str_radix(addr, 16).ok()?, name)));
        if let Some((addr, name)) = label {
            all.extend(current.take());
            current = Some(Function {
                addr,
                name: name.to_string(),
                body: Vec::new(),
            });
        } else if line.trim().is_empty() {
            all.extend(current.take());
        } else if let Some(f) = current.as_mut() {
            f.body.push(line.to_string());
        }
    }
    all.extend(current);
    all
}

/// The first function whose name is `name` or ends in `::name`.
pub fn find<'a>(funcs: &'a [Function], name: &str) -> Option<&'a Function> {
    let suffix = format!("::{name}");
    funcs
        .iter()
        .find(|f| f.name == name || f.name.ends_with(&suffix))
}

/// The function starting at `addr` (meaningful in a linked executable).
pub fn at(funcs: &[Function], addr: u64) -> Option<&Function> {
    funcs.iter().find(|f| f.addr == addr)
}

/// Counts how the function body `lines` (from [`functions`]) reaches TLS.
pub fn tls_use(lines: &[String]) -> TlsUse {
    let mut u = TlsUse::default();
    for l in lines {
        let is_reloc = l.contains("R_X86_64_");
        if l.contains("__tls_get_addr")
            || l.contains("R_X86_64_TLSGD")
            || l.contains("R_X86_64_TLSLD")
        {
            u.tls_get_addr += 1;
        }
        if is_reloc {
            continue;
        }
        u.instructions += 1;
        if l.contains("%fs:") {
            u.fs_accesses += 1;
        }
        if let Some(pos) = l.find("call ") {
            let operand = l[pos + 5..].trim();
            if let Some((addr, target)) = operand.split_once(" <") {
                let target = target.trim_end_matches('>');
                // Calls to a place inside the same function, and the
                // unresolved `call <f+0x..>` of an object file, are no callees.
                if let (Ok(addr), false) = (u64::from_str_radix(addr, 16), target.contains('+'))
                    && !u.callees.iter().any(|(a, _)| *a == addr)
                {
                    u.callees.push((addr, target.to_string()));
                }
            }
        }
    }
    u
}

/// Pins the calling thread to CPU `cpu` (`sched_setaffinity`); `Err` with
/// the OS error if the CPU does not exist or is not allowed.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: CPU_SET writes one bit of `set`; `cpu` is within the set's
    // capacity (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the
    // calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The CPUs two-thread rows pin their threads to, from `RCU_BENCH_PIN`
/// (`reader,writer`, e.g. `1,0`); `None` (the default) leaves placement to
/// the scheduler. Pinning applies to every side alike.
pub fn pinning() -> Option<(usize, usize)> {
    let v = std::env::var("RCU_BENCH_PIN").ok()?;
    let (r, w) = v.split_once(',')?;
    Some((r.trim().parse().ok()?, w.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
0000000000000080 <shim_read_loop>:
  a0:\tmov    %fs:(%rbx),%rax
  ac:\tcall   1a0 <shim_read_loop+0x120>
\t\t\tad: R_X86_64_PLT32\t__tls_get_addr-0x4
  b0:\tcall   2000 <rcu::reader::read_lock>
  b5:\tret

0000000000000200 <other>:
  200:\tret
";

    #[test]
    fn splits_functions_and_counts_tls_use() {
        let f = functions(SAMPLE);
        let addrs: Vec<u64> = f.iter().map(|f| f.addr).collect();
        assert_eq!(addrs, [0x80, 0x200]);
        let u = tls_use(&find(&f, "shim_read_loop").expect("present").body);
        assert_eq!(u.fs_accesses, 1);
        assert_eq!(u.tls_get_addr, 1);
        assert_eq!(u.instructions, 4);
        assert_eq!(u.callees, [(0x2000, "rcu::reader::read_lock".to_string())]);
        assert_eq!(find(&f, "read_lock"), None);
        assert_eq!(
            tls_use(&at(&f, 0x200).expect("present").body).instructions,
            1
        );
    }

    #[test]
    fn each_sleep_of_another_thread_counts_as_a_wake_up() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            tx.send(thread_id()).expect("send");
            go_rx.recv().expect("go");
            for _ in 0..5 {
                std::thread::sleep(Duration::from_millis(2));
            }
            go_rx.recv().expect("end");
        });
        let tid = rx.recv().expect("tid");
        // Let it block in its first recv.
        std::thread::sleep(Duration::from_millis(50));
        let before = voluntary_switches();
        go_tx.send(()).expect("send");
        std::thread::sleep(Duration::from_millis(200));
        let after = voluntary_switches();
        go_tx.send(()).expect("send");
        t.join().expect("join");
        // Five sleeps, then blocking in a receive, which may park more
        // than once.
        let n = after[&tid] - before[&tid];
        assert!((6..=8).contains(&n), "{n} wake-ups counted");
        // Leaving the thread out takes exactly its wake-ups out of the sum
        // (other test threads of this process may have woken meanwhile).
        assert_eq!(
            wakeups_between(&before, &after, &[]) - wakeups_between(&before, &after, &[tid]),
            n
        );
    }

    #[test]
    fn thread_cpu_time_advances_with_work() {
        let t0 = thread_cpu_time();
        let mut x = 0u64;
        while thread_cpu_time() - t0 < Duration::from_millis(2) {
            x = std::hint::black_box(x + 1);
        }
        assert!(thread_cpu_time() > t0);
    }
}
