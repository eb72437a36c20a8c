//! The shapes of QMP messages (QEMU's `docs/interop/qmp-spec.rst`): the
//! greeting, the request envelope, replies, and how a message is written on
//! the wire.

use super::error::QmpError;
use serde_json::{Map, Value, json};
use std::time::{SystemTime, UNIX_EPOCH};

/// The QEMU version whose QMP behaviour the server follows, reported in the
/// greeting and by `query-version` as `(major, minor, micro)`.
pub(crate) const QEMU_VERSION: (u64, u64, u64) = (9, 2, 0);

/// The `package` string of `query-version`: names this VMM.
pub(crate) fn package() -> String {
    format!("vmm {}", env!("CARGO_PKG_VERSION"))
}

/// The `VersionInfo` object of `query-version` and the greeting.
pub(crate) fn version_info() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": package(),
    })
}

/// The greeting sent when a client connects. No capability is offered (no
/// out-of-band execution).
pub(crate) fn greeting() -> Value {
    json!({"QMP": {"version": version_info(), "capabilities": []}})
}

/// A request that passed the envelope checks.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Request {
    /// The command name.
    pub execute: String,
    /// The arguments (empty when the member is absent).
    pub arguments: Map<String, Value>,
}

/// Checks the envelope of a parsed message as QEMU's
/// `qmp_dispatch_check_obj()` does. Returns the `id` to echo (a copy of the
/// member, present even when the envelope is bad) and the request or the
/// error to answer with.
pub(crate) fn parse_request(message: Value) -> (Option<Value>, Result<Request, QmpError>) {
    let Value::Object(mut members) = message else {
        return (
            None,
            Err(QmpError::generic("QMP input must be a JSON object")),
        );
    };
    let id = members.remove("id");
    let mut execute = None;
    let mut arguments = Map::new();
    for (name, member) in members {
        match (name.as_str(), member) {
            ("execute", Value::String(command)) => execute = Some(command),
            ("execute", _) => {
                return (
                    id,
                    Err(QmpError::generic(
                        "QMP input member 'execute' must be a string",
                    )),
                );
            }
            ("arguments", Value::Object(args)) => arguments = args,
            ("arguments", _) => {
                return (
                    id,
                    Err(QmpError::generic(
                        "QMP input member 'arguments' must be an object",
                    )),
                );
            }
            (other, _) => {
                return (
                    id,
                    Err(QmpError::generic(format!(
                        "QMP input member '{other}' is unexpected"
                    ))),
                );
            }
        }
    }
    match execute {
        Some(execute) => (id, Ok(Request { execute, arguments })),
        None => (
            id,
            Err(QmpError::generic("QMP input lacks member 'execute'")),
        ),
    }
}

/// A reply: `{"return": ...}` or `{"error": {"class", "desc"}}`, with the
/// request's `id` when it had one.
pub(crate) fn response(id: Option<Value>, result: Result<Value, QmpError>) -> Value {
    let mut reply = Map::new();
    match result {
        Ok(value) => {
            reply.insert("return".into(), value);
        }
        Err(e) => {
            reply.insert(
                "error".into(),
                json!({"class": e.class().as_str(), "desc": e.desc()}),
            );
        }
    }
    if let Some(id) = id {
        reply.insert("id".into(), id);
    }
    Value::Object(reply)
}

/// A message as written on the wire: compact JSON, then `\r\n` as QEMU's
/// monitor writes it.
pub(crate) fn encode(message: &Value) -> Vec<u8> {
    let mut bytes = message.to_string().into_bytes();
    bytes.extend_from_slice(b"\r\n");
    bytes
}

/// An event time stamp: wall-clock time since the Unix epoch, as QEMU
/// stamps events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timestamp {
    /// Whole seconds.
    pub seconds: u64,
    /// Microseconds within the second (0..1_000_000).
    pub microseconds: u32,
}

impl Timestamp {
    /// The current time (the epoch if the clock is set before it).
    pub(crate) fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            seconds: since.as_secs(),
            microseconds: since.subsec_micros(),
        }
    }

    /// The moment `t` (the epoch if it is before it).
    pub(crate) fn from_system_time(t: SystemTime) -> Self {
        let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        Self {
            seconds: since.as_secs(),
            microseconds: since.subsec_micros(),
        }
    }

    /// The `{"seconds": S, "microseconds": U}` object.
    pub(crate) fn to_json(self) -> Value {
        json!({"seconds": self.seconds, "microseconds": self.microseconds})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::error::ErrorClass;

    #[test]
    fn test_greeting_has_version_and_no_capabilities() {
        let g = greeting();
        let (major, minor, micro) = QEMU_VERSION;
        assert_eq!(g["QMP"]["version"]["qemu"]["major"], major);
        assert_eq!(g["QMP"]["version"]["qemu"]["minor"], minor);
        assert_eq!(g["QMP"]["version"]["qemu"]["micro"], micro);
        assert!(
            g["QMP"]["version"]["package"]
                .as_str()
                .unwrap()
                .starts_with("vmm ")
        );
        assert_eq!(g["QMP"]["capabilities"], json!([]));
        assert_eq!(g.as_object().unwrap().len(), 1);
    }

    #[test]
    fn test_parse_request_full_envelope() {
        let (id, req) = parse_request(json!({
            "execute": "qom-get",
            "arguments": {"path": "vmem0"},
            "id": {"any": ["json", 1]}
        }));
        assert_eq!(id, Some(json!({"any": ["json", 1]})));
        let req = req.unwrap();
        assert_eq!(req.execute, "qom-get");
        assert_eq!(req.arguments.get("path"), Some(&json!("vmem0")));
    }

    #[test]
    fn test_parse_request_without_arguments_has_empty_arguments() {
        let (id, req) = parse_request(json!({"execute": "stop"}));
        assert_eq!(id, None);
        assert!(req.unwrap().arguments.is_empty());
    }

    #[test]
    fn test_parse_request_non_object_has_no_id() {
        for v in [json!([1]), json!(42), json!("execute"), json!(null)] {
            let (id, req) = parse_request(v);
            assert_eq!(id, None);
            assert_eq!(
                req.unwrap_err(),
                QmpError::generic("QMP input must be a JSON object")
            );
        }
    }

    #[test]
    fn test_parse_request_envelope_errors_keep_id() {
        let cases = [
            (
                json!({"id": 7, "execute": 1}),
                "QMP input member 'execute' must be a string",
            ),
            (
                json!({"id": 7, "execute": "stop", "arguments": []}),
                "QMP input member 'arguments' must be an object",
            ),
            (
                json!({"id": 7, "execute": "stop", "extra": 1}),
                "QMP input member 'extra' is unexpected",
            ),
            (
                json!({"id": 7, "exec-oob": "stop"}),
                "QMP input member 'exec-oob' is unexpected",
            ),
            (json!({"id": 7}), "QMP input lacks member 'execute'"),
        ];
        for (input, desc) in cases {
            let (id, req) = parse_request(input);
            assert_eq!(id, Some(json!(7)));
            let e = req.unwrap_err();
            assert_eq!(e.class(), ErrorClass::GenericError);
            assert_eq!(e.desc(), desc);
        }
    }

    #[test]
    fn test_response_success_and_error_shapes() {
        assert_eq!(
            response(Some(json!("a")), Ok(json!({}))),
            json!({"return": {}, "id": "a"})
        );
        assert_eq!(
            response(None, Err(QmpError::command_not_found("nope"))),
            json!({"error": {"class": "CommandNotFound", "desc": "nope"}})
        );
    }

    #[test]
    fn test_encode_is_one_line_ending_in_crlf() {
        let bytes = encode(&json!({"return": {"a": "x\ny"}}));
        assert!(bytes.ends_with(b"\r\n"));
        let body = &bytes[..bytes.len() - 2];
        assert!(!body.contains(&b'\n'));
        assert_eq!(
            serde_json::from_slice::<Value>(body).unwrap(),
            json!({"return": {"a": "x\ny"}})
        );
    }

    #[test]
    fn test_timestamp_now_is_recent_and_in_range() {
        let t = Timestamp::now();
        assert!(t.microseconds < 1_000_000);
        // 2020-01-01 as a lower bound for a sane clock.
        assert!(t.seconds > 1_577_836_800);
        assert_eq!(
            t.to_json(),
            json!({"seconds": t.seconds, "microseconds": t.microseconds})
        );
    }
}
