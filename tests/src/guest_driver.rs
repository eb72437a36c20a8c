//! A remote-controlled tiny guest: a vCPU runs a loop that takes batches of
//! accesses from a mailbox in guest RAM, performs each with the width asked
//! for (guest memory, MMIO or port I/O) and writes back what it read. A test
//! thread drives it with [`GuestDriver::run`], so a test can act as a
//! hostile (or a proper) guest driver, one access at a time or thousands per
//! batch, while every access really is a guest instruction that exits to the
//! VMM.
//!
//! The loop runs at CPL3 (native speed here; MMIO only, port I/O from CPL3
//! does not reach the VMM on emulation-only hosts) or at CPL0 (emulated
//! here, about a thousand times slower, but port I/O works). See
//! [`start_runner`].
//!
//! Guest RAM the runner uses (a VM needs at least [`RUNNER_RAM_END`] bytes):
//! its code at [`CODE_ADDR`] (from [`runner`]), the [`MAILBOX`], the batch
//! [`TABLE`] and stacks below 1 MiB. [`SCRATCH`] is free for tests (virtio
//! rings and buffers); [`HEARTBEAT`] is the counter of [`heartbeat`], a loop
//! a second vCPU runs so a test can see that the VM still makes progress.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::test_utils::SharedGuestMap;

use crate::bare_vm::{BareVm, CODE_ADDR};

/// The mailbox: `+0` command sequence number (written last by the host),
/// `+8` done sequence number (written last by the guest), `+16` table
/// address, `+24` entry count, `+32` index of the entry being executed.
pub const MAILBOX: u64 = 0x30_0000;
/// The batch table: 32-byte entries (see [`Op`]).
pub const TABLE: u64 = 0x31_0000;
/// Most entries in one batch.
pub const MAX_BATCH: usize = 0x10_0000 / 32;
/// Scratch RAM for tests: `[SCRATCH, SCRATCH + SCRATCH_SIZE)`.
pub const SCRATCH: u64 = 0x200_0000;
/// Size of [`SCRATCH`].
pub const SCRATCH_SIZE: u64 = 0x100_0000;
/// The counter the [`heartbeat`] loop increments.
pub const HEARTBEAT: u64 = 0x2f_0000;
/// Offset of the [`heartbeat`] code from [`CODE_ADDR`].
pub const HEARTBEAT_OFFSET: u64 = 0x1000;
/// RAM the runner needs.
pub const RUNNER_RAM_END: u64 = SCRATCH + SCRATCH_SIZE;

crate::guest_code! {
    /// The runner. Entered at CPL0 in long mode with RBX = mailbox; if R15
    /// is not 0 it first drops to CPL3 with the user stack in R13.
    /// Entry ops: 0 write, 1 read, 2 port write, 3 port read, 4 poll.
    pub fn runner(runner_start, runner_end) {
        ".code64",
        "test r15, r15",
        "jz 21f",
        "push 0x33",
        "push r13",
        "pushfq",
        "push 0x3b",
        "lea rax, [rip + 21f]",
        "push rax",
        "iretq",
        "21:",
        "mov rax, qword ptr [rbx]",
        "cmp rax, qword ptr [rbx + 8]",
        "jne 22f",
        "pause",
        "jmp 21b",
        "22:",
        "mov rsi, qword ptr [rbx + 16]",
        "mov rcx, qword ptr [rbx + 24]",
        "xor r8d, r8d",
        "23:",
        "cmp r8, rcx",
        "jae 39f",
        "mov qword ptr [rbx + 32], r8",
        "mov r9, r8",
        "shl r9, 5",
        "add r9, rsi",
        "movzx eax, word ptr [r9]",
        "movzx r11d, word ptr [r9 + 2]",
        "mov rdi, qword ptr [r9 + 8]",
        "mov r10, qword ptr [r9 + 16]",
        "cmp eax, 1",
        "je 25f",
        "cmp eax, 2",
        "je 27f",
        "cmp eax, 3",
        "je 28f",
        "cmp eax, 4",
        "je 30f",
        // 0: write
        "cmp r11d, 1",
        "je 24f",
        "cmp r11d, 2",
        "je 31f",
        "cmp r11d, 4",
        "je 32f",
        "mov qword ptr [rdi], r10",
        "jmp 38f",
        "24:",
        "mov byte ptr [rdi], r10b",
        "jmp 38f",
        "31:",
        "mov word ptr [rdi], r10w",
        "jmp 38f",
        "32:",
        "mov dword ptr [rdi], r10d",
        "jmp 38f",
        // 1: read
        "25:",
        "cmp r11d, 1",
        "je 33f",
        "cmp r11d, 2",
        "je 34f",
        "cmp r11d, 4",
        "je 35f",
        "mov rax, qword ptr [rdi]",
        "jmp 26f",
        "33:",
        "movzx eax, byte ptr [rdi]",
        "jmp 26f",
        "34:",
        "movzx eax, word ptr [rdi]",
        "jmp 26f",
        "35:",
        "mov eax, dword ptr [rdi]",
        "26:",
        "mov qword ptr [r9 + 24], rax",
        "jmp 38f",
        // 2: port write
        "27:",
        "mov rdx, rdi",
        "mov rax, r10",
        "cmp r11d, 1",
        "je 36f",
        "cmp r11d, 2",
        "je 37f",
        "out dx, eax",
        "jmp 38f",
        "36:",
        "out dx, al",
        "jmp 38f",
        "37:",
        "out dx, ax",
        "jmp 38f",
        // 3: port read
        "28:",
        "mov rdx, rdi",
        "xor eax, eax",
        "cmp r11d, 1",
        "je 40f",
        "cmp r11d, 2",
        "je 41f",
        "in eax, dx",
        "jmp 26b",
        "40:",
        "in al, dx",
        "jmp 26b",
        "41:",
        "in ax, dx",
        "jmp 26b",
        // 4: poll a dword until (value & mask) == expect, at most limit times
        "30:",
        "mov r12d, dword ptr [r9 + 4]",
        "mov r14, r10",
        "shr r14, 32",
        "mov r15d, r10d",
        "42:",
        "mov eax, dword ptr [rdi]",
        "mov edx, eax",
        "and edx, r14d",
        "cmp edx, r15d",
        "je 43f",
        "pause",
        "dec r12d",
        "jnz 42b",
        "43:",
        "mov dword ptr [r9 + 4], r12d",
        "jmp 26b",
        "38:",
        "inc r8",
        "jmp 23b",
        "39:",
        "mov rax, qword ptr [rbx]",
        "mov qword ptr [rbx + 8], rax",
        "jmp 21b",
    }
}

crate::guest_code! {
    /// Drops to CPL3 (user stack in R13) and increments the 64-bit counter
    /// at RDI forever.
    pub fn heartbeat(heartbeat_start, heartbeat_end) in user mode {
        "2:",
        "inc qword ptr [rdi]",
        "jmp 2b",
    }
}

/// Where a vCPU runs the runner loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    /// Kernel mode: port I/O works; emulated (slow) on emulation-only hosts.
    Kernel,
    /// User mode: native speed; MMIO and memory only.
    User,
}

/// One access of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Stores the low `width` bytes of `value` at `addr` (RAM or MMIO).
    Write {
        /// Guest-physical (identity-mapped) address.
        addr: u64,
        /// 1, 2, 4 or 8 bytes.
        width: u8,
        /// The value.
        value: u64,
    },
    /// Loads `width` bytes at `addr`; the result is zero-extended.
    Read {
        /// Guest-physical address.
        addr: u64,
        /// 1, 2, 4 or 8 bytes.
        width: u8,
    },
    /// `out` of the low `width` bytes of `value` to `port` (CPL0 only).
    PortWrite {
        /// The port.
        port: u16,
        /// 1, 2 or 4 bytes.
        width: u8,
        /// The value.
        value: u32,
    },
    /// `in` of `width` bytes from `port` (CPL0 only).
    PortRead {
        /// The port.
        port: u16,
        /// 1, 2 or 4 bytes.
        width: u8,
    },
    /// Reads the dword at `addr` until `value & mask == expect`, at most
    /// `limit` times (with `pause` in between); the result is the last value
    /// read.
    Poll {
        /// Guest-physical address (RAM or MMIO).
        addr: u64,
        /// Bits compared.
        mask: u32,
        /// Their expected value.
        expect: u32,
        /// Most reads.
        limit: u32,
    },
}

impl Op {
    fn encode(&self) -> [u8; 32] {
        let (op, width, limit, addr, value): (u16, u8, u32, u64, u64) = match *self {
            Op::Write { addr, width, value } => (0, width, 0, addr, value),
            Op::Read { addr, width } => (1, width, 0, addr, 0),
            Op::PortWrite { port, width, value } => (2, width, 0, port.into(), value.into()),
            Op::PortRead { port, width } => (3, width, 0, port.into(), 0),
            Op::Poll {
                addr,
                mask,
                expect,
                limit,
            } => {
                assert!(limit > 0, "a poll needs a limit");
                (
                    4,
                    4,
                    limit,
                    addr,
                    u64::from(expect) | (u64::from(mask) << 32),
                )
            }
        };
        let mut e = [0u8; 32];
        e[0..2].copy_from_slice(&op.to_le_bytes());
        e[2..4].copy_from_slice(&u16::from(width).to_le_bytes());
        e[4..8].copy_from_slice(&limit.to_le_bytes());
        e[8..16].copy_from_slice(&addr.to_le_bytes());
        e[16..24].copy_from_slice(&value.to_le_bytes());
        e
    }
}

/// What the guest reported for one [`Op`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpResult {
    /// The value read (0 for writes).
    pub value: u64,
    /// For [`Op::Poll`]: whether the condition was met before the limit.
    pub matched: bool,
}

/// Why a batch did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverError {
    /// The guest did not finish in time; `progress` is the entry it was at.
    Timeout {
        /// Index (in the batch) of the entry being executed.
        progress: u64,
    },
    /// The VM is ending (an exit request or a fatal vCPU error was raised)
    /// while the guest was at entry `progress`.
    VmEnded {
        /// Index (in the batch) of the entry being executed.
        progress: u64,
    },
}

/// The host side of the mailbox. Use it from a thread other than the one
/// running the VM.
pub struct GuestDriver {
    memory: SharedGuestMap,
    ended: Box<dyn Fn() -> bool + Send>,
    seq: u64,
    /// How long one batch may take.
    pub timeout: Duration,
}

impl std::fmt::Debug for GuestDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestDriver")
            .field("seq", &self.seq)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl GuestDriver {
    /// A driver for the runner of `vm` (see [`start_runner`]).
    pub fn new(vm: &BareVm) -> Self {
        let exit = std::sync::Arc::clone(&vm.machine.devices.exit);
        let fatal = std::sync::Arc::clone(vm.machine.fatal_errors());
        Self {
            memory: std::sync::Arc::clone(&vm.machine.memory),
            ended: Box::new(move || exit.first().is_some() || fatal.first().is_some()),
            seq: 0,
            timeout: Duration::from_secs(60),
        }
    }

    fn load(&self, addr: u64) -> u64 {
        let g = rcu::read_lock();
        self.memory
            .read(&g)
            .load(GuestAddress(addr), std::sync::atomic::Ordering::Acquire)
            .unwrap()
    }

    /// Runs `ops` in the guest, in order; returns one result per op.
    pub fn run(&mut self, ops: &[Op]) -> Result<Vec<OpResult>, DriverError> {
        assert!(ops.len() <= MAX_BATCH, "batch too large");
        let mut table = Vec::with_capacity(ops.len() * 32);
        for op in ops {
            table.extend_from_slice(&op.encode());
        }
        self.seq += 1;
        {
            let g = rcu::read_lock();
            let mem = self.memory.read(&g);
            mem.write_slice(&table, GuestAddress(TABLE)).unwrap();
            mem.write_obj(TABLE, GuestAddress(MAILBOX + 16)).unwrap();
            mem.write_obj(ops.len() as u64, GuestAddress(MAILBOX + 24))
                .unwrap();
            mem.store(
                self.seq,
                GuestAddress(MAILBOX),
                std::sync::atomic::Ordering::Release,
            )
            .unwrap();
        }
        let end = Instant::now() + self.timeout;
        let mut spins = 0u32;
        while self.load(MAILBOX + 8) != self.seq {
            let progress = self.progress();
            if (self.ended)() {
                return Err(DriverError::VmEnded { progress });
            }
            if Instant::now() > end {
                return Err(DriverError::Timeout { progress });
            }
            spins += 1;
            if spins > 1000 {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::hint::spin_loop();
            }
        }
        let g = rcu::read_lock();
        let mem = self.memory.read(&g);
        let mut raw = vec![0u8; table.len()];
        mem.read_slice(&mut raw, GuestAddress(TABLE)).unwrap();
        Ok(ops
            .iter()
            .zip(raw.chunks_exact(32))
            .map(|(op, e)| {
                let value = u64::from_le_bytes(e[24..32].try_into().unwrap());
                let left = u32::from_le_bytes(e[4..8].try_into().unwrap());
                OpResult {
                    value,
                    matched: matches!(op, Op::Poll { .. }) && left != 0,
                }
            })
            .collect())
    }

    /// Runs one op and returns its result.
    pub fn one(&mut self, op: Op) -> Result<OpResult, DriverError> {
        Ok(self.run(&[op])?[0])
    }

    /// Index (in the current batch) of the entry the guest executes or last
    /// executed.
    pub fn progress(&self) -> u64 {
        self.load(MAILBOX + 32)
    }

    /// The [`heartbeat`] counter.
    pub fn heartbeat(&self) -> u64 {
        self.load(HEARTBEAT)
    }

    /// Waits until the [`heartbeat`] counter moves; false after `limit`.
    pub fn heartbeat_moves(&self, limit: Duration) -> bool {
        let start = self.heartbeat();
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if self.heartbeat() != start {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }
}

/// Loads the runner (and the heartbeat code) and starts vCPU 0 on the
/// runner at `privilege`; with `heartbeat_vcpu`, vCPU 1 runs [`heartbeat`]
/// at CPL3. The VM must have been created with [`runner`] as its code.
pub fn start_runner(vm: &BareVm, privilege: Privilege, heartbeat_vcpu: bool) {
    vm.write(CODE_ADDR + HEARTBEAT_OFFSET, heartbeat());
    vm.write(MAILBOX, &[0u8; 64]);
    vm.write(HEARTBEAT, &[0u8; 8]);
    vm.start_vcpu(0, 0, 0x8_0000, true, |r| {
        r.rbx = MAILBOX;
        r.r13 = 0x7_0000;
        r.r15 = u64::from(privilege == Privilege::User);
    });
    if heartbeat_vcpu {
        vm.start_vcpu(1, HEARTBEAT_OFFSET, 0x6_f000, true, |r| {
            r.rdi = HEARTBEAT;
            r.r13 = 0x6_e000;
        });
    }
}

/// Runs the VM on this thread and `drive` on a thread named `guest-driver`
/// (a fenced RCU reader, as vCPU threads are). When `drive` returns or
/// panics, that thread asks the VM to power off, so the run ends either
/// way. Returns how the run ended and what `drive` returned, or its panic
/// payload for the caller to report with what it knows.
pub fn run_driven<T: Send + 'static>(
    vm: &mut BareVm,
    limit: Duration,
    drive: impl FnOnce(GuestDriver) -> T + Send + 'static,
) -> (vmm::test_utils::RunOutcome, std::thread::Result<T>) {
    let driver = GuestDriver::new(vm);
    let exit = std::sync::Arc::clone(&vm.machine.devices.exit);
    let thread = std::thread::Builder::new()
        .name("guest-driver".into())
        .spawn(move || {
            rcu::set_reader_mode(rcu::ReaderMode::Fenced);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drive(driver)));
            exit.request(devices::ExitRequest::PowerOff);
            r
        })
        .expect("spawn the guest-driver thread");
    let outcome = vm.run_outcome(limit);
    let driven = thread
        .join()
        .expect("the guest-driver thread catches its panics");
    (outcome, driven)
}
