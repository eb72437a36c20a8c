//! Fuzz target `virtio_mem_queue`: arbitrary queue memory and register
//! writes against the virtio-mem device and its transport.
//!
//! The input (read with `arbitrary::Unstructured`) picks the requested size,
//! fills the descriptor table and the available ring with raw bytes, and then
//! runs up to 128 steps: raw writes to guest memory, register writes (any
//! offset of the register file, any value, or values a driver would write),
//! queue notifications processed as the VMM's control thread does, new
//! handshakes, requested-size changes and machine resets. Nothing is
//! well-formed on purpose; the checks are about what must hold whatever the
//! guest does:
//! - no panic, and the backend is only called as its contract says;
//! - the device's plugged blocks are the backend's, inside the usable region;
//! - a processing call completes at most one ring's worth of chains;
//! - afterwards a driver that resets the device and handshakes again can plug
//!   memory with a valid request (the device recovered).

use arbitrary::{Result, Unstructured};
use devices::virtio::MemRequest;
use devices::virtio::mem::VIRTIO_MEM_QUEUE_SIZE;
use devices::virtio::mem_request::MEM_RESPONSE_SIZE;
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress};

use crate::virtio::{
    BLOCK, BLOCKS, Fixture, QUEUE_BASE, QUEUE_SIZE, REGION_ADDR, REGION_SIZE, avail_addr,
};

/// Values a driver writes to registers, which random values rarely hit.
const INTERESTING: [u32; 14] = [
    0,
    1,
    2,
    3,
    0xb,
    0xf,
    0x4f,
    0x80,
    16,
    128,
    256,
    0x1000,
    0x1100,
    0xffff_ffff,
];

fn step(f: &Fixture, u: &mut Unstructured<'_>) -> Result<()> {
    match u.int_in_range(0u8..=9)? {
        0 | 1 => {
            let addr = u64::from(u.arbitrary::<u16>()?);
            let len = u.int_in_range(1usize..=64)?;
            let bytes = u.bytes(len)?;
            // Writes beyond the first region are cut off by memory's end.
            let _ = f.mem.write_slice(bytes, GuestAddress(addr));
        }
        2 | 3 => {
            let offset = u32::from(u.int_in_range(0u8..=0x3f)?) * 4;
            let value = if u.ratio(1, 2)? {
                *u.choose(&INTERESTING)?
            } else {
                u.arbitrary()?
            };
            f.write32(offset, value);
        }
        4 => {
            let offset = u64::from(u.arbitrary::<u16>()? % 0x1000);
            let len = u.int_in_range(0usize..=8)?;
            let bytes = u.bytes(len)?;
            use devices::BusDevice;
            f.mmio.write(0, offset, bytes);
            let mut back = vec![0u8; len];
            f.mmio.read(0, offset, &mut back);
        }
        5..=7 => {
            let outcome = f.kick();
            assert!(
                outcome.completed <= usize::from(VIRTIO_MEM_QUEUE_SIZE),
                "more than a ring's worth of chains in one call"
            );
        }
        8 => f.handshake(),
        _ => {
            if u.ratio(1, 2)? {
                let size = u64::from(u.int_in_range(0u16..=BLOCKS as u16)?) * BLOCK;
                f.vmem.set_requested_size(size).unwrap();
            } else {
                f.vmem.system_reset().unwrap();
            }
        }
    }
    f.check_consistent();
    Ok(())
}

fn fill(f: &Fixture, u: &mut Unstructured<'_>) -> Result<()> {
    let table = u.bytes(16 * usize::from(QUEUE_SIZE))?;
    f.mem.write_slice(table, GuestAddress(QUEUE_BASE)).unwrap();
    let ring = u.bytes(4 + 2 * usize::from(QUEUE_SIZE))?;
    f.mem.write_slice(ring, GuestAddress(avail_addr())).unwrap();
    // Mostly a small available index, so chains get looked at.
    if u.ratio(3, 4)? {
        let idx = u.int_in_range(0u16..=QUEUE_SIZE)?;
        f.mem
            .write_obj(idx, GuestAddress(avail_addr() + 2))
            .unwrap();
    }
    Ok(())
}

/// After whatever happened, a driver resets the device, handshakes and
/// plugs one more block with a valid request: it must be acknowledged.
fn check_recovers(f: &Fixture) {
    let plugged = f.vmem.plugged_size();
    if plugged >= REGION_SIZE {
        return;
    }
    f.vmem.set_requested_size(plugged + BLOCK).unwrap();
    f.handshake();
    let plugged_blocks = f.backend.plugged();
    let Some(addr) = (0..BLOCKS)
        .map(|i| REGION_ADDR + i * BLOCK)
        .find(|a| !plugged_blocks.contains(a))
    else {
        return;
    };
    let req = MemRequest::Plug { addr, nb_blocks: 1 }.to_bytes();
    f.mem.write_slice(&req, GuestAddress(0x8000)).unwrap();
    f.store_desc(0, 0x8000, 24, 1, 1);
    f.store_desc(1, 0x9000, MEM_RESPONSE_SIZE as u32, 2, 0);
    f.publish(0, 1);
    let outcome = f.kick();
    assert!(
        !outcome.needs_reset,
        "a valid request after a reset broke the device"
    );
    assert_eq!(outcome.completed, 1);
    let kind: u16 = f.mem.read_obj(GuestAddress(0x9000)).unwrap();
    assert_eq!(kind, 0, "a valid PLUG after a reset was not acknowledged");
    assert!(f.backend.plugged().contains(&addr));
    f.check_consistent();
}

/// Runs one input; panics if a check fails.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(blocks) = u.int_in_range(0u16..=BLOCKS as u16) else {
        return;
    };
    let f = Fixture::new(u64::from(blocks) * BLOCK);
    f.handshake();
    if fill(&f, &mut u).is_ok() {
        for _ in 0..128 {
            if u.is_empty() || step(&f, &mut u).is_err() {
                break;
            }
        }
    }
    let _ = f.read32(VIRTIO_MMIO_STATUS);
    f.check_consistent();
    check_recovers(&f);
}
