//! The buffers of one request, taken from a split-virtqueue descriptor chain and checked
//! before the device acts on the request.
//!
//! `virtio-queue`'s chain iterator already refuses to run away: it follows at most
//! queue-size descriptors (so a loop ends), stops at a `next` index outside the table, at
//! a descriptor it cannot read, at a bad indirect table and at a chain longer than 4 GiB.
//! But it stops *silently*, exactly as if the chain had ended. `RequestBuffers::new`
//! tells the two apart: a chain whose last descriptor still has `VRING_DESC_F_NEXT` set
//! was cut short, and that is a malformed chain. It also enforces the ordering rule of the
//! virtio spec (all device-readable descriptors before all device-writable ones).
//!
//! Guest memory is only touched through vm-memory's checked accessors on the map the
//! caller passes in; nothing here can reach host memory outside that map.

use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap};

/// Why a descriptor chain cannot be used.
#[derive(Debug, Error)]
pub enum ChainError {
    /// The chain yields no descriptor: bad head index or unreadable descriptor table.
    #[error("descriptor chain with head {head} is empty or unreadable")]
    Empty {
        /// Head index from the available ring.
        head: u16,
    },
    /// The chain ends on a descriptor that still points to a next one: a loop longer
    /// than the queue, a `next` index outside the table, an unreadable descriptor or an
    /// invalid indirect table.
    #[error("descriptor chain with head {head} is cut short after {count} descriptors")]
    Truncated {
        /// Head index from the available ring.
        head: u16,
        /// Descriptors read before the chain broke off.
        count: usize,
    },
    /// The chain has more descriptors than the device accepts (only possible through an
    /// indirect table, which the driver may not use unless negotiated).
    #[error("descriptor chain with head {head} has more than {max} descriptors")]
    TooLong {
        /// Head index from the available ring.
        head: u16,
        /// The most descriptors accepted.
        max: usize,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("descriptor chain with head {head} has a readable buffer after a writable one")]
    ReadableAfterWritable {
        /// Head index from the available ring.
        head: u16,
    },
    /// The device-readable buffers hold fewer bytes than the request needs.
    #[error("request needs {needed} readable bytes, the chain has {available}")]
    RequestTooShort {
        /// Bytes the request needs.
        needed: usize,
        /// Bytes in the chain's device-readable buffers.
        available: u64,
    },
    /// The device-writable buffers hold fewer bytes than the response needs.
    #[error("response needs {needed} writable bytes, the chain has {available}")]
    ResponseTooShort {
        /// Bytes the response needs.
        needed: usize,
        /// Bytes in the chain's device-writable buffers.
        available: u64,
    },
    /// A buffer the request or response needs lies outside guest memory.
    #[error("descriptor buffer at {addr:#x} (+{len:#x}) is outside guest memory")]
    OutOfRange {
        /// Guest-physical start of the part that could not be accessed.
        addr: u64,
        /// Length of that part.
        len: usize,
    },
    /// Guest memory refused an access that was checked before.
    #[error("cannot access a descriptor buffer")]
    Memory(#[source] GuestMemoryError),
    /// A buffer the device would write, or the used ring, overlaps memory the
    /// device has unplugged (the VMM does not let anything write there).
    #[error("device-written memory at {addr:#x} (+{len:#x}) overlaps unplugged memory")]
    Unplugged {
        /// Guest-physical start of the range.
        addr: u64,
        /// Its length.
        len: u64,
    },
}

/// One buffer of a chain: guest-physical address and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// The device-readable and device-writable buffers of one descriptor chain, in order.
///
/// Only the buffers are recorded, never their contents; reads and writes go to guest
/// memory when asked for.
#[derive(Debug)]
pub(crate) struct RequestBuffers {
    head: u16,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    readable_len: u64,
    writable_len: u64,
}

impl RequestBuffers {
    /// Walks `chain` to its end and records its buffers.
    ///
    /// Fails if the chain is empty, cut short, longer than `max_descriptors`, or has a
    /// readable buffer after a writable one. Zero-length descriptors are allowed and
    /// skipped. The walk reads at most `max_descriptors + 1` descriptors (the chain
    /// iterator itself stops after the queue size, or an indirect table's size).
    pub(crate) fn new(
        chain: DescriptorChain<&GuestMemoryMmap>,
        max_descriptors: usize,
    ) -> Result<Self, ChainError> {
        let head = chain.head_index();
        let mut bufs = RequestBuffers {
            head,
            readable: Vec::new(),
            writable: Vec::new(),
            readable_len: 0,
            writable_len: 0,
        };
        let mut count = 0usize;
        let mut last_has_next = false;
        let mut seen_writable = false;
        for desc in chain {
            count += 1;
            if count > max_descriptors {
                return Err(ChainError::TooLong {
                    head,
                    max: max_descriptors,
                });
            }
            last_has_next = desc.has_next();
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.is_write_only() {
                seen_writable = true;
                bufs.writable_len += u64::from(seg.len);
                if seg.len > 0 {
                    bufs.writable.push(seg);
                }
            } else {
                if seen_writable {
                    return Err(ChainError::ReadableAfterWritable { head });
                }
                bufs.readable_len += u64::from(seg.len);
                if seg.len > 0 {
                    bufs.readable.push(seg);
                }
            }
        }
        if count == 0 {
            return Err(ChainError::Empty { head });
        }
        if last_has_next {
            return Err(ChainError::Truncated { head, count });
        }
        Ok(bufs)
    }

    /// The head index to report in the used ring.
    pub(crate) fn head(&self) -> u16 {
        self.head
    }

    /// Fills `buf` with the first `buf.len()` bytes of the readable buffers.
    ///
    /// Fails if the readable buffers are shorter than `buf` or the bytes needed are not
    /// all in guest memory. Bytes beyond `buf.len()` are neither read nor checked.
    pub(crate) fn read_prefix(
        &self,
        mem: &GuestMemoryMmap,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        if self.readable_len < buf.len() as u64 {
            return Err(ChainError::RequestTooShort {
                needed: buf.len(),
                available: self.readable_len,
            });
        }
        let mut done = 0usize;
        for (addr, part) in pieces(&self.readable, buf.len()) {
            let Some(dst) = buf.get_mut(done..done + part) else {
                break;
            };
            mem.read_slice(dst, addr)
                .map_err(|_| ChainError::OutOfRange {
                    addr: addr.0,
                    len: part,
                })?;
            done += part;
        }
        Ok(())
    }

    /// Checks that the writable buffers can take `len` bytes: long enough, and the first
    /// `len` bytes all in guest memory. A following [`write_prefix`] of at most `len`
    /// bytes on the same map then cannot fail for lack of space or memory.
    ///
    /// [`write_prefix`]: RequestBuffers::write_prefix
    pub(crate) fn check_writable(
        &self,
        mem: &GuestMemoryMmap,
        len: usize,
    ) -> Result<(), ChainError> {
        if self.writable_len < len as u64 {
            return Err(ChainError::ResponseTooShort {
                needed: len,
                available: self.writable_len,
            });
        }
        for (addr, part) in pieces(&self.writable, len) {
            if !GuestMemoryBackend::check_range(mem, addr, part) {
                return Err(ChainError::OutOfRange {
                    addr: addr.0,
                    len: part,
                });
            }
        }
        Ok(())
    }

    /// The guest ranges a [`write_prefix`](RequestBuffers::write_prefix) of `len` bytes
    /// writes.
    pub(crate) fn writable_ranges(&self, len: usize) -> impl Iterator<Item = (u64, u64)> + '_ {
        pieces(&self.writable, len).map(|(a, n)| (a.0, n as u64))
    }

    /// Writes `data` to the start of the writable buffers; returns the number of bytes
    /// written (`data.len()`), which is what the used ring reports.
    pub(crate) fn write_prefix(
        &self,
        mem: &GuestMemoryMmap,
        data: &[u8],
    ) -> Result<u32, ChainError> {
        self.check_writable(mem, data.len())?;
        let mut done = 0usize;
        for (addr, part) in pieces(&self.writable, data.len()) {
            let Some(src) = data.get(done..done + part) else {
                break;
            };
            mem.write_slice(src, addr).map_err(ChainError::Memory)?;
            done += part;
        }
        u32::try_from(done).map_err(|_| ChainError::ResponseTooShort {
            needed: data.len(),
            available: self.writable_len,
        })
    }
}

/// The `(address, length)` pieces that cover the first `total` bytes of `segments`.
fn pieces(segments: &[Segment], total: usize) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
    let mut left = total;
    segments.iter().map_while(move |seg| {
        if left == 0 {
            return None;
        }
        let part = usize::try_from(seg.len).unwrap_or(usize::MAX).min(left);
        left -= part;
        Some((seg.addr, part))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};

    use super::*;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// Puts `descs` at table index 0.. and makes index 0 the only available head.
    fn parse(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<RequestBuffers, ChainError> {
        let vq = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
        for (i, d) in descs.iter().enumerate() {
            vq.desc_table().store(i as u16, *d).unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(mem).unwrap().next().unwrap();
        RequestBuffers::new(chain, 64)
    }

    #[test]
    fn request_and_response_split_across_descriptors() {
        let m = mem();
        m.write_slice(&[1, 2, 3], GuestAddress(0x8000)).unwrap();
        m.write_slice(&[4, 5], GuestAddress(0x9000)).unwrap();
        let bufs = parse(
            &m,
            &[
                desc(0x8000, 3, NEXT, 1),
                desc(0x7000, 0, NEXT, 2),
                desc(0x9000, 8, NEXT, 3),
                desc(0xa000, 1, WRITE | NEXT, 4),
                desc(0xb000, 16, WRITE, 0),
            ],
        )
        .unwrap();
        assert_eq!(bufs.head(), 0);
        let mut req = [0u8; 5];
        bufs.read_prefix(&m, &mut req).unwrap();
        assert_eq!(req, [1, 2, 3, 4, 5]);
        assert_eq!(bufs.write_prefix(&m, &[9, 8, 7]).unwrap(), 3);
        let mut out = [0u8; 3];
        m.read_slice(&mut out[..1], GuestAddress(0xa000)).unwrap();
        m.read_slice(&mut out[1..], GuestAddress(0xb000)).unwrap();
        assert_eq!(out, [9, 8, 7]);
    }

    #[test]
    fn loop_is_reported_as_truncated() {
        let m = mem();
        let err = parse(&m, &[desc(0x8000, 8, NEXT, 1), desc(0x9000, 8, NEXT, 0)]).unwrap_err();
        assert!(
            matches!(err, ChainError::Truncated { head: 0, count: 16 }),
            "{err:?}"
        );
    }

    #[test]
    fn chains_longer_than_the_limit_are_rejected() {
        let m = mem();
        let descs: Vec<_> = (0..5u16)
            .map(|i| desc(0x8000, 4, if i < 4 { NEXT } else { 0 }, i + 1))
            .collect();
        let vq = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        for (i, d) in descs.iter().enumerate() {
            vq.desc_table().store(i as u16, *d).unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(&m).unwrap().next().unwrap();
        assert!(matches!(
            RequestBuffers::new(chain.clone(), 4),
            Err(ChainError::TooLong { head: 0, max: 4 })
        ));
        assert!(RequestBuffers::new(chain, 5).is_ok());
    }

    #[test]
    fn indirect_table_is_followed_and_bounded_by_its_size() {
        let m = mem();
        // An indirect table of 4 descriptors at 0x6000 that loops back on itself.
        for i in 0..4u16 {
            let d = desc(0x8000, 4, NEXT, (i + 1) % 4);
            m.write_obj(d, GuestAddress(0x6000 + 16 * u64::from(i)))
                .unwrap();
        }
        let err = parse(&m, &[desc(0x6000, 64, VRING_DESC_F_INDIRECT as u16, 0)]).unwrap_err();
        assert!(
            matches!(err, ChainError::Truncated { count: 4, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn next_index_outside_the_table_is_truncated() {
        let m = mem();
        let err = parse(&m, &[desc(0x8000, 8, NEXT, 16)]).unwrap_err();
        assert!(
            matches!(err, ChainError::Truncated { count: 1, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn readable_after_writable_is_rejected() {
        let m = mem();
        let err = parse(
            &m,
            &[desc(0x8000, 8, WRITE | NEXT, 1), desc(0x9000, 8, 0, 0)],
        )
        .unwrap_err();
        assert!(matches!(err, ChainError::ReadableAfterWritable { .. }));
        let err = parse(
            &m,
            &[desc(0x8000, 0, WRITE | NEXT, 1), desc(0x9000, 8, 0, 0)],
        )
        .unwrap_err();
        assert!(
            matches!(err, ChainError::ReadableAfterWritable { .. }),
            "an empty writable descriptor counts too"
        );
    }

    #[test]
    fn head_outside_the_table_is_empty() {
        let m = mem();
        let vq = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        vq.avail().ring().ref_at(0).unwrap().store(16);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(&m).unwrap().next().unwrap();
        assert!(matches!(
            RequestBuffers::new(chain, 64),
            Err(ChainError::Empty { head: 16 })
        ));
    }

    #[test]
    fn short_and_out_of_range_buffers_are_rejected() {
        let m = mem();
        let bufs = parse(&m, &[desc(0x8000, 4, NEXT, 1), desc(0x9000, 2, WRITE, 0)]).unwrap();
        let mut req = [0u8; 8];
        assert!(matches!(
            bufs.read_prefix(&m, &mut req),
            Err(ChainError::RequestTooShort {
                needed: 8,
                available: 4
            })
        ));
        assert!(matches!(
            bufs.check_writable(&m, 3),
            Err(ChainError::ResponseTooShort {
                needed: 3,
                available: 2
            })
        ));

        let bufs = parse(
            &m,
            &[desc(0xf_fffc, 8, NEXT, 1), desc(u64::MAX - 3, 16, WRITE, 0)],
        )
        .unwrap();
        assert!(matches!(
            bufs.read_prefix(&m, &mut req),
            Err(ChainError::OutOfRange {
                addr: 0xf_fffc,
                len: 8
            })
        ));
        assert!(matches!(
            bufs.write_prefix(&m, &[0; 10]),
            Err(ChainError::OutOfRange { .. })
        ));
    }

    #[test]
    fn writable_only_chain_has_no_request() {
        let m = mem();
        let bufs = parse(&m, &[desc(0x9000, 32, WRITE, 0)]).unwrap();
        let mut req = [0u8; 24];
        assert!(matches!(
            bufs.read_prefix(&m, &mut req),
            Err(ChainError::RequestTooShort { available: 0, .. })
        ));
    }
}
