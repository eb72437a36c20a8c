//! Splits a client's byte stream into top-level JSON texts, the way QEMU's
//! JSON lexer and streamer do (`qobject/json-lexer.c`,
//! `qobject/json-streamer.c`).
//!
//! QMP input is a stream of JSON values with no delimiter between them: the
//! `qemu.qmp` client sends commands without a newline, a read may hold
//! several commands or a piece of one. The splitter is a small lexer that
//! only knows where strings are and how deep the brackets go; it hands each
//! complete value to `serde_json` for the real parse. Its cost is linear in
//! the input, whatever the read sizes.
//!
//! Framing rules (QEMU's):
//!
//! * A message ends when the brackets and braces opened since the previous
//!   one are closed. A scalar at top level (`42`, `"x"`, `true`) is a
//!   message by itself, as is a stray `}`, `]`, `:` or `,` (the parser then
//!   rejects it).
//! * Whitespace between messages is dropped; whitespace inside a message is
//!   kept (so the parser's line/column positions are right).
//!
//! Errors and resynchronisation:
//!
//! * **Lexical error**: a byte that cannot start or continue a token (for
//!   example `@`, a byte >= 0x80 outside a string, an ASCII control
//!   character other than whitespace, or a control character or
//!   `0xFE`/`0xFF` inside a string). The message in progress is dropped and
//!   answered with `JSON parse error, stray '<byte>'`; then input is skipped,
//!   as QEMU's lexer recovery does, up to the next structural character
//!   (`{ } [ ] : ,`, where parsing restarts) or control character or
//!   `0xFE`/`0xFF` (consumed; a newline is one). QEMU's spec tells clients
//!   to send such a byte to force the parser into a known state; unlike QEMU
//!   we do not answer that byte with a second error when it ends a recovery.
//! * **Too deep**: an opening bracket beyond [`MAX_NESTING`] levels is
//!   answered with `JSON nesting depth limit exceeded`; the rest of that
//!   message is skipped (brackets and strings are still tracked, nothing is
//!   buffered) and parsing restarts after its last closing bracket.
//! * **Too large**: a message (or a skipped remainder) longer than the size
//!   limit is answered with `JSON token size limit exceeded`, and the
//!   caller closes the connection: the limit bounds what one client can
//!   make the VMM buffer.

/// Nesting deeper than this is rejected. QMP commands need a handful of
/// levels; `serde_json` itself stops at 128.
pub(crate) const MAX_NESTING: usize = 100;

/// What the splitter found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete top-level JSON text, not validated beyond its framing.
    Message(Vec<u8>),
    /// Input that cannot be JSON: answered with this description; the
    /// splitter has resynchronised and can go on.
    Error(String),
    /// A message outgrew the size limit: answered with this description,
    /// after which the connection must be closed.
    TooLarge(String),
}

/// Description of a message that outgrew the size limit (QEMU's words).
pub(crate) const TOO_LARGE: &str = "JSON token size limit exceeded";

/// Description of a message nested too deeply (QEMU's words).
pub(crate) const TOO_DEEP: &str = "JSON nesting depth limit exceeded";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Between tokens.
    Start,
    /// Inside a string delimited by `quote` (QEMU also lexes `'` strings).
    Str { quote: u8, escaped: bool },
    /// Inside a number or keyword at top level, which ends at the first byte
    /// that cannot continue it.
    Scalar,
    /// After a lexical error, skipping to a resynchronisation point.
    Recovery,
    /// Skipping the rest of a message that was nested too deeply.
    Skip {
        depth: usize,
        quote: Option<u8>,
        escaped: bool,
    },
}

/// What one byte did.
enum Step {
    /// Consumed; go on.
    Next,
    /// Not consumed; look at it again in the new state.
    Again,
    /// Consumed, and a frame is complete.
    Emit(Frame),
    /// Not consumed (it starts the next token), and a frame is complete.
    EmitBefore(Frame),
}

/// An incremental splitter; see the module docs.
#[derive(Debug)]
pub struct JsonSplitter {
    lex: Lex,
    depth: usize,
    msg: Vec<u8>,
    skipped: usize,
    max_len: usize,
}

impl JsonSplitter {
    /// A splitter that rejects messages longer than `max_len` bytes.
    pub fn new(max_len: usize) -> Self {
        Self {
            lex: Lex::Start,
            depth: 0,
            msg: Vec::new(),
            skipped: 0,
            max_len,
        }
    }

    /// Consumes bytes from the front of `input` until a frame is complete.
    /// Returns how many bytes were consumed and the frame, if one completed;
    /// without a frame, all of `input` was consumed and the partial message
    /// is kept for the next call.
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<Frame>) {
        for (i, &b) in input.iter().enumerate() {
            loop {
                match self.step(b) {
                    Step::Next => break,
                    Step::Again => continue,
                    Step::Emit(f) => return (i + 1, Some(f)),
                    Step::EmitBefore(f) => return (i, Some(f)),
                }
            }
        }
        (input.len(), None)
    }

    /// Whether a message has started and not completed.
    pub fn in_message(&self) -> bool {
        !self.msg.is_empty() || !matches!(self.lex, Lex::Start | Lex::Recovery)
    }

    fn step(&mut self, b: u8) -> Step {
        match self.lex {
            Lex::Start => self.start(b),
            Lex::Str { quote, escaped } => self.string(b, quote, escaped),
            Lex::Scalar => {
                if is_scalar_byte(b) {
                    self.push(b)
                } else {
                    self.lex = Lex::Start;
                    Step::EmitBefore(Frame::Message(self.take()))
                }
            }
            Lex::Recovery => match b {
                b'{' | b'}' | b'[' | b']' | b':' | b',' => {
                    self.lex = Lex::Start;
                    Step::Again
                }
                b'\t' => Step::Next,
                0..=0x1f | 0xfe | 0xff => {
                    self.lex = Lex::Start;
                    Step::Next
                }
                _ => Step::Next,
            },
            Lex::Skip {
                depth,
                quote,
                escaped,
            } => self.skip(b, depth, quote, escaped),
        }
    }

    fn start(&mut self, b: u8) -> Step {
        match b {
            b' ' | b'\t' | b'\r' | b'\n' => {
                if self.depth > 0 {
                    self.push(b)
                } else {
                    Step::Next
                }
            }
            b'{' | b'[' => {
                if self.depth >= MAX_NESTING {
                    self.skipped = self.msg.len();
                    self.reset();
                    self.lex = Lex::Skip {
                        depth: MAX_NESTING + 1,
                        quote: None,
                        escaped: false,
                    };
                    return Step::Emit(Frame::Error(TOO_DEEP.to_string()));
                }
                self.depth += 1;
                self.push(b)
            }
            b'}' | b']' => {
                if let Step::Emit(f) = self.push(b) {
                    return Step::Emit(f);
                }
                if self.depth <= 1 {
                    // The message is complete (or a stray closer at top
                    // level, which the parser rejects).
                    self.depth = 0;
                    Step::Emit(Frame::Message(self.take()))
                } else {
                    self.depth -= 1;
                    Step::Next
                }
            }
            b':' | b',' => {
                if let Step::Emit(f) = self.push(b) {
                    return Step::Emit(f);
                }
                if self.depth == 0 {
                    Step::Emit(Frame::Message(self.take()))
                } else {
                    Step::Next
                }
            }
            b'"' | b'\'' => {
                self.lex = Lex::Str {
                    quote: b,
                    escaped: false,
                };
                self.push(b)
            }
            _ if is_scalar_byte(b) => {
                if self.depth == 0 {
                    self.lex = Lex::Scalar;
                }
                self.push(b)
            }
            _ => self.lexical_error(b),
        }
    }

    fn string(&mut self, b: u8, quote: u8, escaped: bool) -> Step {
        if !is_string_byte(b) {
            return self.lexical_error(b);
        }
        if let Step::Emit(f) = self.push(b) {
            return Step::Emit(f);
        }
        if escaped {
            self.lex = Lex::Str {
                quote,
                escaped: false,
            };
        } else if b == b'\\' {
            self.lex = Lex::Str {
                quote,
                escaped: true,
            };
        } else if b == quote {
            self.lex = Lex::Start;
            if self.depth == 0 {
                return Step::Emit(Frame::Message(self.take()));
            }
        }
        Step::Next
    }

    fn skip(&mut self, b: u8, depth: usize, quote: Option<u8>, escaped: bool) -> Step {
        self.skipped += 1;
        if self.skipped > self.max_len {
            self.reset();
            return Step::Emit(Frame::TooLarge(TOO_LARGE.to_string()));
        }
        let mut depth = depth;
        let mut quote = quote;
        let mut escaped = escaped;
        match quote {
            Some(_) if !is_string_byte(b) => {
                // Garbage inside garbage: already answered once.
                self.lex = Lex::Recovery;
                return Step::Next;
            }
            Some(_) if escaped => escaped = false,
            Some(_) if b == b'\\' => escaped = true,
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None => match b {
                b'{' | b'[' => depth = depth.saturating_add(1),
                b'}' | b']' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        self.skipped = 0;
                        self.lex = Lex::Start;
                        return Step::Next;
                    }
                }
                b'"' | b'\'' => quote = Some(b),
                b' ' | b'\t' | b'\r' | b'\n' | b':' | b',' => {}
                _ if is_scalar_byte(b) => {}
                _ => {
                    self.lex = Lex::Recovery;
                    return Step::Next;
                }
            },
        }
        self.lex = Lex::Skip {
            depth,
            quote,
            escaped,
        };
        Step::Next
    }

    fn push(&mut self, b: u8) -> Step {
        if self.msg.len() >= self.max_len {
            self.reset();
            return Step::Emit(Frame::TooLarge(TOO_LARGE.to_string()));
        }
        self.msg.push(b);
        Step::Next
    }

    fn lexical_error(&mut self, b: u8) -> Step {
        self.reset();
        self.lex = Lex::Recovery;
        Step::Emit(Frame::Error(format!(
            "JSON parse error, stray '{}'",
            show_byte(b)
        )))
    }

    /// Takes the completed message, leaving an empty buffer behind (the
    /// capacity goes with it, so a large message is not kept around).
    fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.msg)
    }

    /// Drops the message in progress.
    fn reset(&mut self) {
        self.msg = Vec::new();
        self.depth = 0;
        self.lex = Lex::Start;
    }
}

/// Bytes allowed inside a string (QEMU's lexer: no control characters, no
/// `0xFE`/`0xFF`; UTF-8 validity is the parser's business).
fn is_string_byte(b: u8) -> bool {
    (0x20..0xfe).contains(&b)
}

/// Bytes that may continue a number or a keyword.
fn is_scalar_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')
}

/// A byte as it is quoted in an error: printable ASCII as itself, anything
/// else as `\xNN`.
fn show_byte(b: u8) -> String {
    if b.is_ascii_graphic() || b == b' ' {
        char::from(b).to_string()
    } else {
        format!("\\x{b:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1 << 20;

    /// Feeds `chunks` one after the other and collects every frame, up to
    /// and including a `TooLarge` (after which a connection is closed).
    fn split_chunks(s: &mut JsonSplitter, chunks: &[&[u8]]) -> Vec<Frame> {
        let mut frames = Vec::new();
        for chunk in chunks {
            let mut rest: &[u8] = chunk;
            loop {
                let (used, f) = s.feed(rest);
                rest = &rest[used..];
                match f {
                    Some(f @ Frame::TooLarge(_)) => {
                        frames.push(f);
                        return frames;
                    }
                    Some(f) => frames.push(f),
                    None => break,
                }
            }
            assert!(rest.is_empty());
        }
        frames
    }

    fn split(input: &[u8]) -> Vec<Frame> {
        split_chunks(&mut JsonSplitter::new(LIMIT), &[input])
    }

    fn msg(s: &str) -> Frame {
        Frame::Message(s.as_bytes().to_vec())
    }

    #[test]
    fn test_feed_one_message_without_newline_is_complete() {
        assert_eq!(
            split(br#"{"execute": "qmp_capabilities"}"#),
            vec![msg(r#"{"execute": "qmp_capabilities"}"#)]
        );
    }

    #[test]
    fn test_feed_merged_messages_are_split() {
        assert_eq!(
            split(br#"{"a":1}{"b":[2,3]}  {"c":"}"}"#),
            vec![
                msg(r#"{"a":1}"#),
                msg(r#"{"b":[2,3]}"#),
                msg(r#"{"c":"}"}"#)
            ]
        );
    }

    #[test]
    fn test_feed_message_split_at_every_byte_is_reassembled() {
        let text = br#"{"execute": "qom-set", "arguments": {"path": "a\"}b", "value": [1, {"x": -2.5e3}]}, "id": "q\\"}"#;
        let chunks: Vec<&[u8]> = text.chunks(1).collect();
        let frames = split_chunks(&mut JsonSplitter::new(LIMIT), &chunks);
        assert_eq!(frames, vec![Frame::Message(text.to_vec())]);
        let v: serde_json::Value = serde_json::from_slice(text).unwrap();
        assert_eq!(v["arguments"]["path"], "a\"}b");
    }

    #[test]
    fn test_feed_returns_after_each_frame_with_bytes_consumed() {
        let mut s = JsonSplitter::new(LIMIT);
        let input = b"{}[]";
        assert_eq!(s.feed(input), (2, Some(msg("{}"))));
        assert_eq!(s.feed(&input[2..]), (2, Some(msg("[]"))));
        assert_eq!(s.feed(b""), (0, None));
    }

    #[test]
    fn test_feed_partial_message_is_kept_until_complete() {
        let mut s = JsonSplitter::new(LIMIT);
        assert_eq!(s.feed(br#"{"execute": "#), (12, None));
        assert!(s.in_message());
        assert_eq!(
            s.feed(br#""stop"}"#),
            (7, Some(msg(r#"{"execute": "stop"}"#)))
        );
        assert!(!s.in_message());
    }

    #[test]
    fn test_feed_whitespace_between_messages_is_dropped_inside_kept() {
        assert_eq!(
            split(b"\r\n  {\n\"a\" : 1\n}\r\n"),
            vec![msg("{\n\"a\" : 1\n}")]
        );
    }

    #[test]
    fn test_feed_top_level_scalars_are_messages() {
        assert_eq!(
            split(b"42 true\"s\"{}"),
            vec![msg("42"), msg("true"), msg("\"s\""), msg("{}")]
        );
    }

    #[test]
    fn test_feed_top_level_scalar_waits_for_its_end() {
        let mut s = JsonSplitter::new(LIMIT);
        assert_eq!(s.feed(b"12"), (2, None));
        assert_eq!(s.feed(b"34 "), (2, Some(msg("1234"))));
    }

    #[test]
    fn test_feed_stray_closer_is_a_message_for_the_parser_to_reject() {
        assert_eq!(split(b"}{}"), vec![msg("}"), msg("{}")]);
        assert!(serde_json::from_slice::<serde_json::Value>(b"}").is_err());
    }

    #[test]
    fn test_feed_lexical_error_recovers_at_next_brace() {
        assert_eq!(
            split(br#"@garbage{"execute":"stop"}"#),
            vec![
                Frame::Error("JSON parse error, stray '@'".into()),
                msg(r#"{"execute":"stop"}"#)
            ]
        );
    }

    #[test]
    fn test_feed_lexical_error_inside_message_drops_it() {
        assert_eq!(
            split(b"{\"a\": #x\n{\"b\":1}"),
            vec![
                Frame::Error("JSON parse error, stray '#'".into()),
                msg("{\"b\":1}")
            ]
        );
    }

    #[test]
    fn test_feed_newline_in_string_is_an_error_and_resyncs() {
        // An unterminated string must not swallow the next line.
        assert_eq!(
            split(b"{\"execute\": \"foo\n{\"execute\":\"cont\"}"),
            vec![
                Frame::Error("JSON parse error, stray '\\x0a'".into()),
                msg("{\"execute\":\"cont\"}")
            ]
        );
    }

    #[test]
    fn test_feed_control_byte_resets_an_unfinished_message() {
        // What QEMU's spec tells clients to send to get a known-good parser.
        assert_eq!(
            split(b"{\"execute\": [1, 2\xff{}"),
            vec![
                Frame::Error("JSON parse error, stray '\\xff'".into()),
                msg("{}")
            ]
        );
    }

    #[test]
    fn test_feed_recovery_ends_at_newline_without_second_error() {
        assert_eq!(
            split(b"@@@ abc\n42\n"),
            vec![
                Frame::Error("JSON parse error, stray '@'".into()),
                msg("42")
            ]
        );
    }

    #[test]
    fn test_feed_non_ascii_outside_string_is_an_error_inside_is_kept() {
        assert_eq!(
            split("{\"a\":\"é\"}".as_bytes()),
            vec![msg("{\"a\":\"é\"}")]
        );
        assert_eq!(
            split(b"\xc3\xa9{}"),
            vec![
                Frame::Error("JSON parse error, stray '\\xc3'".into()),
                msg("{}")
            ]
        );
    }

    #[test]
    fn test_feed_nesting_at_limit_is_accepted_by_splitter_and_parser() {
        let text = format!("{}{}", "[".repeat(MAX_NESTING), "]".repeat(MAX_NESTING));
        let frames = split(text.as_bytes());
        assert_eq!(frames, vec![msg(&text)]);
        assert!(serde_json::from_slice::<serde_json::Value>(text.as_bytes()).is_ok());
    }

    #[test]
    fn test_feed_nesting_beyond_limit_is_one_error_then_resumes() {
        let deep = 100_000;
        let text = format!(
            "{}\"]]\"{}{{\"execute\":\"stop\"}}",
            "[".repeat(deep),
            "]".repeat(deep)
        );
        assert_eq!(
            split(text.as_bytes()),
            vec![Frame::Error(TOO_DEEP.into()), msg(r#"{"execute":"stop"}"#)]
        );
    }

    #[test]
    fn test_feed_message_beyond_size_limit_is_too_large() {
        let mut s = JsonSplitter::new(1000);
        let mut text = b"{\"execute\":\"".to_vec();
        text.extend(std::iter::repeat_n(b'a', 5000));
        let (used, f) = s.feed(&text);
        assert_eq!(f, Some(Frame::TooLarge(TOO_LARGE.into())));
        assert!(used <= 1001, "stopped at the limit, not at the end: {used}");
    }

    #[test]
    fn test_feed_message_at_size_limit_is_accepted() {
        let mut s = JsonSplitter::new(10);
        assert_eq!(s.feed(b"[1,2,3,44]"), (10, Some(msg("[1,2,3,44]"))));
    }

    #[test]
    fn test_feed_too_deep_remainder_counts_toward_size_limit() {
        let mut s = JsonSplitter::new(1000);
        let text = "[".repeat(5000);
        let frames = split_chunks(&mut s, &[text.as_bytes()]);
        assert_eq!(
            frames,
            vec![
                Frame::Error(TOO_DEEP.into()),
                Frame::TooLarge(TOO_LARGE.into())
            ]
        );
    }

    #[test]
    fn test_feed_garbage_of_any_size_buffers_nothing() {
        let mut s = JsonSplitter::new(1000);
        let text = vec![b'@'; 1 << 20];
        let frames = split_chunks(&mut s, &[&text]);
        assert_eq!(
            frames,
            vec![Frame::Error("JSON parse error, stray '@'".into())]
        );
        assert!(!s.in_message());
    }

    #[test]
    fn test_feed_single_quoted_strings_are_framed() {
        // QEMU accepts them; serde_json does not, so the parser rejects the
        // whole message with one error instead of the lexer with many.
        assert_eq!(split(b"{'a':'}'}"), vec![msg("{'a':'}'}")]);
    }
}
