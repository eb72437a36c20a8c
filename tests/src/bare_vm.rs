//! A VM with the VMM's devices but no kernel: tests load a tiny guest, set
//! the boot vCPU's registers and run it with a time limit.

use crate::recorder::Recorder;
use devices::BusRange;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};
use vmm::control::StopReason;
use vmm::{HardwareSpec, Machine, RunOptions};

/// Where test guests' code goes.
pub const CODE_ADDR: u64 = 0x10_0000;
/// Their stack top.
pub const STACK_TOP: u64 = 0x8_0000;
/// Port of the test recorder on the port-I/O bus (8 ports).
pub const TEST_PORT: u16 = 0x80;
/// Address of the test recorder on the MMIO bus (one page, in the device
/// window above the virtio devices).
pub const TEST_MMIO: u64 = 0xd800_0000;

/// A bare VM with a recorder on both buses.
#[allow(missing_debug_implementations)] // Machine is not Debug-worthy here.
pub struct BareVm {
    /// The machine.
    pub machine: Machine,
    /// Records port I/O to [`TEST_PORT`]..+8.
    pub pio: Arc<Recorder>,
    /// Records MMIO to [`TEST_MMIO`]..+4096.
    pub mmio: Arc<Recorder>,
}

impl BareVm {
    /// Creates the VM (`cpus` vCPUs, `memory` bytes) and loads `code` at
    /// [`CODE_ADDR`]. Recorder reads return `read_value`.
    pub fn new(cpus: u32, memory: u64, code: &[u8], read_value: u64) -> Self {
        crate::require_kvm();
        let machine = Machine::create(
            HardwareSpec {
                cpus,
                memory,
                hotplug_memory: 0,
            },
            Instant::now(),
        )
        .expect("bare VM");
        let pio = Arc::new(Recorder::new(read_value));
        let mmio = Arc::new(Recorder::new(read_value));
        machine
            .devices
            .add_pio(BusRange::new(u64::from(TEST_PORT), 8).unwrap(), pio.clone())
            .unwrap();
        machine
            .devices
            .add_mmio(BusRange::new(TEST_MMIO, 4096).unwrap(), mmio.clone())
            .unwrap();
        let vm = Self { machine, pio, mmio };
        vm.write(CODE_ADDR, code);
        vm
    }

    /// Writes `bytes` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        let g = rcu::read_lock();
        self.machine
            .memory
            .read(&g)
            .write_slice(bytes, GuestAddress(gpa))
            .unwrap();
    }

    /// Reads `len` bytes of guest memory at `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let g = rcu::read_lock();
        let mut v = vec![0u8; len];
        self.machine
            .memory
            .read(&g)
            .read_slice(&mut v, GuestAddress(gpa))
            .unwrap();
        v
    }

    /// Puts vCPU 0 in 64-bit long mode at [`CODE_ADDR`] + `offset`.
    pub fn start_long_mode(&self, offset: u64, user_pages: bool) {
        let g = rcu::read_lock();
        boot::cpu::regs::enter_long_mode(
            self.machine.memory.read(&g),
            &self.machine.vcpu_fds()[0],
            &boot::cpu::regs::LongModeEntry {
                rip: CODE_ADDR + offset,
                rsp: STACK_TOP,
                user_pages,
            },
        )
        .unwrap();
    }

    /// Runs until the guest ends or `limit` passes.
    pub fn run(&mut self, limit: Duration) -> StopReason {
        self.run_outcome(limit).reason
    }

    /// As [`run`](Self::run), with the vCPUs' exit counters.
    pub fn run_outcome(&mut self, limit: Duration) -> vmm::machine::RunOutcome {
        self.machine
            .run(RunOptions {
                console: false,
                timeout: Some(limit),
            })
            .expect("run")
    }
}
