//! virtio-mem queue abuse: well-formed requests the device must refuse,
//! malformed descriptor chains and queue set-ups that must break it (and a
//! reset that must mend it), rings in memory that a request unplugs; and
//! what an unplugged block holds on the host.

use devices::virtio::mem_request::{
    VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_STATE, VIRTIO_MEM_REQ_UNPLUG, VIRTIO_MEM_REQ_UNPLUG_ALL,
};
use tests::guest_driver::{GuestDriver, SCRATCH};
use tests::virtio_ops::{
    DRIVER_OK_STATUS, NEEDS_RESET, QUEUE_NOTIFY, STATUS, VIRTIO, handshake_ops, r32, w32,
};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INTERRUPT_STATUS;
use vmm::test_utils::SLOT_SIZE;

use crate::harness::{BLOCK, HOTPLUG_BASE, HOTPLUG_SIZE, HotplugView, RAM_SIZE, r};
use crate::virtq::{
    F_INDIRECT, F_NEXT, F_WRITE, Virtq, handshake, notify_and_wait_broken, notify_and_wait_used,
    poll, request_bytes,
};

/// How a malformed request is put in the queue (the request itself is a
/// valid PLUG of `PROBE_BLOCKS` blocks, so a device that acted on it would
/// plug memory).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Malformed {
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

pub(crate) const ALL_MALFORMED: [Malformed; 14] = [
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

pub(crate) const ACK: u16 = 0;
pub(crate) const NACK: u16 = 1;
pub(crate) const ERROR: u16 = 3;

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
pub(crate) fn mapping_rss_kib(addr: u64) -> (u64, String) {
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

/// The requested size is 8 blocks, nothing is plugged: well-formed requests
/// for what may not be plugged are answered ERROR or NACK, and change
/// nothing.
pub(crate) fn refused_requests_are_answered(
    driver: &mut GuestDriver,
    q: &mut Virtq,
    v: &HotplugView,
) {
    for case in refused_requests() {
        let before = q.used_idx();
        q.request(case.kind, case.addr, case.nb_blocks);
        let (answered, status) = notify_and_wait_used(driver, q, before);
        assert!(answered, "{}: not answered (status {status:#x})", case.what);
        assert_eq!(status, DRIVER_OK_STATUS, "{}: the device broke", case.what);
        assert_eq!(q.response(), case.answer, "{}", case.what);
        assert_eq!(v.plugged(), 0, "{}", case.what);
        assert_eq!(v.mapped_slots(), 0, "{}", case.what);
    }
}

/// Plugs two blocks properly, then sends the overlapping and mixed cases:
/// answered, nothing changed.
pub(crate) fn overlapping_requests_are_answered(
    driver: &mut GuestDriver,
    q: &mut Virtq,
    v: &HotplugView,
) {
    let before = q.used_idx();
    q.request(VIRTIO_MEM_REQ_PLUG, HOTPLUG_BASE, 2);
    assert!(notify_and_wait_used(driver, q, before).0);
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
        assert!(notify_and_wait_used(driver, q, before).0, "{what}");
        assert_eq!(q.response(), answer, "{what}");
        assert_eq!(v.plugged(), 2 * BLOCK, "{what}");
    }
}

/// Each malformed chain: DEVICE_NEEDS_RESET, a configuration interrupt,
/// nothing completed, nothing plugged; a reset makes it work again. Two
/// blocks are plugged.
pub(crate) fn malformed_chains_break_the_device(
    driver: &mut GuestDriver,
    q: &mut Virtq,
    v: &HotplugView,
) {
    for how in ALL_MALFORMED {
        let used_before = q.used_idx();
        let broken_before = v.transport().stats().broken;
        put_malformed(q, how);
        let (broken, isr) = notify_and_wait_broken(driver);
        assert!(broken, "{how:?}: DEVICE_NEEDS_RESET not set");
        assert_ne!(isr & 2, 0, "{how:?}: no configuration-change interrupt");
        assert_eq!(q.used_idx(), used_before, "{how:?}: a chain was completed");
        assert_eq!(v.plugged(), 2 * BLOCK, "{how:?}: the plugged size changed");
        assert_eq!(v.mapped_slots(), 1, "{how:?}");
        assert_eq!(v.transport().stats().broken, broken_before + 1);
        // More notifications change nothing while it needs a reset.
        let res = driver.run(&[w32(QUEUE_NOTIFY, 0), r32(STATUS)]).unwrap();
        assert_ne!(res[1].value as u32 & NEEDS_RESET, 0);
        handshake(driver, q);
        let before = q.used_idx();
        q.request(VIRTIO_MEM_REQ_STATE, HOTPLUG_BASE, 2);
        assert!(
            notify_and_wait_used(driver, q, before).0,
            "{how:?}: no recovery"
        );
        assert_eq!(
            q.response(),
            (ACK, 0),
            "{how:?}: plugged blocks survive a reset"
        );
    }
}

/// Bad queue set-ups: rings outside guest memory, misaligned, a size that
/// is not a power of two. Each breaks the device when notified.
pub(crate) fn bad_queue_setups_break_the_device(
    driver: &mut GuestDriver,
    q: &mut Virtq,
    v: &HotplugView,
) {
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
        let (broken, _) = notify_and_wait_broken(driver);
        assert!(broken, "{what}: DEVICE_NEEDS_RESET not set");
        assert_eq!(v.plugged(), 2 * BLOCK, "{what}");
    }
}

/// Rings in plugged memory, and a request on them that unplugs that very
/// memory: the device finishes the request on the map it started with, the
/// slot goes away, and the next notification finds the rings gone and
/// breaks the device. The answer goes to `q`'s response buffer.
pub(crate) fn unplugging_the_rings_under_the_device(
    driver: &mut GuestDriver,
    q: &Virtq,
    v: &HotplugView,
) {
    let mut hq = Virtq::new(v, HOTPLUG_BASE + 0x10_0000);
    handshake(driver, &mut hq);
    hq.write(
        hq.req(),
        &request_bytes(VIRTIO_MEM_REQ_UNPLUG, HOTPLUG_BASE, 2),
    );
    hq.set_desc(0, hq.req(), 24, F_NEXT, 1);
    hq.set_desc(1, q.resp(), 10, F_WRITE, 0);
    hq.publish(0, 1);
    driver.one(w32(QUEUE_NOTIFY, 0)).unwrap();
    assert!(
        poll(
            driver,
            VIRTIO + u64::from(VIRTIO_MMIO_INTERRUPT_STATUS),
            1,
            1,
            10_000
        ),
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
    let (broken, _) = notify_and_wait_broken(driver);
    assert!(broken, "rings in unplugged memory did not break the device");
}

/// UNPLUG_ALL takes back everything plugged.
pub(crate) fn unplug_all_takes_it_all_back(
    driver: &mut GuestDriver,
    q: &mut Virtq,
    v: &HotplugView,
) {
    let before = q.used_idx();
    q.request(VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0);
    assert!(notify_and_wait_used(driver, q, before).0);
    assert_eq!(q.response(), (ACK, 0));
    assert_eq!((v.plugged(), v.mapped_slots()), (0, 0));
}
