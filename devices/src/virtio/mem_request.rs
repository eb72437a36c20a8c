//! The virtio-mem request and response wire formats (virtio 1.2 §5.15.6).
//!
//! A request is 24 bytes: `le16 type; le16 padding[3]; le64 addr; le16 nb_blocks;
//! le16 padding[3]` (the address and block count are only meaningful for PLUG, UNPLUG and
//! STATE). A response is 10 bytes: `le16 type; le16 padding[3]; le16 state` (the state
//! only for an acknowledged STATE request). Padding is ignored on input and written as 0.

use vm_memory::{ByteValued, Le16, Le64};

/// Size of a request in bytes.
pub const MEM_REQUEST_SIZE: usize = 24;
/// Size of a response in bytes.
pub const MEM_RESPONSE_SIZE: usize = 10;

/// A request as the driver lays it out (`struct virtio_mem_req`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct WireRequest {
    kind: Le16,
    padding: [Le16; 3],
    addr: Le64,
    nb_blocks: Le16,
    padding_1: [Le16; 3],
}

// SAFETY: little-endian integer fields only, with the spec's padding as
// explicit fields (no implicit padding: the size assertion below), so every
// byte pattern is a valid value and every value's bytes are initialised.
unsafe impl ByteValued for WireRequest {}

/// A response as the device lays it out (`struct virtio_mem_resp`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct WireResponse {
    kind: Le16,
    padding: [Le16; 3],
    state: Le16,
}

// SAFETY: as for `WireRequest`.
unsafe impl ByteValued for WireResponse {}

const _: () = assert!(std::mem::size_of::<WireRequest>() == MEM_REQUEST_SIZE);
const _: () = assert!(std::mem::size_of::<WireResponse>() == MEM_RESPONSE_SIZE);

/// Request type: plug consecutive blocks.
pub const VIRTIO_MEM_REQ_PLUG: u16 = 0;
/// Request type: unplug consecutive blocks.
pub const VIRTIO_MEM_REQ_UNPLUG: u16 = 1;
/// Request type: unplug every block and possibly shrink the usable region.
pub const VIRTIO_MEM_REQ_UNPLUG_ALL: u16 = 2;
/// Request type: query the state of consecutive blocks.
pub const VIRTIO_MEM_REQ_STATE: u16 = 3;

/// Response type: request processed.
pub const VIRTIO_MEM_RESP_ACK: u16 = 0;
/// Response type: request denied (plugging more than requested).
pub const VIRTIO_MEM_RESP_NACK: u16 = 1;
/// Response type: request cannot be processed now, try again later.
pub const VIRTIO_MEM_RESP_BUSY: u16 = 2;
/// Response type: request is invalid (alignment, range, block state).
pub const VIRTIO_MEM_RESP_ERROR: u16 = 3;

/// Block state in a STATE response: all blocks plugged.
pub const VIRTIO_MEM_STATE_PLUGGED: u16 = 0;
/// Block state in a STATE response: all blocks unplugged.
pub const VIRTIO_MEM_STATE_UNPLUGGED: u16 = 1;
/// Block state in a STATE response: some plugged, some not.
pub const VIRTIO_MEM_STATE_MIXED: u16 = 2;

/// A decoded request. Every 24-byte input decodes to one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemRequest {
    /// Plug `nb_blocks` blocks starting at guest-physical `addr`.
    Plug {
        /// Guest-physical address of the first block.
        addr: u64,
        /// Number of consecutive blocks.
        nb_blocks: u16,
    },
    /// Unplug `nb_blocks` blocks starting at guest-physical `addr`.
    Unplug {
        /// Guest-physical address of the first block.
        addr: u64,
        /// Number of consecutive blocks.
        nb_blocks: u16,
    },
    /// Unplug every plugged block.
    UnplugAll,
    /// Report whether the `nb_blocks` blocks at `addr` are plugged.
    State {
        /// Guest-physical address of the first block.
        addr: u64,
        /// Number of consecutive blocks.
        nb_blocks: u16,
    },
    /// A request type this device does not know.
    Unknown {
        /// The type field as sent.
        kind: u16,
    },
}

impl MemRequest {
    /// Decodes a request; padding is ignored.
    pub fn parse(bytes: &[u8; MEM_REQUEST_SIZE]) -> MemRequest {
        let mut wire = WireRequest::default();
        wire.as_mut_slice().copy_from_slice(bytes);
        let (addr, nb_blocks) = (wire.addr.to_native(), wire.nb_blocks.to_native());
        match wire.kind.to_native() {
            VIRTIO_MEM_REQ_PLUG => MemRequest::Plug { addr, nb_blocks },
            VIRTIO_MEM_REQ_UNPLUG => MemRequest::Unplug { addr, nb_blocks },
            VIRTIO_MEM_REQ_UNPLUG_ALL => MemRequest::UnplugAll,
            VIRTIO_MEM_REQ_STATE => MemRequest::State { addr, nb_blocks },
            kind => MemRequest::Unknown { kind },
        }
    }

    /// Encodes the request as a driver would send it (padding zero).
    pub fn to_bytes(&self) -> [u8; MEM_REQUEST_SIZE] {
        let (kind, addr, nb_blocks) = match *self {
            MemRequest::Plug { addr, nb_blocks } => (VIRTIO_MEM_REQ_PLUG, addr, nb_blocks),
            MemRequest::Unplug { addr, nb_blocks } => (VIRTIO_MEM_REQ_UNPLUG, addr, nb_blocks),
            MemRequest::UnplugAll => (VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0),
            MemRequest::State { addr, nb_blocks } => (VIRTIO_MEM_REQ_STATE, addr, nb_blocks),
            MemRequest::Unknown { kind } => (kind, 0, 0),
        };
        let wire = WireRequest {
            kind: kind.into(),
            addr: addr.into(),
            nb_blocks: nb_blocks.into(),
            ..WireRequest::default()
        };
        let mut out = [0u8; MEM_REQUEST_SIZE];
        out.copy_from_slice(wire.as_slice());
        out
    }
}

/// The answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemResponse {
    /// Processed; for STATE requests with the state of the blocks.
    Ack(Option<BlockState>),
    /// Denied: plugging would exceed the requested size.
    Nack,
    /// Cannot be processed now (the backend failed); the driver retries later.
    Busy,
    /// Invalid request.
    Error,
}

/// The state of a range of blocks, as a STATE request reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockState {
    /// Every block is plugged.
    Plugged,
    /// No block is plugged.
    Unplugged,
    /// Some blocks are plugged, some are not.
    Mixed,
}

impl MemResponse {
    /// The response type field.
    pub fn kind(&self) -> u16 {
        match self {
            MemResponse::Ack(_) => VIRTIO_MEM_RESP_ACK,
            MemResponse::Nack => VIRTIO_MEM_RESP_NACK,
            MemResponse::Busy => VIRTIO_MEM_RESP_BUSY,
            MemResponse::Error => VIRTIO_MEM_RESP_ERROR,
        }
    }

    /// Encodes the response; the state field is 0 unless this is an ACK with a state.
    pub fn to_bytes(&self) -> [u8; MEM_RESPONSE_SIZE] {
        let state = match self {
            MemResponse::Ack(Some(BlockState::Plugged)) => VIRTIO_MEM_STATE_PLUGGED,
            MemResponse::Ack(Some(BlockState::Unplugged)) => VIRTIO_MEM_STATE_UNPLUGGED,
            MemResponse::Ack(Some(BlockState::Mixed)) => VIRTIO_MEM_STATE_MIXED,
            _ => 0,
        };
        let wire = WireResponse {
            kind: self.kind().into(),
            state: state.into(),
            ..WireResponse::default()
        };
        let mut out = [0u8; MEM_RESPONSE_SIZE];
        out.copy_from_slice(wire.as_slice());
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn plug_request_layout_matches_the_spec() {
        let mut raw = [0xeeu8; MEM_REQUEST_SIZE];
        raw[0..2].copy_from_slice(&0u16.to_le_bytes());
        raw[8..16].copy_from_slice(&0x1_2345_6000u64.to_le_bytes());
        raw[16..18].copy_from_slice(&7u16.to_le_bytes());
        assert_eq!(
            MemRequest::parse(&raw),
            MemRequest::Plug {
                addr: 0x1_2345_6000,
                nb_blocks: 7
            },
            "padding (0xee) is ignored"
        );
    }

    #[test]
    fn every_type_decodes() {
        let mut raw = [0u8; MEM_REQUEST_SIZE];
        raw[0] = 1;
        assert!(matches!(MemRequest::parse(&raw), MemRequest::Unplug { .. }));
        raw[0] = 2;
        assert_eq!(MemRequest::parse(&raw), MemRequest::UnplugAll);
        raw[0] = 3;
        assert!(matches!(MemRequest::parse(&raw), MemRequest::State { .. }));
        raw[0] = 4;
        assert_eq!(MemRequest::parse(&raw), MemRequest::Unknown { kind: 4 });
        raw[1] = 1;
        assert_eq!(MemRequest::parse(&raw), MemRequest::Unknown { kind: 0x104 });
    }

    #[test]
    fn responses_encode_type_and_state() {
        assert_eq!(
            MemResponse::Ack(Some(BlockState::Mixed)).to_bytes(),
            [0, 0, 0, 0, 0, 0, 0, 0, 2, 0]
        );
        assert_eq!(MemResponse::Nack.to_bytes(), [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(MemResponse::Busy.to_bytes()[0], 2);
        assert_eq!(MemResponse::Error.to_bytes()[0], 3);
        assert_eq!(MemResponse::Ack(None).to_bytes(), [0; MEM_RESPONSE_SIZE]);
        assert_eq!(
            MemResponse::Ack(Some(BlockState::Unplugged)).to_bytes()[8],
            1
        );
    }

    proptest! {
        #[test]
        fn known_requests_round_trip(kind in 0u16..4, addr in any::<u64>(), nb in any::<u16>()) {
            let mut raw = [0u8; MEM_REQUEST_SIZE];
            raw[0..2].copy_from_slice(&kind.to_le_bytes());
            raw[8..16].copy_from_slice(&addr.to_le_bytes());
            raw[16..18].copy_from_slice(&nb.to_le_bytes());
            let req = MemRequest::parse(&raw);
            let again = MemRequest::parse(&req.to_bytes());
            prop_assert_eq!(req, again);
        }
    }
}
