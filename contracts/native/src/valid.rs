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
//!
//! The same checks run alone (`Schema::accepts`) or inside the decoding walk (`Checking`, the
//! walk's `Source` in `Decoder.checked_decode`): one pass over the bytes of a GenAI message.

use std::cell::Cell;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::wire::{self, Field, Level, Source, Unsure, Walk};

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
/// `required`: the field number of the request's `resource_spans`, which `_parse_proto` requires;
/// `levels`: where the decoding walk's messages are in it (None: the schema has no such path).
pub struct Schema {
    messages: Vec<Vec<Check>>,
    required: u32,
    levels: Option<[Place; LEVELS]>,
}

/// How many `Level`s the decoding walk has: the request, then one per field of `descents`.
const LEVELS: usize = 5;

/// Where a `Level` of the decoding walk is in the schema: its message, and the fields of it whose
/// content the walk checks itself (a bit per number): the message fields it descends into,
/// which its next level checks, and an attribute entry's key (`Checking::key`).
#[derive(Debug, Clone, Copy)]
struct Place {
    message: usize,
    walked: u64,
}

impl Schema {
    /// `messages[i]`: field number -> "utf8", "packable" or the index of the field's message
    /// type; the request is message 0. A field not listed is skipped by its wire type.
    /// `required`: a message field of the request (numbered below 64) it must hold.
    /// `descents`: the message fields the decoding walk descends into, from the request down
    /// (`Level`), each numbered below 64; `entry_key`: the key's number in an attribute entry.
    pub fn new(
        messages: Vec<std::collections::HashMap<u32, Bound<'_, PyAny>>>,
        required: u32,
        descents: [u32; LEVELS - 1],
        entry_key: u32,
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
        let levels = levels(&messages, descents, entry_key);
        Ok(Schema {
            messages,
            required,
            levels,
        })
    }

    /// A check to run in the decoding walk (`Checking`); None where the schema does not hold
    /// the walk's path: then `accepts` checks alone.
    pub fn checking(&self) -> Option<Checking<'_>> {
        let levels = self.levels?;
        Some(Checking {
            schema: self,
            levels,
            checks: levels.map(|place| &self.messages[place.message][..]),
            refused: Cell::new(false),
            found: Cell::new(0),
        })
    }

    /// True: upb accepts `payload` as the request (message 0) and it holds the required field
    /// (`resource_spans`, which `_parse_proto` requires); false: not sure, upb decides.
    pub fn accepts(&self, payload: &[u8]) -> bool {
        matches!(self.message(0, payload, 0), Ok(found) if self.holds_required(found))
    }

    /// True when the message holds the required field, by the bits `message` returns.
    fn holds_required(&self, found: u64) -> bool {
        found & (1 << self.required) != 0
    }

    /// Walks one message; returns a bit per message field (numbered below 64) found in it.
    fn message(&self, index: usize, bytes: &[u8], depth: usize) -> Walk<u64> {
        let checks = &self.messages[index];
        let mut reader = Reader { rest: bytes };
        let mut found = 0u64;
        while !reader.rest.is_empty() {
            let (number, wire) = reader.tag()?;
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
                    found |= self.content(checks, number, content, depth, false)?;
                }
                _ => return Err(Unsure), // groups (3, 4) and the wire types that do not exist
            }
        }
        Ok(found)
    }

    /// Checks a length-delimited field's content by the field's `Check` in `checks`, but for the
    /// depth of a sub-message where the decoding walk checks the content itself (`walked`).
    /// Returns the field's bit if it is a message field (numbered below 64), else 0.
    #[inline(always)]
    fn content(
        &self,
        checks: &[Check],
        number: u32,
        content: &[u8],
        depth: usize,
        walked: bool,
    ) -> Walk<u64> {
        match checks.get(number as usize).copied().unwrap_or(Check::Skip) {
            Check::Skip => Ok(0),
            Check::Utf8 if walked || content.is_ascii() => Ok(0), // most keys and values: no decoding
            Check::Utf8 => {
                std::str::from_utf8(content).map_err(|_| Unsure)?;
                Ok(0)
            }
            Check::Message(sub) => {
                if depth + 1 > MAX_DEPTH {
                    return Err(Unsure);
                }
                if !walked && !self.one_plain_field(sub, content) {
                    self.message(sub, content, depth + 1)?;
                }
                Ok(if number < 64 { 1 << number } else { 0 })
            }
            Check::Packable => Err(Unsure),
        }
    }

    /// True where `message` surely accepts `bytes` as message `index` without walking it: one
    /// field of a one-byte tag and no sub-message, the common attribute value (a short ASCII
    /// text, a number of up to 9 varint bytes, a double). False: not sure, `message` walks it.
    #[inline(always)]
    fn one_plain_field(&self, index: usize, bytes: &[u8]) -> bool {
        let [tag, rest @ ..] = bytes else {
            return false;
        };
        if *tag >= 0x80 || *tag >> 3 == 0 {
            return false;
        }
        match tag & 7 {
            0 => match rest.split_last() {
                Some((last, more)) => *last < 0x80 && more.len() < 9 && more.iter().all(|byte| *byte >= 0x80),
                None => false,
            },
            1 => rest.len() == 8,
            5 => rest.len() == 4,
            2 => match rest {
                [length, text @ ..] if *length < 0x80 && usize::from(*length) == text.len() => {
                    match self.messages[index].get(usize::from(*tag >> 3)) {
                        None | Some(Check::Skip) => true,
                        Some(Check::Utf8) => text.is_ascii(),
                        Some(_) => false,
                    }
                }
                _ => false,
            },
            _ => false,
        }
    }
}

/// The `Place` of each `Level` of the decoding walk, following `descents` from the request;
/// None if one of them is no message field (numbered below 64) of its message, or the entry's
/// key is numbered past 63.
fn levels(messages: &[Vec<Check>], descents: [u32; LEVELS - 1], entry_key: u32) -> Option<[Place; LEVELS]> {
    let mut places = [Place {
        message: 0,
        walked: 0,
    }; LEVELS];
    let mut message = 0;
    for (place, number) in places.iter_mut().zip(descents) {
        let Some(&Check::Message(sub)) = messages[message].get(number as usize) else {
            return None;
        };
        if number >= 64 {
            return None;
        }
        *place = Place {
            message,
            walked: 1 << number,
        };
        message = sub;
    }
    if entry_key >= 64 {
        return None;
    }
    let key_is_text = messages[message].get(entry_key as usize) == Some(&Check::Utf8);
    places[LEVELS - 1] = Place {
        message,
        walked: if key_is_text { 1 << entry_key } else { 0 },
    };
    Some(places)
}

/// `accepts` run inside the decoding walk, as its `Source`: each message the walk reads is checked
/// field by field as `Schema::message` checks it, and every sub-message the walk does not descend
/// into (a resource, a scope, events, links, an attribute's value ...) is checked whole on the
/// way; the ones it descends into, its next level checks, and an attribute entry's key the walk
/// checks (`key`) unless its table holds it. A walk that reads every field of every message it
/// descends into and checks every key it does not find (as the decoding walk does unless it
/// falls back) has then checked what `accepts` checks, in one pass over the bytes.
///
/// `checks`: each level's message's; `refused`: a check failed (`accepts` would answer false);
/// `found`: the request's message fields, by bit.
pub struct Checking<'s> {
    schema: &'s Schema,
    levels: [Place; LEVELS],
    checks: [&'s [Check]; LEVELS],
    refused: Cell<bool>,
    found: Cell<u64>,
}

impl Checking<'_> {
    /// What `accepts` answers, after a walk that read every field (`Ok`); false if a check failed.
    pub fn accepted(&self) -> bool {
        !self.refused.get() && self.schema.holds_required(self.found.get())
    }

    /// Whether a check failed (`accepts` answers false), rather than the walk falling back.
    pub fn refused(&self) -> bool {
        self.refused.get()
    }
}

impl<'c> Source for &'c Checking<'c> {
    type Fields<'a> = CheckedFields<'a, 'c>;

    #[inline]
    fn fields<'a>(self, message: &'a [u8], level: Level) -> CheckedFields<'a, 'c> {
        CheckedFields {
            reader: Reader { rest: message },
            checking: self,
            checks: self.checks[level as usize],
            walked: self.levels[level as usize].walked,
            depth: level as usize,
            request: level == Level::Request,
        }
    }

    #[inline]
    fn key(self, key: &[u8]) -> Walk<()> {
        if self.levels[Level::KeyValue as usize].walked == 0
            || key.is_ascii()
            || std::str::from_utf8(key).is_ok()
        {
            return Ok(());
        }
        self.refused.set(true);
        Err(Unsure)
    }
}

/// The fields of one message of the decoding walk, each checked before it is yielded; a failed
/// check is an error (and marks the `Checking` refused).
pub struct CheckedFields<'a, 'c> {
    reader: Reader<'a>,
    checking: &'c Checking<'c>,
    checks: &'c [Check],
    walked: u64,
    depth: usize,
    request: bool,
}

impl<'a> CheckedFields<'a, '_> {
    #[inline(always)]
    fn field(&mut self) -> Walk<(u32, Field<'a>)> {
        let (number, wire) = self.reader.tag()?;
        let field = match wire {
            0 => Field::Varint(self.reader.varint()?),
            1 => Field::Fixed64(u64::from_le_bytes(
                self.reader.take(8)?.try_into().map_err(|_| Unsure)?,
            )),
            5 => {
                self.reader.take(4)?;
                Field::Fixed32
            }
            2 => {
                let content = self.reader.delimited()?;
                let walked = number < 64 && self.walked & (1 << number) != 0;
                let schema = self.checking.schema;
                let found = schema.content(self.checks, number, content, self.depth, walked)?;
                if self.request {
                    self.checking.found.set(self.checking.found.get() | found);
                }
                Field::Bytes(content)
            }
            _ => return Err(Unsure), // groups (3, 4) and the wire types that do not exist
        };
        Ok((number, field))
    }
}

impl<'a> Iterator for CheckedFields<'a, '_> {
    type Item = Walk<(u32, Field<'a>)>;

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.reader.rest.is_empty() {
            return None;
        }
        let field = self.field();
        if field.is_err() {
            self.checking.refused.set(true);
        }
        Some(field)
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
