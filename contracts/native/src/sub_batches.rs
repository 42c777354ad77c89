//! `group_sub_batches`: a source partition's group (`groups::Groups`) as the JSON of the sub-batches
//! stage 1 sends for it, per usage partition, without a Python object per row.
//!
//! The reference is `stream/app.py:BudgetJob._close_group` over `GroupRows`: the group's wire rows
//! (`GroupRows.rows`, `records._combined`) cut into chunks of at most `max_rows` rows and steps,
//! each chunk's rows sent to their key's usage partition (Kafka's murmur2 of `budget|key`,
//! `partitioner.usage_partition`) in partition order, each such part one sub-batch
//! `[source partition, the group's last offset, [rows], []]`, written as msgspec writes it inside
//! the record (`records.encode_record`): compact, floats in their shortest round-trip form (the
//! `ryu` crate's, `state::write_float`), text as UTF-8 with `"`, `\` and control characters escaped.
//! A group with anything this does not write exactly as the reference would (a field not of the
//! type `usage_rows` makes, an int past an int64, a float that is not finite, a window start past
//! an int64) gives None, and the reference path sends the group. `tests/test_sub_batches.py` holds
//! the two to the same bytes.

use std::borrow::Cow;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyFloat, PyList, PyString, PyTuple};

use crate::groups::{Groups, NativeRow, Part, BEFORE_MIX, MIX_FIELDS};
use crate::state::{write_float, write_int, Refused, Written};
use crate::totals::int;

/// A row's call mix field: none (a row of 8 fields), an explicit null, or the mix.
#[derive(Clone, Copy)]
enum Mix {
    Absent,
    Null,
    Calls([f64; MIX_FIELDS]),
}

/// One message's row for a key, read from a Python list or a native row.
struct Row<'a> {
    budget: Cow<'a, str>,
    key: Cow<'a, str>,
    start: i64,
    amount: f64,
    spans: i64,
    first: i64,
    last: i64,
    bucket: i64,
    mix: Mix,
}

/// A first guess at a part's bytes (a step is ~40, a one-message row ~150): the buffer's capacity.
const BYTES_PER_PART: usize = 64;

/// A key's wire row, written into the shared buffer at `range`.
struct Encoded {
    partition: usize,
    range: std::ops::Range<usize>,
    /// 1 + its steps (`GroupRows.rows`' weight): what `MicroBatch` counts for it.
    weight: usize,
    /// Whether it has ten fields (`_steps_in`: it makes its record a `groups` one).
    combined: bool,
}

/// (usage partition, sub-batch JSON, its rows and steps, whether one of its rows is combined) of
/// every sub-batch `_close_group` would add for the group, in that order; None where the reference
/// must send it (module doc). The group is not changed.
#[pyfunction]
pub fn group_sub_batches<'py>(
    py: Python<'py>,
    group: PyRef<'py, Groups>,
    source_partition: i64,
    partitions: usize,
    max_rows: usize,
) -> PyResult<Option<Bound<'py, PyList>>> {
    if partitions == 0 || max_rows == 0 || partitions > i32::MAX as usize {
        return Ok(None);
    }
    let parts_in_all: usize = group.parts.iter().map(Vec::len).sum();
    let mut buffer = Vec::with_capacity(parts_in_all * BYTES_PER_PART);
    let mut rows = Vec::with_capacity(group.parts.len());
    let mut scratch = Vec::new();
    for parts in &group.parts {
        match encode_key(
            py,
            parts,
            group.last_offset,
            partitions,
            &mut scratch,
            &mut buffer,
        ) {
            Ok(encoded) => rows.push(encoded),
            Err(Refused) => return Ok(None),
        }
    }
    let out = PyList::empty(py);
    let mut head = Vec::new();
    write_int(source_partition, &mut head);
    head.push(b',');
    write_int(group.last_offset, &mut head);
    let mut start = 0;
    while start < rows.len() {
        let mut end = start;
        let mut weight = 0;
        while end < rows.len() && (end == start || weight + rows[end].weight <= max_rows) {
            weight += rows[end].weight;
            end += 1;
        }
        chunk(py, &rows[start..end], &buffer, &head, &out)?;
        start = end;
    }
    Ok(Some(out))
}

/// One chunk's sub-batches, one per usage partition in partition order, rows in group order.
fn chunk(
    py: Python<'_>,
    rows: &[Encoded],
    buffer: &[u8],
    head: &[u8],
    out: &Bound<'_, PyList>,
) -> PyResult<()> {
    let mut order: Vec<&Encoded> = rows.iter().collect();
    order.sort_by_key(|row| row.partition); // stable: a partition's rows stay in group order
    for part in order.chunk_by(|a, b| a.partition == b.partition) {
        // `[head,[row,row,...],[]]`, written straight into the bytes object
        let rows_len: usize = part.iter().map(|row| row.range.len()).sum::<usize>() + part.len() - 1;
        let json = PyBytes::new_with(py, head.len() + rows_len + 8, |bytes| {
            let mut at = 0;
            let mut put = |piece: &[u8]| {
                bytes[at..at + piece.len()].copy_from_slice(piece);
                at += piece.len();
            };
            put(b"[");
            put(head);
            put(b",[");
            for (index, row) in part.iter().enumerate() {
                if index > 0 {
                    put(b",");
                }
                put(&buffer[row.range.clone()]);
            }
            put(b"],[]]");
            Ok(())
        })?;
        let size: usize = part.iter().map(|row| row.weight).sum();
        let combined = part.iter().any(|row| row.combined);
        out.append(PyTuple::new(
            py,
            [
                part[0].partition.into_pyobject(py)?.into_any(),
                json.into_any(),
                size.into_pyobject(py)?.into_any(),
                PyBool::new(py, combined).to_owned().into_any(),
            ],
        )?)?;
    }
    Ok(())
}

/// A key's wire row (`GroupRows.rows`) appended to `buffer`, with its partition and weight; its
/// parts read into `rows` (a scratch list, kept between keys).
fn encode_key<'a>(
    py: Python<'_>,
    parts: &'a [Part],
    last_offset: i64,
    partitions: usize,
    rows: &mut Vec<(i64, Row<'a>)>,
    buffer: &mut Vec<u8>,
) -> Result<Encoded, Refused> {
    rows.clear();
    for part in parts {
        rows.push(match part {
            Part::Native(offset, row) => (*offset, native_row(py, row)?),
            Part::Python(offset, row) => (*offset, python_row(row.bind(py))?),
        });
    }
    let Some((offset, head)) = rows.first() else {
        return Err(Refused);
    };
    let partition = usage_partition(&head.budget, &head.key, partitions);
    let begin = buffer.len();
    let combined = if rows.len() > 1 {
        write_combined(rows, buffer)?;
        true
    } else {
        write_one(head, *offset, last_offset, buffer)?;
        *offset != last_offset
    };
    Ok(Encoded {
        partition,
        range: begin..buffer.len(),
        weight: if rows.len() > 1 { 1 + rows.len() } else { 1 },
        combined,
    })
}

/// `usage_partition(partition_key_of(budget, key), partitions)`: aiokafka's default choice.
fn usage_partition(budget: &str, key: &str, partitions: usize) -> usize {
    let mut text = Vec::with_capacity(budget.len() + 1 + key.len());
    text.extend_from_slice(budget.as_bytes());
    text.push(b'|');
    text.extend_from_slice(key.as_bytes());
    (crate::murmur2(&text) & 0x7FFF_FFFF) as usize % partitions
}

fn native_row<'a>(py: Python<'_>, row: &'a NativeRow) -> Result<Row<'a>, Refused> {
    Ok(Row {
        budget: Cow::Borrowed(&row.budget_text),
        key: Cow::Borrowed(&row.key),
        start: row.start,
        amount: row.amount,
        spans: row.spans,
        first: row.first,
        last: row.last,
        bucket: int(row.bucket.bind(py)).ok_or(Refused)?,
        mix: row.mix.map_or(Mix::Absent, Mix::Calls),
    })
}

/// A `usage_rows` list: str budget and key, int64s, a float amount, then no mix, a null or four floats.
fn python_row(row: &Bound<'_, PyList>) -> Result<Row<'static>, Refused> {
    if row.len() != BEFORE_MIX && row.len() != BEFORE_MIX + 1 {
        return Err(Refused);
    }
    let item = |at: usize| row.get_item(at).map_err(|_| Refused);
    let text = |at: usize| -> Result<Cow<'static, str>, Refused> {
        let value = item(at)?;
        let text = value.cast_exact::<PyString>().map_err(|_| Refused)?;
        Ok(Cow::Owned(text.to_str().map_err(|_| Refused)?.to_owned()))
    };
    let number = |at: usize| int(&item(at)?).ok_or(Refused);
    let mix = if row.len() == BEFORE_MIX {
        Mix::Absent
    } else {
        python_mix(&item(BEFORE_MIX)?)?
    };
    Ok(Row {
        budget: text(0)?,
        key: text(1)?,
        start: number(2)?,
        amount: item(3)?.cast_exact::<PyFloat>().map_err(|_| Refused)?.value(),
        spans: number(4)?,
        first: number(5)?,
        last: number(6)?,
        bucket: number(7)?,
        mix,
    })
}

/// None, or a list of exactly four floats.
fn python_mix(value: &Bound<'_, PyAny>) -> Result<Mix, Refused> {
    if value.is_none() {
        return Ok(Mix::Null);
    }
    let list = value.cast_exact::<PyList>().map_err(|_| Refused)?;
    if list.len() != MIX_FIELDS {
        return Err(Refused);
    }
    let mut mix = [0.0; MIX_FIELDS];
    for (field, value) in mix.iter_mut().zip(list.iter()) {
        *field = value.cast_exact::<PyFloat>().map_err(|_| Refused)?.value();
    }
    Ok(Mix::Calls(mix))
}

/// A one-message row: its fields and mix as made, then (unless at the group's last offset) a null
/// for a row without a mix and its offset.
fn write_one(row: &Row<'_>, offset: i64, last_offset: i64, out: &mut Vec<u8>) -> Written {
    write_fields(row, row.amount, row.spans, row.first, row.last, out)?;
    match &row.mix {
        Mix::Absent => {}
        Mix::Null => out.extend_from_slice(b",null"),
        Mix::Calls(mix) => {
            out.push(b',');
            write_mix(mix, out)?;
        }
    }
    if offset != last_offset {
        if matches!(row.mix, Mix::Absent) {
            out.extend_from_slice(b",null");
        }
        out.push(b',');
        write_int(offset, out);
    }
    out.push(b']');
    Ok(())
}

/// `records._combined`: the sums, the summed mix (or null) and each message's step.
fn write_combined(rows: &[(i64, Row<'_>)], out: &mut Vec<u8>) -> Written {
    let counts_calls = rows.iter().any(|(_, row)| matches!(row.mix, Mix::Calls(_)));
    let mut total: Option<[f64; MIX_FIELDS]> = None;
    let (mut amount, mut spans, mut first_ns, mut last_ns) = (0.0_f64, 0_i128, 0_i64, 0_i64);
    for (_, row) in rows {
        amount += row.amount;
        spans += i128::from(row.spans);
        if row.first != 0 && (first_ns == 0 || row.first < first_ns) {
            first_ns = row.first;
        }
        if row.last > last_ns {
            last_ns = row.last;
        }
        if let Mix::Calls(mix) = &row.mix {
            match total.as_mut() {
                None => total = Some(*mix),
                Some(sums) => sums.iter_mut().zip(mix).for_each(|(sum, value)| *sum += value),
            }
        }
    }
    let spans = i64::try_from(spans).map_err(|_| Refused)?;
    write_fields(&rows[0].1, amount, spans, first_ns, last_ns, out)?;
    out.push(b',');
    match &total {
        Some(mix) => write_mix(mix, out)?,
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",[");
    for (at, (offset, row)) in rows.iter().enumerate() {
        write_step(*offset, row, counts_calls, at > 0, out)?;
    }
    out.extend_from_slice(b"]]");
    Ok(())
}

/// A message's step, `[offset,amount,spans,first,last - first]`, then its mix unless a plain one's
/// (a null for a row without one in a row with one); after a comma unless it is the first.
fn write_step(offset: i64, row: &Row<'_>, counts_calls: bool, comma: bool, out: &mut Vec<u8>) -> Written {
    let duration = i64::try_from(i128::from(row.last) - i128::from(row.first)).map_err(|_| Refused)?;
    out.extend_from_slice(if comma { b",[" } else { b"[" });
    write_int(offset, out);
    out.push(b',');
    write_float(row.amount, out)?;
    for value in [row.spans, row.first, duration] {
        out.push(b',');
        write_int(value, out);
    }
    match &row.mix {
        Mix::Absent | Mix::Null if counts_calls => out.extend_from_slice(b",null"),
        Mix::Absent | Mix::Null => {}
        Mix::Calls(mix) if !NativeRow::plain(mix, row.spans) => {
            out.push(b',');
            write_mix(mix, out)?;
        }
        Mix::Calls(_) => {}
    }
    out.push(b']');
    Ok(())
}

/// `[budget,key,start,amount,spans,first,last,bucket` (the row left open).
fn write_fields(row: &Row<'_>, amount: f64, spans: i64, first: i64, last: i64, out: &mut Vec<u8>) -> Written {
    out.push(b'[');
    write_text(&row.budget, out);
    out.push(b',');
    write_text(&row.key, out);
    out.push(b',');
    write_int(row.start, out);
    out.push(b',');
    write_float(amount, out)?;
    for value in [spans, first, last, row.bucket] {
        out.push(b',');
        write_int(value, out);
    }
    Ok(())
}

fn write_mix(mix: &[f64; MIX_FIELDS], out: &mut Vec<u8>) -> Written {
    out.push(b'[');
    for (at, value) in mix.iter().enumerate() {
        if at > 0 {
            out.push(b',');
        }
        write_float(*value, out)?;
    }
    out.push(b']');
    Ok(())
}

/// Text as msgspec writes it: UTF-8 between quotes, `"` and `\` escaped, control characters as
/// `\b`, `\t`, `\n`, `\f`, `\r` or `\u00xx` (lower-case hex); everything else as it is.
fn write_text(text: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for &byte in text.as_bytes() {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0xf)]);
            }
            _ => out.push(byte),
        }
    }
    out.push(b'"');
}
