//! Fuzz target `virtio_mem_request`: sequences of virtio-mem requests, each
//! in a well-formed or a malformed descriptor chain, against a model.
//!
//! The input (read with `arbitrary::Unstructured`) picks the requested size
//! and then up to 64 operations: a request (type, address, block count,
//! padding, the chain's shape, whether the backend fails), a new requested
//! size from the host, a driver reset with a new handshake, or a machine
//! reset. Checked after every operation:
//! - a well-formed chain is answered (one used element of 10 bytes) with
//!   exactly the answer of [`Model`], written over the response buffer, and
//!   the device stays usable;
//! - a malformed chain (request shorter than 24 bytes, response room shorter
//!   than 10 bytes or device-readable, a buffer outside guest memory,
//!   a descriptor loop, a readable buffer after a writable one, a head or
//!   `next` index outside the table) sets `DEVICE_NEEDS_RESET`, completes
//!   nothing and makes no backend call: nothing is plugged or unplugged;
//! - the backend is only called as the `MemoryBackend` contract says (it
//!   panics otherwise), and the device's plugged blocks are the backend's.

use arbitrary::{Result, Unstructured};
use devices::virtio::MemRequest;
use devices::virtio::mem_request::{
    MEM_RESPONSE_SIZE, VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_STATE, VIRTIO_MEM_REQ_UNPLUG,
    VIRTIO_MEM_REQ_UNPLUG_ALL,
};
use std::collections::BTreeSet;
use vm_memory::{Bytes, GuestAddress};

use crate::virtio::{BLOCK, BLOCKS, Fixture, QUEUE_SIZE, REGION_ADDR, REGION_SIZE, S_NEEDS_RESET};

const REQ_ADDR: u64 = 0x8000;
const RESP_ADDR: u64 = 0x9000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// QEMU's extent of the usable region past the requested size.
const USABLE_EXTENT: u64 = 256 << 20;

/// The device's rules, written from the virtio spec and QEMU's choices.
#[derive(Debug)]
pub struct Model {
    plugged: BTreeSet<u64>,
    requested: u64,
    usable: u64,
}

/// The answer the model expects: `(type, state)` as in the response.
type Answer = (u16, u16);
const ACK: u16 = 0;
const NACK: u16 = 1;
const BUSY: u16 = 2;
const ERROR: u16 = 3;

impl Model {
    fn new(requested: u64) -> Model {
        let mut m = Model {
            plugged: BTreeSet::new(),
            requested,
            usable: 0,
        };
        m.resize(true);
        m
    }

    fn resize(&mut self, can_shrink: bool) {
        let new = if self.requested == 0 {
            0
        } else {
            (self.requested + USABLE_EXTENT)
                .min(REGION_SIZE)
                .next_multiple_of(BLOCK)
        };
        if new >= self.usable || can_shrink {
            self.usable = new;
        }
    }

    fn range(&self, addr: u64, nb: u16) -> Option<Vec<u64>> {
        if nb == 0 || !addr.is_multiple_of(BLOCK) || addr < REGION_ADDR {
            return None;
        }
        let end = addr.checked_add(u64::from(nb) * BLOCK)?;
        if end > REGION_ADDR + self.usable {
            return None;
        }
        Some((0..u64::from(nb)).map(|i| addr + i * BLOCK).collect())
    }

    fn answer(&mut self, req: MemRequest, fail: bool) -> Answer {
        match req {
            MemRequest::Plug { addr, nb_blocks } => {
                let Some(blocks) = self.range(addr, nb_blocks) else {
                    return (ERROR, 0);
                };
                let total = (self.plugged.len() + blocks.len()) as u64 * BLOCK;
                if total > self.requested {
                    return (NACK, 0);
                }
                if blocks.iter().any(|b| self.plugged.contains(b)) {
                    return (ERROR, 0);
                }
                if fail {
                    return (BUSY, 0);
                }
                self.plugged.extend(blocks);
                (ACK, 0)
            }
            MemRequest::Unplug { addr, nb_blocks } => {
                let Some(blocks) = self.range(addr, nb_blocks) else {
                    return (ERROR, 0);
                };
                if !blocks.iter().all(|b| self.plugged.contains(b)) {
                    return (ERROR, 0);
                }
                if fail {
                    return (BUSY, 0);
                }
                for b in blocks {
                    self.plugged.remove(&b);
                }
                (ACK, 0)
            }
            MemRequest::UnplugAll => {
                if fail && !self.plugged.is_empty() {
                    return (BUSY, 0);
                }
                self.plugged.clear();
                self.resize(true);
                (ACK, 0)
            }
            MemRequest::State { addr, nb_blocks } => match self.range(addr, nb_blocks) {
                None => (ERROR, 0),
                Some(blocks) => {
                    let n = blocks.iter().filter(|b| self.plugged.contains(b)).count();
                    let state = if n == blocks.len() {
                        0
                    } else if n == 0 {
                        1
                    } else {
                        2
                    };
                    (ACK, state)
                }
            },
            MemRequest::Unknown { .. } => (ERROR, 0),
        }
    }
}

/// How the request is put in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Linux's layout: 24 readable bytes, then 10 writable bytes.
    Good,
    /// Well-formed but split over several descriptors, with extra room and
    /// zero-length descriptors.
    Split,
    ShortRequest(u32),
    ShortResponse(u32),
    ResponseReadable,
    RequestOutside(u64),
    ResponseOutside(u64),
    Loop,
    ReadableAfterWritable,
    HeadOutside,
    NextOutside,
}

impl Shape {
    fn malformed(self) -> bool {
        !matches!(self, Shape::Good | Shape::Split)
    }
}

/// Addresses where a buffer is not (wholly) in guest memory.
const OUTSIDE: [u64; 7] = [
    0xfff8,                // runs off the end of the first RAM region
    0x1_8000,              // in the hole between the regions
    0x2_fffc,              // runs off the end of the second region
    0x4_0000,              // above RAM
    REGION_ADDR,           // unplugged hot-plug memory
    0xffff_ffff_ffff_fff0, // near the end of the address space
    u64::MAX,
];

fn shape(u: &mut Unstructured<'_>) -> Result<Shape> {
    let pick = u.int_in_range(0u8..=15)?;
    Ok(match pick {
        0..=4 => Shape::Good,
        5 => Shape::Split,
        6 => Shape::ShortRequest(u.int_in_range(0..=23)?),
        7 => Shape::ShortResponse(u.int_in_range(0..=9)?),
        8 => Shape::ResponseReadable,
        9 => Shape::RequestOutside(*u.choose(&OUTSIDE)?),
        10 => Shape::ResponseOutside(*u.choose(&OUTSIDE)?),
        11 => Shape::Loop,
        12 => Shape::ReadableAfterWritable,
        13 => Shape::HeadOutside,
        _ => Shape::NextOutside,
    })
}

fn request(u: &mut Unstructured<'_>) -> Result<[u8; 24]> {
    let kind = match u.int_in_range(0u8..=8)? {
        0 | 1 => VIRTIO_MEM_REQ_PLUG,
        2 | 3 => VIRTIO_MEM_REQ_UNPLUG,
        4 => VIRTIO_MEM_REQ_UNPLUG_ALL,
        5 | 6 => VIRTIO_MEM_REQ_STATE,
        _ => u.arbitrary()?,
    };
    let addr = match u.int_in_range(0u8..=5)? {
        0..=2 => REGION_ADDR + u64::from(u.int_in_range(0u16..=(BLOCKS as u16 + 4))?) * BLOCK,
        3 => {
            REGION_ADDR
                + u64::from(u.arbitrary::<u16>()?) * BLOCK
                + u64::from(u.arbitrary::<u16>()?)
        }
        4 => REGION_ADDR.wrapping_sub(u64::from(u.int_in_range(1u8..=4)?) * BLOCK),
        _ => u.arbitrary()?,
    };
    let nb_blocks: u16 = if u.ratio(3, 4)? {
        u.int_in_range(0..=8)?
    } else {
        u.arbitrary()?
    };
    let mut raw: [u8; 24] = u.arbitrary()?; // padding stays random: it must be ignored
    raw[0..2].copy_from_slice(&kind.to_le_bytes());
    raw[8..16].copy_from_slice(&addr.to_le_bytes());
    raw[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
    Ok(raw)
}

/// Puts the request in the queue in `shape`; returns the head index.
fn push(f: &Fixture, shape: Shape, u: &mut Unstructured<'_>) -> Result<u16> {
    let resp = MEM_RESPONSE_SIZE as u32;
    let descs: Vec<(u64, u32, u16)> = match shape {
        Shape::Good => vec![(REQ_ADDR, 24, 0), (RESP_ADDR, resp, F_WRITE)],
        Shape::Split => {
            let cut = u.int_in_range(1u32..=23)?;
            let extra = u.int_in_range(0u32..=64)?;
            vec![
                (REQ_ADDR, cut, 0),
                (0, 0, 0),
                (REQ_ADDR + u64::from(cut), 24 - cut + extra, 0),
                (RESP_ADDR, 3, F_WRITE),
                (0, 0, F_WRITE),
                (RESP_ADDR + 3, resp - 3 + extra, F_WRITE),
            ]
        }
        Shape::ShortRequest(n) => vec![(REQ_ADDR, n, 0), (RESP_ADDR, resp, F_WRITE)],
        Shape::ShortResponse(n) => vec![(REQ_ADDR, 24, 0), (RESP_ADDR, n, F_WRITE)],
        Shape::ResponseReadable => vec![(REQ_ADDR, 24, 0), (RESP_ADDR, resp, 0)],
        Shape::RequestOutside(a) => vec![(a, 24, 0), (RESP_ADDR, resp, F_WRITE)],
        Shape::ResponseOutside(a) => vec![(REQ_ADDR, 24, 0), (a, resp, F_WRITE)],
        Shape::ReadableAfterWritable => vec![
            (REQ_ADDR, 12, 0),
            (RESP_ADDR, resp, F_WRITE),
            (REQ_ADDR + 12, 12, 0),
        ],
        Shape::Loop => {
            let first = u.int_in_range(0..=QUEUE_SIZE - 1)?;
            let second = u.int_in_range(0..=QUEUE_SIZE - 1)?;
            f.store_desc(first, REQ_ADDR, 24, F_NEXT, second);
            f.store_desc(second, RESP_ADDR, resp, F_WRITE | F_NEXT, first);
            f.publish(first, 1);
            return Ok(first);
        }
        Shape::HeadOutside => {
            let head = u.int_in_range(QUEUE_SIZE..=u16::MAX)?;
            f.publish(head, 1);
            return Ok(head);
        }
        Shape::NextOutside => {
            let next = u.int_in_range(QUEUE_SIZE..=u16::MAX)?;
            f.store_desc(0, REQ_ADDR, 24, F_NEXT, 1);
            f.store_desc(1, RESP_ADDR, resp, F_WRITE | F_NEXT, next);
            f.publish(0, 1);
            return Ok(0);
        }
    };
    let n = descs.len() as u16;
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let i = i as u16;
        let (flags, next) = if i + 1 < n {
            (flags | F_NEXT, i + 1)
        } else {
            (flags, 0)
        };
        f.store_desc(i, addr, len, flags, next);
    }
    f.publish(0, 1);
    Ok(0)
}

fn one_request(f: &Fixture, model: &mut Model, u: &mut Unstructured<'_>) -> Result<()> {
    let raw = request(u)?;
    let fail = u.ratio(1, 8)?;
    let shape = shape(u)?;
    f.mem.write_slice(&raw, GuestAddress(REQ_ADDR)).unwrap();
    f.mem
        .write_slice(&[0xa5; 16], GuestAddress(RESP_ADDR))
        .unwrap();
    f.backend.set_fail(fail);
    let calls = f.backend.call_count();
    let used = f.used_idx();
    let head = push(f, shape, u)?;
    let outcome = f.kick();
    f.backend.set_fail(false);
    let req = MemRequest::parse(&raw);
    if shape.malformed() {
        assert!(
            outcome.needs_reset,
            "{shape:?} {req:?} did not break the device"
        );
        assert_eq!(outcome.completed, 0);
        assert_eq!(f.used_idx(), used, "a malformed chain was completed");
        assert_eq!(
            f.backend.call_count(),
            calls,
            "a malformed chain reached the backend"
        );
        assert_ne!(f.status() & S_NEEDS_RESET, 0);
        // The driver resets the device: it works again, with its blocks.
        f.handshake();
        return Ok(());
    }
    let expected = model.answer(req, fail);
    assert!(!outcome.needs_reset, "{shape:?} {req:?} broke the device");
    assert_eq!(outcome.completed, 1);
    assert_eq!(f.used_idx(), used.wrapping_add(1));
    assert_eq!(f.used(used), (u32::from(head), MEM_RESPONSE_SIZE as u32));
    let mut resp = [0u8; MEM_RESPONSE_SIZE];
    let read = |at: u64, buf: &mut [u8]| f.mem.read_slice(buf, GuestAddress(at)).unwrap();
    // Both shapes put the first response bytes at RESP_ADDR, contiguously.
    read(RESP_ADDR, &mut resp);
    let kind = u16::from_le_bytes([resp[0], resp[1]]);
    let state = u16::from_le_bytes([resp[8], resp[9]]);
    assert_eq!((kind, state), expected, "{req:?} (backend fails: {fail})");
    assert_eq!(&resp[2..8], &[0; 6], "padding is written as 0");
    Ok(())
}

fn ops(f: &Fixture, model: &mut Model, u: &mut Unstructured<'_>) -> Result<()> {
    for _ in 0..64 {
        if u.is_empty() {
            break;
        }
        match u.int_in_range(0u8..=9)? {
            0..=6 => one_request(f, model, u)?,
            7 => {
                let size = u64::from(u.int_in_range(0u16..=BLOCKS as u16)?) * BLOCK;
                f.vmem.set_requested_size(size).unwrap();
                model.requested = size;
                model.resize(false);
            }
            8 => f.handshake(),
            _ => {
                f.vmem.system_reset().unwrap();
                model.plugged.clear();
                model.resize(true);
            }
        }
        f.check_consistent();
        let plugged: BTreeSet<u64> = model.plugged.clone();
        assert_eq!(f.backend.plugged(), plugged, "device and model disagree");
        assert_eq!(f.vmem.info().usable_region_size, model.usable);
    }
    Ok(())
}

/// Runs one input; panics if a check fails.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(blocks) = u.int_in_range(0u16..=BLOCKS as u16) else {
        return;
    };
    let requested = u64::from(blocks) * BLOCK;
    let f = Fixture::new(requested);
    f.handshake();
    let mut model = Model::new(requested);
    let _ = ops(&f, &mut model, &mut u);
    f.check_consistent();
}
