//! `Groups`: a source partition's group of a micro-batch's messages, their delta rows combined per
//! key, as `stream/records.py:GroupRows` (the reference) combines them. A message's rows come as
//! the Python lists `usage_rows` makes, or as the native loop's own rows (`MessageRows`, made by
//! `Summer.add_all_detached` for a message whose every span it summed itself): then no Python
//! object exists per (message, key) row until the group's wire rows are made, once per key.
//! A key only native rows touched gets its wire row here (`_combined`'s, a one-message row with its
//! offset appended unless it is the group's last); any other key's rows are made Python lists
//! first (the lists `usage_rows` would have made) and combined as the reference does
//! (`records.combined_row`, handed in). `tests/test_group_rows.py` runs both on the same messages.

use std::sync::Arc;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyFloat, PyInt, PyList, PyString, PyTuple};
use rustc_hash::FxHashMap;

/// A delta row's fields before its call mix (`records.DELTA_ROW_FIELDS_BEFORE_MIX`).
pub const BEFORE_MIX: usize = 8;
/// A call mix's fields (`accounting.MIX_FIELDS`).
pub const MIX_FIELDS: usize = 4;

/// One message's row for one key as the native loop made it: the fields of the list `usage_rows`
/// would have made (`DeltaRow`'s order), without the list.
pub struct NativeRow {
    pub budget: Py<PyString>,
    /// The budget's text (shared by the rows of the budget, as the key's by the rows of the key).
    pub budget_text: Arc<str>,
    pub key: Arc<str>,
    pub start: i64,
    pub amount: f64,
    pub spans: i64,
    pub first: i64,
    pub last: i64,
    pub bucket: Py<PyAny>,
    /// The call mix, None for a budget that does not count model calls (a row of 8 fields).
    pub mix: Option<[f64; MIX_FIELDS]>,
}

impl NativeRow {
    /// The Python list `usage_rows` would have made for it.
    fn to_list<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let row = PyList::new(
            py,
            [
                self.budget.bind(py).clone().into_any(),
                PyString::new(py, &self.key).into_any(),
                self.start.into_pyobject(py)?.into_any(),
                PyFloat::new(py, self.amount).into_any(),
                self.spans.into_pyobject(py)?.into_any(),
                self.first.into_pyobject(py)?.into_any(),
                self.last.into_pyobject(py)?.into_any(),
                self.bucket.bind(py).clone(),
            ],
        )?;
        if let Some(mix) = self.mix {
            row.append(PyList::new(py, mix)?)?;
        }
        Ok(row)
    }

    /// Whether its call mix is a plain one's (`[spans, 0, 0, 0]`), as `_combined` tests it (a
    /// float equal to an int exactly, as Python compares them).
    pub(crate) fn plain(mix: &[f64; MIX_FIELDS], spans: i64) -> bool {
        let calls = mix[0];
        calls.fract() == 0.0
            && calls as i128 == i128::from(spans)
            && mix[1..].iter().all(|value| *value == 0.0)
    }
}

/// A message's rows made by the native loop (`Summer.add_all_detached`), in the order
/// `usage_rows` would have listed them; taken whole by `Groups.add`.
#[pyclass(module = "burnguard.contracts._otlp_native")]
pub struct MessageRows {
    pub rows: Vec<NativeRow>,
}

#[pymethods]
impl MessageRows {
    fn __len__(&self) -> usize {
        self.rows.len()
    }

    /// The rows as the Python lists `usage_rows` makes (for the tests, and a group's reference path).
    fn lists<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let rows = PyList::empty(py);
        for row in &self.rows {
            rows.append(row.to_list(py)?)?;
        }
        Ok(rows)
    }
}

/// A window start as a key's identity: an int64, or the digits of a Python int past one (the
/// reference keys its dict by any int; `usage_rows` makes such a start only from an event time
/// past an int64, which the per-span path takes).
enum Start {
    Int(i64),
    Text(String),
}

/// One message's part of a key: its offset and its row, a Python list or the native loop's.
pub(crate) enum Part {
    Python(i64, Py<PyList>),
    Native(i64, NativeRow),
}

/// `GroupRows` natively (see the module doc).
#[pyclass(module = "burnguard.contracts._otlp_native")]
pub struct Groups {
    /// `records.combined_row`: the combined row of a key with a part that is a Python list.
    combine: Py<PyAny>,
    #[pyo3(get)]
    pub(crate) last_offset: i64,
    /// A key's (budget, key, window start), encoded (`slot`) -> its index in `parts`.
    index: FxHashMap<Box<[u8]>, usize>,
    /// Per key in the order keys first appeared, its messages' parts in offset order.
    pub(crate) parts: Vec<Vec<Part>>,
    encoded: Vec<u8>,
}

#[pymethods]
impl Groups {
    #[new]
    fn new(combine: Py<PyAny>) -> Self {
        Groups {
            combine,
            last_offset: -1,
            index: FxHashMap::default(),
            parts: Vec::new(),
            encoded: Vec::new(),
        }
    }

    /// A message's rows (messages in offset order): a list of `usage_rows`' lists, each with a
    /// str budget, a str key and an int window start within an int64 (what `usage_rows` makes;
    /// anything else raises, nothing added), or a `MessageRows` (taken: it is empty afterwards).
    fn add(&mut self, offset: i64, rows: &Bound<'_, PyAny>) -> PyResult<()> {
        if let Ok(native) = rows.cast::<MessageRows>() {
            let taken = std::mem::take(&mut native.borrow_mut().rows);
            self.last_offset = offset;
            for row in taken {
                let at = self.key_index(&row.budget_text, &row.key, &Start::Int(row.start));
                self.parts[at].push(Part::Native(offset, row));
            }
            return Ok(());
        }
        let rows = rows.cast::<PyList>()?;
        let mut lists = Vec::with_capacity(rows.len());
        for row in rows.iter() {
            let row = row.cast_into::<PyList>()?;
            if row.len() < 3 {
                return Err(PyTypeError::new_err(
                    "a delta row without its budget, key and window start",
                ));
            }
            lists.push(row);
        }
        let mut slots = Vec::with_capacity(lists.len());
        for row in &lists {
            let (budget, key, start) = (row.get_item(0)?, row.get_item(1)?, row.get_item(2)?);
            let (Ok(budget), Ok(key)) = (budget.cast_into::<PyString>(), key.cast_into::<PyString>()) else {
                return Err(PyTypeError::new_err(
                    "a delta row whose budget or key is not a str",
                ));
            };
            if !start.is_exact_instance_of::<PyInt>() {
                return Err(PyTypeError::new_err(
                    "a delta row whose window start is not an int",
                ));
            }
            let start = match start.extract::<i64>() {
                Ok(start) => Start::Int(start),
                Err(_) => Start::Text(start.str()?.to_str()?.to_owned()), // past an int64: its digits
            };
            slots.push((budget, key, start));
        }
        self.last_offset = offset;
        for (row, (budget, key, start)) in lists.into_iter().zip(slots) {
            let at = self.key_index(budget.to_str()?, key.to_str()?, &start);
            self.parts[at].push(Part::Python(offset, row.unbind()));
        }
        Ok(())
    }

    /// (wire row, its weight: 1 + its steps) of every key, in the order keys first appeared:
    /// `GroupRows.rows`. Once per group (a Python row of one message is extended in place).
    fn rows<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for parts in &self.parts {
            let weight = if parts.len() > 1 { 1 + parts.len() } else { 1 };
            let row = match parts.as_slice() {
                [Part::Native(offset, row)] => {
                    let list = row.to_list(py)?;
                    self.with_offset(py, &list, *offset)?;
                    list
                }
                [Part::Python(offset, row)] => {
                    let list = row.bind(py).clone();
                    self.with_offset(py, &list, *offset)?;
                    list
                }
                _ if parts.iter().all(|part| matches!(part, Part::Native(..))) => combined(py, parts)?,
                _ => self.combined_by_reference(py, parts)?,
            };
            out.append(PyTuple::new(
                py,
                [row.into_any(), weight.into_pyobject(py)?.into_any()],
            )?)?;
        }
        Ok(out)
    }
}

impl Groups {
    /// The index of the key's parts, added when new.
    fn key_index(&mut self, budget: &str, key: &str, start: &Start) -> usize {
        let encoded = &mut self.encoded;
        encoded.clear();
        encoded.extend_from_slice(&(budget.len() as u64).to_le_bytes());
        encoded.extend_from_slice(budget.as_bytes());
        encoded.extend_from_slice(&(key.len() as u64).to_le_bytes());
        encoded.extend_from_slice(key.as_bytes());
        match start {
            Start::Int(start) => {
                encoded.push(0);
                encoded.extend_from_slice(&start.to_le_bytes());
            }
            Start::Text(digits) => {
                encoded.push(1);
                encoded.extend_from_slice(digits.as_bytes());
            }
        }
        if let Some(&at) = self.index.get(encoded.as_slice()) {
            return at;
        }
        self.parts.push(Vec::new());
        self.index.insert(encoded.as_slice().into(), self.parts.len() - 1);
        self.parts.len() - 1
    }

    /// A one-message row: its offset appended unless it is the group's last (with a null mix
    /// first for a row without one), as `GroupRows.rows` does.
    fn with_offset(&self, py: Python<'_>, row: &Bound<'_, PyList>, offset: i64) -> PyResult<()> {
        if offset != self.last_offset {
            if row.len() <= BEFORE_MIX {
                row.append(py.None())?;
            }
            row.append(offset)?;
        }
        Ok(())
    }

    /// A key with a Python part: `[offset, row, ...]` with the native parts as lists, combined by
    /// `records.combined_row`.
    fn combined_by_reference<'py>(&self, py: Python<'py>, parts: &[Part]) -> PyResult<Bound<'py, PyList>> {
        let made = PyList::empty(py);
        for part in parts {
            match part {
                Part::Python(offset, row) => {
                    made.append(offset)?;
                    made.append(row.bind(py))?;
                }
                Part::Native(offset, row) => {
                    made.append(offset)?;
                    made.append(row.to_list(py)?)?;
                }
            }
        }
        Ok(self.combine.bind(py).call1((made,))?.cast_into::<PyList>()?)
    }
}

/// `records._combined` of native parts only (at least two): the sums (amounts as doubles added in
/// offset order, spans, the first non-zero first event, the last event, the mixes field by field)
/// and each message's step `[offset, amount, spans, first, last - first]`, its mix appended unless
/// a plain one's, a null for a row without one in a row with one.
fn combined<'py>(py: Python<'py>, parts: &[Part]) -> PyResult<Bound<'py, PyList>> {
    let rows: Vec<(i64, &NativeRow)> = parts
        .iter()
        .filter_map(|part| match part {
            Part::Native(offset, row) => Some((*offset, row)),
            Part::Python(..) => None,
        })
        .collect();
    let counts_calls = rows.iter().any(|(_, row)| row.mix.is_some());
    let steps = PyList::empty(py);
    let mut total: Option<[f64; MIX_FIELDS]> = None;
    let (mut amount, mut spans, mut first_ns, mut last_ns) = (0.0_f64, 0_i128, 0_i64, 0_i64);
    for &(offset, row) in &rows {
        amount += row.amount;
        spans += i128::from(row.spans); // ints, as Python's: no overflow
        if row.first != 0 && (first_ns == 0 || row.first < first_ns) {
            first_ns = row.first;
        }
        if row.last > last_ns {
            last_ns = row.last;
        }
        let duration = i128::from(row.last) - i128::from(row.first);
        let step = PyList::new(
            py,
            [
                offset.into_pyobject(py)?.into_any(),
                PyFloat::new(py, row.amount).into_any(),
                row.spans.into_pyobject(py)?.into_any(),
                row.first.into_pyobject(py)?.into_any(),
                duration.into_pyobject(py)?.into_any(),
            ],
        )?;
        match &row.mix {
            None if counts_calls => step.append(py.None())?,
            None => {}
            Some(mix) => {
                if !NativeRow::plain(mix, row.spans) {
                    step.append(PyList::new(py, mix)?)?;
                }
                match total.as_mut() {
                    None => total = Some(*mix),
                    Some(sums) => sums.iter_mut().zip(mix).for_each(|(sum, value)| *sum += value),
                }
            }
        }
        steps.append(step)?;
    }
    let head = rows[0].1;
    let total = match total {
        Some(sums) => PyList::new(py, sums)?.into_any(),
        None => py.None().into_bound(py),
    };
    PyList::new(
        py,
        [
            head.budget.bind(py).clone().into_any(),
            PyString::new(py, &head.key).into_any(),
            head.start.into_pyobject(py)?.into_any(),
            PyFloat::new(py, amount).into_any(),
            spans.into_pyobject(py)?.into_any(),
            first_ns.into_pyobject(py)?.into_any(),
            last_ns.into_pyobject(py)?.into_any(),
            head.bucket.bind(py).clone(),
            total,
            steps.into_any(),
        ],
    )
}
