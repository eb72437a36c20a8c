//! Entry points for the fuzz targets of the repository's `fuzz/` crate (not a
//! stable API; exported as `vmm::test_utils::qmp::fuzz_api`, feature
//! `test-utils`).
//!
//! A fuzz target cannot open sockets per input, so it drives the server's
//! input path without one: the same [`JsonSplitter`] a connection feeds, and
//! [`answer`], which turns one [`Frame`] into what the server queues for the
//! client (events before the reply, the reply, events after), exactly as the
//! server does for a frame read from a socket.

use super::commands;
use super::error::QmpError;
use super::protocol::{self, Timestamp};
use super::server::frame_message;
use super::vm_ops::VmOps;
use serde_json::Value;

pub use super::json_splitter::{Frame, JsonSplitter};

/// What the server sends a client for one frame of its input.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// Events sent before the reply (`STOP`, `RESUME`), time-stamped 0.
    pub before: Vec<Value>,
    /// The reply: `{"return": ...}` or `{"error": ...}`, with the `id`.
    pub reply: Value,
    /// Events sent after the reply (`POWERDOWN`, `SHUTDOWN`), time-stamped 0.
    pub after: Vec<Value>,
}

/// Answers `frame` for a client whose negotiation state is `negotiated`
/// (updated by `qmp_capabilities`), running the command against `vm` as the
/// server does. Events are only reported for a negotiated client, as the
/// server only sends them to those.
pub fn answer(frame: Frame, negotiated: &mut bool, vm: &mut dyn VmOps) -> Answer {
    let message = match frame_message(frame) {
        Ok(message) => message,
        Err(e) => return error_only(e),
    };
    let outcome = commands::execute(message, negotiated, vm);
    let stamp = |events: Vec<super::QmpEvent>| -> Vec<Value> {
        if !*negotiated {
            return Vec::new();
        }
        let at = Timestamp {
            seconds: 0,
            microseconds: 0,
        };
        events.iter().map(|e| e.to_message(at)).collect()
    };
    Answer {
        before: stamp(outcome.before),
        reply: outcome.reply,
        after: stamp(outcome.after),
    }
}

fn error_only(e: QmpError) -> Answer {
    Answer {
        before: Vec::new(),
        reply: protocol::response(None, Err(e)),
        after: Vec::new(),
    }
}

/// A message as the server writes it on the wire (compact JSON and `\r\n`).
pub fn encode(message: &Value) -> Vec<u8> {
    protocol::encode(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::FakeVm;
    use serde_json::json;

    #[test]
    fn test_answer_runs_a_message_and_reports_events() {
        let mut vm = FakeVm::new();
        let mut negotiated = false;
        let a = answer(
            Frame::Message(br#"{"execute":"qmp_capabilities","id":1}"#.to_vec()),
            &mut negotiated,
            &mut vm,
        );
        assert_eq!(a.reply, json!({"return": {}, "id": 1}));
        assert!(negotiated);
        let a = answer(
            Frame::Message(br#"{"execute":"stop"}"#.to_vec()),
            &mut negotiated,
            &mut vm,
        );
        assert_eq!(a.reply, json!({"return": {}}));
        assert_eq!(a.before.len(), 1);
        assert_eq!(a.before[0]["event"], "STOP");
        assert_eq!(vm.calls, ["stop"]);
    }

    /// Found by the `qmp` fuzz target (fuzz/regressions/qmp/float-id-roundtrip):
    /// serde_json's default float parsing may be off by one unit in the last
    /// place, so the id `1.5e200` came back as `1.5000000000000001e+200` and a
    /// client could not match the reply to its request.
    #[test]
    fn test_float_id_is_echoed_exactly() {
        let mut vm = FakeVm::new();
        let mut negotiated = true;
        for (text, exact) in [
            ("1.5e200", 1.5e200_f64),
            ("0.1", 0.1),
            ("-3.25e-7", -3.25e-7),
        ] {
            let input = format!(r#"{{"execute":"query-status","id":{text}}}"#);
            let a = answer(Frame::Message(input.into_bytes()), &mut negotiated, &mut vm);
            let wire = encode(&a.reply);
            let text_out = std::str::from_utf8(&wire).unwrap();
            // The number as written on the wire, parsed exactly by Rust.
            let after = text_out.split(r#""id":"#).nth(1).unwrap();
            let id_out: String = after.chars().take_while(|c| !",}".contains(*c)).collect();
            assert_eq!(id_out.parse::<f64>().unwrap(), exact, "{text_out}");
        }
    }

    #[test]
    fn test_answer_to_bad_input_has_no_id_and_runs_nothing() {
        let mut vm = FakeVm::new();
        let mut negotiated = true;
        for frame in [
            Frame::Message(b"{\"execute\":".to_vec()),
            Frame::Error("JSON parse error, stray '@'".into()),
            Frame::TooLarge("JSON token size limit exceeded".into()),
        ] {
            let a = answer(frame, &mut negotiated, &mut vm);
            assert_eq!(a.reply["error"]["class"], "GenericError");
            assert!(a.reply.get("id").is_none());
            assert!(a.before.is_empty() && a.after.is_empty());
        }
        assert!(vm.calls.is_empty());
        assert!(encode(&json!({"return": {}})).ends_with(b"\r\n"));
    }
}
