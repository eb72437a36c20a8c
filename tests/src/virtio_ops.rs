//! Guest accesses ([`Op`]s for the `guest_driver` runner) that drive the
//! virtio-mem device of a bare VM (`BareVm::with_hotplug`) through its
//! virtio-mmio registers: a driver's handshake, and a queue whose rings lie
//! outside guest memory, which breaks the device on the first notification.

use crate::bare_vm::{BareVm, TEST_MMIO};
use crate::guest_driver::{GuestDriver, Op, OpResult, Privilege, runner, start_runner};
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_STATUS,
};
use vmm::test_utils::Hotplug;
use vmm::test_utils::SLOT_SIZE;

/// Where the virtio-mmio window of the hot-plug device is in a bare VM.
pub const VIRTIO: u64 = 0xd000_1000;
/// `QueueNotify`.
pub const QUEUE_NOTIFY: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// `Status`.
pub const STATUS: u64 = VIRTIO_MMIO_STATUS as u64;
/// The `DEVICE_NEEDS_RESET` status bit.
pub const NEEDS_RESET: u32 = 0x40;
/// ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK.
pub const DRIVER_OK_STATUS: u32 = 0xf;
/// Rings here are outside a bare VM's RAM and outside every device window.
pub const OUTSIDE_RAM: u64 = 0xe000_0000;

/// A 32-bit write to register `offset` of the window.
pub fn w32(offset: impl Into<u64>, value: u32) -> Op {
    Op::Write {
        addr: VIRTIO + offset.into(),
        width: 4,
        value: value.into(),
    }
}

/// A 32-bit read of register `offset` of the window.
pub fn r32(offset: impl Into<u64>) -> Op {
    Op::Read {
        addr: VIRTIO + offset.into(),
        width: 4,
    }
}

/// The guest side of Linux's probe: reset, features VERSION_1 and
/// UNPLUGGED_INACCESSIBLE, queue 0 with `num` entries at the given rings,
/// DRIVER_OK, and a read of the status (the last result).
pub fn handshake_ops(num: u32, desc: u64, avail: u64, used: u64) -> Vec<Op> {
    let mut ops = vec![
        w32(STATUS, 0),
        w32(STATUS, 1),
        w32(STATUS, 3),
        w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1),
        w32(VIRTIO_MMIO_DRIVER_FEATURES, 1),
        w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0),
        w32(VIRTIO_MMIO_DRIVER_FEATURES, 1 << 1),
        w32(STATUS, 0xb),
        w32(VIRTIO_MMIO_QUEUE_SEL, 0),
        w32(VIRTIO_MMIO_QUEUE_NUM, num),
    ];
    for (reg, addr) in [
        (VIRTIO_MMIO_QUEUE_DESC_LOW, desc),
        (VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail),
        (VIRTIO_MMIO_QUEUE_USED_LOW, used),
    ] {
        ops.push(w32(reg, addr as u32));
        ops.push(w32(reg + 4, (addr >> 32) as u32));
    }
    ops.extend([
        w32(VIRTIO_MMIO_QUEUE_READY, 1),
        w32(STATUS, DRIVER_OK_STATUS),
        r32(STATUS),
    ]);
    ops
}

/// A handshake that reaches DRIVER_OK with the rings at [`OUTSIDE_RAM`]:
/// the first notification breaks the device.
pub fn broken_queue_handshake() -> Vec<Op> {
    handshake_ops(16, OUTSIDE_RAM, OUTSIDE_RAM + 0x1000, OUTSIDE_RAM + 0x2000)
}

/// Notifies queue 0, then has the guest read the status until
/// `DEVICE_NEEDS_RESET` shows (at most `limit` reads; the last result says
/// whether it did).
pub fn notify_and_poll_broken(limit: u32) -> [Op; 2] {
    [
        w32(QUEUE_NOTIFY, 0),
        Op::Poll {
            addr: VIRTIO + STATUS,
            mask: NEEDS_RESET,
            expect: NEEDS_RESET,
            limit,
        },
    ]
}

/// Runs `ops`, panicking with what was being done if the guest did not finish.
pub fn run(driver: &mut GuestDriver, what: &str, ops: &[Op]) -> Vec<OpResult> {
    driver
        .run(ops)
        .unwrap_or_else(|e| panic!("{what}: the guest did not finish: {e:?}"))
}

/// Breaks the device with a fresh handshake (rings outside RAM) and a
/// notification, then polls until the guest sees `DEVICE_NEEDS_RESET`,
/// for at most `within`. `round` labels the panics.
pub fn break_device(driver: &mut GuestDriver, round: u64, within: Duration) {
    let mut ops = broken_queue_handshake();
    let status_at = ops.len() - 1;
    ops.extend(notify_and_poll_broken(1 << 16));
    let res = run(driver, "break", &ops);
    assert_eq!(
        res[status_at].value,
        u64::from(DRIVER_OK_STATUS),
        "round {round}: the handshake did not reach DRIVER_OK"
    );
    let end = Instant::now() + within;
    let mut broken = res.last().is_some_and(|r| r.matched);
    while !broken && Instant::now() < end {
        broken = run(driver, "poll", &notify_and_poll_broken(1 << 16)[1..])[0].matched;
    }
    assert!(broken, "round {round}: DEVICE_NEEDS_RESET not set");
}

/// A bare VM (2 vCPUs, 64 MiB of RAM, a virtio-mem device over 8 hot-plug
/// slots) running the `guest_driver` runner at CPL3 on vCPU 0, with a
/// heartbeat on vCPU 1; returns it and its virtio-mem device, whose
/// virtio-mmio window is checked to be at [`VIRTIO`].
pub fn runner_vm_with_virtio_mem() -> (BareVm, Arc<Hotplug>) {
    let vm = BareVm::with_hotplug(2, 64 << 20, 8 * SLOT_SIZE, runner(), 0);
    let hp = Arc::clone(vm.machine.hotplug.first().expect("hot-plug device"));
    assert_eq!(hp.mmio_base, VIRTIO, "the virtio-mmio window moved");
    start_runner(&vm, Privilege::User, true);
    (vm, hp)
}

/// The driver's first batch: one read of [`TEST_MMIO`], which the runner
/// answers once the VM runs. The VMM has installed its panic hook by then,
/// so this puts `panic_watch`'s in front of it.
pub fn first_read_then_watch_panics(driver: &mut GuestDriver) {
    run(
        driver,
        "first read",
        &[Op::Read {
            addr: TEST_MMIO,
            width: 8,
        }],
    );
    crate::panic_watch::install();
}
