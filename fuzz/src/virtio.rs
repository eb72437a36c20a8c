//! The virtio-mem fixture both virtio-mem targets use: a small guest memory
//! with a hole, a [`VirtioMem`] behind a [`VirtioMmio`] transport, a backend
//! that checks the [`MemoryBackend`] contract, and a driver that talks to the
//! transport through its registers as Linux does.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use devices::virtio::mmio::QueueOutcome;
use devices::virtio::{MemoryBackend, MemoryBackendError, VirtioMem, VirtioMemConfig, VirtioMmio};
use devices::{BusDevice, Interrupt, InterruptError};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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

/// A backend that tracks plugged blocks, can be told to fail, and panics on
/// any call that breaks the [`MemoryBackend`] contract.
#[derive(Debug, Default)]
pub struct CheckedBackend {
    plugged: Mutex<BTreeSet<u64>>,
    fail: std::sync::atomic::AtomicBool,
    calls: AtomicU64,
}

impl CheckedBackend {
    /// Makes every later call fail (or succeed again).
    pub fn set_fail(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    /// The plugged block addresses.
    pub fn plugged(&self) -> BTreeSet<u64> {
        self.plugged.lock().unwrap().clone()
    }

    /// Calls so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    fn apply(&self, gpa: u64, len: u64, plug: bool) -> Result<(), MemoryBackendError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        assert!(
            len > 0 && len.is_multiple_of(BLOCK) && gpa.is_multiple_of(BLOCK),
            "{gpa:#x}+{len:#x}"
        );
        assert!(gpa >= REGION_ADDR && gpa + len <= REGION_ADDR + REGION_SIZE);
        let mut plugged = self.plugged.lock().unwrap();
        let blocks: Vec<u64> = (0..len / BLOCK).map(|i| gpa + i * BLOCK).collect();
        for b in &blocks {
            assert_eq!(
                plugged.contains(b),
                !plug,
                "block {b:#x} already in that state"
            );
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(MemoryBackendError::new("injected failure"));
        }
        for b in blocks {
            if plug {
                plugged.insert(b);
            } else {
                plugged.remove(&b);
            }
        }
        Ok(())
    }
}

impl MemoryBackend for CheckedBackend {
    fn plug(&self, gpa: u64, len: u64) -> Result<(), MemoryBackendError> {
        self.apply(gpa, len, true)
    }

    fn unplug(&self, gpa: u64, len: u64) -> Result<(), MemoryBackendError> {
        self.apply(gpa, len, false)
    }
}

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
        let backend = Arc::new(CheckedBackend::default());
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
        let zeros = vec![0u8; (used_addr() + 6 + 8 * u64::from(QUEUE_SIZE) - QUEUE_BASE) as usize];
        self.mem
            .write_slice(&zeros, GuestAddress(QUEUE_BASE))
            .unwrap();
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

    /// Writes descriptor `index`.
    pub fn store_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let at = QUEUE_BASE + 16 * u64::from(index % QUEUE_SIZE);
        self.mem.write_slice(&d, GuestAddress(at)).unwrap();
    }

    /// The available ring's index.
    pub fn avail_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(avail_addr() + 2)).unwrap()
    }

    /// Puts `head` in the available ring and bumps its index by `bump`.
    pub fn publish(&self, head: u16, bump: u16) {
        let idx = self.avail_idx();
        let slot = avail_addr() + 4 + 2 * u64::from(idx % QUEUE_SIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(bump), GuestAddress(avail_addr() + 2))
            .unwrap();
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(used_addr() + 2)).unwrap()
    }

    /// Used element `i` as `(id, len)`.
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = used_addr() + 4 + 8 * u64::from(i % QUEUE_SIZE);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
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
    QUEUE_BASE + 16 * u64::from(QUEUE_SIZE)
}

/// Where the used ring starts.
pub fn used_addr() -> u64 {
    (avail_addr() + 6 + 2 * u64::from(QUEUE_SIZE)).next_multiple_of(4)
}
