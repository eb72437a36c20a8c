//! Register abuse over MMIO, at CPL3: pseudo-random accesses to the
//! virtio-mmio window, the GED and unassigned MMIO, with bursts of what a
//! driver does and queues whose rings hold fuzzed chains in scratch RAM.

use tests::bare_vm::{BareVm, TEST_MMIO};
use tests::guest_driver::{Op, SCRATCH, SCRATCH_SIZE};
use tests::virtio_ops::{DRIVER_OK_STATUS, QUEUE_NOTIFY, VIRTIO, handshake_ops, r32, w32};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_STATUS,
};

use crate::harness::{GED, HOTPLUG_BASE, HOTPLUG_SIZE, MIB, RAM_SIZE, Rng, r, w};
use crate::virtq::{F_INDIRECT, F_NEXT, F_WRITE};

/// Where in scratch RAM the ring at `reg` (a low address register) may lie:
/// descriptor tables only where the device never writes, available rings
/// in their own part, used rings where nothing reads descriptors. So every
/// descriptor the device ever reads was written by the test, and every
/// buffer it names lies in scratch RAM or outside RAM: whatever the fuzzed
/// queues say, the device cannot write over the runner.
pub(crate) fn scratch_part(reg: u32) -> (u64, u64) {
    match reg {
        VIRTIO_MMIO_QUEUE_DESC_LOW => (SCRATCH_DESCS, MIB - 4096),
        VIRTIO_MMIO_QUEUE_AVAIL_LOW => (SCRATCH_AVAILS, MIB - 4096),
        _ => (SCRATCH_USED, MIB - 4096),
    }
}

/// Addresses a hostile driver might give for the ring at `reg`: in its part
/// of scratch RAM (aligned or not), MMIO, unplugged hot-plug memory, beyond
/// RAM, nothing at all.
pub(crate) fn ring_address(rng: &mut Rng, reg: u32) -> u64 {
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
pub(crate) fn register_value(rng: &mut Rng, offset: u32) -> u32 {
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
pub(crate) fn sanitize(offset: u32, v: u32) -> u32 {
    let is_low_ring = matches!(
        offset,
        VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_USED_LOW
    );
    if is_low_ring && u64::from(v) < RAM_SIZE {
        let (base, len) = scratch_part(offset);
        (base + u64::from(v) % len) as u32
    } else {
        v
    }
}

/// Scratch layout of [`fill_scratch`]: descriptor tables, then available
/// rings with small indices, then room for used rings.
pub(crate) const SCRATCH_DESCS: u64 = SCRATCH;
pub(crate) const SCRATCH_AVAILS: u64 = SCRATCH + MIB;
pub(crate) const SCRATCH_USED: u64 = SCRATCH + 2 * MIB;
/// Random bytes, where descriptors put their buffers.
pub(crate) const SCRATCH_BUFFERS: u64 = SCRATCH + 3 * MIB;
/// Size of that part (the last 64 KiB of scratch are the tests' own queue).
pub(crate) const SCRATCH_BUFFERS_SIZE: u64 = SCRATCH_SIZE - 3 * MIB - 0x1_0000;

/// A complete, proper queue set-up whose rings hold fuzz content (from
/// [`fill_scratch`]), so the device parses fuzzed descriptor chains.
pub(crate) fn coherent_burst(rng: &mut Rng, ops: &mut Vec<Op>) {
    let desc = SCRATCH_DESCS + 16 * rng.below(MIB / 16 - 256);
    let avail = SCRATCH_AVAILS + 64 * rng.below(MIB / 64);
    let used = SCRATCH_USED + 4096 * rng.below(MIB / 4096);
    let num = rng.pick(&[16, 16, 16, 8, 32, 128]);
    ops.extend(handshake_ops(num, desc, avail, used));
    let any = rng.next() as u32;
    ops.push(w32(VIRTIO_MMIO_QUEUE_NOTIFY, rng.pick(&[0, 0, any])));
    ops.push(r32(VIRTIO_MMIO_STATUS));
}

/// A burst of what a driver does, with random holes and wrong values.
pub(crate) fn driver_burst(rng: &mut Rng, ops: &mut Vec<Op>) {
    if rng.chance(40) {
        coherent_burst(rng, ops);
        return;
    }
    let mut step = |rng: &mut Rng, op: Op| {
        if rng.chance(85) {
            ops.push(op);
        }
    };
    step(rng, w32(VIRTIO_MMIO_STATUS, 0));
    step(rng, w32(VIRTIO_MMIO_STATUS, 1));
    step(rng, w32(VIRTIO_MMIO_STATUS, 3));
    let sel = if rng.chance(80) { 1 } else { rng.next() as u32 };
    step(rng, w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel));
    let hi = if rng.chance(80) { 1 } else { rng.next() as u32 };
    step(rng, w32(VIRTIO_MMIO_DRIVER_FEATURES, hi));
    step(rng, w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0));
    let lo = if rng.chance(80) { 2 } else { rng.next() as u32 };
    step(rng, w32(VIRTIO_MMIO_DRIVER_FEATURES, lo));
    let ok = rng.pick(&[0xb, 0xb, 0xf, 0x8b, 0x4b]);
    step(rng, w32(VIRTIO_MMIO_STATUS, ok));
    step(rng, r32(VIRTIO_MMIO_STATUS));
    let qsel = if rng.chance(85) {
        0
    } else {
        rng.below(4) as u32
    };
    step(rng, w32(VIRTIO_MMIO_QUEUE_SEL, qsel));
    step(rng, r32(VIRTIO_MMIO_QUEUE_NUM_MAX));
    let num = rng.pick(&[16, 16, 128, 1, 2, 256, 3, 0, 0x1_0010]);
    step(rng, w32(VIRTIO_MMIO_QUEUE_NUM, num));
    for reg in [
        VIRTIO_MMIO_QUEUE_DESC_LOW,
        VIRTIO_MMIO_QUEUE_AVAIL_LOW,
        VIRTIO_MMIO_QUEUE_USED_LOW,
    ] {
        let a = ring_address(rng, reg);
        step(rng, w32(reg, sanitize(reg, a as u32)));
        step(rng, w32(reg + 4, (a >> 32) as u32));
    }
    let ready = rng.pick(&[1, 1, 1, 0, 2]);
    step(rng, w32(VIRTIO_MMIO_QUEUE_READY, ready));
    step(rng, w32(VIRTIO_MMIO_STATUS, DRIVER_OK_STATUS));
    let any = rng.next() as u32;
    let n = rng.pick(&[0, 0, 1, any]);
    step(rng, w32(VIRTIO_MMIO_QUEUE_NOTIFY, n));
    step(rng, r32(VIRTIO_MMIO_INTERRUPT_STATUS));
    let ack = rng.next() as u32;
    step(rng, w32(VIRTIO_MMIO_INTERRUPT_ACK, ack));
    step(rng, r32(VIRTIO_MMIO_CONFIG_GENERATION));
    let config = VIRTIO + u64::from(VIRTIO_MMIO_CONFIG) + rng.below(56);
    step(rng, r(config, 1));
}

pub(crate) fn width(rng: &mut Rng) -> u8 {
    rng.pick(&[1, 2, 4, 8])
}

/// An aligned address of `width` bytes in `[base, base + len)`.
pub(crate) fn aligned_in(rng: &mut Rng, base: u64, len: u64, width: u8) -> u64 {
    base + (rng.below(len) & !(u64::from(width) - 1))
}

/// Unassigned MMIO: the device window outside our devices and the test
/// page, the rest of the 32-bit hole below the IOAPIC, and unplugged
/// hot-plug memory.
pub(crate) fn unassigned(rng: &mut Rng, width: u8) -> u64 {
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
pub(crate) fn mmio_abuse(rng: &mut Rng, n: usize) -> Vec<Op> {
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
            (
                VIRTIO + offset,
                wd,
                u64::from(register_value(rng, offset as u32)),
            )
        } else if roll < 55 {
            let wd = width(rng);
            let addr = aligned_in(rng, VIRTIO, 0x1000, wd);
            let mut v = rng.next();
            if wd == 4 {
                v = u64::from(sanitize((addr - VIRTIO) as u32, v as u32));
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
pub(crate) fn fill_scratch(vm: &BareVm, rng: &mut Rng) {
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
