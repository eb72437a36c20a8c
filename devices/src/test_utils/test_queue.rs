//! [`TestQueue`]: a split virtqueue filled by a test as a driver would.

use std::mem::size_of;

use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_LOW,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::bus::BusDevice;

/// Guest memory a [`TestQueue`] reads and writes.
///
/// Any `&M` with `M: GuestMemory` is one, used as it is. Memory that may
/// only be touched inside a scope (the VMM's RCU-published map, reached
/// inside a read section) implements it by entering the scope in
/// [`access`](QueueMemory::access): each queue operation is one access.
pub trait QueueMemory {
    /// The memory an access sees.
    type Memory: GuestMemory + ?Sized;

    /// Runs `f` on the memory and returns what it returns.
    fn access<R>(&self, f: impl FnOnce(&Self::Memory) -> R) -> R;
}

impl<M: GuestMemory + ?Sized> QueueMemory for &M {
    type Memory = M;

    fn access<R>(&self, f: impl FnOnce(&M) -> R) -> R {
        f(self)
    }
}

/// Bytes of one split-queue descriptor.
const DESC_SIZE: u64 = size_of::<Descriptor>() as u64;

/// The driver side of a split virtqueue of `size` entries whose rings lie
/// back to back from `base`: the descriptor table, the available ring, then
/// the used ring at the next 4-byte boundary (the alignments virtio 1.x
/// asks for when `base` is 16-byte aligned).
///
/// The test writes descriptors (as [`Descriptor`]s, never hand-encoded) and
/// the available ring as a driver would and reads the used ring the device
/// fills. Nothing is checked: a test may write any index, any flags, any
/// available index, to see what the device makes of it. Every access
/// unwraps: the rings must lie in the memory the queue is given.
///
/// The rings are laid out here rather than with `virtio-queue`'s
/// `MockSplitQueue`, whose used ring overlaps the upper half of its available
/// ring (its `AvailRing::end` adds the element count, not the byte size), so
/// more than a few published heads would overwrite the used index.
#[derive(Debug)]
pub struct TestQueue<M> {
    mem: M,
    base: u64,
    size: u16,
    next_desc: u16,
}

impl<M> TestQueue<M> {
    /// A queue of `size` entries at `base` in `mem`. Writes nothing: call
    /// [`reset`](Self::reset) for zeroed rings. The layout methods need no
    /// memory (`TestQueue::new((), base, size).used_addr()` works).
    pub fn new(mem: M, base: u64, size: u16) -> Self {
        TestQueue {
            mem,
            base,
            size,
            next_desc: 0,
        }
    }

    /// The memory the queue lives in.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// The number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Where the descriptor table starts.
    pub fn desc_addr(&self) -> u64 {
        self.base
    }

    /// Where the available ring starts.
    pub fn avail_addr(&self) -> u64 {
        self.base + DESC_SIZE * u64::from(self.size)
    }

    /// Where the used ring starts.
    pub fn used_addr(&self) -> u64 {
        (self.avail_addr() + 6 + 2 * u64::from(self.size)).next_multiple_of(4)
    }

    /// The first byte after the used ring.
    pub fn end_addr(&self) -> u64 {
        self.used_addr() + 6 + 8 * u64::from(self.size)
    }
}

impl<M: QueueMemory> TestQueue<M> {
    /// Zeroes the table and the rings and starts allocating descriptors
    /// from 0 again (a driver after a device reset).
    pub fn reset(&mut self) {
        let zeros = vec![0u8; (self.end_addr() - self.base) as usize];
        self.write_slice(self.base, &zeros);
        self.next_desc = 0;
    }

    /// Configures queue `index` of a virtio-mmio transport through its
    /// registers, as Linux's `vm_setup_vq` does; panics if the queue is
    /// already ready or smaller than this one.
    pub fn setup(&self, dev: &dyn BusDevice, index: u32) {
        let read32 = |offset: u32| {
            let mut b = [0u8; 4];
            dev.read(0, offset.into(), &mut b);
            u32::from_le_bytes(b)
        };
        let write32 = |offset: u32, value: u32| dev.write(0, offset.into(), &value.to_le_bytes());
        write32(VIRTIO_MMIO_QUEUE_SEL, index);
        assert_eq!(read32(VIRTIO_MMIO_QUEUE_READY), 0);
        assert!(read32(VIRTIO_MMIO_QUEUE_NUM_MAX) >= u32::from(self.size));
        write32(VIRTIO_MMIO_QUEUE_NUM, self.size.into());
        for (low, addr) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, self.desc_addr()),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, self.avail_addr()),
            (VIRTIO_MMIO_QUEUE_USED_LOW, self.used_addr()),
        ] {
            write32(low, addr as u32);
            write32(low + 4, (addr >> 32) as u32);
        }
        write32(VIRTIO_MMIO_QUEUE_READY, 1);
    }

    /// Stores `descs` (address, length, device-writable) as a chain at the
    /// next free table slots (wrapping around the table) and makes it
    /// available; returns the head index.
    pub fn push(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        let indices: Vec<u16> = (0..descs.len() as u16)
            .map(|i| (self.next_desc + i) % self.size)
            .collect();
        self.next_desc = (self.next_desc + descs.len() as u16) % self.size;
        for (pos, &(addr, len, write)) in descs.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            let next = indices.get(pos + 1).copied();
            if next.is_some() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.store(indices[pos], addr, len, flags, next.unwrap_or(0));
        }
        self.publish(indices[0]);
        indices[0]
    }

    /// Writes descriptor `index` of the table (not wrapped: an index past
    /// the table writes past it).
    pub fn store(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc_addr() + DESC_SIZE * u64::from(index);
        let desc = Descriptor::new(addr, len, flags, next);
        self.mem
            .access(|m| m.write_obj(desc, GuestAddress(at)))
            .unwrap();
    }

    /// The available ring's index, as it is in memory.
    pub fn avail_idx(&self) -> u16 {
        self.read_obj(self.avail_addr() + 2)
    }

    /// Overwrites the available ring's index.
    pub fn set_avail_idx(&self, idx: u16) {
        self.write_obj(self.avail_addr() + 2, idx);
    }

    /// Puts `head` in the available ring and bumps its index.
    pub fn publish(&self, head: u16) {
        self.publish_bumped(head, 1);
    }

    /// Puts `head` in the available ring at the slot of the current index,
    /// then moves the index by `bump` (more than 1: the index runs ahead of
    /// what was written).
    pub fn publish_bumped(&self, head: u16, bump: u16) {
        let idx = self.avail_idx();
        let slot = self.avail_addr() + 4 + 2 * u64::from(idx % self.size);
        self.write_obj(slot, head);
        self.set_avail_idx(idx.wrapping_add(bump));
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.read_obj(self.used_addr() + 2)
    }

    /// The `(id, len)` of used element `i` (ring position `i % size`).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = self.used_addr() + 4 + 8 * u64::from(i % self.size);
        (self.read_obj(at), self.read_obj(at + 4))
    }

    /// Writes `bytes` at `addr` of the queue's memory (a request, say).
    pub fn write_slice(&self, addr: u64, bytes: &[u8]) {
        self.mem
            .access(|m| m.write_slice(bytes, GuestAddress(addr)))
            .unwrap();
    }

    /// Reads `len` bytes at `addr` of the queue's memory (a response, say).
    pub fn read_vec(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .access(|m| m.read_slice(&mut v, GuestAddress(addr)))
            .unwrap();
        v
    }

    fn read_obj<T: vm_memory::ByteValued>(&self, addr: u64) -> T {
        self.mem.access(|m| m.read_obj(GuestAddress(addr))).unwrap()
    }

    fn write_obj<T: vm_memory::ByteValued>(&self, addr: u64, value: T) {
        self.mem
            .access(|m| m.write_obj(value, GuestAddress(addr)))
            .unwrap();
    }
}
