//! The native fast path of `burnguard.contracts.otlp.decode_spans`.
//!
//! It walks the protobuf bytes of an OTLP `ExportTraceServiceRequest` over the few fields
//! decoding needs and returns, per accounted span, the field values `_span_usage` builds,
//! so Python does `SpanUsage(*values)` and `span_checks.span_problem` on them. Every rule
//! (attribute keys, precedence, markers, defaults) is handed in as data by contracts/otlp.py;
//! none is written here. Whatever the walk is not sure of, it answers None ("fall back") and
//! the Python reference decodes the message: errors and rejections are made in one place.

mod value;
mod wire;

use std::collections::HashMap;

use pyo3::panic::PanicException;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString, PyTuple};
use rustc_hash::FxHashMap;

use value::{text, Any, Reader, Value};
use wire::{Fields, Unsure, Walk};

/// What decoding does with an attribute: the field it fills, how it is read, and for a
/// spelling that only fills an empty field, its rank (the lowest rank fills first).
#[derive(Debug, Clone, Copy)]
struct Slot {
    index: usize,
    reader: Reader,
    rank: Option<usize>,
}

/// What one attribute key of a span means: a field it fills, a GenAI marker, the duplicate mark.
#[derive(Debug, Clone, Copy, Default)]
struct SpanKey {
    slot: Option<Slot>,
    marker: bool,
    duplicate: bool,
}

/// The positions of the fields a span (not an attribute) sets, in `SpanUsage` order.
#[derive(Debug, Clone, Copy)]
struct Positions {
    trace_id: usize,
    span_id: usize,
    parent_span_id: usize,
    name: usize,
    start_ns: usize,
    end_ns: usize,
    operation: usize,
    service: usize,
    status_error: usize,
}

/// The attributes of one span or resource found in the table: per key id, its last value.
type Found<'a> = Vec<Option<&'a [u8]>>;
/// Attribute keys (bytes) -> their id in the decoder's table.
type KeyIds = FxHashMap<Vec<u8>, usize>;

/// A decoder configured with the rules of contracts/otlp.py (see `Decoder.__new__`).
#[pyclass(frozen, module = "burnguard.contracts._otlp_native")]
struct Decoder {
    span_ids: KeyIds,
    span_keys: Vec<SpanKey>,
    resource_ids: KeyIds,
    resource_slots: Vec<Option<Slot>>, // None: the service key
    defaults: Vec<Value<'static>>,
    positions: Positions,
    operation_default: String,
    status_error_code: u32,
}

/// A resource's contribution to its spans: the service and the attribution they inherit.
struct Resource<'a> {
    service: &'a str,
    inherited: Vec<(usize, Value<'a>)>,
}

#[pymethods]
impl Decoder {
    /// `slots` and `attribution_slots`: attribute key -> (field index, reader, rank or None);
    /// `readers`: the reader numbers of str, int, float and bool; `markers`: the keys that make a
    /// span a GenAI span, unless it has `duplicate_of`; `defaults`: the field values before any
    /// attribute is read; `positions`: field name -> index for the fields set from the span itself.
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        slots: HashMap<String, (usize, u8, Option<usize>)>,
        attribution_slots: HashMap<String, (usize, u8, Option<usize>)>,
        readers: (u8, u8, u8, u8),
        markers: Vec<String>,
        duplicate_of: String,
        service_key: String,
        defaults: Vec<Bound<'_, PyAny>>,
        positions: HashMap<String, usize>,
        operation_default: String,
        status_error_code: u32,
    ) -> PyResult<Self> {
        let defaults = defaults
            .iter()
            .map(Value::from_python)
            .collect::<PyResult<Vec<_>>>()?;
        let mut span_keys: HashMap<String, SpanKey> = HashMap::new();
        for (key, slot) in slots {
            span_keys.entry(key).or_default().slot = Some(slot_of(slot, readers, defaults.len())?);
        }
        for key in markers {
            span_keys.entry(key).or_default().marker = true;
        }
        span_keys.entry(duplicate_of).or_default().duplicate = true;
        let mut resource_slots: HashMap<String, Option<Slot>> = HashMap::new();
        for (key, slot) in attribution_slots {
            resource_slots.insert(key, Some(slot_of(slot, readers, defaults.len())?));
        }
        if resource_slots.insert(service_key, None).is_some() {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "the service key is also an attribution key",
            ));
        }
        one_canonical_per_field(span_keys.values().filter_map(|key| key.slot))?;
        one_canonical_per_field(resource_slots.values().flatten().copied())?;
        let (span_ids, span_keys) = numbered(span_keys);
        let (resource_ids, resource_slots) = numbered(resource_slots);
        Ok(Decoder {
            span_ids,
            span_keys,
            resource_ids,
            resource_slots,
            positions: positions_of(&positions, defaults.len())?,
            defaults,
            operation_default,
            status_error_code,
        })
    }

    /// The field values of each accounted span, in walk order, as tuples; None: fall back.
    ///
    /// Call it only on protobuf bytes the upb parse accepted (it validates the whole message).
    fn decode<'py>(&self, py: Python<'py>, payload: &[u8]) -> PyResult<Option<Bound<'py, PyList>>> {
        let mut rows = Rows::new(py, self.span_keys.len());
        if self.request(payload, &mut rows).is_err() {
            return Ok(None);
        }
        Ok(Some(PyList::new(py, rows.tuples)?))
    }
}

/// The tuples made so far, and what making them reuses: the text of a message's attributes
/// repeats from span to span (tenant, model, service ...), each text becomes one `str`.
struct Rows<'py, 'a> {
    py: Python<'py>,
    tuples: Vec<Bound<'py, PyTuple>>,
    texts: FxHashMap<&'a str, Bound<'py, PyAny>>,
    found: Found<'a>,
    values: Vec<Value<'a>>,
}

impl<'py, 'a> Rows<'py, 'a> {
    fn new(py: Python<'py>, keys: usize) -> Self {
        let (tuples, texts) = (Vec::new(), FxHashMap::default());
        Rows {
            py,
            tuples,
            texts,
            found: vec![None; keys],
            values: Vec::new(),
        }
    }

    /// `self.values` as a tuple of Python objects.
    fn push(&mut self) -> Walk<()> {
        let (py, texts) = (self.py, &mut self.texts);
        let objects = self.values.iter().map(|value| match value {
            Value::Str(std::borrow::Cow::Borrowed(text)) if !text.is_empty() => texts
                .entry(text)
                .or_insert_with(|| PyString::new(py, text).into_any())
                .clone(),
            other => other.to_python(py),
        });
        self.tuples.push(PyTuple::new(py, objects).map_err(|_| Unsure)?);
        Ok(())
    }
}

impl Decoder {
    fn request<'a>(&self, payload: &'a [u8], rows: &mut Rows<'_, 'a>) -> Walk<()> {
        for field in Fields::of(payload) {
            if let (1, field) = field? {
                self.resource_spans(field.bytes()?, rows)?;
            }
        }
        Ok(())
    }

    /// One `ResourceSpans`: its resource read once (only if a span needs it), then its spans.
    fn resource_spans<'a>(&self, message: &'a [u8], rows: &mut Rows<'_, 'a>) -> Walk<()> {
        let mut resource: Option<&[u8]> = None;
        let mut scopes = Vec::new();
        for field in Fields::of(message) {
            match field? {
                (1, _) if resource.is_some() => return Err(Unsure), // merged resources: Python's
                (1, field) => resource = Some(field.bytes()?),
                (2, field) => scopes.push(field.bytes()?),
                _ => {}
            }
        }
        let mut inherited: Option<Resource> = None;
        for scope in scopes {
            for field in Fields::of(scope) {
                if let (2, field) = field? {
                    if self.span(field.bytes()?, resource, &mut inherited, rows)? {
                        rows.push()?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The field values of a span into `rows.values`; false when it is not accounted (`_is_accounted`).
    fn span<'a>(
        &self,
        message: &'a [u8],
        resource: Option<&'a [u8]>,
        read_resource: &mut Option<Resource<'a>>,
        rows: &mut Rows<'_, 'a>,
    ) -> Walk<bool> {
        let found = &mut rows.found;
        found.fill(None);
        let (mut ids, mut name, mut times, mut status) = ([&b""[..]; 3], &b""[..], [0u64; 2], 0u32);
        for field in Fields::of(message) {
            match field? {
                (1, field) => ids[0] = field.bytes()?,
                (2, field) => ids[1] = field.bytes()?,
                (4, field) => ids[2] = field.bytes()?,
                (5, field) => name = field.bytes()?,
                (7, field) => times[0] = field.fixed64()?,
                (8, field) => times[1] = field.fixed64()?,
                (9, field) => attribute(field.bytes()?, &self.span_ids, found)?,
                (15, field) => status = status_code(field.bytes()?, status)?,
                _ => {}
            }
        }
        let has = |wanted: fn(&SpanKey) -> bool| {
            self.span_keys
                .iter()
                .zip(found.iter())
                .any(|(key, value)| wanted(key) && value.is_some())
        };
        if !has(|key| key.marker) || has(|key| key.duplicate) {
            return Ok(false);
        }
        let values = &mut rows.values;
        values.clone_from(&self.defaults);
        let slots = self.span_keys.iter().map(|key| key.slot);
        fill(values, slots, found)?;
        let at = self.positions;
        for (position, id) in [at.trace_id, at.span_id, at.parent_span_id].into_iter().zip(ids) {
            values[position] = Value::Str(hex(id).into());
        }
        values[at.name] = Value::Str(text(name)?.into());
        values[at.start_ns] = Value::UInt(times[0]);
        values[at.end_ns] = Value::UInt(times[1]);
        if !values[at.operation].truthy() {
            values[at.operation] = Value::Str(self.operation_default.clone().into());
        }
        if read_resource.is_none() {
            *read_resource = Some(self.resource(resource.unwrap_or_default())?);
        }
        let resource = read_resource.as_ref().ok_or(Unsure)?;
        values[at.service] = Value::Str(resource.service.into());
        values[at.status_error] = Value::Bool(status == self.status_error_code);
        for (index, value) in &resource.inherited {
            if !values[*index].truthy() {
                values[*index] = value.clone();
            }
        }
        Ok(true)
    }

    /// `resource_attribution` and the service name: `service.name`'s string value, else "".
    fn resource<'a>(&self, message: &'a [u8]) -> Walk<Resource<'a>> {
        let mut found: Found = vec![None; self.resource_slots.len()];
        for field in Fields::of(message) {
            if let (1, field) = field? {
                attribute(field.bytes()?, &self.resource_ids, &mut found)?;
            }
        }
        let service_id = self
            .resource_slots
            .iter()
            .position(Option::is_none)
            .ok_or(Unsure)?;
        let service = match found[service_id] {
            Some(value) => Any::parse(value)?.string_value()?,
            None => "",
        };
        let mut values = vec![Value::None; self.defaults.len()];
        fill(&mut values, self.resource_slots.iter().copied(), &found)?;
        let inherited = values
            .into_iter()
            .enumerate()
            .filter(|(_, value)| value.truthy())
            .collect();
        Ok(Resource { service, inherited })
    }
}

/// One attribute (a `KeyValue`): its value kept if its key is in `ids`. Read as protobuf's
/// `KeyValue` reads it: the last key, any other field (OTLP 1.10's `key_strindex`, whatever a
/// hostile or future encoder adds) ignored; Python's reference reads such an entry the same way.
fn attribute<'a>(entry: &'a [u8], ids: &KeyIds, found: &mut Found<'a>) -> Walk<()> {
    let (mut key, mut value) = (&b""[..], None);
    for field in Fields::of(entry) {
        match field? {
            (1, field) => key = field.bytes()?,
            (2, _) if value.is_some() => return Err(Unsure), // merged values: Python's
            (2, field) => value = Some(field.bytes()?),
            _ => {}
        }
    }
    if let Some(&id) = ids.get(key) {
        found[id] = Some(value.unwrap_or_default()); // no value: an empty AnyValue
    }
    Ok(())
}

/// The values of the found attributes into their fields: each canonical spelling, then the
/// others by rank, each only into a field still empty (`_span_usage`, `_fill_if_empty`).
fn fill<'a>(
    values: &mut [Value<'a>],
    slots: impl Iterator<Item = Option<Slot>>,
    found: &Found<'a>,
) -> Walk<()> {
    let mut ranked = Vec::new();
    for (slot, value) in slots.zip(found) {
        let (Some(slot), Some(value)) = (slot, value) else {
            continue;
        };
        match slot.rank {
            Some(rank) => ranked.push((rank, slot, *value)),
            None => values[slot.index] = Any::parse(value)?.read(slot.reader)?,
        }
    }
    ranked.sort_by_key(|(rank, _, _)| *rank);
    for (_, slot, value) in ranked {
        if !values[slot.index].truthy() {
            values[slot.index] = Any::parse(value)?.read(slot.reader)?;
        }
    }
    Ok(())
}

/// A `Status` merged into the one before it: its code, if it has one, replaces the earlier one.
fn status_code(message: &[u8], earlier: u32) -> Walk<u32> {
    let mut code = earlier;
    for field in Fields::of(message) {
        if let (3, field) = field? {
            code = field.varint()? as u32; // an enum is an int32: the low 32 bits
        }
    }
    Ok(code)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(DIGITS[usize::from(byte >> 4)] as char);
        out.push(DIGITS[usize::from(byte & 15)] as char);
    }
    out
}

fn slot_of(slot: (usize, u8, Option<usize>), readers: (u8, u8, u8, u8), fields: usize) -> PyResult<Slot> {
    let (index, number, rank) = slot;
    let reader = match number {
        n if n == readers.0 => Reader::Str,
        n if n == readers.1 => Reader::Int,
        n if n == readers.2 => Reader::Float,
        n if n == readers.3 => Reader::Bool,
        _ => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "unknown reader {number}"
            )))
        }
    };
    if index >= fields {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "field index {index} out of range"
        )));
    }
    Ok(Slot { index, reader, rank })
}

/// The walk reads attributes in any order: that needs at most one canonical spelling per field.
fn one_canonical_per_field(slots: impl Iterator<Item = Slot>) -> PyResult<()> {
    let mut seen = std::collections::HashSet::new();
    for slot in slots.filter(|slot| slot.rank.is_none()) {
        if !seen.insert(slot.index) {
            let message = format!("two canonical spellings fill field {}", slot.index);
            return Err(pyo3::exceptions::PyValueError::new_err(message));
        }
    }
    Ok(())
}

fn numbered<T>(table: HashMap<String, T>) -> (KeyIds, Vec<T>) {
    let mut ids = KeyIds::default();
    let mut items = Vec::new();
    for (key, item) in table {
        ids.insert(key.into_bytes(), items.len());
        items.push(item);
    }
    (ids, items)
}

fn positions_of(positions: &HashMap<String, usize>, fields: usize) -> PyResult<Positions> {
    let at = |name: &str| match positions.get(name) {
        Some(&index) if index < fields => Ok(index),
        _ => Err(pyo3::exceptions::PyValueError::new_err(format!(
            "no position for {name}"
        ))),
    };
    Ok(Positions {
        trace_id: at("trace_id")?,
        span_id: at("span_id")?,
        parent_span_id: at("parent_span_id")?,
        name: at("name")?,
        start_ns: at("start_ns")?,
        end_ns: at("end_ns")?,
        operation: at("operation")?,
        service: at("service")?,
        status_error: at("status_error")?,
    })
}

/// Kafka's murmur2 hash of a record key, as its default partitioner computes it. The reference is
/// `stream/partitioner.py:_murmur2`, which `tests/test_accounting.py` compares this with; the
/// worker hashes every new budget key (stage 1) and every new snapshot key, ~4 us each in Python.
#[pyfunction]
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5BD1_E995;
    let whole = data.len() - data.len() % 4;
    let mut h: u32 = 0x9747_B28C ^ (data.len() as u32);
    for word in data[..whole].chunks_exact(4) {
        let mut k = u32::from_le_bytes([word[0], word[1], word[2], word[3]]).wrapping_mul(M);
        k ^= k >> 24;
        h = h.wrapping_mul(M) ^ k.wrapping_mul(M);
    }
    let tail = &data[whole..];
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if let Some(&first) = tail.first() {
        h = (h ^ u32::from(first)).wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

/// `Decoder`, `murmur2`, and the exception a Rust panic is raised as (a BaseException: the caller
/// catches it by name, `except Exception` would let it through).
#[pymodule]
fn _otlp_native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add("PanicException", module.py().get_type::<PanicException>())?;
    module.add_function(wrap_pyfunction!(murmur2, module)?)?;
    module.add_class::<Decoder>()
}
