//! Whether upb surely accepts a whole message as the request schema, so that `decode_spans` may
//! skip its parse (~1 µs a span). The schema is handed in by contracts/otlp.py (`wire_schema`,
//! from `TraceRequestView`'s descriptors): per message, the fields whose content upb checks.
//!
//! What upb (protobuf's Python runtime, upb/wire/decode.c) refuses, and what this checks:
//! a tag of more than 5 bytes or past `u32`, field number 0, wire types 4 (outside a group), 6
//! and 7; a varint of more than 10 bytes; a length of more than 5 bytes or past `i32::MAX`, or
//! past the end of its message; a string field that is not UTF-8 (`utf8_range`: well-formed
//! UTF-8, as Rust's `str::from_utf8`); a sub-message refused; submessages nested past its depth
//! limit (100). Fields it does not know, and known fields of another wire type, are unknown
//! fields to upb: skipped by their wire type, their content not looked at. Enums are open
//! (proto3), scalars take any value. Vouching is one-sided: whatever this does not match
//! exactly is `Unsure` and upb parses the message, the reference: groups (wire type 3, which upb
//! skips or parses by rules of their own), a packed repeated scalar, a 10-byte varint past
//! `u64`, nesting past `MAX_DEPTH` (below upb's limit).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::wire::{self, Unsure, Walk};

/// The deepest submessage vouched for: the request is depth 0, upb refuses past 100.
const MAX_DEPTH: usize = 64;

/// What upb checks of one known field's content when it comes with the wire type of its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// a scalar or bytes field, or a number the message does not know: skipped by wire type
    Skip,
    /// a string field: its bytes must be UTF-8 (with wire type 2)
    Utf8,
    /// a message field: the sub-message, by its index in the schema (with wire type 2)
    Message(usize),
    /// a repeated scalar, which may come packed (with wire type 2): not vouched for
    Packable,
}

/// The request's schema: per message, `Check` by field number (numbers past the table: `Skip`);
/// `required`: the field number of the request's `resource_spans`, which `_parse_proto` requires.
pub struct Schema {
    messages: Vec<Vec<Check>>,
    required: u32,
}

impl Schema {
    /// `messages[i]`: field number -> "utf8", "packable" or the index of the field's message
    /// type; the request is message 0. A field not listed is skipped by its wire type.
    /// `required`: a message field of the request (numbered below 64) it must hold.
    pub fn new(
        messages: Vec<std::collections::HashMap<u32, Bound<'_, PyAny>>>,
        required: u32,
    ) -> PyResult<Self> {
        let count = messages.len();
        if count == 0 {
            return Err(PyValueError::new_err("a schema of no message"));
        }
        let messages = messages
            .into_iter()
            .map(|fields| {
                let size = fields.keys().max().map_or(0, |&number| number as usize + 1);
                let mut checks = vec![Check::Skip; size];
                for (number, check) in fields {
                    checks[number as usize] = check_of(&check, count)?;
                }
                Ok(checks)
            })
            .collect::<PyResult<Vec<Vec<Check>>>>()?;
        if required >= 64 || !matches!(messages[0].get(required as usize), Some(Check::Message(_))) {
            return Err(PyValueError::new_err(
                "the required field is no message field of the request",
            ));
        }
        Ok(Schema { messages, required })
    }

    /// True: upb accepts `payload` as the request (message 0) and it holds the required field
    /// (`resource_spans`, which `_parse_proto` requires); false: not sure, upb decides.
    pub fn accepts(&self, payload: &[u8]) -> bool {
        matches!(self.message(0, payload, 0), Ok(found) if found & (1 << self.required) != 0)
    }

    /// Walks one message; returns a bit per message field (numbered below 64) found in it.
    fn message(&self, index: usize, bytes: &[u8], depth: usize) -> Walk<u64> {
        let checks = &self.messages[index];
        let mut reader = Reader { rest: bytes };
        let mut found = 0u64;
        while !reader.rest.is_empty() {
            let (number, wire) = reader.tag()?;
            let check = checks.get(number as usize).copied().unwrap_or(Check::Skip);
            match wire {
                0 => {
                    reader.varint()?;
                }
                1 => {
                    reader.take(8)?;
                }
                5 => {
                    reader.take(4)?;
                }
                2 => {
                    let content = reader.delimited()?;
                    match check {
                        Check::Skip => {}
                        Check::Utf8 if content.is_ascii() => {} // most keys and values: no decoding
                        Check::Utf8 => {
                            std::str::from_utf8(content).map_err(|_| Unsure)?;
                        }
                        Check::Message(sub) => {
                            if depth + 1 > MAX_DEPTH {
                                return Err(Unsure);
                            }
                            self.message(sub, content, depth + 1)?;
                            if number < 64 {
                                found |= 1 << number;
                            }
                        }
                        Check::Packable => return Err(Unsure),
                    }
                }
                _ => return Err(Unsure), // groups (3, 4) and the wire types that do not exist
            }
        }
        Ok(found)
    }
}

fn check_of(check: &Bound<'_, PyAny>, messages: usize) -> PyResult<Check> {
    if let Ok(index) = check.extract::<usize>() {
        if index < messages {
            return Ok(Check::Message(index));
        }
        return Err(PyValueError::new_err(format!("no message {index} in the schema")));
    }
    match check.extract::<String>()?.as_str() {
        "utf8" => Ok(Check::Utf8),
        "packable" => Ok(Check::Packable),
        other => Err(PyValueError::new_err(format!("unknown check {other:?}"))),
    }
}

/// The wire format as upb reads it (upb/wire/reader.c), each read `Unsure` where upb's fails.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A varint of at most `max_bytes`; `Unsure` if longer or cut off by the message's end.
    #[inline]
    fn varint_of(&mut self, max_bytes: usize) -> Walk<u64> {
        if let Some(&byte) = self.rest.first() {
            if byte < 0x80 {
                // one byte: every tag and length of a short field
                self.rest = &self.rest[1..];
                return Ok(u64::from(byte));
            }
        }
        self.long_varint(max_bytes)
    }

    #[inline(never)]
    fn long_varint(&mut self, max_bytes: usize) -> Walk<u64> {
        let mut value = 0u64;
        for (at, &byte) in self.rest.iter().take(max_bytes).enumerate() {
            value |= u64::from(byte & 0x7f) << (7 * at);
            if byte & 0x80 == 0 {
                if at == 9 && byte > 1 {
                    return Err(Unsure); // bits past u64: upb drops them, not vouched for
                }
                self.rest = &self.rest[at + 1..];
                return Ok(value);
            }
        }
        Err(Unsure)
    }

    #[inline]
    fn varint(&mut self) -> Walk<u64> {
        self.varint_of(10)
    }

    /// (field number, wire type): at most 5 bytes, within `u32`, the number not 0.
    #[inline]
    fn tag(&mut self) -> Walk<(u32, u8)> {
        let tag = self.varint_of(5)?;
        let tag = u32::try_from(tag).map_err(|_| Unsure)?;
        if tag >> 3 == 0 {
            return Err(Unsure);
        }
        Ok((tag >> 3, (tag & 7) as u8))
    }

    /// A length-delimited field's content: its length at most 5 bytes and `i32::MAX`.
    #[inline]
    fn delimited(&mut self) -> Walk<&'a [u8]> {
        let length = self.varint_of(5)?;
        if length > i32::MAX as u64 {
            return Err(Unsure);
        }
        self.take(length as usize)
    }

    #[inline]
    fn take(&mut self, count: usize) -> Walk<&'a [u8]> {
        wire::take(&mut self.rest, count)
    }
}
