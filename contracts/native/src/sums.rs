//! The per-span loop of `stream/accounting.py:usage_rows` on the common span: its amounts added to
//! the delta rows of its group, in span order, as the Python loop adds them.
//!
//! Python keeps the rules that need Python's objects or libraries: pricing and model classes
//! (`_Batch.prepare`, for a model call without a cost or a class), globs (each budget's
//! `KeyMatcher`, asked once per key and call unless the key is the pattern itself), window starts
//! (`_Batch.starts_range`, called only when an event time leaves the cached [low, high) range),
//! late spans and the call mix of unusual calls. Handed in as data: the usage class, the dimensions a group is keyed by, the
//! model-call operations, the tool operation, the row layout, each scope's dimensions and the key
//! separator, the budgets' scopes, windows, metrics and matches, an empty row per budget as
//! `_row_for` makes it (copied for each new row, into `_Batch.rows`), and which budgets count
//! which kind of span (`_BudgetSet.for_kind`). A span this loop is not sure of goes to the reference
//! (`_Batch.add`) at its place in the order: a refused span, a call that fell back or escalated,
//! a span before `closed_before_ns`, a field of an unexpected type. A row's amount is a chain of
//! float additions in span order, so the sums kept here are written back to the rows before each
//! hand-over (the reference may add to the same rows) and at the end: the same floats, bit for
//! bit. Mirrored here, not handed in (formulas, not tables): `amounts` (`budget_rules.amounts`),
//! a scope's key (`budget_rules.span_keys`) and a budget taking a key (`_targets`);
//! `tests/test_native_sums.py` compares both loops on random spans and budget files.

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyList, PyString, PyTuple, PyType};
use rustc_hash::{FxHashMap, FxHasher};

use crate::combine::mix_values;
use crate::groups::{MessageRows, NativeRow, BEFORE_MIX, MIX_FIELDS};
use crate::usage::slot_offset;

/// The number of budget metrics (`budget_rules.METRICS`): a target's metric index is below it.
const METRICS: usize = 5;
/// The room made per span for rows, keys and targets (`State::sized_for`): a small message makes
/// ~2.9 rows a span.
const ROWS_PER_SPAN: usize = 3;
/// The most dimensions a signature may have (a span's values are read into an array this long).
const MAX_DIMENSIONS: usize = 32;

/// A span's signature values (the first `.1` of the array).
type Signature<'a> = ([&'a str; MAX_DIMENSIONS], usize);

/// Where the fields the loop reads are inside a usage object.
struct Offsets {
    operation: isize,
    refused: isize,
    cost_usd: isize,
    model_class: isize,
    start_ns: isize,
    end_ns: isize,
    input_tokens: isize,
    output_tokens: isize,
    tool_calls: isize,
    fallback: isize,
    downgraded_from: isize,
    routed_from: isize,
    escalated_from: isize,
}

/// The row fields the loop writes: (amount, spans, first event, last event) indices.
type RowLayout = (usize, usize, usize, usize);

/// One budget of `_BudgetSet.entries`: the indices of its scope, window and metric, and its
/// match unless `*`: (the pattern, the `KeyMatcher` that judges any other key).
struct Entry {
    scope: usize,
    window: usize,
    metric: usize,
    matcher: Option<(String, Py<PyAny>)>,
    /// An empty row of the budget as `_row_for` makes it: [budget id, key, start, the rest...].
    prototype: Py<PyList>,
    /// What a row kept natively takes of the prototype (`detached`), read once; None for a
    /// prototype not of `DeltaRow`'s layout (its rows are then made in Python).
    own: Option<OwnRow>,
}

/// A prototype's budget (the object and its text), bucket size and call mix (`own_row`).
struct OwnRow {
    budget: Py<PyString>,
    text: Arc<str>,
    bucket: Py<PyAny>,
    mix: Option<[f64; MIX_FIELDS]>,
}

/// An entry as handed in: (scope, window, metric, (pattern, matcher) or None, prototype row).
type EntryData = (usize, usize, usize, Option<(String, Py<PyAny>)>, Py<PyList>);

/// `usage_rows`' per-span loop for one budget configuration (see the module doc).
#[pyclass(frozen, module = "burnguard.contracts._otlp_native")]
pub struct Summer {
    class: Py<PyType>,
    offsets: Offsets,
    signature: Vec<isize>,
    model_calls: Vec<String>,
    tool_operation: String,
    layout: RowLayout,
    /// Per scope, the positions in the signature of its one or two dimensions.
    scopes: Vec<Vec<usize>>,
    separator: String,
    entries: Vec<Entry>,
    /// `_BudgetSet.for_kind` as entry indices, at `2 * calls + tools`.
    kinds: [Vec<usize>; 4],
    /// The number of windows: the length of every window-starts tuple.
    windows: usize,
    /// The window starts of the last call's last event time, and the range they hold for.
    last_starts: Mutex<LastStarts>,
}

/// Window starts and the [low, high) range of event times they hold for (`batch.starts_range`),
/// kept from one call to the next: the starts are a function of the event time and the budgets'
/// windows (the same budget set for a `Summer`), as `_BudgetSet.starts_at` keeps them between
/// calls too; a small message's spans mostly fall in the range its predecessor ended with.
type LastStarts = Option<(i128, i128, Vec<i64>)>;

/// How the loop takes a span.
enum Take {
    /// A common span: added here.
    Common(Common),
    /// A span no budget counts (neither a model call nor a tool call).
    Nothing,
    /// A model call without a cost or a model class: `batch.prepare` prices and classes it first.
    Prepare,
    /// Anything else: the reference (`batch.add`, or `batch.count` once prepared).
    Reference,
}

/// What a common span adds: its kind, event time and amount per metric.
struct Common {
    model_call: bool,
    tool_kind: bool,
    event_ns: i64,
    amounts: [f64; METRICS],
}

/// One group of spans with the same signature, kind and window starts: its targets
/// (row index, metric index), span count and event-time range.
struct Group {
    /// The signature values, each as its length (4 bytes) and its UTF-8 (`same_signature`).
    signature: Box<[u8]>,
    model_call: bool,
    tool_kind: bool,
    starts: usize,
    /// Its targets: `State.targets[from..to]`.
    targets: (usize, usize),
    /// The group made before it with the same hash, if any.
    same_hash: Option<usize>,
    spans: u64,
    first: i64,
    last: i64,
}

/// A delta row, its amount as summed here (`loaded`: read from the row and not yet written back),
/// and what its groups' spans add to its count and event-time range (`settle`).
struct RowSum {
    /// The Python row; None while no span was handed over (`State.lazy`): made by `materialize`.
    row: Option<Py<PyList>>,
    /// (entry, key id, window start): the row's budget, key and window.
    slot: (usize, usize, i64),
    sum: f64,
    loaded: bool,
    /// Made by this loop and not handed to Python since: its count and event times are still
    /// the prototype's zeros (`settle` sets them without reading them).
    fresh: bool,
    spans: u64,
    first: i64,
    last: i64,
}

/// One `add_all` call's state.
struct State<'py> {
    groups: Vec<Group>,
    /// Every group's targets, one after the other: (row index, metric index).
    targets: Vec<(usize, usize)>,
    /// A buffer for a two-dimension key.
    joined: String,
    /// A group key's hash -> the newest group with it (older ones chained by `Group.same_hash`).
    by_hash: FxHashMap<u64, usize>,
    rows: Vec<RowSum>,
    row_ids: FxHashMap<usize, usize>,
    loaded: Vec<usize>,
    starts: Vec<Vec<i64>>,
    range: (i128, i128, usize),
    /// Scope keys seen in this call, each numbered once.
    key_ids: FxHashMap<Arc<str>, usize>,
    keys: Vec<Arc<str>>,
    /// Each key as a Python str, made when a row first needs it.
    key_objects: Vec<Option<Bound<'py, PyString>>>,
    /// `batch.rows`: (budget id, key, window start) -> row, in the order rows were made.
    row_dict: Bound<'py, PyDict>,
    /// (entry, key) -> whether the entry's match takes the key.
    verdicts: FxHashMap<(usize, usize), bool>,
    /// The rows still `fresh`.
    fresh: Vec<usize>,
    /// (entry, key, window start) -> the row's index in `rows`.
    row_of: FxHashMap<(usize, usize, i64), usize>,
    /// No span handed over yet: the rows are kept here only, none made in Python (`materialize`).
    lazy: bool,
}

#[pymethods]
impl Summer {
    /// `usage_class`: the class of the spans (others go to the reference); `signature`: the
    /// dimensions (fields) a group is keyed by; `model_call_operations`, `tool_operation`: what
    /// `is_model_call` and `is_tool_call` test; `row_layout`: the (amount, spans, first event,
    /// last event) indices of a delta row; `scopes`: each scope's dimensions as positions in
    /// `signature`, joined by `separator` when two; `entries`: the budgets (`EntryData`);
    /// `kinds`: the entries that count each kind of span, at `2 * calls + tools`; `windows`: how
    /// many window starts a span has.
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        usage_class: Bound<'_, PyType>,
        signature: Vec<String>,
        model_call_operations: Vec<String>,
        tool_operation: String,
        row_layout: RowLayout,
        scopes: Vec<Vec<usize>>,
        separator: String,
        entries: Vec<EntryData>,
        kinds: [Vec<usize>; 4],
        windows: usize,
    ) -> PyResult<Self> {
        let out_of_range = |what: &str| PyValueError::new_err(format!("{what} out of range"));
        if scopes
            .iter()
            .any(|scope| !(1..=2).contains(&scope.len()) || scope.iter().any(|&at| at >= signature.len()))
        {
            return Err(out_of_range("a scope's dimensions"));
        }
        let entries: Vec<Entry> = entries
            .into_iter()
            .map(|(scope, window, metric, matcher, prototype)| Entry {
                scope,
                window,
                metric,
                matcher,
                prototype,
                own: None,
            })
            .collect();
        if entries
            .iter()
            .any(|entry| entry.scope >= scopes.len() || entry.window >= windows || entry.metric >= METRICS)
        {
            return Err(out_of_range("an entry's scope, window or metric"));
        }
        let mut entries = entries;
        for entry in &mut entries {
            let prototype = entry.prototype.bind(usage_class.py());
            empty_row(prototype, row_layout)?;
            entry.own = own_row(prototype, row_layout)?;
        }
        if kinds.iter().flatten().any(|&entry| entry >= entries.len()) {
            return Err(out_of_range("an entry of a kind"));
        }
        let at = |name: &str| slot_offset(&usage_class, name);
        let offsets = Offsets {
            operation: at("operation")?,
            refused: at("refused")?,
            cost_usd: at("cost_usd")?,
            model_class: at("model_class")?,
            start_ns: at("start_ns")?,
            end_ns: at("end_ns")?,
            input_tokens: at("input_tokens")?,
            output_tokens: at("output_tokens")?,
            tool_calls: at("tool_calls")?,
            fallback: at("fallback")?,
            downgraded_from: at("downgraded_from")?,
            routed_from: at("routed_from")?,
            escalated_from: at("escalated_from")?,
        };
        if signature.len() > MAX_DIMENSIONS {
            return Err(out_of_range("the number of dimensions"));
        }
        let signature = signature.iter().map(|name| at(name)).collect::<PyResult<_>>()?;
        Ok(Summer {
            class: usage_class.unbind(),
            offsets,
            signature,
            model_calls: model_call_operations,
            tool_operation,
            layout: row_layout,
            scopes,
            separator,
            entries,
            kinds,
            windows,
            last_starts: Mutex::default(),
        })
    }

    /// Add the spans of `usages` to `batch`'s rows: the common ones here, the others through
    /// `batch.add`, in order; the native groups settled into their rows. Returns how many spans
    /// were counted here (for `stats.spans`), or None, having done nothing, when a span has no
    /// event time or the batch is not what this loop reads (the reference sums the whole batch).
    fn add_all<'py>(
        &self,
        py: Python<'py>,
        usages: &Bound<'py, PyList>,
        batch: &Bound<'py, PyAny>,
        closed_before_ns: &Bound<'py, PyAny>,
    ) -> PyResult<Option<usize>> {
        Ok(self
            .run(py, usages, batch, closed_before_ns, None)?
            .map(|(counted, _)| counted))
    }

    /// `add_all`, for a micro-batch's native group (`Groups.add`): when no span was handed over,
    /// the rows are answered as `MessageRows` (no Python list per row; `batch.rows` stays empty)
    /// with their call mixes settled as `accounting._settle_call_mix` settles them (`mix`: the
    /// indices of the calls made and refused in a call mix). Returns (counted, those rows), or
    /// (counted, None) with the rows in `batch.rows` as `add_all` leaves them, or None as it does.
    fn add_all_detached<'py>(
        &self,
        py: Python<'py>,
        usages: &Bound<'py, PyList>,
        batch: &Bound<'py, PyAny>,
        closed_before_ns: &Bound<'py, PyAny>,
        mix: (usize, usize),
    ) -> PyResult<Option<(usize, Option<MessageRows>)>> {
        if mix.0 >= MIX_FIELDS || mix.1 >= MIX_FIELDS {
            return Err(PyValueError::new_err("a call mix index out of range"));
        }
        self.run(py, usages, batch, closed_before_ns, Some(mix))
    }
}

impl Summer {
    fn kept_starts(&self) -> MutexGuard<'_, LastStarts> {
        self.last_starts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `add_all`'s loop; with `detach` (the call mix's calls and refused indices) the rows of a
    /// batch with no span handed over are answered as `MessageRows` instead of made in `batch.rows`.
    fn run<'py>(
        &self,
        py: Python<'py>,
        usages: &Bound<'py, PyList>,
        batch: &Bound<'py, PyAny>,
        closed_before_ns: &Bound<'py, PyAny>,
        detach: Option<(usize, usize)>,
    ) -> PyResult<Option<(usize, Option<MessageRows>)>> {
        let Ok(closed_before_ns) = closed_before_ns.extract::<i64>() else {
            return Ok(None);
        };
        if !self.every_span_has_a_time(usages) {
            return Ok(None);
        }
        let mut state = State::sized_for(usages.len(), batch.getattr("rows")?.cast_into::<PyDict>()?);
        state.start_from(&self.kept_starts());
        let mut counted = 0;
        for index in 0..usages.len() {
            let usage = usages.get_item(index)?;
            let mut take = self.take(usage.as_ptr(), closed_before_ns);
            let prepared = matches!(take, Take::Prepare);
            if prepared {
                batch.call_method1("prepare", (&usage,))?; // counts it in `stats` too
                take = match self.take(usage.as_ptr(), closed_before_ns) {
                    Take::Common(span) => Take::Common(span),
                    _ => Take::Reference,
                };
            }
            let here = match take {
                Take::Common(span) => self.add(py, &mut state, &usage, &span, batch, prepared)?,
                Take::Nothing => true,
                Take::Prepare | Take::Reference => {
                    state.hand_over(py, self, batch, &usage, prepared)?;
                    false
                }
            };
            counted += usize::from(here && !prepared); // a prepared span is in `stats` already
        }
        *self.kept_starts() = state.last_starts();
        if let Some(mix) = detach.filter(|_| state.lazy) {
            if let Some(rows) = state.detached(py, self, mix)? {
                return Ok(Some((counted, Some(rows))));
            }
        }
        state.write_back(py, self)?;
        state.settle(py, self.layout)?;
        Ok(Some((counted, None)))
    }

    /// `all(usage.end_ns or usage.start_ns for usage in usages)`, for spans of the class with
    /// int times; false for anything else too (the reference then decides).
    fn every_span_has_a_time(&self, usages: &Bound<'_, PyList>) -> bool {
        let class = self.class.as_ptr().cast::<ffi::PyTypeObject>();
        usages.iter().all(|usage| {
            let pointer = usage.as_ptr();
            // SAFETY: a live object; its slots are read only once its type is the class.
            unsafe {
                if ffi::Py_TYPE(pointer) != class {
                    return false;
                }
                let (end, start) = (
                    slot(pointer, self.offsets.end_ns),
                    slot(pointer, self.offsets.start_ns),
                );
                is_int(end)
                    && is_int(start)
                    && (ffi::PyObject_IsTrue(end) == 1 || ffi::PyObject_IsTrue(start) == 1)
            }
        })
    }

    /// How the loop takes the span (`Take`).
    fn take(&self, usage: *mut ffi::PyObject, closed_before_ns: i64) -> Take {
        self.classify(usage, closed_before_ns).unwrap_or(Take::Reference)
    }

    /// `take`, None for a field of an unexpected type.
    fn classify(&self, usage: *mut ffi::PyObject, closed_before_ns: i64) -> Option<Take> {
        let at = &self.offsets;
        // SAFETY: `usage` is a live object of the class (checked first); each slot read is a
        // borrowed reference or null, read only while the span is in hand.
        unsafe {
            if ffi::Py_TYPE(usage) != self.class.as_ptr().cast::<ffi::PyTypeObject>() {
                return None;
            }
            let operation = text(slot(usage, at.operation))?;
            if !text(slot(usage, at.refused))?.is_empty() {
                return None; // refused: the call mix's, or not a tool that ran
            }
            let model_call = self.model_calls.iter().any(|known| known == operation);
            let tool_call = operation == self.tool_operation;
            let tool_calls = int(slot(usage, at.tool_calls))?;
            let tool_kind = tool_call || tool_calls > 0;
            if !(model_call || tool_kind) {
                return Some(Take::Nothing);
            }
            let cost = slot(usage, at.cost_usd);
            let cost = if cost == ffi::Py_None() {
                if model_call {
                    return Some(Take::Prepare); // to be priced
                }
                0.0
            } else if ffi::PyFloat_CheckExact(cost) == 1 {
                ffi::PyFloat_AS_DOUBLE(cost)
            } else {
                return None;
            };
            if model_call && text(slot(usage, at.model_class))?.is_empty() {
                return Some(Take::Prepare); // its class is looked up in Python
            }
            if model_call && !self.plain_call(usage)? {
                return None;
            }
            let end = int(slot(usage, at.end_ns))?;
            let event_ns = if end != 0 {
                end
            } else {
                int(slot(usage, at.start_ns))?
            };
            if event_ns < closed_before_ns {
                return None; // perhaps too late: the per-span path
            }
            let (input, output) = (
                int(slot(usage, at.input_tokens))?,
                int(slot(usage, at.output_tokens))?,
            );
            let amounts = amounts(cost, input, output, tool_calls, tool_call, model_call);
            Some(Take::Common(Common {
                model_call,
                tool_kind,
                event_ns,
                amounts,
            }))
        }
    }

    /// A model call whose call mix is a plain call's (made, on the class asked for, not an
    /// escalation retry); None for a field of an unexpected type.
    ///
    /// # Safety
    /// `usage` is a live object of the class.
    unsafe fn plain_call(&self, usage: *mut ffi::PyObject) -> Option<bool> {
        let at = &self.offsets;
        if slot(usage, at.fallback) != ffi::Py_False() {
            return Some(false);
        }
        let downgraded = !text(slot(usage, at.downgraded_from))?.is_empty();
        let routed = !text(slot(usage, at.routed_from))?.is_empty();
        let escalated = !text(slot(usage, at.escalated_from))?.is_empty();
        let fell_back = downgraded && !routed;
        Some(!fell_back && !escalated)
    }

    /// Add a common span to its group's rows, the group made first when new; false when it was
    /// handed over instead (a signature value that is not a str).
    fn add<'py>(
        &self,
        py: Python<'py>,
        state: &mut State<'py>,
        usage: &Bound<'py, PyAny>,
        span: &Common,
        batch: &Bound<'py, PyAny>,
        prepared: bool,
    ) -> PyResult<bool> {
        let Some((values, count)) = self.signature_of(usage.as_ptr()) else {
            state.hand_over(py, self, batch, usage, prepared)?;
            return Ok(false);
        };
        let signature = &values[..count];
        let starts = state.starts_at(batch, span.event_ns, self.windows)?;
        let mut hasher = FxHasher::default();
        (signature, span.model_call, span.tool_kind, starts).hash(&mut hasher);
        let hash = hasher.finish();
        let newest = state.by_hash.get(&hash).copied();
        let mut found = newest;
        while let Some(id) = found {
            let group = &state.groups[id];
            if group.starts == starts
                && group.model_call == span.model_call
                && group.tool_kind == span.tool_kind
                && same_signature(&group.signature, signature)
            {
                break;
            }
            found = group.same_hash;
        }
        let id = match found {
            Some(id) => id,
            None => {
                let id = state.new_group(self, batch, span, starts, signature, newest)?;
                state.by_hash.insert(hash, id);
                id
            }
        };
        let group = &mut state.groups[id];
        group.spans += 1;
        group.first = group.first.min(span.event_ns);
        group.last = group.last.max(span.event_ns);
        let (from, to) = group.targets;
        for &(row, metric) in &state.targets[from..to] {
            let sum = &mut state.rows[row];
            if !sum.loaded {
                sum.sum = amount_of(&python_row(py, &sum.row)?, self.layout.0)?;
                sum.loaded = true;
                state.loaded.push(row);
            }
            sum.sum += span.amounts[metric];
        }
        Ok(true)
    }

    /// The span's value of each signature dimension, None if one is not a str.
    fn signature_of<'a>(&self, usage: *mut ffi::PyObject) -> Option<Signature<'a>> {
        let mut values = [""; MAX_DIMENSIONS];
        for (value, &offset) in values.iter_mut().zip(&self.signature) {
            // SAFETY: a live object of the class (checked in `take`); the texts are read while
            // the span is in hand, before any call into Python.
            *value = unsafe { text(slot(usage, offset))? };
        }
        Some((values, self.signature.len()))
    }
}

impl<'py> State<'py> {
    /// An empty state with room for a batch of `spans` spans (perf: growing the maps and vectors
    /// from empty, call after call, was ~5% of a small message's loop): at most a group per span,
    /// ~3 rows and keys per span on small messages (`ROWS_PER_SPAN`), a few targets per group.
    fn sized_for(spans: usize, row_dict: Bound<'py, PyDict>) -> Self {
        let rows = spans * ROWS_PER_SPAN;
        State {
            groups: Vec::with_capacity(spans),
            targets: Vec::with_capacity(rows),
            joined: String::new(),
            by_hash: sized_map(spans),
            rows: Vec::with_capacity(rows),
            row_ids: FxHashMap::default(),
            loaded: Vec::with_capacity(rows),
            starts: Vec::new(),
            range: (0, 0, 0),
            key_ids: sized_map(rows),
            keys: Vec::with_capacity(rows),
            key_objects: Vec::with_capacity(rows),
            row_dict,
            verdicts: FxHashMap::default(),
            fresh: Vec::with_capacity(rows),
            row_of: sized_map(rows),
            lazy: true,
        }
    }

    /// The index of these window starts among this call's distinct starts, added when new.
    fn starts_id(&mut self, values: Vec<i64>) -> usize {
        match self.starts.iter().position(|known| *known == values) {
            Some(id) => id,
            None => {
                self.starts.push(values);
                self.starts.len() - 1
            }
        }
    }

    /// The window starts the previous call ended with, and the [low, high) range of event times
    /// they hold for, as this call's cached range (`LastStarts`).
    fn start_from(&mut self, last: &LastStarts) {
        if let Some((low, high, values)) = last {
            let id = self.starts_id(values.clone());
            self.range = (*low, *high, id);
        }
    }

    /// The cached range and its window starts, for the next call.
    fn last_starts(&self) -> LastStarts {
        let (low, high, id) = self.range;
        self.starts.get(id).map(|values| (low, high, values.clone()))
    }

    /// The index (among this call's distinct starts) of the window starts that hold `event_ns`:
    /// from the cached [low, high) range, else from `batch.starts_range`.
    fn starts_at(&mut self, batch: &Bound<'py, PyAny>, event_ns: i64, windows: usize) -> PyResult<usize> {
        let (low, high, id) = self.range;
        let at = i128::from(event_ns);
        if low <= at && at < high {
            return Ok(id);
        }
        let (values, low, high): (Vec<i64>, i128, i128) =
            batch.call_method1("starts_range", (event_ns,))?.extract()?;
        if values.len() != windows {
            return Err(PyValueError::new_err("window starts of another length"));
        }
        let id = self.starts_id(values);
        self.range = (low, high, id);
        Ok(id)
    }

    /// A new group and its targets: per budget of its kind (in file order) whose scope gives the
    /// span a key that the budget's match takes, the row of (budget, key, window start), made by
    /// `row_for` when this call has not met it yet (`_targets`, with the keys of `span_keys`).
    fn new_group(
        &mut self,
        summer: &Summer,
        batch: &Bound<'py, PyAny>,
        span: &Common,
        starts: usize,
        signature: &[&str],
        same_hash: Option<usize>,
    ) -> PyResult<usize> {
        let keys: Vec<Option<usize>> = summer
            .scopes
            .iter()
            .map(|scope| self.key_of(scope, signature, &summer.separator))
            .collect();
        let kind = 2 * usize::from(span.model_call) + usize::from(span.tool_kind);
        let from = self.targets.len();
        for &index in &summer.kinds[kind] {
            let entry = &summer.entries[index];
            let Some(key) = keys[entry.scope] else {
                continue;
            };
            if !self.takes(batch.py(), entry, index, key)? {
                continue;
            }
            let start = self.starts[starts][entry.window];
            let slot = (index, key, start);
            let row = match self.row_of.get(&slot) {
                Some(&row) => row,
                None => {
                    let row = if self.lazy {
                        self.kept_row(slot)
                    } else {
                        let (made, fresh) = self.row_for(entry, key, start)?;
                        self.known_row(made, fresh, slot)
                    };
                    self.row_of.insert(slot, row);
                    row
                }
            };
            self.targets.push((row, entry.metric));
        }
        let mut encoded = Vec::with_capacity(signature.iter().map(|value| 4 + value.len()).sum());
        for value in signature {
            encoded.extend_from_slice(&(value.len() as u32).to_le_bytes());
            encoded.extend_from_slice(value.as_bytes());
        }
        self.groups.push(Group {
            signature: encoded.into_boxed_slice(),
            model_call: span.model_call,
            tool_kind: span.tool_kind,
            starts,
            targets: (from, self.targets.len()),
            same_hash,
            spans: 0,
            first: i64::MAX,
            last: 0,
        });
        Ok(self.groups.len() - 1)
    }

    /// The span's key under a scope (`budget_rules.span_keys`): its one value, or its two values
    /// joined by the separator; None when a value is empty.
    fn key_of(&mut self, scope: &[usize], signature: &[&str], separator: &str) -> Option<usize> {
        match *scope {
            [one] if !signature[one].is_empty() => Some(self.key_id(signature[one])),
            [first, second] if !signature[first].is_empty() && !signature[second].is_empty() => {
                let mut joined = std::mem::take(&mut self.joined);
                joined.clear();
                joined.push_str(signature[first]);
                joined.push_str(separator);
                joined.push_str(signature[second]);
                let id = self.key_id(&joined);
                self.joined = joined;
                Some(id)
            }
            _ => None,
        }
    }

    fn key_id(&mut self, key: &str) -> usize {
        if let Some(&id) = self.key_ids.get(key) {
            return id;
        }
        let shared: Arc<str> = Arc::from(key);
        self.keys.push(shared.clone());
        self.key_objects.push(None);
        self.key_ids.insert(shared, self.keys.len() - 1);
        self.keys.len() - 1
    }

    /// Whether the entry's match takes the key: `*` always, its own pattern at once, any other
    /// key as its `KeyMatcher` says (the glob stays Python's), remembered for this call.
    fn takes(&mut self, py: Python<'py>, entry: &Entry, index: usize, key: usize) -> PyResult<bool> {
        let Some((pattern, matcher)) = &entry.matcher else {
            return Ok(true);
        };
        if **pattern == *self.keys[key] {
            return Ok(true);
        }
        if let Some(&verdict) = self.verdicts.get(&(index, key)) {
            return Ok(verdict);
        }
        let verdict = matcher
            .bind(py)
            .call_method1("matches", (&*self.keys[key],))?
            .is_truthy()?;
        self.verdicts.insert((index, key), verdict);
        Ok(verdict)
    }

    /// The row of (the entry's budget, key, start) in `batch.rows`, made as `_row_for` makes it
    /// when the reference has not made it: the entry's prototype with this slot, its list
    /// fields (the call mix) new lists.
    fn row_for(&mut self, entry: &Entry, key: usize, start: i64) -> PyResult<(Bound<'py, PyList>, bool)> {
        let py = self.row_dict.py();
        let prototype = entry.prototype.bind(py);
        let key = match &self.key_objects[key] {
            Some(text) => text.clone(),
            None => {
                let text = PyString::new(py, &self.keys[key]);
                self.key_objects[key] = Some(text.clone());
                text
            }
        };
        let slot = PyTuple::new(
            py,
            [
                prototype.get_item(0)?,
                key.into_any(),
                start.into_pyobject(py)?.into_any(),
            ],
        )?;
        if let Some(row) = self.row_dict.get_item(&slot)? {
            return Ok((row.cast_into::<PyList>()?, false));
        }
        let row = PyList::new(py, slot.iter())?;
        for value in prototype.iter().skip(3) {
            match value.cast::<PyList>() {
                Ok(list) => row.append(PyList::new(py, list.iter())?)?,
                Err(_) => row.append(value)?,
            }
        }
        self.row_dict.set_item(slot, &row)?;
        Ok((row, true))
    }

    /// The index in `rows` of a delta row, added when new (rows are known by identity: the groups
    /// that share a row share its sum).
    fn known_row(&mut self, row: Bound<'py, PyList>, fresh: bool, slot: (usize, usize, i64)) -> usize {
        let next = self.rows.len();
        let id = *self.row_ids.entry(row.as_ptr() as usize).or_insert(next);
        if id == next {
            self.rows.push(RowSum {
                row: Some(row.unbind()),
                slot,
                sum: 0.0,
                loaded: fresh, // a new row's amount is the prototype's 0.0
                fresh,
                spans: 0,
                first: i64::MAX,
                last: i64::MIN,
            });
            if fresh {
                self.loaded.push(id);
                self.fresh.push(id);
            }
        }
        id
    }

    /// A new row kept here only (`lazy`): its amount 0.0, its count and event times the
    /// prototype's zeros, as `row_for` would make it.
    fn kept_row(&mut self, slot: (usize, usize, i64)) -> usize {
        let id = self.rows.len();
        self.rows.push(RowSum {
            row: None,
            slot,
            sum: 0.0,
            loaded: true,
            fresh: true,
            spans: 0,
            first: i64::MAX,
            last: i64::MIN,
        });
        self.loaded.push(id);
        self.fresh.push(id);
        id
    }

    /// The rows kept here made in `batch.rows` (by `row_for`, in the order they were made: the
    /// order `usage_rows` lists them), before Python may read or add to them; then no longer lazy.
    fn materialize(&mut self, summer: &Summer) -> PyResult<()> {
        if !self.lazy {
            return Ok(());
        }
        self.lazy = false;
        for id in 0..self.rows.len() {
            let (entry, key, start) = self.rows[id].slot;
            let (made, fresh) = self.row_for(&summer.entries[entry], key, start)?;
            if !fresh {
                return Err(PyRuntimeError::new_err(
                    "a row in the batch before the loop made it",
                ));
            }
            self.row_ids.insert(made.as_ptr() as usize, id);
            self.rows[id].row = Some(made.unbind());
        }
        Ok(())
    }

    /// A span for the reference, once the sums kept here are in their rows: `batch.add`, or
    /// `batch.count` for a span `batch.prepare` priced and classed already.
    fn hand_over(
        &mut self,
        py: Python<'py>,
        summer: &Summer,
        batch: &Bound<'py, PyAny>,
        usage: &Bound<'py, PyAny>,
        prepared: bool,
    ) -> PyResult<()> {
        self.write_back(py, summer)?;
        for id in self.fresh.drain(..) {
            self.rows[id].fresh = false; // the reference may count into it
        }
        batch.call_method1(if prepared { "count" } else { "add" }, (usage,))?;
        Ok(())
    }

    /// The sums kept here into their rows (before Python may read or add to them), the rows
    /// made first where they are kept here only.
    fn write_back(&mut self, py: Python<'py>, summer: &Summer) -> PyResult<()> {
        self.materialize(summer)?;
        for id in self.loaded.drain(..) {
            let sum = &mut self.rows[id];
            python_row(py, &sum.row)?.set_item(summer.layout.0, PyFloat::new(py, sum.sum))?;
            sum.loaded = false;
        }
        Ok(())
    }

    /// Each group's count and event-time range into its rows' sums (a sum, a min and a max of
    /// ints, order-free).
    fn gather(&mut self) {
        for group in &self.groups {
            for &(id, _) in &self.targets[group.targets.0..group.targets.1] {
                let row = &mut self.rows[id];
                row.spans += group.spans;
                row.first = row.first.min(group.first);
                row.last = row.last.max(group.last);
            }
        }
    }

    /// The rows kept here (`lazy`: every one fresh) as the native rows `settle` and
    /// `_settle_call_mix` would have made them, or None (the rows are made in Python then) for a
    /// budget whose prototype is not of the layout `Groups` reads (`OwnRow`).
    fn detached(
        &mut self,
        py: Python<'py>,
        summer: &Summer,
        mix: (usize, usize),
    ) -> PyResult<Option<MessageRows>> {
        if self
            .rows
            .iter()
            .any(|sum| summer.entries[sum.slot.0].own.is_none())
        {
            return Ok(None);
        }
        self.gather();
        let mut rows = Vec::with_capacity(self.rows.len());
        for sum in &self.rows {
            let (entry, key, start) = sum.slot;
            let Some(own) = &summer.entries[entry].own else {
                return Ok(None);
            };
            let calls = own.mix.map(|mut values| {
                values[mix.0] = sum.spans as f64 - values[mix.1]; // `_settle_call_mix`
                values
            });
            let counted = sum.spans > 0; // `settle` leaves a row no span reached at its zeros
            rows.push(NativeRow {
                budget: own.budget.clone_ref(py),
                budget_text: own.text.clone(),
                key: self.keys[key].clone(),
                start,
                amount: sum.sum,
                spans: i64::try_from(sum.spans)
                    .map_err(|_| PyValueError::new_err("a span count past an int64"))?,
                first: if counted { sum.first } else { 0 },
                last: if counted { sum.last.max(0) } else { 0 },
                bucket: own.bucket.clone_ref(py),
                mix: calls,
            });
        }
        Ok(Some(MessageRows { rows }))
    }

    /// Each group's count and event-time range into its rows (`_Group.settle`: a sum, a min and a
    /// max of ints, order-free), gathered per row first and written once per row.
    fn settle(&mut self, py: Python<'py>, layout: RowLayout) -> PyResult<()> {
        self.gather();
        let (_, spans, first, last) = layout;
        for sum in self.rows.iter().filter(|sum| sum.spans > 0) {
            let row = python_row(py, &sum.row)?;
            if sum.fresh {
                row.set_item(spans, sum.spans)?;
                row.set_item(first, sum.first)?; // event times are never 0: the first is set
                if sum.last > 0 {
                    row.set_item(last, sum.last)?;
                }
                continue;
            }
            row.set_item(spans, row.get_item(spans)?.add(sum.spans)?)?;
            let earliest = row.get_item(first)?;
            if !earliest.is_truthy()? || earliest.gt(sum.first)? {
                row.set_item(first, sum.first)?;
            }
            if row.get_item(last)?.lt(sum.last)? {
                row.set_item(last, sum.last)?;
            }
        }
        Ok(())
    }
}

/// An empty map with room for `size` entries.
fn sized_map<K, V>(size: usize) -> FxHashMap<K, V> {
    FxHashMap::with_capacity_and_hasher(size, Default::default())
}

/// A row made in Python (`materialize` made every row before any is written).
fn python_row<'py>(py: Python<'py>, row: &Option<Py<PyList>>) -> PyResult<Bound<'py, PyList>> {
    row.as_ref()
        .map(|row| row.bind(py).clone())
        .ok_or_else(|| PyRuntimeError::new_err("a row kept only natively was to be written"))
}

/// What a row kept natively takes of the prototype: a str budget, a bucket size, and a call mix of
/// four exact floats when the row has one; None for any other prototype or a row layout other than
/// `DeltaRow`'s (the fields `Groups` writes).
fn own_row(prototype: &Bound<'_, PyList>, layout: RowLayout) -> PyResult<Option<OwnRow>> {
    let fields = prototype.len();
    if layout != (3, 4, 5, 6) || !(BEFORE_MIX..=BEFORE_MIX + 1).contains(&fields) {
        return Ok(None);
    }
    let Ok(budget) = prototype.get_item(0)?.cast_into::<PyString>() else {
        return Ok(None);
    };
    let mix = if fields > BEFORE_MIX {
        match mix_values(&prototype.get_item(BEFORE_MIX)?)? {
            Some(values) => Some(values),
            None => return Ok(None),
        }
    } else {
        None
    };
    Ok(Some(OwnRow {
        text: Arc::from(budget.to_str()?),
        budget: budget.unbind(),
        bucket: prototype.get_item(BEFORE_MIX - 1)?.unbind(),
        mix,
    }))
}

/// Whether a group's encoded signature holds these values.
fn same_signature(encoded: &[u8], values: &[&str]) -> bool {
    let mut rest = encoded;
    for value in values {
        let Some((length, tail)) = rest.split_first_chunk::<4>() else {
            return false;
        };
        let length = u32::from_le_bytes(*length) as usize;
        if length != value.len() || tail.get(..length) != Some(value.as_bytes()) {
            return false;
        }
        rest = &tail[length..];
    }
    rest.is_empty()
}

/// What one span adds to each metric: `contracts/budget_rules.py:amounts`, the same formula on
/// the same values (`cost or 0.0`, the token sum as an int, then one conversion to float).
fn amounts(
    cost: f64,
    input: i64,
    output: i64,
    tool_calls: i64,
    tool_call: bool,
    model_call: bool,
) -> [f64; METRICS] {
    [
        if cost == 0.0 { 0.0 } else { cost }, // `cost or 0.0`: -0.0 is falsy too
        (i128::from(input) + i128::from(output)) as f64,
        input as f64,
        if tool_call { 1.0 } else { tool_calls as f64 },
        if model_call { 1.0 } else { 0.0 },
    ]
}

/// A prototype is an empty row: its (budget, key, start), then an amount of 0.0 and a count and
/// event times of 0 (what a new row's `fresh` sums and settling assume).
fn empty_row(row: &Bound<'_, PyList>, layout: RowLayout) -> PyResult<()> {
    let (amount, spans, first, last) = layout;
    let zero = |at: usize| -> PyResult<bool> { Ok(row.get_item(at)?.extract::<i64>().ok() == Some(0)) };
    let empty = [amount, spans, first, last]
        .iter()
        .all(|&at| at >= 3 && at < row.len())
        && amount_of(row, amount)?.to_bits() == 0
        && zero(spans)?
        && zero(first)?
        && zero(last)?;
    if !empty {
        return Err(PyValueError::new_err("a prototype that is not an empty row"));
    }
    Ok(())
}

/// A row's amount, a float as `_row_for` makes it and additions keep it.
fn amount_of(row: &Bound<'_, PyList>, amount: usize) -> PyResult<f64> {
    let value = row.get_item(amount)?;
    if !value.is_exact_instance_of::<PyFloat>() {
        return Err(PyTypeError::new_err("a delta row's amount that is not a float"));
    }
    value.extract()
}

/// The object in the slot at `offset` (borrowed; null when unset).
///
/// # Safety
/// `object` is a live object whose type has an object slot at `offset` (`slot_offset`).
unsafe fn slot(object: *mut ffi::PyObject, offset: isize) -> *mut ffi::PyObject {
    *object.cast::<u8>().offset(offset).cast::<*mut ffi::PyObject>()
}

/// An exact `int` (not a bool or another subclass).
///
/// # Safety
/// `object` is null or a live object.
unsafe fn is_int(object: *mut ffi::PyObject) -> bool {
    !object.is_null() && ffi::PyLong_CheckExact(object) == 1
}

/// The value of an exact `int` that fits an i64, else None.
///
/// # Safety
/// `object` is null or a live object.
unsafe fn int(object: *mut ffi::PyObject) -> Option<i64> {
    if !is_int(object) {
        return None;
    }
    let mut overflow = 0;
    let value = ffi::PyLong_AsLongLongAndOverflow(object, &mut overflow);
    let failed = value == -1 && !ffi::PyErr_Occurred().is_null();
    (overflow == 0 && !failed).then_some(value)
}

/// The text of an exact `str`, else None (a str UTF-8 cannot hold is cleared and None too).
///
/// # Safety
/// `object` is null or a live object, which outlives the text's use.
unsafe fn text<'a>(object: *mut ffi::PyObject) -> Option<&'a str> {
    if object.is_null() || ffi::PyUnicode_CheckExact(object) != 1 {
        return None;
    }
    let mut size: ffi::Py_ssize_t = 0;
    let data = ffi::PyUnicode_AsUTF8AndSize(object, &mut size);
    if data.is_null() {
        ffi::PyErr_Clear();
        return None;
    }
    let bytes = std::slice::from_raw_parts(data.cast::<u8>(), usize::try_from(size).ok()?);
    Some(std::str::from_utf8_unchecked(bytes))
}
