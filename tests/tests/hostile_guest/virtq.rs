//! A virtqueue in guest RAM that the test fills as a driver would
//! (`devices::test_utils::TestQueue` over the VM's published memory), and
//! the guest-side steps around it: the handshake, notifying and waiting for
//! an answer or a broken device, a proper PLUG.

use std::sync::Arc;
use std::time::Duration;

use devices::test_utils::{QueueMemory, TestQueue};
use devices::virtio::mem_request::VIRTIO_MEM_REQ_PLUG;
use tests::guest_driver::{GuestDriver, Op};
use tests::virtio_ops::{
    DRIVER_OK_STATUS, NEEDS_RESET, QUEUE_NOTIFY, STATUS, VIRTIO, handshake_ops, r32, w32,
};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INTERRUPT_STATUS;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::GuestMemoryMmap;
use vmm::test_utils::SharedGuestMap;

use crate::harness::{BLOCK, HOTPLUG_BASE, HotplugView, r, w};

pub(crate) const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub(crate) const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
pub(crate) const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
pub(crate) const QSIZE: u16 = 16;

/// The VMM's published guest memory, as a [`TestQueue`] reaches it: each
/// access in its own RCU read section, as a device would.
pub(crate) struct Published(SharedGuestMap);

impl QueueMemory for Published {
    type Memory = GuestMemoryMmap;

    fn access<R>(&self, f: impl FnOnce(&GuestMemoryMmap) -> R) -> R {
        let g = rcu::read_lock();
        f(self.0.read(&g).memory())
    }
}

/// A [`TestQueue`] of [`QSIZE`] entries at `base`, with room for one
/// request at `base + 0x400` and its response at `base + 0x500`.
pub(crate) struct Virtq {
    q: TestQueue<Published>,
    base: u64,
}

impl Virtq {
    pub(crate) fn new(view: &HotplugView, base: u64) -> Self {
        Self {
            q: TestQueue::new(Published(Arc::clone(&view.memory)), base, QSIZE),
            base,
        }
    }
    pub(crate) fn desc(&self) -> u64 {
        self.q.desc_addr()
    }
    pub(crate) fn avail(&self) -> u64 {
        self.q.avail_addr()
    }
    pub(crate) fn used(&self) -> u64 {
        self.q.used_addr()
    }
    pub(crate) fn req(&self) -> u64 {
        self.base + 0x400
    }
    pub(crate) fn resp(&self) -> u64 {
        self.base + 0x500
    }
    pub(crate) fn write(&self, addr: u64, bytes: &[u8]) {
        self.q.write_slice(addr, bytes);
    }
    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        self.q.read_vec(addr, len)
    }
    /// Zeroes the rings, the request and the response, and forgets the
    /// indices (after a device reset).
    pub(crate) fn clear(&mut self) {
        self.q.reset();
        self.write(self.req(), &[0; 0x200]);
    }
    pub(crate) fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.q.store(i, addr, len, flags, next);
    }
    /// Makes `head` available and moves the index by `bump`.
    pub(crate) fn publish(&mut self, head: u16, bump: u16) {
        self.q.publish_bumped(head, bump);
    }
    pub(crate) fn used_idx(&self) -> u16 {
        self.q.used_idx()
    }
    /// The standard request: 24 readable bytes, 10 writable bytes.
    pub(crate) fn request(&mut self, kind: u16, addr: u64, nb_blocks: u16) {
        self.write(self.req(), &request_bytes(kind, addr, nb_blocks));
        self.write(self.resp(), &[0xee; 16]);
        self.set_desc(0, self.req(), 24, F_NEXT, 1);
        self.set_desc(1, self.resp(), 10, F_WRITE, 0);
        self.publish(0, 1);
    }
    /// The response as `(type, state)`.
    pub(crate) fn response(&self) -> (u16, u16) {
        let b = self.read(self.resp(), 10);
        (
            u16::from_le_bytes([b[0], b[1]]),
            u16::from_le_bytes([b[8], b[9]]),
        )
    }
}

pub(crate) fn request_bytes(kind: u16, addr: u64, nb_blocks: u16) -> [u8; 24] {
    let mut req = [0u8; 24];
    req[0..2].copy_from_slice(&kind.to_le_bytes());
    req[8..16].copy_from_slice(&addr.to_le_bytes());
    req[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
    req
}

pub(crate) fn handshake(driver: &mut GuestDriver, q: &mut Virtq) {
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
pub(crate) const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// Has the guest poll `addr` until `value & mask == expect`, in rounds of
/// `limit` reads, for at most [`ANSWER_WITHIN`]; returns whether it matched.
pub(crate) fn poll(
    driver: &mut GuestDriver,
    addr: u64,
    mask: u32,
    expect: u32,
    limit: u32,
) -> bool {
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
pub(crate) fn notify_and_wait_used(
    driver: &mut GuestDriver,
    q: &Virtq,
    before: u16,
) -> (bool, u32) {
    driver.one(w32(QUEUE_NOTIFY, 0)).unwrap();
    let expect = u32::from(before.wrapping_add(1)) << 16;
    let answered = poll(driver, q.used(), 0xffff_0000, expect, 1 << 22);
    (answered, driver.one(r32(STATUS)).unwrap().value as u32)
}

/// Notifies the queue and waits for DEVICE_NEEDS_RESET; returns whether it
/// came and the interrupt status read afterwards.
pub(crate) fn notify_and_wait_broken(driver: &mut GuestDriver) -> (bool, u32) {
    driver.one(w32(QUEUE_NOTIFY, 0)).unwrap();
    let broken = poll(driver, VIRTIO + STATUS, NEEDS_RESET, NEEDS_RESET, 10_000);
    (
        broken,
        driver.one(r32(VIRTIO_MMIO_INTERRUPT_STATUS)).unwrap().value as u32,
    )
}

/// Proper driver after the abuse: reset, handshake, PLUG two blocks at the
/// start of the region; the memory gets mapped and the guest can use it.
pub(crate) fn plug_properly(driver: &mut GuestDriver, view: &HotplugView, q: &mut Virtq) {
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
