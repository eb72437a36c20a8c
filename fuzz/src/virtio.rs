//! The virtio-mem fixture both virtio-mem targets use: a small guest memory
//! with a hole, a [`VirtioMem`] behind a [`VirtioMmio`] transport, a
//! [`CheckedBackend`] that panics when the `MemoryBackend` contract is broken,
//! and a driver that talks to the transport through its registers as Linux
//! does, with its queue a [`TestQueue`] (both from `devices::test_utils`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use devices::test_utils::{CheckedBackend, OnViolation, TestQueue};
use devices::virtio::mmio::QueueOutcome;
use devices::virtio::{VirtioMem, VirtioMemConfig, VirtioMmio};
use devices::{BusDevice, Interrupt, InterruptError};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// The guest RAM: two 64 KiB regions with a 64 KiB hole between them, so
/// buffers can run off the end of memory and across a hole.
pub const RAM: [(u64, usize); 2] = [(0, 0x1_0000), (0x2_0000, 0x1_0000)];
/// The virtio-mem region: 1 GiB at 4 GiB, as the VMM places it.
pub const REGION_ADDR: u64 = 1 << 32;
/// Size of the region.
pub const REGION_SIZE: u64 = 1 << 30;
/// Block size (the device default).
pub const BLOCK: u64 = 2 << 20;
/// Blocks in the region.
pub const BLOCKS: u64 = REGION_SIZE / BLOCK;
/// Where the driver puts its queue (descriptor table, then the rings).
pub const QUEUE_BASE: u64 = 0x1000;
/// The queue size the driver picks.
pub const QUEUE_SIZE: u16 = 16;

/// Status bits.
pub const S_ACK: u32 = 1;
/// Status bits.
pub const S_DRIVER: u32 = 2;
/// Status bits.
pub const S_DRIVER_OK: u32 = 4;
/// Status bits.
pub const S_FEATURES_OK: u32 = 8;
/// Status bits.
pub const S_NEEDS_RESET: u32 = 0x40;

/// An interrupt line that counts.
#[derive(Debug, Default)]
pub struct CountingIrq(AtomicU64);

impl Interrupt for CountingIrq {
    fn trigger(&self) -> Result<(), InterruptError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Guest memory, device, transport and backend.
#[derive(Debug)]
pub struct Fixture {
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// The device.
    pub vmem: Arc<VirtioMem>,
    /// Its transport.
    pub mmio: VirtioMmio,
    /// The backend.
    pub backend: Arc<CheckedBackend>,
}

impl Fixture {
    /// A fresh device with `requested` bytes requested.
    pub fn new(requested: u64) -> Fixture {
        let backend = Arc::new(
            CheckedBackend::new(BLOCK)
                .with_region(REGION_ADDR, REGION_SIZE)
                .on_violation(OnViolation::Panic),
        );
        let config = VirtioMemConfig {
            requested_size: requested,
            ..VirtioMemConfig::new(REGION_ADDR, REGION_SIZE)
        };
        let vmem = Arc::new(VirtioMem::new(config, backend.clone()).unwrap());
        let mmio = VirtioMmio::new(vmem.clone(), Arc::new(CountingIrq::default())).unwrap();
        let ranges: Vec<(GuestAddress, usize)> =
            RAM.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
        Fixture {
            mem: GuestMemoryMmap::from_ranges(&ranges).unwrap(),
            vmem,
            mmio,
            backend,
        }
    }

    /// Reads a 32-bit register.
    pub fn read32(&self, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        self.mmio.read(0, offset.into(), &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a 32-bit register.
    pub fn write32(&self, offset: u32, value: u32) {
        self.mmio.write(0, offset.into(), &value.to_le_bytes());
    }

    /// The device status as the driver reads it.
    pub fn status(&self) -> u32 {
        self.read32(VIRTIO_MMIO_STATUS)
    }

    /// Linux's probe: reset, negotiate VERSION_1 and UNPLUGGED_INACCESSIBLE,
    /// set up queue 0 at [`QUEUE_BASE`] with [`QUEUE_SIZE`] entries (rings
    /// zeroed), DRIVER_OK. Panics if the device refuses.
    pub fn handshake(&self) {
        self.write32(VIRTIO_MMIO_STATUS, 0);
        self.write32(VIRTIO_MMIO_STATUS, S_ACK);
        self.write32(VIRTIO_MMIO_STATUS, S_ACK | S_DRIVER);
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES, 1);
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES, 1 << 1);
        self.write32(VIRTIO_MMIO_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        assert_eq!(self.status(), S_ACK | S_DRIVER | S_FEATURES_OK);
        self.queue().reset();
        self.write32(VIRTIO_MMIO_QUEUE_SEL, 0);
        self.write32(VIRTIO_MMIO_QUEUE_NUM, QUEUE_SIZE.into());
        for (low, addr) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, QUEUE_BASE),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail_addr()),
            (VIRTIO_MMIO_QUEUE_USED_LOW, used_addr()),
        ] {
            self.write32(low, addr as u32);
            self.write32(low + 4, (addr >> 32) as u32);
        }
        self.write32(VIRTIO_MMIO_QUEUE_READY, 1);
        self.write32(
            VIRTIO_MMIO_STATUS,
            S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        assert_eq!(
            self.status(),
            S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
        );
    }

    /// The driver's queue: [`QUEUE_SIZE`] entries at [`QUEUE_BASE`]; the
    /// available index is read from memory on each use, so a fresh value
    /// sees what the input wrote there.
    pub fn queue(&self) -> TestQueue<&GuestMemoryMmap> {
        TestQueue::new(&self.mem, QUEUE_BASE, QUEUE_SIZE)
    }

    /// Writes descriptor `index % QUEUE_SIZE`.
    pub fn store_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.queue()
            .store(index % QUEUE_SIZE, addr, len, flags, next);
    }

    /// The available ring's index.
    pub fn avail_idx(&self) -> u16 {
        self.queue().avail_idx()
    }

    /// Puts `head` in the available ring and bumps its index by `bump`.
    pub fn publish(&self, head: u16, bump: u16) {
        self.queue().publish_bumped(head, bump);
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.queue().used_idx()
    }

    /// Used element `i` as `(id, len)`.
    pub fn used(&self, i: u16) -> (u32, u32) {
        self.queue().used(i)
    }

    /// Notifies queue 0 through the register and processes it as the VMM's
    /// control thread does.
    pub fn kick(&self) -> QueueOutcome {
        self.write32(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        if let Some(evt) = self.mmio.queue_notify_event(0) {
            let _ = evt.read();
        }
        self.mmio.process_queue(0, &self.mem).unwrap()
    }

    /// Checks that the device and the backend agree on what is plugged.
    pub fn check_consistent(&self) {
        let from_device: BTreeSet<u64> = self
            .vmem
            .plugged_ranges()
            .into_iter()
            .flat_map(|(gpa, len)| (0..len / BLOCK).map(move |i| gpa + i * BLOCK))
            .collect();
        assert_eq!(
            from_device,
            self.backend.plugged(),
            "device and backend disagree"
        );
        assert_eq!(
            self.vmem.plugged_size(),
            from_device.len() as u64 * BLOCK,
            "plugged size"
        );
        let info = self.vmem.info();
        assert!(info.usable_region_size <= REGION_SIZE);
        assert_eq!(info.usable_region_size % BLOCK, 0);
        assert!(
            from_device
                .iter()
                .all(|&b| b + BLOCK <= REGION_ADDR + info.usable_region_size),
            "a plugged block outside the usable region"
        );
    }
}

/// Where the available ring starts.
pub fn avail_addr() -> u64 {
    TestQueue::new((), QUEUE_BASE, QUEUE_SIZE).avail_addr()
}

/// Where the used ring starts.
pub fn used_addr() -> u64 {
    TestQueue::new((), QUEUE_BASE, QUEUE_SIZE).used_addr()
}
