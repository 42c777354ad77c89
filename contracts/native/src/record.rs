//! `UsageRecord`: a stage-1 `batches` / `groups` usage record read from its JSON bytes.
//!
//! `stream/records.py:UsageRecordsJson` (msgspec into Python lists) and `sub_batches` are the
//! reference. The record is taken only in the exact shape stage 1 writes
//! (`{"kind":"batches"|"groups","batches":[[partition,offset,[rows],[contexts]],...]}`, in that
//! key order, whitespace allowed) and only when nothing in it could read differently here: any
//! byte that is not valid UTF-8, a string with an escape or a control character, a number that
//! is not JSON or a float past the double range, any other shape of the record or of a sub-batch,
//! and `parse` answers None and the reference decodes the record whole. Each delta row is read
//! into its fields where it has the shapes `TotalsRows` adds (`totals.rs`: exact ints, floats,
//! strings, a call mix of floats, steps); any other row (valid JSON) is kept as its bytes, which
//! the caller decodes with the reference decoder and applies in Python, as is each sub-batch's
//! non-empty context array. No Python object is made for a row the native rows add.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

/// A call mix as a row or step writes it: null, `[]`, or a list of floats (its length checked by
/// `TotalsRows`, which knows `MIX_FIELDS`).
#[derive(Debug, Clone)]
pub(crate) enum WireMix {
    Null,
    Empty,
    Floats(Vec<f64>),
}

/// A step of a group's row: `[offset, amount, spans, first_ns, last - first]` and, when written,
/// its own mix (`records.Step`).
#[derive(Debug, Clone)]
pub(crate) struct WireStep {
    pub offset: i64,
    pub amount: f64,
    pub spans: i64,
    pub first: i64,
    pub span: i64,
    pub mix: Option<WireMix>,
}

/// A row's tenth field: none (its sub-batch's message), one message's offset, or steps.
#[derive(Debug, Clone)]
pub(crate) enum Origin {
    Own,
    Offset(i64),
    Steps(Vec<WireStep>),
}

/// A delta row read into its fields (`records.DeltaRow`, `DELTA_ROW_FIELDS*`); the strings as
/// byte ranges of the record.
#[derive(Debug, Clone)]
pub(crate) struct WireRow {
    pub budget: (usize, usize),
    pub key: (usize, usize),
    pub start: i64,
    pub amount: f64,
    pub spans: i64,
    pub first: i64,
    pub last: i64,
    /// The bucket size; None: null (read as 0, as `TotalsRows` reads it).
    pub bucket: Option<i64>,
    pub mix: WireMix,
    pub origin: Origin,
}

/// A delta row: its bytes, and its fields where it has the shapes read here.
pub(crate) struct Row {
    pub bytes: (usize, usize),
    pub fields: Option<WireRow>,
}

/// A sub-batch (`records.BatchRecord`): its source, its rows, its context array's bytes.
pub(crate) struct SubBatch {
    pub partition: i64,
    pub offset: i64,
    pub rows: Vec<Row>,
    /// None: an empty context array (nothing to observe).
    pub contexts: Option<(usize, usize)>,
}

/// A `batches` or `groups` record read from its bytes, and how far `TotalsRows.add_record` got.
#[pyclass(module = "burnguard.contracts._otlp_native")]
pub struct UsageRecord {
    pub payload: Py<PyBytes>,
    pub(crate) batches: Vec<SubBatch>,
    /// The sub-batch, the row within it, the row's step and whether its contexts were handed
    /// back, next.
    pub batch: usize,
    pub row: usize,
    pub step: usize,
    pub contexts_done: bool,
}

#[pymethods]
impl UsageRecord {
    /// The record read from `payload`, or None: not this shape, or anything in doubt (module doc).
    #[staticmethod]
    fn parse(payload: Bound<'_, PyBytes>) -> Option<UsageRecord> {
        let batches = read_record(payload.as_bytes()).ok()?;
        Some(UsageRecord {
            payload: payload.unbind(),
            batches,
            batch: 0,
            row: 0,
            step: 0,
            contexts_done: false,
        })
    }

    /// The bytes it was read from (the reference decodes them where the native rows are not used).
    #[getter]
    fn payload(&self, py: Python<'_>) -> Py<PyBytes> {
        self.payload.clone_ref(py)
    }

    /// The number of delta rows in the record, over its sub-batches.
    fn rows(&self) -> usize {
        self.batches.iter().map(|batch| batch.rows.len()).sum()
    }

    /// Each delta row's bytes and, where it was read into fields, those fields as the JSON list
    /// they stand for (None: kept as bytes): what `tests/test_usage_records.py` holds against the
    /// reference decoding of the same bytes.
    fn read_rows<'py>(&self, py: Python<'py>) -> PyResult<Vec<ReadRow<'py>>> {
        let bytes = self.payload.bind(py).as_bytes();
        let text = |(start, end): (usize, usize)| String::from_utf8_lossy(&bytes[start..end]).into_owned();
        let mix = |mix: &WireMix| mix_value(py, mix);
        let mut out = Vec::new();
        for row in self.batches.iter().flat_map(|batch| &batch.rows) {
            let raw = PyBytes::new(py, &bytes[row.bytes.0..row.bytes.1]);
            let Some(fields) = &row.fields else {
                out.push((raw, None));
                continue;
            };
            let list = PyList::empty(py);
            list.append(text(fields.budget))?;
            list.append(text(fields.key))?;
            list.append(fields.start)?;
            list.append(fields.amount)?;
            list.append(fields.spans)?;
            list.append(fields.first)?;
            list.append(fields.last)?;
            list.append(fields.bucket)?;
            list.append(mix(&fields.mix)?)?;
            match &fields.origin {
                Origin::Own => {}
                Origin::Offset(offset) => list.append(offset)?,
                Origin::Steps(steps) => {
                    let made = PyList::empty(py);
                    for step in steps {
                        let item = PyList::new(py, [step.offset, 0, step.spans, step.first, step.span])?;
                        item.set_item(1, step.amount)?;
                        if let Some(step_mix) = &step.mix {
                            item.append(mix(step_mix)?)?;
                        }
                        made.append(item)?;
                    }
                    list.append(made)?;
                }
            }
            out.push((raw, Some(list.into_any())));
        }
        Ok(out)
    }

    /// Each step of each group's row read into fields: (the row's bytes, the step's index, the
    /// step's own row as `WireRow::step_row` hands it back, with `mix_fields` for a plain mix):
    /// what `tests/test_usage_records.py` holds against `records.step_row` of the decoded row.
    fn step_rows<'py>(&self, py: Python<'py>, mix_fields: usize) -> PyResult<Vec<StepRowRead<'py>>> {
        let bytes = self.payload.bind(py).as_bytes();
        let mut out = Vec::new();
        for row in self.batches.iter().flat_map(|batch| &batch.rows) {
            let Some(
                fields @ WireRow {
                    origin: Origin::Steps(steps),
                    ..
                },
            ) = &row.fields
            else {
                continue;
            };
            for step in 0..steps.len() {
                let raw = PyBytes::new(py, &bytes[row.bytes.0..row.bytes.1]);
                out.push((raw, step, fields.step_row(py, bytes, step, mix_fields)?));
            }
        }
        Ok(out)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let bytes = self.payload.bind(py).as_bytes();
        let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(500)]);
        format!("UsageRecord({shown})")
    }
}

/// A row's bytes and, where they were read into fields, those fields as a JSON list (`read_rows`).
type ReadRow<'py> = (Bound<'py, PyBytes>, Option<Bound<'py, PyAny>>);

/// A group's row's bytes, a step's index, and that step's own row (`step_rows`).
type StepRowRead<'py> = (Bound<'py, PyBytes>, usize, Option<(Bound<'py, PyTuple>, i64)>);

/// A mix as the reference decoder makes it: None, `[]`, or a list of floats.
fn mix_value<'py>(py: Python<'py>, mix: &WireMix) -> PyResult<Bound<'py, PyAny>> {
    Ok(match mix {
        WireMix::Null => py.None().into_bound(py),
        WireMix::Empty => PyList::empty(py).into_any(),
        WireMix::Floats(values) => PyList::new(py, values)?.into_any(),
    })
}

impl WireRow {
    /// The delta row that step `step` of this group's row stands for, as the tuple of
    /// `records.step_row`'s fields (the Python values msgspec would decode: strings, ints, floats,
    /// the step's own mix as written, else a plain one of `mix_fields` where the row has a mix),
    /// and the step's message offset. `TotalsRows.add_record` hands it back for a step the caller
    /// applies alone: the row's JSON decoded for one step was ~8% of stage 2 on small messages
    /// (BENCHMARKS.md, hSig). None: no such step (not a group's row, or past its steps), or its
    /// last event past an int64 (the native rows never hand back such a step alone).
    pub(crate) fn step_row<'py>(
        &self,
        py: Python<'py>,
        bytes: &[u8],
        step: usize,
        mix_fields: usize,
    ) -> PyResult<Option<(Bound<'py, PyTuple>, i64)>> {
        let Origin::Steps(steps) = &self.origin else {
            return Ok(None);
        };
        let Some(own) = steps.get(step) else {
            return Ok(None);
        };
        let Some(last) = own.first.checked_add(own.span) else {
            return Ok(None);
        };
        let text =
            |(start, end): (usize, usize)| PyString::new(py, &String::from_utf8_lossy(&bytes[start..end]));
        let mix = match (&own.mix, &self.mix) {
            (Some(mix), _) => mix_value(py, mix)?,
            (None, WireMix::Null) => py.None().into_bound(py),
            (None, _) => {
                let mut plain = vec![0.0; mix_fields];
                if let Some(calls) = plain.first_mut() {
                    *calls = own.spans as f64; // `float(spans)`: both round to nearest, ties to even
                }
                PyList::new(py, plain)?.into_any()
            }
        };
        let fields = PyTuple::new(
            py,
            [
                text(self.budget).into_any(),
                text(self.key).into_any(),
                self.start.into_pyobject(py)?.into_any(),
                own.amount.into_pyobject(py)?.into_any(),
                own.spans.into_pyobject(py)?.into_any(),
                own.first.into_pyobject(py)?.into_any(),
                last.into_pyobject(py)?.into_any(),
                self.bucket.into_pyobject(py)?.into_any(),
                mix,
            ],
        )?;
        Ok(Some((fields, own.offset)))
    }
}

/// Not taken: the reference decodes the record.
#[derive(Debug)]
pub(crate) struct Doubt;

type Read<T> = Result<T, Doubt>;

/// `digits * 10^shift` where both are exact doubles (digits below 2^53, |shift| at most 22): one
/// IEEE multiplication or division of exact values, so correctly rounded (Clinger's fast path);
/// None otherwise (the full parse).
fn exact_float(digits: u64, shift: i64) -> Option<f64> {
    const POWERS: [f64; 23] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17,
        1e18, 1e19, 1e20, 1e21, 1e22,
    ];
    if digits >= 1 << 53 {
        return None;
    }
    let power = *POWERS.get(usize::try_from(shift.unsigned_abs()).ok()?)?;
    let digits = digits as f64; // exact: below 2^53
    Some(if shift >= 0 {
        digits * power
    } else {
        digits / power
    })
}

/// The value of eight ASCII digits, or None where any byte is not one: core's `dec2flt`
/// (`is_8digits`, `parse_8digits`, SWAR). The digits of a row's event times and amounts were most
/// of the record's reading, one multiplication and check per digit (BENCHMARKS.md, hStep).
fn eight_digits(chunk: &[u8]) -> Option<u64> {
    let value = u64::from_le_bytes(chunk.try_into().ok()?);
    let above = value.wrapping_add(0x4646_4646_4646_4646);
    let below = value.wrapping_sub(0x3030_3030_3030_3030);
    if (above | below) & 0x8080_8080_8080_8080 != 0 {
        return None;
    }
    const MASK: u64 = 0x0000_00FF_0000_00FF;
    const MUL1: u64 = 0x000F_4240_0000_0064; // 100 + (1000000 << 32)
    const MUL2: u64 = 0x0000_2710_0000_0001; // 1 + (10000 << 32)
    let pairs = below * 10 + (below >> 8); // each byte 0..=9: no overflow
    let high = (pairs & MASK).wrapping_mul(MUL1);
    let low = ((pairs >> 16) & MASK).wrapping_mul(MUL2);
    Some((high.wrapping_add(low) >> 32) & 0xFFFF_FFFF)
}

/// A JSON number: an int that fits an int64, a float, or an int past int64 (a Python int).
#[derive(Debug, Clone, Copy)]
enum Number {
    Int(i64),
    Float(f64),
    BigInt,
}

/// A row's or a step's five numbers (`Reader::five_numbers`).
type FiveNumbers = (i64, f64, i64, i64, i64);

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

fn read_record(bytes: &[u8]) -> Read<Vec<SubBatch>> {
    if std::str::from_utf8(bytes).is_err() {
        return Err(Doubt);
    }
    let mut reader = Reader { bytes, at: 0 };
    reader.expect(b'{')?;
    reader.expect_key(b"kind")?;
    let kind = reader.string()?;
    if !matches!(&bytes[kind.0..kind.1], b"batches" | b"groups") {
        return Err(Doubt);
    }
    reader.expect(b',')?;
    reader.expect_key(b"batches")?;
    let batches = reader.array(Reader::sub_batch)?;
    reader.expect(b'}')?;
    reader.skip_space();
    if reader.at != bytes.len() {
        return Err(Doubt);
    }
    Ok(batches)
}

impl Reader<'_> {
    fn skip_space(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    /// The next byte after any whitespace, not consumed.
    fn peek(&mut self) -> Read<u8> {
        self.skip_space();
        self.bytes.get(self.at).copied().ok_or(Doubt)
    }

    fn expect(&mut self, byte: u8) -> Read<()> {
        if self.peek()? != byte {
            return Err(Doubt);
        }
        self.at += 1;
        Ok(())
    }

    /// Consumes `byte` if it is next; whether it was.
    fn closes(&mut self, byte: u8) -> Read<bool> {
        let found = self.peek()? == byte;
        if found {
            self.at += 1;
        }
        Ok(found)
    }

    /// `"key":`.
    fn expect_key(&mut self, key: &[u8]) -> Read<()> {
        let (start, end) = self.string()?;
        if &self.bytes[start..end] != key {
            return Err(Doubt);
        }
        self.expect(b':')
    }

    /// A string without escapes or control characters: the byte range of its text.
    fn string(&mut self) -> Read<(usize, usize)> {
        self.expect(b'"')?;
        let start = self.at;
        loop {
            match self.bytes.get(self.at) {
                Some(b'"') => break,
                Some(b'\\') | None => return Err(Doubt),
                Some(&byte) if byte < 0x20 => return Err(Doubt),
                Some(_) => self.at += 1,
            }
        }
        let end = self.at;
        self.at += 1;
        Ok((start, end))
    }

    /// A JSON number (RFC 8259's grammar): an int as an int64 where it fits, a float parsed as the
    /// decimal it writes rounds (Rust's parse rounds correctly, as Python's and msgspec's do; the
    /// common short decimals by `exact_float` first).
    fn number(&mut self) -> Read<Number> {
        self.skip_space();
        let bytes = self.bytes;
        let start = self.at;
        let mut at = start;
        let negative = bytes.get(at) == Some(&b'-');
        if negative {
            at += 1;
        }
        // the digits as one integer (None past u64)
        let mut whole: Option<u64> = Some(0);
        let digits = |at: &mut usize, whole: &mut Option<u64>| {
            let from = *at;
            while let Some(value) = *whole {
                let Some(eight) = bytes.get(*at..*at + 8).and_then(eight_digits) else {
                    break;
                };
                // None past u64, as the loop below: a longer number is never below a prefix of it
                *whole = value
                    .checked_mul(100_000_000)
                    .and_then(|value| value.checked_add(eight));
                *at += 8;
            }
            while let Some(&byte) = bytes.get(*at).filter(|byte| byte.is_ascii_digit()) {
                *whole = whole
                    .and_then(|value| value.checked_mul(10))
                    .and_then(|value| value.checked_add(u64::from(byte - b'0')));
                *at += 1;
            }
            *at - from
        };
        let leading = bytes.get(at).copied();
        let integral = digits(&mut at, &mut whole);
        if integral == 0 || (leading == Some(b'0') && integral > 1) {
            return Err(Doubt);
        }
        let mut fraction = 0;
        let mut float = false;
        if bytes.get(at) == Some(&b'.') {
            at += 1;
            fraction = digits(&mut at, &mut whole);
            if fraction == 0 {
                return Err(Doubt);
            }
            float = true;
        }
        // the exponent written (0 without one); None past i64: the full parse
        let mut exponent: Option<i64> = Some(0);
        if let Some(b'e' | b'E') = bytes.get(at) {
            at += 1;
            let sign = match bytes.get(at) {
                Some(b'-') => {
                    at += 1;
                    -1
                }
                Some(b'+') => {
                    at += 1;
                    1
                }
                _ => 1,
            };
            let mut value = Some(0u64);
            if digits(&mut at, &mut value) == 0 {
                return Err(Doubt);
            }
            exponent = value
                .and_then(|value| i64::try_from(value).ok())
                .map(|value| sign * value);
            float = true;
        }
        self.at = at;
        if !float {
            return Ok(match whole.and_then(|value| i64::try_from(value).ok()) {
                Some(value) if negative => Number::Int(-value),
                Some(value) => Number::Int(value),
                // -9223372036854775808 and any int past int64: a Python int, handed back
                None => Number::BigInt,
            });
        }
        let shift = exponent.map(|exponent| exponent - i64::try_from(fraction).unwrap_or(i64::MAX));
        if let Some(value) = whole
            .zip(shift)
            .and_then(|(digits, shift)| exact_float(digits, shift))
        {
            return Ok(Number::Float(if negative { -value } else { value }));
        }
        // ASCII digits, signs, a point and an exponent: valid UTF-8
        let text = std::str::from_utf8(&bytes[start..at]).map_err(|_| Doubt)?;
        let value = text.parse::<f64>().map_err(|_| Doubt)?;
        if !value.is_finite() {
            return Err(Doubt); // msgspec refuses it, Faust's decoder reads inf: the reference's
        }
        Ok(Number::Float(value))
    }

    fn int(&mut self) -> Read<Option<i64>> {
        Ok(match self.number()? {
            Number::Int(value) => Some(value),
            _ => None,
        })
    }

    fn float(&mut self) -> Read<Option<f64>> {
        Ok(match self.number()? {
            Number::Float(value) => Some(value),
            _ => None,
        })
    }

    /// `true`, `false` or `null` (`word`), after whitespace.
    fn literal(&mut self, word: &[u8]) -> Read<()> {
        self.skip_space();
        if !self.bytes[self.at..].starts_with(word) {
            return Err(Doubt);
        }
        self.at += word.len();
        Ok(())
    }

    /// Any JSON value, checked and passed over (strings and numbers as above).
    fn skip_value(&mut self) -> Read<()> {
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'[' => self.skip_sequence(b']', false),
            b'{' => self.skip_sequence(b'}', true),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number().map(|_| ()),
        }
    }

    /// An array's (or, `keyed`, an object's) items after its opening byte, through `close`.
    fn skip_sequence(&mut self, close: u8, keyed: bool) -> Read<()> {
        self.at += 1;
        if self.closes(close)? {
            return Ok(());
        }
        loop {
            if keyed {
                self.string()?;
                self.expect(b':')?;
            }
            self.skip_value()?;
            if self.closes(close)? {
                return Ok(());
            }
            self.expect(b',')?;
        }
    }

    /// A JSON array of items each read by `item`, after whitespace.
    fn array<T>(&mut self, item: fn(&mut Self) -> Read<T>) -> Read<Vec<T>> {
        self.expect(b'[')?;
        let mut items = Vec::new();
        if !self.closes(b']')? {
            loop {
                items.push(item(self)?);
                if self.closes(b']')? {
                    break;
                }
                self.expect(b',')?;
            }
        }
        Ok(items)
    }

    /// `[partition, offset, [rows], [contexts]]`.
    fn sub_batch(&mut self) -> Read<SubBatch> {
        self.expect(b'[')?;
        let (Some(partition), Some(offset)) = (self.int()?, {
            self.expect(b',')?;
            self.int()?
        }) else {
            return Err(Doubt);
        };
        self.expect(b',')?;
        let rows = self.array(Reader::row)?;
        self.expect(b',')?;
        if self.peek()? != b'[' {
            return Err(Doubt);
        }
        let start = self.at;
        self.skip_value()?;
        let inside = &self.bytes[start + 1..self.at - 1];
        let empty = inside.iter().all(|byte| b" \t\n\r".contains(byte));
        let contexts = (!empty).then_some((start, self.at));
        self.expect(b']')?;
        Ok(SubBatch {
            partition,
            offset,
            rows,
            contexts,
        })
    }

    /// A delta row: read into its fields if it has their shapes, else checked and kept as bytes.
    fn row(&mut self) -> Read<Row> {
        self.skip_space();
        let start = self.at;
        let fields = self.row_fields().ok().flatten();
        if fields.is_none() {
            self.at = start;
            self.skip_value()?;
        }
        Ok(Row {
            bytes: (start, self.at),
            fields,
        })
    }

    /// A delta row of 9 fields, or of 10 with its origin (`records.message_rows`); None: another.
    fn row_fields(&mut self) -> Read<Option<WireRow>> {
        self.expect(b'[')?;
        let budget = self.string()?;
        self.expect(b',')?;
        let key = self.string()?;
        self.expect(b',')?;
        let Some((start, amount, spans, first, last)) = self.five_numbers()? else {
            return Ok(None);
        };
        self.expect(b',')?;
        let bucket = if self.peek()? == b'n' {
            self.literal(b"null")?;
            None
        } else {
            match self.int()? {
                Some(size) => Some(size),
                None => return Ok(None),
            }
        };
        self.expect(b',')?;
        let Some(mix) = self.mix()? else {
            return Ok(None);
        };
        let origin = if self.closes(b']')? {
            Origin::Own
        } else {
            self.expect(b',')?;
            let origin = if self.peek()? == b'[' {
                match self.steps()? {
                    Some(steps) => Origin::Steps(steps),
                    None => return Ok(None),
                }
            } else {
                match self.int()? {
                    Some(offset) => Origin::Offset(offset),
                    None => return Ok(None),
                }
            };
            self.expect(b']')?;
            origin
        };
        Ok(Some(WireRow {
            budget,
            key,
            start,
            amount,
            spans,
            first,
            last,
            bucket,
            mix,
            origin,
        }))
    }

    /// An int, a float and three ints, comma-separated: a row's window start, amount, spans, first
    /// and last event, or a step's offset, amount, spans, first event and span; None: other types.
    fn five_numbers(&mut self) -> Read<Option<FiveNumbers>> {
        let numbers = (
            self.int()?,
            self.comma_then(Self::float)?,
            self.comma_then(Self::int)?,
            self.comma_then(Self::int)?,
            self.comma_then(Self::int)?,
        );
        let (Some(a), Some(b), Some(c), Some(d), Some(e)) = numbers else {
            return Ok(None);
        };
        Ok(Some((a, b, c, d, e)))
    }

    fn comma_then<T>(&mut self, read: fn(&mut Self) -> Read<Option<T>>) -> Read<Option<T>> {
        self.expect(b',')?;
        read(self)
    }

    /// null, `[]` or a list of floats; None: another value.
    fn mix(&mut self) -> Read<Option<WireMix>> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            return Ok(Some(WireMix::Null));
        }
        self.expect(b'[')?;
        if self.closes(b']')? {
            return Ok(Some(WireMix::Empty));
        }
        let mut values = Vec::with_capacity(4);
        loop {
            match self.float()? {
                Some(value) => values.push(value),
                None => return Ok(None),
            }
            if self.closes(b']')? {
                return Ok(Some(WireMix::Floats(values)));
            }
            self.expect(b',')?;
        }
    }

    /// A group's row's steps, each `[offset, amount, spans, first_ns, span_ns(, mix)]`.
    fn steps(&mut self) -> Read<Option<Vec<WireStep>>> {
        self.expect(b'[')?;
        let mut steps = Vec::new();
        if self.closes(b']')? {
            return Ok(Some(steps));
        }
        loop {
            self.expect(b'[')?;
            let Some((offset, amount, spans, first, span)) = self.five_numbers()? else {
                return Ok(None);
            };
            let mix = if self.closes(b']')? {
                None
            } else {
                self.expect(b',')?;
                let Some(mix) = self.mix()? else {
                    return Ok(None);
                };
                self.expect(b']')?;
                Some(mix)
            };
            steps.push(WireStep {
                offset,
                amount,
                spans,
                first,
                span,
                mix,
            });
            if self.closes(b']')? {
                return Ok(Some(steps));
            }
            self.expect(b',')?;
        }
    }
}
