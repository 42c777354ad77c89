//! The native fast path of `burnguard.contracts.otlp.decode_spans`.
//!
//! It walks the protobuf bytes of an OTLP `ExportTraceServiceRequest` over the few fields
//! decoding needs and returns, per accounted span, the `SpanUsage` that `_span_usage` builds
//! (made here, `usage.rs`), each inside the ceilings of `span_checks` (`checks.rs`). Every rule
//! (attribute keys, precedence, markers, defaults, the fields of `SpanUsage`, the checked fields
//! and ceilings) is handed in as data by contracts/otlp.py; none is written here. Whatever the walk is not sure of, it answers None ("fall back") and
//! the Python reference decodes the message: errors and rejections are made in one place.

mod checks;
mod combine;
mod digest;
mod groups;
mod record;
mod snapshot;
mod state;
mod sub_batches;
mod sums;
mod texts;
mod totals;
mod usage;
mod valid;
mod value;
mod wire;

use std::collections::HashMap;
use std::sync::Mutex;

use pyo3::panic::PanicException;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyType};
use rustc_hash::FxHashMap;

use checks::{Ceilings, Checks};
use texts::Texts;
use usage::{Usages, ValueRef};
use valid::Schema;
use value::{text, Any, Reader, Value};
use wire::{Fields, Level, Plain, Source, Unsure, Walk};

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

/// The attributes of one span or resource found in the table: per key id, its last value, and
/// the ids set, so that a span's walk reads and clears only its own attributes, not the table.
struct Found<'a> {
    values: Vec<Option<&'a [u8]>>,
    set: Vec<usize>,
}

impl<'a> Found<'a> {
    fn new(keys: usize) -> Self {
        Found {
            values: vec![None; keys],
            set: Vec::new(),
        }
    }

    /// A key repeated in one span keeps its last value.
    fn insert(&mut self, id: usize, value: &'a [u8]) {
        if self.values[id].replace(value).is_none() {
            self.set.push(id);
        }
    }

    fn get(&self, id: usize) -> Option<&'a [u8]> {
        self.values[id]
    }

    /// The ids set and their values, in the order first set.
    fn iter(&self) -> impl Iterator<Item = (usize, &'a [u8])> + '_ {
        self.set.iter().filter_map(|&id| Some((id, self.values[id]?)))
    }

    fn clear(&mut self) {
        for id in self.set.drain(..) {
            self.values[id] = None;
        }
    }
}

/// The deprecated or foreign spellings found in a span: (rank, slot, value), a buffer reused.
type Ranked<'a> = Vec<(usize, Slot, &'a [u8])>;
/// Attribute keys (bytes) -> their id in the decoder's table.
type KeyIds = FxHashMap<Vec<u8>, usize>;

/// A decoder configured with the rules of contracts/otlp.py (see `Decoder.__new__`).
#[pyclass(frozen, module = "burnguard.contracts._otlp_native")]
struct Decoder {
    span_ids: KeyIds,
    span_keys: Vec<SpanKey>,
    resource_ids: KeyIds,
    resource_slots: Vec<Option<Slot>>, // None: the service key
    defaults: Defaults,
    positions: Positions,
    operation_default: String,
    status_error_code: u32,
    usages: Usages,
    checks: Checks,
    schema: Schema,
    /// The `str`s of attribute texts, from one decode to the next (`texts.rs`).
    texts: Mutex<Texts>,
}

/// The field values before any attribute is read: as Python objects (a span's fields left at
/// their default take these, no conversion), as values (the checks read them), and whether each
/// is true (`bool(value)`), which decides whether a deprecated spelling or the resource may
/// still fill it.
struct Defaults {
    objects: Vec<Py<PyAny>>,
    values: Vec<Value<'static>>,
    truthy: Vec<bool>,
}

impl Defaults {
    fn new(defaults: &[Bound<'_, PyAny>]) -> PyResult<Self> {
        let values: Vec<_> = defaults.iter().map(Value::from_python).collect::<PyResult<_>>()?;
        let truthy = values.iter().map(Value::truthy).collect();
        let objects = defaults.iter().map(|value| value.clone().unbind()).collect();
        Ok(Defaults {
            objects,
            values,
            truthy,
        })
    }

    fn len(&self) -> usize {
        self.truthy.len()
    }
}

/// A span's field values under construction: None where the field keeps its default.
type Values<'a> = Vec<Option<Value<'a>>>;

/// `bool(value)` of a field; `unset`: that of the value a field not yet set has.
fn truthy(values: &Values<'_>, index: usize, unset: &[bool]) -> bool {
    match &values[index] {
        Some(value) => value.truthy(),
        None => unset[index],
    }
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
    /// attribute is read; `positions`: field name -> index for the fields set from the span itself;
    /// `usage_class`, `usage_fields` (in the order of the values) and `fresh_dicts`: what a span's
    /// values become (`usage.rs`); `cost_field`, `count_fields`, `key_fields`: what the checks
    /// read (`checks.rs`); `schema` and `required`: the request's wire schema, what `accepts`
    /// checks (`valid.rs`).
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
        usage_class: Bound<'_, PyType>,
        usage_fields: Vec<String>,
        fresh_dicts: Vec<String>,
        cost_field: String,
        count_fields: Vec<String>,
        key_fields: Vec<String>,
        schema: Vec<HashMap<u32, Bound<'_, PyAny>>>,
        required: u32,
    ) -> PyResult<Self> {
        let schema = Schema::new(schema, required, DESCENTS, ENTRY_KEY)?;
        let defaults = Defaults::new(&defaults)?;
        let usages = Usages::new(&usage_class, &usage_fields, &fresh_dicts)?;
        if usages.fields() != defaults.len() {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "one default per field of the usage class",
            ));
        }
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
        let index = |name: &String| {
            usage_fields
                .iter()
                .position(|field| field == name)
                .ok_or_else(|| pyo3::exceptions::PyValueError::new_err(format!("no field {name} to check")))
        };
        let checks = Checks {
            cost: index(&cost_field)?,
            counts: count_fields.iter().map(index).collect::<PyResult<_>>()?,
            keys: key_fields.iter().map(index).collect::<PyResult<_>>()?,
        };
        Ok(Decoder {
            schema,
            checks,
            span_ids,
            span_keys,
            resource_ids,
            resource_slots,
            positions: positions_of(&positions, defaults.len())?,
            defaults,
            operation_default,
            status_error_code,
            usages,
            texts: Mutex::default(),
        })
    }

    /// True when the upb parse surely accepts `payload` as the request (and `_parse_proto` with
    /// it: it holds a `resource_spans`); false: not sure, upb parses it (`valid.rs`).
    fn accepts(&self, payload: &[u8]) -> bool {
        self.schema.accepts(payload)
    }

    /// The `SpanUsage` of each accounted span, in walk order; None: fall back, which a span
    /// outside the `ceilings` (`SpanLimits.ceilings()`) also answers.
    ///
    /// Call it only on protobuf bytes that upb accepts (`accepts`, or the upb parse itself):
    /// it does not check what it skips.
    fn decode<'py>(
        &self,
        py: Python<'py>,
        payload: &[u8],
        ceilings: Ceilings,
    ) -> PyResult<Option<Bound<'py, PyList>>> {
        let walked = self.walk(py, Plain, payload, ceilings)?;
        walked.ok().map(|usages| PyList::new(py, usages)).transpose()
    }

    /// `accepts` and `decode` in one walk of the bytes: `(accepts(payload), decode(payload,
    /// ceilings))` where the check accepts, `(False, None)` where it does not (upb parses, then
    /// `decode` walks what upb accepted). The decoding walk reads the fields of the messages it
    /// descends into through the check (`valid::Checking`), which checks every other sub-message
    /// whole on the way; where the walk falls back before the end, `accepts` checks alone.
    fn checked_decode<'py>(
        &self,
        py: Python<'py>,
        payload: &[u8],
        ceilings: Ceilings,
    ) -> PyResult<(bool, Option<Bound<'py, PyList>>)> {
        let Some(checking) = self.schema.checking() else {
            let accepted = self.schema.accepts(payload);
            return Ok((
                accepted,
                if accepted {
                    self.decode(py, payload, ceilings)?
                } else {
                    None
                },
            ));
        };
        Ok(match self.walk(py, &checking, payload, ceilings)? {
            Ok(usages) if checking.accepted() => (true, Some(PyList::new(py, usages)?)),
            Ok(_) => (false, None),
            Err(Unsure) if checking.refused() => (false, None),
            Err(Unsure) => (self.schema.accepts(payload), None),
        })
    }

    /// Whether `checked_decode` checks in the decoding walk (the schema holds the walk's path),
    /// for the tests: else it calls `accepts` and `decode`.
    fn walks_once(&self) -> bool {
        self.schema.checking().is_some()
    }

    /// How many attribute texts the decoder keeps as `str`s (`texts.rs`), for the tests.
    fn kept_texts_count(&self) -> usize {
        self.kept_texts().len()
    }
}

/// The usages made so far, and what making them reuses: the text of attributes repeats from span
/// to span and message to message (tenant, model, service ...), each text becomes one `str`
/// (`texts.rs`), and so does each trace id of the message (the spans of a trace travel
/// together); the buffers of a span's walk.
/// `error`: Python's error making a usage (the walk stops; `decode` raises it).
struct Rows<'py, 'a> {
    py: Python<'py>,
    usages: Vec<Bound<'py, PyAny>>,
    error: Option<PyErr>,
    ceilings: Ceilings,
    texts: Texts,
    trace_ids: FxHashMap<&'a [u8], Bound<'py, PyAny>>,
    found: Found<'a>,
    ranked: Ranked<'a>,
    values: Values<'a>,
}

impl<'py, 'a> Rows<'py, 'a> {
    fn new(py: Python<'py>, keys: usize, fields: usize, ceilings: Ceilings, texts: Texts) -> Self {
        Rows {
            py,
            usages: Vec::new(),
            error: None,
            ceilings,
            texts,
            trace_ids: FxHashMap::with_capacity_and_hasher(16, Default::default()),
            found: Found::new(keys),
            ranked: Vec::new(),
            values: vec![None; fields],
        }
    }

    /// A usage of `self.values`, the defaults where a field is unset; the values are left unset
    /// for the next span. A span the checks cannot vouch for: `Unsure`.
    fn push(&mut self, decoder: &Decoder) -> Walk<()> {
        let (defaults, trace_id) = (&decoder.defaults, decoder.positions.trace_id);
        let values = &self.values;
        let field = |index: usize| values[index].as_ref().unwrap_or(&defaults.values[index]);
        if !decoder.checks.vouch(field, self.ceilings) {
            return Err(Unsure);
        }
        let (py, texts, trace_ids) = (self.py, &mut self.texts, &mut self.trace_ids);
        let objects = self
            .values
            .iter_mut()
            .enumerate()
            .map(|(index, value)| match value.take() {
                None => ValueRef::Borrowed(&defaults.objects[index]),
                Some(Value::Str(std::borrow::Cow::Borrowed(text))) if !text.is_empty() => {
                    ValueRef::Owned(texts.of(py, text))
                }
                Some(Value::Hex(id)) if index == trace_id => ValueRef::Owned(
                    trace_ids
                        .entry(id)
                        .or_insert_with(|| Value::Hex(id).to_python(py))
                        .clone(),
                ),
                Some(other) => ValueRef::Owned(other.to_python(py)),
            });
        match decoder.usages.make(py, objects) {
            Ok(usage) => self.usages.push(usage),
            Err(error) => {
                self.error = Some(error);
                return Err(Unsure);
            }
        }
        Ok(())
    }
}

/// The message fields the decoding walk descends into, level by level (`Level`): the request's
/// `resource_spans`, `ResourceSpans.scope_spans`, `ScopeSpans.spans`, `Span.attributes`. The
/// walk below reads them by these numbers; `checked_decode` checks the rest of each message.
const DESCENTS: [u32; 4] = [1, 2, 2, 9];
/// An attribute entry's key (`attribute`), which the walk checks only where its table lacks it.
const ENTRY_KEY: u32 = 1;

impl Decoder {
    /// The decoding walk over `payload`, its fields read from `source`: the usages it made, or
    /// `Unsure` (it fell back). Python's error making a usage is raised.
    fn walk<'py, S: Source>(
        &self,
        py: Python<'py>,
        source: S,
        payload: &[u8],
        ceilings: Ceilings,
    ) -> PyResult<Walk<Vec<Bound<'py, PyAny>>>> {
        let texts = std::mem::take(&mut *self.kept_texts());
        let mut rows = Rows::new(py, self.span_keys.len(), self.defaults.len(), ceilings, texts);
        let walked = self.request(source, payload, &mut rows);
        *self.kept_texts() = std::mem::take(&mut rows.texts);
        if let Some(error) = rows.error {
            return Err(error);
        }
        Ok(walked.map(|()| rows.usages))
    }

    /// The texts kept between decodes (taken out for a decode and put back after it: a decode
    /// that raised leaves an empty cache, never a wrong one).
    fn kept_texts(&self) -> std::sync::MutexGuard<'_, Texts> {
        self.texts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn request<'a, S: Source>(&self, source: S, payload: &'a [u8], rows: &mut Rows<'_, 'a>) -> Walk<()> {
        for field in source.fields(payload, Level::Request) {
            if let (1, field) = field? {
                self.resource_spans(source, field.bytes()?, rows)?;
            }
        }
        Ok(())
    }

    /// One `ResourceSpans`: its resource read once (only if a span needs it), then its spans.
    fn resource_spans<'a, S: Source>(
        &self,
        source: S,
        message: &'a [u8],
        rows: &mut Rows<'_, 'a>,
    ) -> Walk<()> {
        let mut resource: Option<&[u8]> = None;
        let mut scopes = Vec::new();
        for field in source.fields(message, Level::ResourceSpans) {
            match field? {
                (1, _) if resource.is_some() => return Err(Unsure), // merged resources: Python's
                (1, field) => resource = Some(field.bytes()?),
                (2, field) => scopes.push(field.bytes()?),
                _ => {}
            }
        }
        let mut inherited: Option<Resource> = None;
        for scope in scopes {
            for field in source.fields(scope, Level::ScopeSpans) {
                if let (2, field) = field? {
                    if self.span(source, field.bytes()?, resource, &mut inherited, rows)? {
                        rows.push(self)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The field values of a span into `rows.values`; false when it is not accounted (`_is_accounted`).
    fn span<'a, S: Source>(
        &self,
        source: S,
        message: &'a [u8],
        resource: Option<&'a [u8]>,
        read_resource: &mut Option<Resource<'a>>,
        rows: &mut Rows<'_, 'a>,
    ) -> Walk<bool> {
        let found = &mut rows.found;
        found.clear();
        let (mut ids, mut name, mut times, mut status) = ([&b""[..]; 3], &b""[..], [0u64; 2], 0u32);
        for field in source.fields(message, Level::Span) {
            match field? {
                (1, field) => ids[0] = field.bytes()?,
                (2, field) => ids[1] = field.bytes()?,
                (4, field) => ids[2] = field.bytes()?,
                (5, field) => name = field.bytes()?,
                (7, field) => times[0] = field.fixed64()?,
                (8, field) => times[1] = field.fixed64()?,
                (9, field) => attribute(source, field.bytes()?, &self.span_ids, found)?,
                (15, field) => status = status_code(field.bytes()?, status)?,
                _ => {}
            }
        }
        let has = |wanted: fn(&SpanKey) -> bool| found.iter().any(|(id, _)| wanted(&self.span_keys[id]));
        if !has(|key| key.marker) || has(|key| key.duplicate) {
            return Ok(false);
        }
        let (values, unset) = (&mut rows.values, &self.defaults.truthy[..]); // all unset (`push`)
        fill(
            values,
            unset,
            |id| self.span_keys[id].slot,
            found,
            &mut rows.ranked,
        )?;
        let at = self.positions;
        for (position, id) in [at.trace_id, at.span_id, at.parent_span_id].into_iter().zip(ids) {
            values[position] = Some(Value::Hex(id));
        }
        values[at.name] = Some(Value::Str(text(name)?.into()));
        values[at.start_ns] = Some(Value::UInt(times[0]));
        values[at.end_ns] = Some(Value::UInt(times[1]));
        if !truthy(values, at.operation, unset) {
            values[at.operation] = Some(Value::Str(self.operation_default.clone().into()));
        }
        if read_resource.is_none() {
            *read_resource = Some(self.resource(resource.unwrap_or_default())?);
        }
        let resource = read_resource.as_ref().ok_or(Unsure)?;
        values[at.service] = Some(Value::Str(resource.service.into()));
        values[at.status_error] = Some(Value::Bool(status == self.status_error_code));
        for (index, value) in &resource.inherited {
            if !truthy(values, *index, unset) {
                values[*index] = Some(value.clone());
            }
        }
        Ok(true)
    }

    /// `resource_attribution` and the service name: `service.name`'s string value, else "".
    /// Read as it stands: a checked walk checked the resource whole where it met it.
    fn resource<'a>(&self, message: &'a [u8]) -> Walk<Resource<'a>> {
        let mut found = Found::new(self.resource_slots.len());
        for field in Fields::of(message) {
            if let (1, field) = field? {
                attribute(Plain, field.bytes()?, &self.resource_ids, &mut found)?;
            }
        }
        let service_id = self
            .resource_slots
            .iter()
            .position(Option::is_none)
            .ok_or(Unsure)?;
        let service = match found.get(service_id) {
            Some(value) => Any::parse(value)?.string_value()?,
            None => "",
        };
        let mut values = vec![None; self.defaults.len()];
        let unset = vec![false; self.defaults.len()]; // `values.get(dimension)` of an empty dict
        fill(
            &mut values,
            &unset,
            |id| self.resource_slots[id],
            &found,
            &mut Vec::new(),
        )?;
        let inherited = values
            .into_iter()
            .enumerate()
            .filter_map(|(index, value)| Some((index, value.filter(Value::truthy)?)))
            .collect();
        Ok(Resource { service, inherited })
    }
}

/// One attribute (a `KeyValue`): its value kept if its key is in `ids`. Read as protobuf's
/// `KeyValue` reads it: the last key, any other field (OTLP 1.10's `key_strindex`, whatever a
/// hostile or future encoder adds) ignored; Python's reference reads such an entry the same way.
/// The key is checked (`Source::key`) only where `ids` lacks it: a key there is UTF-8.
fn attribute<'a, S: Source>(source: S, entry: &'a [u8], ids: &KeyIds, found: &mut Found<'a>) -> Walk<()> {
    let (mut key, mut value) = (&b""[..], None);
    for field in source.fields(entry, Level::KeyValue) {
        match field? {
            (ENTRY_KEY, field) => source.key(std::mem::replace(&mut key, field.bytes()?))?,
            (2, _) if value.is_some() => return Err(Unsure), // merged values: Python's
            (2, field) => value = Some(field.bytes()?),
            _ => {}
        }
    }
    match ids.get(key) {
        Some(&id) => found.insert(id, value.unwrap_or_default()), // no value: an empty AnyValue
        None => source.key(key)?,
    }
    Ok(())
}

/// The values of the found attributes into their fields: each canonical spelling, then the
/// others by rank, each only into a field still empty (`_span_usage`, `_fill_if_empty`).
/// `unset`: `bool()` of a field not set yet; `slot_of`: a key id's slot; `ranked`: a buffer.
fn fill<'a>(
    values: &mut Values<'a>,
    unset: &[bool],
    slot_of: impl Fn(usize) -> Option<Slot>,
    found: &Found<'a>,
    ranked: &mut Ranked<'a>,
) -> Walk<()> {
    ranked.clear();
    for (id, value) in found.iter() {
        let Some(slot) = slot_of(id) else {
            continue;
        };
        match slot.rank {
            Some(rank) => ranked.push((rank, slot, value)),
            None => values[slot.index] = Some(Any::parse(value)?.read(slot.reader)?),
        }
    }
    ranked.sort_unstable_by_key(|(rank, _, _)| *rank);
    for (_, slot, value) in ranked.drain(..) {
        if !truthy(values, slot.index, unset) {
            values[slot.index] = Some(Any::parse(value)?.read(slot.reader)?);
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

/// `Decoder`, `MAX_KEPT_TEXTS` (`texts.rs`), `Summer` (`sums.rs`), `combined` (`combine.rs`), `Groups` and `MessageRows`
/// (`groups.rs`), `TotalsRows` (`totals.rs`), `ChangelogJson` (`state.rs`), `UsageValues` (`snapshot.rs`), `murmur2`, `blake3_16` (`digest.rs`), and the exception a Rust panic is raised as (a BaseException: the caller
/// catches it by name, `except Exception` would let it through).
#[pymodule]
fn _otlp_native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add("PanicException", module.py().get_type::<PanicException>())?;
    module.add("MAX_KEPT_TEXTS", texts::MAX_TEXTS)?;
    module.add_function(wrap_pyfunction!(murmur2, module)?)?;
    module.add_function(wrap_pyfunction!(digest::blake3_16, module)?)?;
    module.add_function(wrap_pyfunction!(combine::combined, module)?)?;
    module.add_function(wrap_pyfunction!(sub_batches::group_sub_batches, module)?)?;
    module.add_class::<sums::Summer>()?;
    module.add_class::<groups::Groups>()?;
    module.add_class::<groups::MessageRows>()?;
    module.add_class::<totals::TotalsRows>()?;
    module.add_class::<record::UsageRecord>()?;
    module.add_class::<state::ChangelogJson>()?;
    module.add_class::<snapshot::UsageValues>()?;
    module.add_class::<Decoder>()
}
