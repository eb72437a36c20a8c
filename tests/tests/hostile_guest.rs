//! Hostile tiny guests against the VMM's real devices.
//!
//! A guest here is the attacker: vCPU 0 runs the mailbox runner of
//! `tests::guest_driver`, and a test thread makes it write pseudo-random
//! values of random widths to every register of every device and to
//! unassigned port and MMIO space, or abuse the virtio-mem queue with
//! malformed descriptor chains. vCPU 1 runs a CPL3 heartbeat loop.
//! After the abuse every test checks that:
//! - no thread of the VMM panicked (a panic hook records panics on every
//!   thread, vCPU threads included) and no vCPU reported a fatal error;
//! - the VM still runs: the runner answers, the heartbeat still moves, a
//!   final known write reaches the test device, the virtio-mmio registers
//!   still identify the device;
//! - guest RAM outside what the guest and the devices were allowed to
//!   write is unchanged, and the hot-plug region is unplugged and unmapped
//!   unless the guest plugged memory with a valid request;
//! - the virtio-mem device works again after a driver reset and a proper
//!   handshake: a valid PLUG request is acknowledged and maps the memory.
//!
//! `a_panic_on_a_vcpu_thread_is_noticed` checks the panic watch itself.
//!
//! The pseudo-random sequences come from a seed printed by every test (set
//! `HOSTILE_SEED` to replay one); `HOSTILE_ACCESSES` scales the number of
//! accesses. MMIO abuse runs at CPL3, native speed here; port I/O needs CPL0,
//! which KVM emulates here, so those counts are smaller.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::virtio::mem_request::{
    VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_STATE, VIRTIO_MEM_REQ_UNPLUG, VIRTIO_MEM_REQ_UNPLUG_ALL,
};
use devices::virtio::{VIRTIO_MEM_DEFAULT_BLOCK_SIZE, VirtioMmio};
use devices::{BusRange, ExitRequest, Serial};
use tests::bare_vm::{BareVm, CODE_ADDR, TEST_MMIO, TEST_PORT};
use tests::guest_driver::{
    DriverError, GuestDriver, HEARTBEAT, MAILBOX, Op, Privilege, SCRATCH, SCRATCH_SIZE, TABLE,
    runner, start_runner,
};
use tests::virtio_ops::{
    DRIVER_OK_STATUS, NEEDS_RESET, QUEUE_NOTIFY, STATUS, VIRTIO, handshake_ops, r32, w32,
};
use vm_memory::{Bytes, GuestAddress};
use vmm::control::event_loop::StopReason;
use vmm::memory::hotplug_device::Hotplug;
use vmm::memory::memory_manager::SLOT_SIZE;

const MIB: u64 = 1 << 20;
const RAM_SIZE: u64 = 64 * MIB;
const HOTPLUG_BASE: u64 = 1 << 32;
const HOTPLUG_SIZE: u64 = 8 * SLOT_SIZE;
const BLOCK: u64 = VIRTIO_MEM_DEFAULT_BLOCK_SIZE;
const GED: u64 = 0xd000_0000;
const LIMIT: Duration = Duration::from_secs(600);

// virtio-mmio registers.
const MAGIC: u64 = 0x00;
const VERSION: u64 = 0x04;
const DEVICE_ID: u64 = 0x08;
const DRIVER_FEATURES: u64 = 0x20;
const DRIVER_FEATURES_SEL: u64 = 0x24;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM_MAX: u64 = 0x34;
const QUEUE_NUM: u64 = 0x38;
const QUEUE_READY: u64 = 0x44;
const INTERRUPT_STATUS: u64 = 0x60;
const INTERRUPT_ACK: u64 = 0x64;
const QUEUE_DESC: u64 = 0x80;
const QUEUE_AVAIL: u64 = 0x90;
const QUEUE_USED: u64 = 0xa0;
const CONFIG_GENERATION: u64 = 0xfc;

/// One KVM test at a time: they share the panic record and two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serialise() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// xorshift64*: small, seedable, good enough to pick registers and values.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// The test's seed: `HOSTILE_SEED` or a fixed one per test, printed.
fn seed(test: &str, default: u64) -> u64 {
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

fn accesses(default: usize) -> usize {
    std::env::var("HOSTILE_ACCESSES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Guest RAM that nothing may write: everything from 1 MiB up (below it the
/// CPU itself writes: stacks, accessed and dirty bits in the page tables)
/// except the heartbeat counter, the mailbox and table, and the scratch
/// area where the guest lets the device put rings and buffers.
fn protected_ranges() -> Vec<(u64, u64)> {
    let table_end = TABLE + 0x10_0000;
    vec![
        (CODE_ADDR, HEARTBEAT),
        (HEARTBEAT + 0x1000, MAILBOX),
        (table_end, SCRATCH),
        (SCRATCH + SCRATCH_SIZE, RAM_SIZE),
    ]
}

fn snapshot(vm: &BareVm) -> Vec<Vec<u8>> {
    protected_ranges()
        .into_iter()
        .map(|(a, b)| vm.read(a, (b - a) as usize))
        .collect()
}

fn assert_ram_unchanged(vm: &BareVm, before: &[Vec<u8>], seed: u64) {
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
fn watch_panics() -> usize {
    tests::panic_watch::install();
    tests::panic_watch::panics().len()
}

fn assert_no_panics(baseline: usize, seed: u64) {
    let panics = tests::panic_watch::panics();
    let new = panics.get(baseline..).unwrap_or_default();
    assert!(new.is_empty(), "seed {seed:#x}: panics: {new:#?}");
}

/// Runs the VM on this thread and `drive` on another; when `drive` returns
/// (or panics), the driver thread asks the VM to power off. Returns why the
/// VM stopped and what `drive` returned.
fn run_driven<T: Send + 'static>(
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

fn w(addr: u64, width: u8, value: u64) -> Op {
    Op::Write { addr, width, value }
}

fn r(addr: u64, width: u8) -> Op {
    Op::Read { addr, width }
}

/// Ops a driver runs to probe the device and read back its identity.
fn identity_checks(driver: &mut GuestDriver) {
    let got = driver
        .run(&[r32(MAGIC), r32(VERSION), r32(DEVICE_ID)])
        .unwrap();
    assert_eq!(
        [got[0].value, got[1].value, got[2].value],
        [0x7472_6976, 2, 24],
        "virtio-mmio identity after the abuse"
    );
}

/// Checks the VM still makes progress: the heartbeat moves and a final
/// known write reaches the test device.
fn final_checks(driver: &mut GuestDriver) {
    assert!(
        driver.heartbeat_moves(Duration::from_secs(10)),
        "the heartbeat vCPU stopped"
    );
    driver
        .one(w(TEST_MMIO, 8, 0x600d_cafe_f00d_0001))
        .expect("the runner still answers");
}

fn assert_final_write(vm: &BareVm) {
    let writes = vm.mmio.writes();
    assert_eq!(
        writes.last(),
        Some(&(TEST_MMIO, 0x600d_cafe_f00d_0001)),
        "the final write did not reach the test device"
    );
}

// ---------------------------------------------------------------------------
// A virtqueue in scratch RAM, filled by the test as a driver would.

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const QSIZE: u16 = 16;

struct Virtq {
    memory: vmm::memory::guest_memory::SharedMemory,
    base: u64,
    avail_idx: u16,
}

impl Virtq {
    fn new(view: &HotplugView, base: u64) -> Self {
        Self {
            memory: Arc::clone(&view.memory),
            base,
            avail_idx: 0,
        }
    }
    fn desc(&self) -> u64 {
        self.base
    }
    fn avail(&self) -> u64 {
        self.base + 0x100
    }
    fn used(&self) -> u64 {
        self.base + 0x200
    }
    fn req(&self) -> u64 {
        self.base + 0x400
    }
    fn resp(&self) -> u64 {
        self.base + 0x500
    }
    fn write(&self, addr: u64, bytes: &[u8]) {
        let g = rcu::read_lock();
        self.memory
            .read(&g)
            .write_slice(bytes, GuestAddress(addr))
            .unwrap();
    }
    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let g = rcu::read_lock();
        let mut v = vec![0; len];
        self.memory
            .read(&g)
            .read_slice(&mut v, GuestAddress(addr))
            .unwrap();
        v
    }
    /// Zeroes the rings and forgets the indices (after a device reset).
    fn clear(&mut self) {
        self.write(self.base, &[0; 0x600]);
        self.avail_idx = 0;
    }
    fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(self.desc() + 16 * u64::from(i), &d);
    }
    /// Makes `head` available and moves the index by `bump`.
    fn publish(&mut self, head: u16, bump: u16) {
        let slot = self.avail() + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.write(slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(bump);
        self.write(self.avail() + 2, &self.avail_idx.to_le_bytes());
    }
    fn used_idx(&self) -> u16 {
        let b = self.read(self.used() + 2, 2);
        u16::from_le_bytes([b[0], b[1]])
    }
    /// The standard request: 24 readable bytes, 10 writable bytes.
    fn request(&mut self, kind: u16, addr: u64, nb_blocks: u16) {
        self.write(self.req(), &request_bytes(kind, addr, nb_blocks));
        self.write(self.resp(), &[0xee; 16]);
        self.set_desc(0, self.req(), 24, F_NEXT, 1);
        self.set_desc(1, self.resp(), 10, F_WRITE, 0);
        self.publish(0, 1);
    }
    /// The response as `(type, state)`.
    fn response(&self) -> (u16, u16) {
        let b = self.read(self.resp(), 10);
        (
            u16::from_le_bytes([b[0], b[1]]),
            u16::from_le_bytes([b[8], b[9]]),
        )
    }
}

fn request_bytes(kind: u16, addr: u64, nb_blocks: u16) -> [u8; 24] {
    let mut req = [0u8; 24];
    req[0..2].copy_from_slice(&kind.to_le_bytes());
    req[8..16].copy_from_slice(&addr.to_le_bytes());
    req[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
    req
}

fn handshake(driver: &mut GuestDriver, q: &mut Virtq) {
    q.clear();
    let res = driver
        .run(&handshake_ops(QSIZE.into(), q.desc(), q.avail(), q.used()))
        .unwrap();
    assert_eq!(
        res.last().unwrap().value,
        u64::from(DRIVER_OK_STATUS),
        "the handshake did not reach DRIVER_OK"
    );
}

/// How long the device may take to answer a notification (the control
/// thread shares two cores with spinning vCPUs and other work here).
const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// Has the guest poll `addr` until `value & mask == expect`, in rounds of
/// `limit` reads, for at most [`ANSWER_WITHIN`]; returns whether it matched.
fn poll(driver: &mut GuestDriver, addr: u64, mask: u32, expect: u32, limit: u32) -> bool {
    let end = std::time::Instant::now() + ANSWER_WITHIN;
    loop {
        let res = driver
            .one(Op::Poll {
                addr,
                mask,
                expect,
                limit,
            })
            .unwrap();
        if res.matched {
            return true;
        }
        if std::time::Instant::now() > end {
            return false;
        }
    }
}

/// Notifies the queue and waits until the used index moves past `before`;
/// returns whether it did and the status read afterwards.
fn notify_and_wait_used(driver: &mut GuestDriver, q: &Virtq, before: u16) -> (bool, u32) {
    driver.one(w32(QUEUE_NOTIFY, 0)).unwrap();
    let expect = u32::from(before.wrapping_add(1)) << 16;
    let answered = poll(driver, q.used(), 0xffff_0000, expect, 1 << 22);
    (answered, driver.one(r32(STATUS)).unwrap().value as u32)
}

/// Notifies the queue and waits for DEVICE_NEEDS_RESET; returns whether it
/// came and the interrupt status read afterwards.
fn notify_and_wait_broken(driver: &mut GuestDriver) -> (bool, u32) {
    driver.one(w32(QUEUE_NOTIFY, 0)).unwrap();
    let broken = poll(driver, VIRTIO + STATUS, NEEDS_RESET, NEEDS_RESET, 10_000);
    (
        broken,
        driver.one(r32(INTERRUPT_STATUS)).unwrap().value as u32,
    )
}

/// Everything a test needs to look at the hot-plug state from outside.
struct HotplugView {
    hp: Arc<Hotplug>,
    memory: vmm::memory::guest_memory::SharedMemory,
}

impl HotplugView {
    fn plugged(&self) -> u64 {
        self.hp.vmem.plugged_size()
    }
    fn mapped_slots(&self) -> usize {
        self.hp.manager.mapped_slots()
    }
    fn transport(&self) -> &VirtioMmio {
        &self.hp.transport
    }
}

/// Starts the runner at CPL3 with the heartbeat on vCPU 1, and maps the
/// hot-plug region in the guest's page tables (after the vCPU set-up,
/// which rewrites the tables for the first 4 GiB).
fn start_user(vm: &BareVm) {
    start_runner(vm, Privilege::User, true);
    vm.map_high(HOTPLUG_BASE, 1 << 30);
}

fn hotplug_vm(code: &[u8]) -> (BareVm, HotplugView) {
    let vm = BareVm::with_hotplug(2, RAM_SIZE, HOTPLUG_SIZE, code, 0);
    let hp = Arc::clone(vm.machine.hotplug.first().expect("hot-plug device"));
    assert_eq!(hp.mmio_base, VIRTIO, "the virtio-mmio window moved");
    assert_eq!(hp.vmem.addr(), HOTPLUG_BASE, "the hot-plug region moved");
    let memory = Arc::clone(&vm.machine.memory);
    (vm, HotplugView { hp, memory })
}

/// Proper driver after the abuse: reset, handshake, PLUG two blocks at the
/// start of the region; the memory gets mapped and the guest can use it.
fn plug_properly(driver: &mut GuestDriver, view: &HotplugView, q: &mut Virtq) {
    view.hp.vmem.set_requested_size(2 * BLOCK).unwrap();
    handshake(driver, q);
    let before = q.used_idx();
    q.request(VIRTIO_MEM_REQ_PLUG, HOTPLUG_BASE, 2);
    let (answered, status) = notify_and_wait_used(driver, q, before);
    assert!(
        answered,
        "a valid PLUG was not answered (status {status:#x})"
    );
    assert_eq!(q.response(), (0, 0), "a valid PLUG was not acknowledged");
    assert_eq!(view.plugged(), 2 * BLOCK);
    assert_eq!(view.mapped_slots(), 1, "the plugged slot is not mapped");
    let res = driver
        .run(&[
            w(HOTPLUG_BASE + 0x1234 * 8, 8, 0x0123_4567_89ab_cdef),
            r(HOTPLUG_BASE + 0x1234 * 8, 8),
        ])
        .unwrap();
    assert_eq!(
        res[1].value, 0x0123_4567_89ab_cdef,
        "plugged memory is not usable"
    );
}

// ---------------------------------------------------------------------------
// Register abuse over MMIO, at CPL3.

/// Where in scratch RAM the ring at `reg` (a low address register) may lie:
/// descriptor tables only where the device never writes, available rings
/// in their own part, used rings where nothing reads descriptors. So every
/// descriptor the device ever reads was written by the test, and every
/// buffer it names lies in scratch RAM or outside RAM: whatever the fuzzed
/// queues say, the device cannot write over the runner.
fn scratch_part(reg: u64) -> (u64, u64) {
    match reg {
        QUEUE_DESC => (SCRATCH_DESCS, MIB - 4096),
        QUEUE_AVAIL => (SCRATCH_AVAILS, MIB - 4096),
        _ => (SCRATCH_USED, MIB - 4096),
    }
}

/// Addresses a hostile driver might give for the ring at `reg`: in its part
/// of scratch RAM (aligned or not), MMIO, unplugged hot-plug memory, beyond
/// RAM, nothing at all.
fn ring_address(rng: &mut Rng, reg: u64) -> u64 {
    let (base, len) = scratch_part(reg);
    match rng.below(8) {
        0..=2 => base + (rng.below(len) & !0xf),
        3 => base + rng.below(len),
        4 => rng.pick(&[GED, VIRTIO, VIRTIO + QUEUE_NOTIFY, TEST_MMIO + 0x1000]),
        5 => HOTPLUG_BASE + rng.below(HOTPLUG_SIZE),
        6 => rng.pick(&[0, RAM_SIZE, RAM_SIZE - 8, 0xffff_ffff_ffff_f000, u64::MAX]),
        _ => rng.next(),
    }
}

/// A value for a 32-bit register write at `offset`: random, or one a driver
/// would write, [sanitized](sanitize) so the device never writes used rings
/// or responses over the runner.
fn register_value(rng: &mut Rng, offset: u64) -> u32 {
    let v = match rng.below(3) {
        0 => rng.next() as u32,
        1 => rng.pick(&[
            0,
            1,
            2,
            3,
            0xb,
            0xf,
            0x4f,
            0x80,
            0x40,
            16,
            128,
            256,
            3,
            u32::MAX,
        ]),
        _ => (ring_address(rng, offset & !4) >> (if offset % 8 == 4 { 32 } else { 0 })) as u32,
    };
    sanitize(offset, v)
}

/// `v` as written to the register at `offset`, except that the low word of
/// a ring address that would point into guest RAM is moved into that ring's
/// part of scratch RAM (see [`scratch_part`]).
fn sanitize(offset: u64, v: u32) -> u32 {
    let is_low_ring = matches!(offset, QUEUE_DESC | QUEUE_AVAIL | QUEUE_USED);
    if is_low_ring && u64::from(v) < RAM_SIZE {
        let (base, len) = scratch_part(offset);
        (base + u64::from(v) % len) as u32
    } else {
        v
    }
}

/// Scratch layout of [`fill_scratch`]: descriptor tables, then available
/// rings with small indices, then room for used rings.
const SCRATCH_DESCS: u64 = SCRATCH;
const SCRATCH_AVAILS: u64 = SCRATCH + MIB;
const SCRATCH_USED: u64 = SCRATCH + 2 * MIB;
/// Random bytes, where descriptors put their buffers.
const SCRATCH_BUFFERS: u64 = SCRATCH + 3 * MIB;
/// Size of that part (the last 64 KiB of scratch are the tests' own queue).
const SCRATCH_BUFFERS_SIZE: u64 = SCRATCH_SIZE - 3 * MIB - 0x1_0000;

/// A complete, proper queue set-up whose rings hold fuzz content (from
/// [`fill_scratch`]), so the device parses fuzzed descriptor chains.
fn coherent_burst(rng: &mut Rng, ops: &mut Vec<Op>) {
    let desc = SCRATCH_DESCS + 16 * rng.below(MIB / 16 - 256);
    let avail = SCRATCH_AVAILS + 64 * rng.below(MIB / 64);
    let used = SCRATCH_USED + 4096 * rng.below(MIB / 4096);
    let num = rng.pick(&[16, 16, 16, 8, 32, 128]);
    ops.extend(handshake_ops(num, desc, avail, used));
    let any = rng.next() as u32;
    ops.push(w32(QUEUE_NOTIFY, rng.pick(&[0, 0, any])));
    ops.push(r32(STATUS));
}

/// A burst of what a driver does, with random holes and wrong values.
fn driver_burst(rng: &mut Rng, ops: &mut Vec<Op>) {
    if rng.chance(40) {
        coherent_burst(rng, ops);
        return;
    }
    let mut step = |rng: &mut Rng, op: Op| {
        if rng.chance(85) {
            ops.push(op);
        }
    };
    step(rng, w32(STATUS, 0));
    step(rng, w32(STATUS, 1));
    step(rng, w32(STATUS, 3));
    let sel = if rng.chance(80) { 1 } else { rng.next() as u32 };
    step(rng, w32(DRIVER_FEATURES_SEL, sel));
    let hi = if rng.chance(80) { 1 } else { rng.next() as u32 };
    step(rng, w32(DRIVER_FEATURES, hi));
    step(rng, w32(DRIVER_FEATURES_SEL, 0));
    let lo = if rng.chance(80) { 2 } else { rng.next() as u32 };
    step(rng, w32(DRIVER_FEATURES, lo));
    let ok = rng.pick(&[0xb, 0xb, 0xf, 0x8b, 0x4b]);
    step(rng, w32(STATUS, ok));
    step(rng, r32(STATUS));
    let qsel = if rng.chance(85) {
        0
    } else {
        rng.below(4) as u32
    };
    step(rng, w32(QUEUE_SEL, qsel));
    step(rng, r32(QUEUE_NUM_MAX));
    let num = rng.pick(&[16, 16, 128, 1, 2, 256, 3, 0, 0x1_0010]);
    step(rng, w32(QUEUE_NUM, num));
    for reg in [QUEUE_DESC, QUEUE_AVAIL, QUEUE_USED] {
        let a = ring_address(rng, reg);
        step(rng, w32(reg, sanitize(reg, a as u32)));
        step(rng, w32(reg + 4, (a >> 32) as u32));
    }
    let ready = rng.pick(&[1, 1, 1, 0, 2]);
    step(rng, w32(QUEUE_READY, ready));
    step(rng, w32(STATUS, DRIVER_OK_STATUS));
    let any = rng.next() as u32;
    let n = rng.pick(&[0, 0, 1, any]);
    step(rng, w32(QUEUE_NOTIFY, n));
    step(rng, r32(INTERRUPT_STATUS));
    let ack = rng.next() as u32;
    step(rng, w32(INTERRUPT_ACK, ack));
    step(rng, r32(CONFIG_GENERATION));
    let config = VIRTIO + 0x100 + rng.below(56);
    step(rng, r(config, 1));
}

fn width(rng: &mut Rng) -> u8 {
    rng.pick(&[1, 2, 4, 8])
}

/// An aligned address of `width` bytes in `[base, base + len)`.
fn aligned_in(rng: &mut Rng, base: u64, len: u64, width: u8) -> u64 {
    base + (rng.below(len) & !(u64::from(width) - 1))
}

/// Unassigned MMIO: the device window outside our devices and the test
/// page, the rest of the 32-bit hole below the IOAPIC, and unplugged
/// hot-plug memory.
fn unassigned(rng: &mut Rng, width: u8) -> u64 {
    match rng.below(4) {
        0 => aligned_in(rng, VIRTIO + 0x1000, TEST_MMIO - VIRTIO - 0x1000, width),
        1 => aligned_in(
            rng,
            TEST_MMIO + 0x1000,
            0xe000_0000 - TEST_MMIO - 0x1000,
            width,
        ),
        2 => {
            if rng.chance(50) {
                aligned_in(rng, 0xc000_0000, 0x1000_0000, width)
            } else {
                aligned_in(rng, 0xe000_0000, 0xfec0_0000 - 0xe000_0000, width)
            }
        }
        _ => aligned_in(rng, HOTPLUG_BASE, HOTPLUG_SIZE, width),
    }
}

/// `n` pseudo-random MMIO accesses (plus driver bursts).
fn mmio_abuse(rng: &mut Rng, n: usize) -> Vec<Op> {
    let mut ops = Vec::with_capacity(n + 64);
    while ops.len() < n {
        let write = rng.chance(70);
        let roll = rng.below(100);
        if roll < 12 {
            driver_burst(rng, &mut ops);
            continue;
        }
        let (addr, wd, value) = if roll < 45 {
            // The register file or the configuration space, mostly dwords.
            let wd = if rng.chance(75) { 4 } else { width(rng) };
            let offset = if rng.chance(80) {
                rng.below(0x40) * 4
            } else {
                0x100 + rng.below(0x40)
            };
            let offset = offset & !(u64::from(wd) - 1);
            (VIRTIO + offset, wd, u64::from(register_value(rng, offset)))
        } else if roll < 55 {
            let wd = width(rng);
            let addr = aligned_in(rng, VIRTIO, 0x1000, wd);
            let mut v = rng.next();
            if wd == 4 {
                v = u64::from(sanitize(addr - VIRTIO, v as u32));
            }
            (addr, wd, v)
        } else if roll < 68 {
            let wd = width(rng);
            (aligned_in(rng, GED, 0x1000, wd), wd, rng.next())
        } else {
            let wd = width(rng);
            (unassigned(rng, wd), wd, rng.next())
        };
        ops.push(if write {
            w(addr, wd, value)
        } else {
            r(addr, wd)
        });
    }
    ops
}

/// Scratch RAM that a fuzzed queue may point at: descriptor tables whose
/// buffers and indirect tables stay in scratch, available rings with small
/// indices, room for used rings, then random bytes (see [`scratch_part`]).
fn fill_scratch(vm: &BareVm, rng: &mut Rng) {
    let mut bytes = Vec::with_capacity(SCRATCH_SIZE as usize);
    while bytes.len() < (SCRATCH_AVAILS - SCRATCH) as usize {
        let any = rng.next();
        let flags = rng.pick(&[
            0,
            F_NEXT,
            F_WRITE,
            F_NEXT | F_WRITE,
            F_INDIRECT,
            (any >> 32) as u16,
        ]);
        // Indirect tables are descriptor tables too: they lie wholly where
        // the device never writes. Buffers go to the random part.
        let (addr, len) = if flags & F_INDIRECT != 0 {
            let table = SCRATCH_DESCS + 16 * rng.below((MIB - 8192) / 16);
            (table, 16 * (1 + rng.below(64) as u32))
        } else {
            let addr = SCRATCH_BUFFERS + rng.below(SCRATCH_BUFFERS_SIZE - 0x1_0000);
            (
                addr,
                rng.pick(&[0u32, 1, 10, 16, 24, 64, 4096, any as u32 & 0xffff]),
            )
        };
        let next = rng.below(300) as u16;
        bytes.extend_from_slice(&addr.to_le_bytes());
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&next.to_le_bytes());
    }
    while bytes.len() < (SCRATCH_USED - SCRATCH) as usize {
        let mut ring = [0u8; 64];
        ring[0..2].copy_from_slice(&(rng.below(2) as u16).to_le_bytes());
        ring[2..4].copy_from_slice(&(rng.below(18) as u16).to_le_bytes());
        for slot in ring[4..36].chunks_exact_mut(2) {
            slot.copy_from_slice(&(rng.below(20) as u16).to_le_bytes());
        }
        bytes.extend_from_slice(&ring);
    }
    while bytes.len() < SCRATCH_SIZE as usize {
        bytes.extend_from_slice(&rng.next().to_le_bytes());
    }
    vm.write(SCRATCH, &bytes);
}

#[test]
fn random_mmio_writes_to_every_device_leave_the_vm_running() {
    let _one = serialise();
    let panics = watch_panics();
    let seed = seed("mmio abuse", 0x6d6d_696f_0000_0001);
    let n = accesses(40_000);
    let mut rng = Rng::new(seed);
    let (mut vm, view) = hotplug_vm(runner());
    fill_scratch(&vm, &mut rng);
    start_user(&vm);
    let before = snapshot(&vm);
    let ops = mmio_abuse(&mut rng, n);
    let view = Arc::new(view);
    let v2 = Arc::clone(&view);
    let (reason, ()) = run_driven(&mut vm, move |mut driver| {
        assert!(
            driver.heartbeat_moves(Duration::from_secs(30)),
            "no heartbeat"
        );
        for (i, batch) in ops.chunks(4096).enumerate() {
            if let Err(e) = driver.run(batch) {
                let at = match e {
                    DriverError::Timeout { progress } | DriverError::VmEnded { progress } => {
                        progress as usize
                    }
                };
                let recent = &batch[at.saturating_sub(4)..=at.min(batch.len() - 1)];
                panic!("seed {seed:#x}: batch {i}: {e:?}; last ops {recent:x?}");
            }
        }
        // Nothing can be plugged while the requested size is 0.
        assert_eq!(v2.plugged(), 0, "seed {seed:#x}: memory got plugged");
        assert_eq!(v2.mapped_slots(), 0, "seed {seed:#x}: a slot got mapped");
        identity_checks(&mut driver);
        let mut q = Virtq::new(&v2, SCRATCH + SCRATCH_SIZE - 0x1_0000);
        plug_properly(&mut driver, &v2, &mut q);
        final_checks(&mut driver);
    });
    assert_eq!(
        reason,
        StopReason::Guest(ExitRequest::PowerOff),
        "seed {seed:#x}"
    );
    assert_no_panics(panics, seed);
    assert_eq!(vm.machine.fatal_errors().first(), None);
    assert_final_write(&vm);
    assert_ram_unchanged(&vm, &before, seed);
    let stats = view.transport().stats();
    let unclaimed = {
        let g = rcu::read_lock();
        vm.machine.devices.mmio.read(&g).unclaimed()
    };
    eprintln!(
        "mmio abuse: {n} accesses; virtio-mmio {stats:?}; virtio-mem {:?}; unclaimed MMIO {unclaimed:?}",
        view.hp.vmem.stats()
    );
    assert!(stats.ignored > 0 && stats.bad_width > 0, "{stats:?}");
    assert!(unclaimed.reads + unclaimed.writes > 0);
}

// ---------------------------------------------------------------------------
// Register abuse over port I/O, at CPL0.

/// Ports KVM's in-kernel PIC, PIT and ELCR answer: not the VMM's devices.
fn in_kernel_port(port: u16) -> bool {
    matches!(
        port,
        0x20 | 0x21 | 0x40..=0x43 | 0x61 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1
    )
}

/// Ports that are not the VMM's device ports, its test recorder or KVM's.
fn unassigned_port(rng: &mut Rng) -> u16 {
    loop {
        let port = rng.next() as u16;
        let ours = (0x3f8..=0x3ff).contains(&port)
            || port == 0x60
            || port == 0x64
            || (0x600..=0x602).contains(&port)
            || (TEST_PORT..TEST_PORT + 8).contains(&port);
        if !ours && !in_kernel_port(port) {
            return port;
        }
    }
}

fn port_width(rng: &mut Rng) -> u8 {
    rng.pick(&[1, 1, 1, 2, 4])
}

/// `n` pseudo-random port accesses on COM1, the i8042, the ACPI registers
/// (and their neighbours) and unassigned ports.
fn port_abuse(rng: &mut Rng, n: usize) -> Vec<Op> {
    (0..n)
        .map(|_| {
            let roll = rng.below(100);
            let (port, value) = if roll < 35 {
                let v = rng.pick(&[0x80, 0x03, 0x10, 0x0f, 0x07, 0xc7, 0x00, 0xff]);
                (
                    0x3f8 + rng.below(8) as u16,
                    if rng.chance(50) { v } else { rng.next() as u32 },
                )
            } else if roll < 50 {
                let port = rng.pick(&[0x60, 0x64]);
                let v = rng.pick(&[0xd1, 0xad, 0xae, 0x20, 0x60, 0xaa, 0xfe, 0xff]);
                (port, if rng.chance(40) { v } else { rng.next() as u32 })
            } else if roll < 65 {
                let port = 0x5fc + rng.below(11) as u16;
                let v = rng.pick(&[0x20, 0x14, 0x3c, 0xff, 0x00, 0x01, 0x06, 0x34]);
                (port, if rng.chance(30) { v } else { rng.next() as u32 })
            } else {
                (unassigned_port(rng), rng.next() as u32)
            };
            let width = port_width(rng);
            if rng.chance(65) {
                Op::PortWrite { port, width, value }
            } else {
                Op::PortRead { port, width }
            }
        })
        .collect()
}

/// What a port write does to the VM, as the i8042 and the ACPI registers
/// define it; single-port devices take only single-byte accesses.
fn ends_vm(op: &Op) -> Option<ExitRequest> {
    let Op::PortWrite {
        port,
        width: 1,
        value,
    } = *op
    else {
        return None;
    };
    let v = value as u8;
    match port {
        0x64 if v == 0xfe => Some(ExitRequest::Reset),
        0x600 if v & 0x20 != 0 && (v >> 2) & 7 == 5 => Some(ExitRequest::PowerOff),
        0x602 if v == 1 => Some(ExitRequest::Reset),
        _ => None,
    }
}

/// Counts what the guest sends to COM1 instead of printing it.
#[derive(Clone, Default)]
struct CountingSink(Arc<std::sync::atomic::AtomicU64>);

impl std::io::Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Puts a COM1 whose output is counted (random bytes must not reach the
/// test's stdout) in place of the VM's; its interrupt line goes nowhere.
fn quiet_serial(vm: &BareVm, sink: &CountingSink) {
    let irq: Arc<dyn devices::Interrupt> =
        Arc::new(vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
    let serial = Arc::new(Serial::new(irq, Box::new(sink.clone()), None));
    let pio = &vm.machine.devices.pio;
    let g = rcu::read_lock();
    let (bus, _) = pio.read(&g).without_range(0x3f8).unwrap();
    let bus = bus
        .with_device(BusRange::new(0x3f8, 8).unwrap(), serial)
        .unwrap();
    drop(g);
    pio.replace(bus);
}

/// How one VM of the port test ended.
#[derive(Debug)]
enum SegmentEnd {
    /// Ran its ops and the final checks; the test powered it off.
    Done,
    /// The terminating op at this index ended it.
    Ended(usize),
}

/// Runs `ops[start..]` on a fresh VM until the first op that legitimately
/// ends the VM (which must then end it, with its request) or the end of the
/// list (then the final checks run).
fn port_segment(
    ops: &Arc<Vec<Op>>,
    start: usize,
    seed: u64,
    sink: &CountingSink,
    panics: usize,
) -> SegmentEnd {
    let mut vm = BareVm::new(2, RAM_SIZE, runner(), 0x1234_5678);
    quiet_serial(&vm, sink);
    start_runner(&vm, Privilege::Kernel, true);
    let before = snapshot(&vm);
    let end = ops[start..]
        .iter()
        .position(|op| ends_vm(op).is_some())
        .map(|i| start + i);
    let exit = Arc::clone(&vm.machine.devices.exit);
    let ops2 = Arc::clone(ops);
    let (reason, outcome) = run_driven(&mut vm, move |mut driver| {
        let upto = end.unwrap_or(ops2.len());
        for (b, batch) in ops2[start..upto].chunks(1024).enumerate() {
            if let Err(e) = driver.run(batch) {
                panic!("seed {seed:#x}: ops from {}: {e:?}", start + b * 1024);
            }
            assert_eq!(
                exit.first(),
                None,
                "seed {seed:#x}: a port write in ops {}..{} ended the VM",
                start + b * 1024,
                start + b * 1024 + batch.len()
            );
        }
        if let Some(k) = end {
            match driver.run(&ops2[k..=k]) {
                Ok(_) | Err(DriverError::VmEnded { .. }) => {}
                Err(e) => panic!("seed {seed:#x}: op {k}: {e:?}"),
            }
            return SegmentEnd::Ended(k);
        }
        // The devices still work: COM1's scratch register and line status,
        // the i8042 and ACPI registers, the test recorder on port I/O.
        let res = driver
            .run(&[
                Op::PortWrite {
                    port: 0x3fb,
                    width: 1,
                    value: 0x03,
                },
                Op::PortWrite {
                    port: 0x3ff,
                    width: 1,
                    value: 0x5a,
                },
                Op::PortRead {
                    port: 0x3ff,
                    width: 1,
                },
                Op::PortRead {
                    port: 0x3fd,
                    width: 1,
                },
                Op::PortRead {
                    port: 0x64,
                    width: 1,
                },
                Op::PortRead {
                    port: 0x600,
                    width: 1,
                },
                Op::PortWrite {
                    port: TEST_PORT,
                    width: 4,
                    value: 0x600d_0001,
                },
                Op::PortRead {
                    port: TEST_PORT,
                    width: 4,
                },
            ])
            .expect("the runner still answers");
        assert_eq!(res[2].value, 0x5a, "COM1 scratch register");
        assert_ne!(res[3].value & 0x20, 0, "COM1 transmitter not empty");
        assert_eq!((res[4].value, res[5].value), (0, 0));
        assert_eq!(res[7].value, 0x1234_5678, "test recorder read");
        final_checks(&mut driver);
        SegmentEnd::Done
    });
    assert_no_panics(panics, seed);
    assert_eq!(vm.machine.fatal_errors().first(), None, "seed {seed:#x}");
    assert_ram_unchanged(&vm, &before, seed);
    match outcome {
        SegmentEnd::Ended(k) => {
            assert_eq!(
                reason,
                StopReason::Guest(ends_vm(&ops[k]).unwrap()),
                "seed {seed:#x}: op {k} {:?}",
                ops[k]
            );
        }
        SegmentEnd::Done => {
            assert_eq!(reason, StopReason::Guest(ExitRequest::PowerOff));
            assert_final_write(&vm);
            assert_eq!(
                vm.pio.writes().last(),
                Some(&(u64::from(TEST_PORT), 0x600d_0001))
            );
        }
    }
    outcome
}

#[test]
fn random_port_writes_to_every_device_leave_the_vm_running() {
    let _one = serialise();
    let panics = watch_panics();
    let seed = seed("port abuse", 0x706f_7274_0000_0001);
    let n = accesses(40_000) / 4;
    let mut rng = Rng::new(seed);
    let ops = Arc::new(port_abuse(&mut rng, n));
    let sink = CountingSink::default();
    let mut start = 0;
    let mut restarts = 0;
    while let SegmentEnd::Ended(k) = port_segment(&ops, start, seed, &sink, panics) {
        restarts += 1;
        start = k + 1;
    }
    let bytes = sink.0.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "port abuse: {n} accesses, {restarts} legitimate resets/power-offs (each a new VM), {bytes} bytes sent to COM1"
    );
    assert!(bytes > 0, "the abuse never reached COM1's transmitter");
}

// ---------------------------------------------------------------------------
// virtio-mem queue abuse.

/// How a malformed request is put in the queue (the request itself is a
/// valid PLUG of `PROBE_BLOCKS` blocks, so a device that acted on it would
/// plug memory).
#[derive(Debug, Clone, Copy)]
enum Malformed {
    Loop,
    SelfLoop,
    NextOutside,
    HeadOutside,
    RequestInMmio,
    RequestUnplugged,
    RequestOffEndOfRam,
    ShortRequest,
    ShortResponse,
    ResponseReadable,
    ResponseUnplugged,
    ReadableAfterWritable,
    AvailRunsAhead,
    IndirectOutside,
}

const ALL_MALFORMED: [Malformed; 14] = [
    Malformed::Loop,
    Malformed::SelfLoop,
    Malformed::NextOutside,
    Malformed::HeadOutside,
    Malformed::RequestInMmio,
    Malformed::RequestUnplugged,
    Malformed::RequestOffEndOfRam,
    Malformed::ShortRequest,
    Malformed::ShortResponse,
    Malformed::ResponseReadable,
    Malformed::ResponseUnplugged,
    Malformed::ReadableAfterWritable,
    Malformed::AvailRunsAhead,
    Malformed::IndirectOutside,
];

/// Blocks the malformed PLUG asks for (inside the requested size).
const PROBE_BLOCKS: u16 = 2;
/// Where it asks for them: unplugged blocks 4..6.
const PROBE_ADDR: u64 = HOTPLUG_BASE + 4 * BLOCK;

fn put_malformed(q: &mut Virtq, how: Malformed) {
    q.write(
        q.req(),
        &request_bytes(VIRTIO_MEM_REQ_PLUG, PROBE_ADDR, PROBE_BLOCKS),
    );
    let (req, resp) = (q.req(), q.resp());
    let unplugged = HOTPLUG_BASE + 6 * SLOT_SIZE;
    match how {
        Malformed::Loop => {
            q.set_desc(0, req, 24, F_NEXT, 1);
            q.set_desc(1, resp, 10, F_WRITE | F_NEXT, 0);
        }
        Malformed::SelfLoop => q.set_desc(0, req, 24, F_NEXT, 0),
        Malformed::NextOutside => {
            q.set_desc(0, req, 24, F_NEXT, 1);
            q.set_desc(1, resp, 10, F_WRITE | F_NEXT, 999);
        }
        Malformed::HeadOutside => {
            q.publish(0xbeef, 1);
            return;
        }
        Malformed::RequestInMmio => {
            q.set_desc(0, VIRTIO, 24, F_NEXT, 1);
            q.set_desc(1, resp, 10, F_WRITE, 0);
        }
        Malformed::RequestUnplugged => {
            q.set_desc(0, unplugged, 24, F_NEXT, 1);
            q.set_desc(1, resp, 10, F_WRITE, 0);
        }
        Malformed::RequestOffEndOfRam => {
            q.set_desc(0, RAM_SIZE - 8, 24, F_NEXT, 1);
            q.set_desc(1, resp, 10, F_WRITE, 0);
        }
        Malformed::ShortRequest => {
            q.set_desc(0, req, 16, F_NEXT, 1);
            q.set_desc(1, resp, 10, F_WRITE, 0);
        }
        Malformed::ShortResponse => {
            q.set_desc(0, req, 24, F_NEXT, 1);
            q.set_desc(1, resp, 4, F_WRITE, 0);
        }
        Malformed::ResponseReadable => {
            q.set_desc(0, req, 24, F_NEXT, 1);
            q.set_desc(1, resp, 10, 0, 0);
        }
        Malformed::ResponseUnplugged => {
            q.set_desc(0, req, 24, F_NEXT, 1);
            q.set_desc(1, unplugged, 10, F_WRITE, 0);
        }
        Malformed::ReadableAfterWritable => {
            q.set_desc(0, req, 12, F_NEXT, 1);
            q.set_desc(1, resp, 10, F_WRITE | F_NEXT, 2);
            q.set_desc(2, req + 12, 12, 0, 0);
        }
        Malformed::AvailRunsAhead => {
            q.set_desc(0, req, 24, F_NEXT, 1);
            q.set_desc(1, resp, 10, F_WRITE, 0);
            q.publish(0, 1000);
            return;
        }
        Malformed::IndirectOutside => q.set_desc(0, unplugged, 64, F_INDIRECT, 0),
    }
    q.publish(0, 1);
}

/// A request the device answers (it is well-formed) and the answer.
struct Answered {
    what: &'static str,
    kind: u16,
    addr: u64,
    nb_blocks: u16,
    answer: (u16, u16),
}

const ACK: u16 = 0;
const NACK: u16 = 1;
const ERROR: u16 = 3;

/// Requests for blocks outside the region or the requested size, unaligned,
/// empty or huge, of unknown type: answered ERROR or NACK, nothing plugged.
/// The requested size is 8 blocks, nothing is plugged.
fn refused_requests() -> Vec<Answered> {
    let a = |what, kind, addr, nb_blocks, answer| Answered {
        what,
        kind,
        addr,
        nb_blocks,
        answer,
    };
    vec![
        a(
            "state of an unplugged block",
            VIRTIO_MEM_REQ_STATE,
            HOTPLUG_BASE,
            1,
            (ACK, 1),
        ),
        a(
            "plug below the region",
            VIRTIO_MEM_REQ_PLUG,
            HOTPLUG_BASE - BLOCK,
            1,
            (ERROR, 0),
        ),
        a(
            "plug past the usable region",
            VIRTIO_MEM_REQ_PLUG,
            HOTPLUG_BASE + HOTPLUG_SIZE,
            1,
            (ERROR, 0),
        ),
        a(
            "plug unaligned",
            VIRTIO_MEM_REQ_PLUG,
            HOTPLUG_BASE + 4096,
            1,
            (ERROR, 0),
        ),
        a(
            "plug no blocks",
            VIRTIO_MEM_REQ_PLUG,
            HOTPLUG_BASE,
            0,
            (ERROR, 0),
        ),
        a(
            "plug 65535 blocks",
            VIRTIO_MEM_REQ_PLUG,
            HOTPLUG_BASE,
            u16::MAX,
            (ERROR, 0),
        ),
        a(
            "plug at the top of the address space",
            VIRTIO_MEM_REQ_PLUG,
            u64::MAX - BLOCK + 1,
            1,
            (ERROR, 0),
        ),
        a(
            "plug more than requested",
            VIRTIO_MEM_REQ_PLUG,
            HOTPLUG_BASE,
            9,
            (NACK, 0),
        ),
        a(
            "unplug unplugged blocks",
            VIRTIO_MEM_REQ_UNPLUG,
            HOTPLUG_BASE,
            1,
            (ERROR, 0),
        ),
        a("unknown request type", 0x7777, HOTPLUG_BASE, 1, (ERROR, 0)),
    ]
}

/// The resident memory (`Rss:` of `/proc/self/smaps`, KiB) of the mapping
/// that holds `addr`, and its permissions. The kernel's shared zero page,
/// which reads of never-written anonymous memory map, is not counted.
fn mapping_rss_kib(addr: u64) -> (u64, String) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = None;
    for line in smaps.lines() {
        let head = line.split_whitespace().next().unwrap_or_default();
        if let Some((a, b)) = head.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            let perms = line.split_whitespace().nth(1).unwrap_or_default();
            inside = (a <= addr && addr < b).then(|| perms.to_string());
        } else if let (Some(perms), Some(kib)) = (&inside, line.strip_prefix("Rss:")) {
            let kib = kib.trim().trim_end_matches("kB").trim().parse().unwrap();
            return (kib, perms.clone());
        }
    }
    panic!("no mapping holds {addr:#x}");
}

#[test]
fn a_guest_write_to_an_unplugged_block_gets_no_host_memory() {
    let _one = serialise();
    let panics = watch_panics();
    let (mut vm, view) = hotplug_vm(runner());
    start_user(&vm);
    let view = Arc::new(view);
    let v = Arc::clone(&view);
    // Block 2 of the first slot: the slot is mapped (blocks 0 and 1 are
    // plugged), block 2 is not plugged.
    let target = HOTPLUG_BASE + 2 * BLOCK + 0x40;
    let (reason, (read, wrote)) = run_driven(&mut vm, move |mut driver| {
        let mut q = Virtq::new(&v, SCRATCH);
        plug_properly(&mut driver, &v, &mut q);
        let read = driver
            .one(r(target, 8))
            .expect("the read of the unplugged block")
            .value;
        // The write either stops the VM (KVM_RUN fails with EFAULT: the
        // page is read-only to KVM) or goes nowhere (this machine's KVM
        // emulates the access and, unable to write the page, treats it as
        // MMIO to an unassigned address).
        let wrote = driver.one(w(target, 8, 0x5eed_5eed_5eed_5eed)).is_ok();
        (read, wrote)
    });
    let fatal = vm.machine.fatal_errors().first();
    println!("read {read:#x}; write answered: {wrote}; stop: {reason:?}; fatal: {fatal:?}");
    assert_eq!(read, 0, "an unplugged block reads as zeros");
    if !wrote {
        let msg = fatal.expect("the runner stopped answering, so a vCPU failed");
        assert!(
            msg.contains("KVM_RUN failed") && msg.contains("Bad address"),
            "{msg}"
        );
        assert!(
            msg.contains("unplugged"),
            "the error names the likely cause: {msg}"
        );
    }
    // Host side: the block holds no memory and the value did not land.
    let (_, host, _) = view.hp.manager.mapped_host_ranges()[0];
    let host_target = host + (target - HOTPLUG_BASE);
    let (rss_kib, perms) = mapping_rss_kib(host_target);
    assert_eq!(rss_kib, 0, "the unplugged blocks hold host memory");
    assert!(
        perms.starts_with("r-"),
        "unplugged blocks are read-only: {perms}"
    );
    let (_, plugged_perms) = mapping_rss_kib(host);
    assert!(
        plugged_perms.starts_with("rw"),
        "plugged blocks are writable: {plugged_perms}"
    );
    let g = rcu::read_lock();
    let got: u64 = view
        .memory
        .read(&g)
        .memory()
        .read_obj(GuestAddress(target))
        .unwrap();
    drop(g);
    assert_eq!(got, 0, "the guest's write reached the unplugged block");
    assert_no_panics(panics, 0);
}

#[test]
fn malformed_virtio_mem_requests_break_the_device_and_plug_nothing() {
    let _one = serialise();
    let panics = watch_panics();
    let seed = seed("virtio-mem queue abuse", 0);
    let (mut vm, view) = hotplug_vm(runner());
    start_user(&vm);
    let before = snapshot(&vm);
    let view = Arc::new(view);
    let v = Arc::clone(&view);
    let (reason, ()) = run_driven(&mut vm, move |mut driver| {
        let mut q = Virtq::new(&v, SCRATCH);
        v.hp.vmem.set_requested_size(8 * BLOCK).unwrap();
        handshake(&mut driver, &mut q);

        // Well-formed requests the device must refuse with an answer.
        for case in refused_requests() {
            let before = q.used_idx();
            q.request(case.kind, case.addr, case.nb_blocks);
            let (answered, status) = notify_and_wait_used(&mut driver, &q, before);
            assert!(answered, "{}: not answered (status {status:#x})", case.what);
            assert_eq!(status, DRIVER_OK_STATUS, "{}: the device broke", case.what);
            assert_eq!(q.response(), case.answer, "{}", case.what);
            assert_eq!(v.plugged(), 0, "{}", case.what);
            assert_eq!(v.mapped_slots(), 0, "{}", case.what);
        }

        // Plug two blocks properly, then the overlapping and mixed cases.
        let before = q.used_idx();
        q.request(VIRTIO_MEM_REQ_PLUG, HOTPLUG_BASE, 2);
        assert!(notify_and_wait_used(&mut driver, &q, before).0);
        assert_eq!(q.response(), (ACK, 0));
        assert_eq!((v.plugged(), v.mapped_slots()), (2 * BLOCK, 1));
        for (what, kind, addr, nb, answer) in [
            (
                "plug overlapping plugged blocks",
                VIRTIO_MEM_REQ_PLUG,
                HOTPLUG_BASE + BLOCK,
                2,
                (ERROR, 0),
            ),
            (
                "unplug a partly plugged range",
                VIRTIO_MEM_REQ_UNPLUG,
                HOTPLUG_BASE + BLOCK,
                2,
                (ERROR, 0),
            ),
            (
                "state of a mixed range",
                VIRTIO_MEM_REQ_STATE,
                HOTPLUG_BASE + BLOCK,
                2,
                (ACK, 2),
            ),
        ] {
            let before = q.used_idx();
            q.request(kind, addr, nb);
            assert!(notify_and_wait_used(&mut driver, &q, before).0, "{what}");
            assert_eq!(q.response(), answer, "{what}");
            assert_eq!(v.plugged(), 2 * BLOCK, "{what}");
        }

        // Malformed chains: DEVICE_NEEDS_RESET, a configuration interrupt,
        // nothing completed, nothing plugged; a reset makes it work again.
        for how in ALL_MALFORMED {
            let used_before = q.used_idx();
            let broken_before = v.transport().stats().broken;
            put_malformed(&mut q, how);
            let (broken, isr) = notify_and_wait_broken(&mut driver);
            assert!(broken, "{how:?}: DEVICE_NEEDS_RESET not set");
            assert_ne!(isr & 2, 0, "{how:?}: no configuration-change interrupt");
            assert_eq!(q.used_idx(), used_before, "{how:?}: a chain was completed");
            assert_eq!(v.plugged(), 2 * BLOCK, "{how:?}: the plugged size changed");
            assert_eq!(v.mapped_slots(), 1, "{how:?}");
            assert_eq!(v.transport().stats().broken, broken_before + 1);
            // More notifications change nothing while it needs a reset.
            let res = driver.run(&[w32(QUEUE_NOTIFY, 0), r32(STATUS)]).unwrap();
            assert_ne!(res[1].value as u32 & NEEDS_RESET, 0);
            handshake(&mut driver, &mut q);
            let before = q.used_idx();
            q.request(VIRTIO_MEM_REQ_STATE, HOTPLUG_BASE, 2);
            assert!(
                notify_and_wait_used(&mut driver, &q, before).0,
                "{how:?}: no recovery"
            );
            assert_eq!(
                q.response(),
                (ACK, 0),
                "{how:?}: plugged blocks survive a reset"
            );
        }

        // Bad queue set-ups: rings outside guest memory, misaligned, a size
        // that is not a power of two. Each breaks the device when notified.
        for (what, num, desc) in [
            (
                "rings in unplugged memory",
                16,
                HOTPLUG_BASE + 7 * SLOT_SIZE,
            ),
            ("misaligned descriptor table", 16, SCRATCH + 0x3008),
            ("queue size 3", 3, SCRATCH + 0x3000),
        ] {
            q.clear();
            let res = driver
                .run(&handshake_ops(num, desc, q.avail(), q.used()))
                .unwrap();
            assert_eq!(
                res.last().unwrap().value,
                u64::from(DRIVER_OK_STATUS),
                "{what}"
            );
            let (broken, _) = notify_and_wait_broken(&mut driver);
            assert!(broken, "{what}: DEVICE_NEEDS_RESET not set");
            assert_eq!(v.plugged(), 2 * BLOCK, "{what}");
        }

        // Rings in plugged memory, and a request on them that unplugs that
        // very memory: the device finishes the request on the map it
        // started with, the slot goes away, and the next notification finds
        // the rings gone and breaks the device.
        let mut hq = Virtq::new(&v, HOTPLUG_BASE + 0x10_0000);
        handshake(&mut driver, &mut hq);
        hq.write(
            hq.req(),
            &request_bytes(VIRTIO_MEM_REQ_UNPLUG, HOTPLUG_BASE, 2),
        );
        hq.set_desc(0, hq.req(), 24, F_NEXT, 1);
        hq.set_desc(1, q.resp(), 10, F_WRITE, 0);
        hq.publish(0, 1);
        driver.one(w32(QUEUE_NOTIFY, 0)).unwrap();
        assert!(
            poll(&mut driver, VIRTIO + INTERRUPT_STATUS, 1, 1, 10_000),
            "the unplug on rings in plugged memory was not completed"
        );
        assert_eq!(q.response(), (ACK, 0), "unplug answer");
        assert_eq!(
            (v.plugged(), v.mapped_slots()),
            (0, 0),
            "the slot was not unplugged"
        );
        let gone = driver.one(r(HOTPLUG_BASE + 0x10_0000, 8)).unwrap().value;
        assert_eq!(gone, u64::MAX, "unplugged memory still reads as RAM");
        let (broken, _) = notify_and_wait_broken(&mut driver);
        assert!(broken, "rings in unplugged memory did not break the device");

        identity_checks(&mut driver);
        let mut q = Virtq::new(&v, SCRATCH + 0x8000);
        plug_properly(&mut driver, &v, &mut q);
        // And UNPLUG_ALL takes it all back.
        let before = q.used_idx();
        q.request(VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0);
        assert!(notify_and_wait_used(&mut driver, &q, before).0);
        assert_eq!(q.response(), (ACK, 0));
        assert_eq!((v.plugged(), v.mapped_slots()), (0, 0));
        final_checks(&mut driver);
    });
    assert_eq!(reason, StopReason::Guest(ExitRequest::PowerOff));
    assert_no_panics(panics, seed);
    assert_eq!(vm.machine.fatal_errors().first(), None);
    assert_final_write(&vm);
    assert_ram_unchanged(&vm, &before, seed);
    let stats = view.hp.vmem.stats();
    eprintln!(
        "queue abuse: virtio-mem {stats:?}; virtio-mmio {:?}",
        view.transport().stats()
    );
    // Every malformed chain counts, except the available index running
    // ahead: that is a broken ring, not a broken chain.
    assert_eq!(stats.malformed, ALL_MALFORMED.len() as u64 - 1, "{stats:?}");
    rcu::drain_call_rcu();
    let hp_stats = view.hp.manager.stats();
    assert_eq!(
        hp_stats
            .slots_mapped
            .load(std::sync::atomic::Ordering::Relaxed),
        hp_stats
            .slots_unmapped
            .load(std::sync::atomic::Ordering::Relaxed),
        "every slot mapping was released"
    );
}

// ---------------------------------------------------------------------------
// The panic check itself.

/// A device that panics when written: stands for a VMM bug a guest hits.
struct PanicsOnWrite;

impl devices::BusDevice for PanicsOnWrite {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _base: u64, _offset: u64, _data: &[u8]) {
        panic!("test device: deliberate panic on a guest write");
    }
}

/// The tests above rely on noticing a panic on a vCPU thread, which would
/// otherwise end that thread quietly while the VM goes on without it. Both
/// ways must see one: the panic watch records it, and the VMM stops the VM
/// with a fatal error naming it. Under the vCPU seccomp filter, as the other
/// tests run.
#[test]
fn a_panic_on_a_vcpu_thread_is_noticed() {
    let _one = serialise();
    let panics = watch_panics();
    let mut vm = BareVm::new(2, RAM_SIZE, runner(), 0);
    let bug = 0xd800_2000;
    vm.machine
        .devices
        .add_mmio(BusRange::new(bug, 0x1000).unwrap(), Arc::new(PanicsOnWrite))
        .unwrap();
    start_runner(&vm, Privilege::User, true);
    let (reason, result) = run_driven(&mut vm, move |mut driver| {
        driver.timeout = Duration::from_secs(30);
        driver.one(w(bug, 4, 1))
    });
    let StopReason::Fatal(msg) = &reason else {
        panic!("a vCPU panic did not stop the VM: {reason:?}");
    };
    assert!(
        msg.contains("vCPU 0") && msg.contains("deliberate panic"),
        "{msg}"
    );
    assert!(
        matches!(result, Err(DriverError::VmEnded { progress: 0 })),
        "{result:?}"
    );
    let new = tests::panic_watch::panics().split_off(panics);
    assert_eq!(new.len(), 1, "{new:#?}");
    assert!(
        new[0].starts_with("thread 'vcpu0'") && new[0].contains("deliberate panic"),
        "{new:#?}"
    );
}
