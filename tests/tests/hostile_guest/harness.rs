//! What every hostile-guest test uses: the VM and its hot-plug device, the
//! seeded generator, the RAM, panic and liveness checks, and running a VM
//! with a driver thread.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::virtio::VIRTIO_MEM_DEFAULT_BLOCK_SIZE;
use devices::virtio::VirtioMmio;
use tests::bare_vm::{BareVm, CODE_ADDR, TEST_MMIO};
use tests::guest_driver::{
    GuestDriver, HEARTBEAT, MAILBOX, Op, Privilege, SCRATCH, SCRATCH_SIZE, TABLE, start_runner,
};
use tests::virtio_ops::{VIRTIO, r32};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_VERSION,
};
use vmm::test_utils::Hotplug;
use vmm::test_utils::SLOT_SIZE;
use vmm::test_utils::StopReason;

pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const RAM_SIZE: u64 = 64 * MIB;
pub(crate) const HOTPLUG_BASE: u64 = 1 << 32;
pub(crate) const HOTPLUG_SIZE: u64 = 8 * SLOT_SIZE;
pub(crate) const BLOCK: u64 = VIRTIO_MEM_DEFAULT_BLOCK_SIZE;
pub(crate) const GED: u64 = 0xd000_0000;
pub(crate) const LIMIT: Duration = Duration::from_secs(600);

/// One KVM test at a time: they share the panic record and two cores.
pub(crate) static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

pub(crate) fn serialise() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// xorshift64*: small, seedable, good enough to pick registers and values.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub(crate) fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// The test's seed: `HOSTILE_SEED` or a fixed one per test, printed.
pub(crate) fn seed(test: &str, default: u64) -> u64 {
    let seed = std::env::var("HOSTILE_SEED")
        .ok()
        .and_then(|s| {
            let s = s.trim_start_matches("0x");
            u64::from_str_radix(s, 16).ok()
        })
        .unwrap_or(default);
    eprintln!("{test}: seed {seed:#x} (replay with HOSTILE_SEED={seed:x})");
    seed
}

pub(crate) fn accesses(default: usize) -> usize {
    std::env::var("HOSTILE_ACCESSES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Guest RAM that nothing may write: everything from 1 MiB up (below it the
/// CPU itself writes: stacks, accessed and dirty bits in the page tables)
/// except the heartbeat counter, the mailbox and table, and the scratch
/// area where the guest lets the device put rings and buffers.
pub(crate) fn protected_ranges() -> Vec<(u64, u64)> {
    let table_end = TABLE + 0x10_0000;
    vec![
        (CODE_ADDR, HEARTBEAT),
        (HEARTBEAT + 0x1000, MAILBOX),
        (table_end, SCRATCH),
        (SCRATCH + SCRATCH_SIZE, RAM_SIZE),
    ]
}

pub(crate) fn snapshot(vm: &BareVm) -> Vec<Vec<u8>> {
    protected_ranges()
        .into_iter()
        .map(|(a, b)| vm.read(a, (b - a) as usize))
        .collect()
}

pub(crate) fn assert_ram_unchanged(vm: &BareVm, before: &[Vec<u8>], seed: u64) {
    for ((a, b), old) in protected_ranges().into_iter().zip(before) {
        let now = vm.read(a, (b - a) as usize);
        if let Some(i) = now.iter().zip(old).position(|(x, y)| x != y) {
            panic!(
                "seed {seed:#x}: guest RAM at {:#x} changed ({:#x} -> {:#x})",
                a + i as u64,
                old[i],
                now[i]
            );
        }
    }
}

/// Starts watching for panics (see `tests::panic_watch`; [`run_driven`]
/// re-installs the watch once the VM runs); returns how many were recorded
/// before.
pub(crate) fn watch_panics() -> usize {
    tests::panic_watch::install();
    tests::panic_watch::panics().len()
}

pub(crate) fn assert_no_panics(baseline: usize, seed: u64) {
    let panics = tests::panic_watch::panics();
    let new = panics.get(baseline..).unwrap_or_default();
    assert!(new.is_empty(), "seed {seed:#x}: panics: {new:#?}");
}

/// Runs the VM on this thread and `drive` on another; when `drive` returns
/// (or panics), the driver thread asks the VM to power off. Returns why the
/// VM stopped and what `drive` returned.
pub(crate) fn run_driven<T: Send + 'static>(
    vm: &mut BareVm,
    drive: impl FnOnce(GuestDriver) -> T + Send + 'static,
) -> (StopReason, T) {
    let (outcome, driven) = tests::guest_driver::run_driven(vm, LIMIT, move |mut driver| {
        // Once the runner answers, the VMM has installed its panic hook (if
        // it does): put the watch back in front of it.
        driver.one(r(TEST_MMIO, 8)).expect("the runner answers");
        tests::panic_watch::install();
        drive(driver)
    });
    let reason = outcome.reason;
    match driven {
        Ok(t) => (reason, t),
        Err(p) => {
            eprintln!(
                "the VM stopped with {reason:?}; fatal errors: {:?}",
                vm.machine.fatal_errors().first()
            );
            std::panic::resume_unwind(p)
        }
    }
}

pub(crate) fn w(addr: u64, width: u8, value: u64) -> Op {
    Op::Write { addr, width, value }
}

pub(crate) fn r(addr: u64, width: u8) -> Op {
    Op::Read { addr, width }
}

/// Ops a driver runs to probe the device and read back its identity.
pub(crate) fn identity_checks(driver: &mut GuestDriver) {
    let got = driver
        .run(&[
            r32(VIRTIO_MMIO_MAGIC_VALUE),
            r32(VIRTIO_MMIO_VERSION),
            r32(VIRTIO_MMIO_DEVICE_ID),
        ])
        .unwrap();
    assert_eq!(
        [got[0].value, got[1].value, got[2].value],
        [0x7472_6976, 2, 24],
        "virtio-mmio identity after the abuse"
    );
}

/// Checks the VM still makes progress: the heartbeat moves and a final
/// known write reaches the test device.
pub(crate) fn final_checks(driver: &mut GuestDriver) {
    assert!(
        driver.heartbeat_moves(Duration::from_secs(10)),
        "the heartbeat vCPU stopped"
    );
    driver
        .one(w(TEST_MMIO, 8, 0x600d_cafe_f00d_0001))
        .expect("the runner still answers");
}

pub(crate) fn assert_final_write(vm: &BareVm) {
    let writes = vm.mmio.writes();
    assert_eq!(
        writes.last(),
        Some(&(TEST_MMIO, 0x600d_cafe_f00d_0001)),
        "the final write did not reach the test device"
    );
}

/// Everything a test needs to look at the hot-plug state from outside.
pub(crate) struct HotplugView {
    pub(crate) hp: Arc<Hotplug>,
    pub(crate) memory: vmm::test_utils::SharedGuestMap,
}

impl HotplugView {
    pub(crate) fn plugged(&self) -> u64 {
        self.hp.vmem.plugged_size()
    }
    pub(crate) fn mapped_slots(&self) -> usize {
        self.hp.manager.mapped_slots()
    }
    pub(crate) fn transport(&self) -> &VirtioMmio {
        &self.hp.transport
    }
}

/// Starts the runner at CPL3 with the heartbeat on vCPU 1, and maps the
/// hot-plug region in the guest's page tables (after the vCPU set-up,
/// which rewrites the tables for the first 4 GiB).
pub(crate) fn start_user(vm: &BareVm) {
    start_runner(vm, Privilege::User, true);
    vm.map_high(HOTPLUG_BASE, 1 << 30);
}

pub(crate) fn hotplug_vm(code: &[u8]) -> (BareVm, HotplugView) {
    let vm = BareVm::with_hotplug(2, RAM_SIZE, HOTPLUG_SIZE, code, 0);
    let hp = Arc::clone(vm.machine.hotplug.first().expect("hot-plug device"));
    assert_eq!(hp.mmio_base, VIRTIO, "the virtio-mmio window moved");
    assert_eq!(hp.vmem.addr(), HOTPLUG_BASE, "the hot-plug region moved");
    let memory = Arc::clone(&vm.machine.memory);
    (vm, HotplugView { hp, memory })
}
