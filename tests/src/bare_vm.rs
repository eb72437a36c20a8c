//! A VM with the VMM's devices but no kernel: tests load a tiny guest, set
//! the boot vCPU's registers and run it with a time limit.

use crate::recorder::Recorder;
use devices::BusRange;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};
use vmm::test_utils::StopReason;
use vmm::test_utils::{HardwareSpec, Machine, RunOptions};

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
        Self::with_hotplug(cpus, memory, 0, code, read_value)
    }

    /// As [`new`](Self::new), with a virtio-mem hot-plug region of
    /// `hotplug` bytes (placed from 4 GiB).
    pub fn with_hotplug(
        cpus: u32,
        memory: u64,
        hotplug: u64,
        code: &[u8],
        read_value: u64,
    ) -> Self {
        crate::require_kvm();
        let machine = Machine::create(
            HardwareSpec {
                cpus,
                memory,
                hotplug: if hotplug == 0 {
                    Vec::new()
                } else {
                    vec![vmm::test_utils::HotplugDeviceConfig {
                        id: vmm::test_utils::VMEM_ID.into(),
                        size: hotplug,
                        backing: Default::default(),
                        node: None,
                    }]
                },
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
            self.machine.memory.read(&g).memory(),
            &self.machine.vcpu_fds()[0],
            &boot::cpu::regs::LongModeEntry {
                rip: CODE_ADDR + offset,
                rsp: STACK_TOP,
                user_pages,
            },
        )
        .unwrap();
    }

    /// Puts vCPU `index` (an AP: made runnable without INIT/SIPI) in long
    /// mode at [`CODE_ADDR`] + `offset` with stack `rsp`, then applies
    /// `regs` to its general registers.
    pub fn start_vcpu(
        &self,
        index: usize,
        offset: u64,
        rsp: u64,
        user_pages: bool,
        regs: impl FnOnce(&mut kvm_bindings::kvm_regs),
    ) {
        let fd = &self.machine.vcpu_fds()[index];
        if index > 0 {
            fd.set_mp_state(kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            })
            .unwrap();
        }
        let g = rcu::read_lock();
        boot::cpu::regs::enter_long_mode(
            self.machine.memory.read(&g).memory(),
            fd,
            &boot::cpu::regs::LongModeEntry {
                rip: CODE_ADDR + offset,
                rsp,
                user_pages,
            },
        )
        .unwrap();
        drop(g);
        let mut r = fd.get_regs().unwrap();
        regs(&mut r);
        fd.set_regs(&r).unwrap();
    }

    /// Extends the identity page tables (user-accessible 2 MiB pages) over
    /// `[start, start + size)` above 4 GiB, with page directories at
    /// 0x40000.. (free in bare VMs). `start` and `size` are GiB-aligned.
    pub fn map_high(&self, start: u64, size: u64) {
        const PDPT: u64 = 0xa000;
        const PD_AREA: u64 = 0x4_0000;
        let first = start >> 30;
        for (k, gib) in (first..first + (size >> 30)).enumerate() {
            let pd = PD_AREA + k as u64 * 0x1000;
            let mut entries = Vec::with_capacity(4096);
            for i in 0..512u64 {
                let e = ((gib << 30) + (i << 21)) | 0x87; // P | RW | US | PS
                entries.extend_from_slice(&e.to_le_bytes());
            }
            self.write(pd, &entries);
            self.write(PDPT + gib * 8, &(pd | 0x7).to_le_bytes());
        }
    }

    /// Runs until the guest ends or `limit` passes.
    pub fn run(&mut self, limit: Duration) -> StopReason {
        self.run_outcome(limit).reason
    }

    /// As [`run`](Self::run), with the vCPUs' exit counters. The vCPU
    /// threads run under the `vmm` command's vCPU seccomp filter.
    pub fn run_outcome(&mut self, limit: Duration) -> vmm::test_utils::RunOutcome {
        self.machine
            .run(RunOptions {
                console: false,
                timeout: Some(limit),
                qmp: None,
                seccomp: vmm::test_utils::SeccompMode::VcpuThreads,
                console_out: None,
                on_reset: Default::default(),
            })
            .expect("run")
    }
}
