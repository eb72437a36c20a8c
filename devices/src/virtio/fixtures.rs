//! Test fixtures for the virtio modules: a guest memory, a counting interrupt line, the
//! virtio-mem device behind its transport with a [`CheckedBackend`] (queues are
//! [`TestQueue`]s, both from [`crate::test_utils`]), and a driver that talks to a
//! [`VirtioMmio`] through its registers the way Linux's `virtio_mmio` and `virtio_mem`
//! drivers do.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mem::{VirtioMem, VirtioMemConfig};
use super::mem_request::{MEM_RESPONSE_SIZE, MemRequest};
use super::mmio::VirtioMmio;
use crate::bus::BusDevice;
use crate::interrupt::{Interrupt, InterruptError};
pub(crate) use crate::test_utils::{BackendCall, CheckedBackend, TestQueue};

/// Size of the test guest's RAM, at guest-physical 0.
pub(crate) const RAM_SIZE: usize = 0x10_0000;
/// Where the test queue's descriptor table starts.
pub(crate) const QUEUE_BASE: u64 = 0x1000;
/// Size of the test queue (the driver may pick less than the device maximum).
pub(crate) const QUEUE_SIZE: u16 = 16;
/// Where requests are written.
pub(crate) const REQ_ADDR: u64 = 0x8000;
/// Where responses are expected.
pub(crate) const RESP_ADDR: u64 = 0x9000;
/// The virtio-mem region of the fixture: 1 GiB at 4 GiB.
pub(crate) const REGION_ADDR: u64 = 0x1_0000_0000;
pub(crate) const REGION_SIZE: u64 = 0x4000_0000;
pub(crate) const BLOCK: u64 = 2 << 20;

pub(crate) const S_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
pub(crate) const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
pub(crate) const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
pub(crate) const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;

pub(crate) fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap()
}

/// An interrupt line that counts triggers.
#[derive(Debug, Default)]
pub(crate) struct CountingIrq(AtomicU64);

impl CountingIrq {
    pub(crate) fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl Interrupt for CountingIrq {
    fn trigger(&self) -> Result<(), InterruptError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

pub(crate) fn read32(dev: &dyn BusDevice, offset: u32) -> u32 {
    let mut b = [0u8; 4];
    dev.read(0, offset.into(), &mut b);
    u32::from_le_bytes(b)
}

pub(crate) fn write32(dev: &dyn BusDevice, offset: u32, value: u32) {
    dev.write(0, offset.into(), &value.to_le_bytes());
}

/// A zeroed [`TestQueue`] of [`QUEUE_SIZE`] entries at [`QUEUE_BASE`] in `mem`.
pub(crate) fn new_queue(mem: &GuestMemoryMmap) -> TestQueue<&GuestMemoryMmap> {
    let mut q = TestQueue::new(mem, QUEUE_BASE, QUEUE_SIZE);
    q.reset();
    q
}

/// The full stack: guest memory, a virtio-mem device behind a virtio-mmio transport,
/// a fake backend and a counting interrupt line.
pub(crate) struct MemFixture {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) vmem: Arc<VirtioMem>,
    pub(crate) mmio: VirtioMmio,
    pub(crate) backend: Arc<CheckedBackend>,
    pub(crate) irq: Arc<CountingIrq>,
}

impl MemFixture {
    /// 1 GiB region at 4 GiB with 2 MiB blocks and `requested` bytes requested.
    pub(crate) fn new(requested: u64) -> MemFixture {
        let backend = Arc::new(CheckedBackend::new(BLOCK).with_region(REGION_ADDR, REGION_SIZE));
        let config = VirtioMemConfig {
            requested_size: requested,
            ..VirtioMemConfig::new(REGION_ADDR, REGION_SIZE)
        };
        let vmem = Arc::new(VirtioMem::new(config, backend.clone()).unwrap());
        let irq = Arc::new(CountingIrq::default());
        let mmio = VirtioMmio::new(vmem.clone(), irq.clone()).unwrap();
        MemFixture {
            mem: guest_memory(),
            vmem,
            mmio,
            backend,
            irq,
        }
    }

    /// Reset, ACKNOWLEDGE, S_DRIVER, feature negotiation, S_FEATURES_OK; returns the status
    /// read back after setting S_FEATURES_OK.
    pub(crate) fn negotiate(&self, features: u64) -> u32 {
        negotiate(&self.mmio, features)
    }

    /// The whole Linux probe: negotiate the offered features, set up the queue,
    /// S_DRIVER_OK. Returns the queue.
    pub(crate) fn activate(&self) -> TestQueue<&GuestMemoryMmap> {
        let offered = device_features(&self.mmio);
        assert_eq!(
            self.negotiate(offered) & S_FEATURES_OK,
            S_FEATURES_OK,
            "features accepted"
        );
        let q = new_queue(&self.mem);
        q.setup(&self.mmio, 0);
        let status = read32(&self.mmio, VIRTIO_MMIO_STATUS);
        write32(&self.mmio, VIRTIO_MMIO_STATUS, status | S_DRIVER_OK);
        q
    }

    /// Notifies queue 0 through the register, then does what the control thread does.
    pub(crate) fn kick(&self) -> super::mmio::QueueOutcome {
        write32(&self.mmio, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        let evt = self.mmio.queue_notify_event(0).unwrap();
        assert!(evt.read().unwrap() >= 1, "the notify eventfd was signalled");
        self.mmio.process_queue(0, &self.mem).unwrap()
    }

    /// Sends `req` in the Linux layout (one 24-byte readable and one 10-byte writable
    /// descriptor), processes it, and returns the raw response if one was completed.
    pub(crate) fn request(
        &self,
        q: &mut TestQueue<&GuestMemoryMmap>,
        req: MemRequest,
    ) -> Option<[u8; MEM_RESPONSE_SIZE]> {
        self.request_raw(q, &req.to_bytes())
    }

    pub(crate) fn request_raw(
        &self,
        q: &mut TestQueue<&GuestMemoryMmap>,
        raw: &[u8; 24],
    ) -> Option<[u8; MEM_RESPONSE_SIZE]> {
        self.mem.write_slice(raw, GuestAddress(REQ_ADDR)).unwrap();
        self.mem
            .write_slice(&[0xff; MEM_RESPONSE_SIZE], GuestAddress(RESP_ADDR))
            .unwrap();
        let before = q.used_idx();
        let head = q.push(&[
            (REQ_ADDR, 24, false),
            (RESP_ADDR, MEM_RESPONSE_SIZE as u32, true),
        ]);
        self.kick();
        if q.used_idx() == before {
            return None;
        }
        assert_eq!(q.used_idx(), before.wrapping_add(1));
        assert_eq!(q.used(before), (u32::from(head), MEM_RESPONSE_SIZE as u32));
        let mut resp = [0u8; MEM_RESPONSE_SIZE];
        self.mem
            .read_slice(&mut resp, GuestAddress(RESP_ADDR))
            .unwrap();
        Some(resp)
    }

    /// Reads a 64-bit configuration field as Linux does (two 32-bit reads under the
    /// generation counter).
    pub(crate) fn config_u64(&self, offset: u32) -> u64 {
        loop {
            let gen0 = read32(&self.mmio, VIRTIO_MMIO_CONFIG_GENERATION);
            let lo = read32(&self.mmio, VIRTIO_MMIO_CONFIG + offset);
            let hi = read32(&self.mmio, VIRTIO_MMIO_CONFIG + offset + 4);
            if read32(&self.mmio, VIRTIO_MMIO_CONFIG_GENERATION) == gen0 {
                return u64::from(lo) | (u64::from(hi) << 32);
            }
        }
    }
}

/// The 64 device feature bits, read as Linux's `vm_get_features` does.
pub(crate) fn device_features(dev: &VirtioMmio) -> u64 {
    write32(dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    let high = read32(dev, VIRTIO_MMIO_DEVICE_FEATURES);
    write32(dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let low = read32(dev, VIRTIO_MMIO_DEVICE_FEATURES);
    (u64::from(high) << 32) | u64::from(low)
}

/// Reset, ACKNOWLEDGE, S_DRIVER, write `features`, set S_FEATURES_OK; returns the status read
/// back.
pub(crate) fn negotiate(dev: &VirtioMmio, features: u64) -> u32 {
    write32(dev, VIRTIO_MMIO_STATUS, 0);
    write32(dev, VIRTIO_MMIO_STATUS, S_ACK);
    write32(dev, VIRTIO_MMIO_STATUS, S_ACK | S_DRIVER);
    write32(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    write32(dev, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
    write32(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    write32(dev, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
    write32(dev, VIRTIO_MMIO_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    read32(dev, VIRTIO_MMIO_STATUS)
}

/// The log records of one thread, as `(level, message)`.
pub(crate) type CapturedLogs = Vec<(log::Level, String)>;

std::thread_local! {
    static CAPTURED: std::cell::RefCell<Option<CapturedLogs>> =
        const { std::cell::RefCell::new(None) };
}

/// A logger that keeps the records of threads inside [`capture_logs`] and drops the
/// rest (tests run in parallel on other threads).
struct CaptureLogger;

impl log::Log for CaptureLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        CAPTURED.with(|c| {
            if let Some(v) = c.borrow_mut().as_mut() {
                v.push((r.level(), r.args().to_string()));
            }
        });
    }
    fn flush(&self) {}
}

static CAPTURE_LOGGER: CaptureLogger = CaptureLogger;

/// Runs `f` and returns what it logged on this thread, at every level.
pub(crate) fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, CapturedLogs) {
    // Only this logger is ever installed in the devices' unit tests.
    let _ = log::set_logger(&CAPTURE_LOGGER);
    log::set_max_level(log::LevelFilter::Trace);
    CAPTURED.with(|c| *c.borrow_mut() = Some(Vec::new()));
    let t = f();
    let logs = CAPTURED.with(|c| c.borrow_mut().take()).unwrap_or_default();
    (t, logs)
}

/// How many of `logs` are at warn level or above: what a user sees by default.
pub(crate) fn warnings(logs: &CapturedLogs) -> usize {
    logs.iter().filter(|(l, _)| *l <= log::Level::Warn).count()
}
