//! Fuzz target `qmp`: one client's byte stream through the QMP input path.
//!
//! Input layout: byte 0 holds flags, the rest is what the client sends.
//! - bit 0: the client has already negotiated capabilities;
//! - bit 1: use a 256-byte message limit instead of the server's
//!   [`MAX_MESSAGE_SIZE`], so the "too large" path is reachable within
//!   libFuzzer's input sizes;
//! - bit 2: every VM operation fails (as a VM in a bad state would);
//! - bits 3..8: seed of the chunk sizes of the second split.
//!
//! The stream is split twice, in one piece and in pseudo-random chunks, and
//! both splits must give the same frames (the splitter is incremental: read
//! sizes must not matter). Each frame is then answered as the server answers
//! it, against `vmm::test_utils::FakeVm`, and every reply is checked:
//! - it is `{"return": ...}` or `{"error": {"class", "desc"}}` with QEMU's
//!   classes, plus the request's `id` exactly when the request was a JSON
//!   object with an `id` member;
//! - it encodes to one line ending in `\r\n` that parses back to itself;
//! - before negotiation nothing but `qmp_capabilities` runs and no event is
//!   sent;
//! - the VM is only called as `VmOps` promises (`stop` only while
//!   running, `cont` only while paused or before launch, sizes passed to
//!   `set_requested_size` valid for the device): the fake VM panics
//!   otherwise.
//!
//! Processing stops after a "too large" frame, as the server closes the
//! connection then.

use serde_json::Value;
use vmm::test_utils::FakeVm;
use vmm::test_utils::qmp::fuzz_api::{self, Frame, JsonSplitter};
use vmm::test_utils::qmp::{MAX_MESSAGE_SIZE, QmpError};

/// The small message limit selected by flag bit 1.
pub const SMALL_LIMIT: usize = 256;

/// Splits `input` fed in pieces of the given sizes (cycled; 0 is read as
/// 1), up to and including a "too large" frame.
pub fn split(max_len: usize, input: &[u8], sizes: &[usize]) -> Vec<Frame> {
    let mut splitter = JsonSplitter::new(max_len);
    let mut frames = Vec::new();
    let mut rest = input;
    let mut size = sizes.iter().cycle();
    while !rest.is_empty() {
        let n = size
            .next()
            .copied()
            .unwrap_or(usize::MAX)
            .clamp(1, rest.len());
        let (mut chunk, tail) = rest.split_at(n);
        rest = tail;
        loop {
            let (used, frame) = splitter.feed(chunk);
            assert!(used <= chunk.len());
            chunk = &chunk[used..];
            match frame {
                Some(f @ Frame::TooLarge(_)) => {
                    frames.push(f);
                    return frames;
                }
                Some(f) => frames.push(f),
                None => {
                    assert!(chunk.is_empty(), "no frame but input left over");
                    break;
                }
            }
        }
    }
    frames
}

const CLASSES: [&str; 4] = [
    "GenericError",
    "CommandNotFound",
    "DeviceNotActive",
    "DeviceNotFound",
];

fn check_reply(reply: &Value, request: Option<&Value>) {
    let obj = reply.as_object().expect("a reply is a JSON object");
    let has_return = obj.contains_key("return");
    let has_error = obj.contains_key("error");
    assert!(
        has_return != has_error,
        "exactly one of return/error: {reply}"
    );
    assert!(
        obj.keys()
            .all(|k| ["return", "error", "id"].contains(&k.as_str())),
        "unexpected member in {reply}"
    );
    if let Some(e) = obj.get("error") {
        let e = e.as_object().expect("error is an object");
        assert_eq!(e.len(), 2, "error has class and desc only: {reply}");
        let class = e.get("class").and_then(Value::as_str).expect("class");
        assert!(CLASSES.contains(&class), "unknown class {class}");
        assert!(e.get("desc").is_some_and(Value::is_string), "desc: {reply}");
    }
    let expected_id = request
        .and_then(|r| r.as_object())
        .and_then(|o| o.get("id"));
    assert_eq!(obj.get("id"), expected_id, "id echo of {reply}");
    let wire = fuzz_api::encode(reply);
    let body = wire.strip_suffix(b"\r\n").expect("ends in CRLF");
    assert!(!body.contains(&b'\n'), "one line");
    let back: Value = serde_json::from_slice(body).expect("the reply is valid JSON");
    assert_eq!(&back, reply);
}

/// Runs one input; panics if a check fails.
pub fn run(data: &[u8]) {
    let Some((&flags, stream)) = data.split_first() else {
        return;
    };
    let mut negotiated = flags & 1 != 0;
    let limit = if flags & 2 != 0 {
        SMALL_LIMIT
    } else {
        MAX_MESSAGE_SIZE
    };
    let mut vm = FakeVm::new();
    if flags & 4 != 0 {
        vm.fail = Some(QmpError::generic("injected failure"));
    }

    let whole = split(limit, stream, &[usize::MAX]);
    let mut seed = u32::from(flags >> 3) | 0x100;
    let sizes: Vec<usize> = (0..16)
        .map(|_| {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            1 + ((seed >> 16) as usize % 17)
        })
        .collect();
    let chunked = split(limit, stream, &sizes);
    assert_eq!(whole, chunked, "read sizes changed the framing");

    for frame in whole {
        let request: Option<Value> = match &frame {
            Frame::Message(bytes) => serde_json::from_slice(bytes).ok(),
            _ => None,
        };
        let too_large = matches!(frame, Frame::TooLarge(_));
        let was_negotiated = negotiated;
        let calls_before = vm.calls.len();
        let answer = fuzz_api::answer(frame, &mut negotiated, &mut vm);
        check_reply(&answer.reply, request.as_ref());
        let execute = request
            .as_ref()
            .and_then(|r| r.get("execute"))
            .and_then(Value::as_str);
        if !was_negotiated {
            assert_eq!(
                vm.calls.len(),
                calls_before,
                "a command ran before negotiation"
            );
            assert!(answer.before.is_empty() && answer.after.is_empty());
            if negotiated {
                assert_eq!(execute, Some("qmp_capabilities"));
                assert!(answer.reply.get("return").is_some());
            }
        } else {
            assert!(negotiated, "negotiation cannot be undone");
        }
        for event in answer.before.iter().chain(&answer.after) {
            assert!(event.get("event").is_some_and(Value::is_string), "{event}");
            assert!(event.get("timestamp").is_some(), "{event}");
        }
        if too_large {
            break;
        }
    }
}
