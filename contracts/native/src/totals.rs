//! `TotalsRows`: stage 2's common delta row added to its window's totals natively.
//!
//! `stream/app.py:BudgetJob._apply` (and `_apply_combined`, for a row with steps) is the reference.
//! Per row of a sub-batch, in order, `TotalsRows.add` adds the row's steps here (a one-message
//! row: one step) while each one's outcome is the common one: the budget known, the window's
//! `WindowTotals` object in the table (or, for a window not in it, the empty one
//! `BudgetJob._new_window` makes with its kept answer, put in the table at the commit; None: a
//! forgotten window), the step's amount valid, not a replay, not moving a rolling window's newest
//! bucket, and after it the spend inside the range over which the key's kept answer
//! (`WindowTotals.settled`, `policy.decide_action`) is the published action: no signal and no
//! state change. It then does to the Python objects what `WindowTotals.add` does for each such
//! step (the same float operations in the same order: the mark, the spend, the spans, the event
//! times, the rings' arrays through the buffer protocol, the recent ring moving on, the call mix)
//! and what `TableChanges.set` and the snapshot's `waiting` do. At the first other step `add`
//! stops, the steps before it added, and hands the row back from that step (`Stop`): the caller
//! applies that step alone in Python (most often it changes the key's action and publishes) and
//! calls again from the next step, whose kept answer the reference's decision left; where no step
//! was added since the last such call, the caller applies the row's rest in Python. Every shape is
//! handed in (`TotalsRows.__new__`) or read from the objects; `tests/test_stage2_native.py` holds
//! the two paths to the same outcome.

use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple, PyType};

use crate::record::{Origin, UsageRecord, WireMix, WireRow};
use crate::state::Doubles;
use crate::usage::{slot_at, slot_offsets};

/// The shapes stage 2's Python gives (`TotalsRows.__new__`), read once.
#[pyclass(frozen, module = "burnguard.contracts._otlp_native")]
pub struct TotalsRows {
    totals_class: Py<PyType>,
    ring_class: Py<PyType>,
    /// Where `WindowTotals`' slots (`TOTALS_FIELDS`) and `Ring`'s (`RING_FIELDS`) are in their objects.
    totals_slots: [isize; TOTALS_FIELDS.len()],
    ring_slots: [isize; RING_FIELDS.len()],
    ns_per_minute: i64,
    mix_fields: usize,
    row_fields: usize,
    row_fields_with_steps: usize,
    calendar_settled: usize,
    rolling_settled: usize,
}

/// The `WindowTotals` slots read or written, by their index in `totals_slots` (also
/// `state::ChangelogJson`'s, which writes the first eight in `to_state`'s order).
pub(crate) const TOTALS_FIELDS: [&str; 9] = [
    "spent",
    "spans",
    "first_event_ns",
    "last_event_ns",
    "applied",
    "recent",
    "buckets",
    "mix",
    "settled",
];
pub(crate) const SPENT: usize = 0;
pub(crate) const SPANS: usize = 1;
pub(crate) const FIRST: usize = 2;
pub(crate) const LAST: usize = 3;
pub(crate) const APPLIED: usize = 4;
pub(crate) const RECENT: usize = 5;
pub(crate) const BUCKETS: usize = 6;
pub(crate) const MIX: usize = 7;
pub(crate) const SETTLED: usize = 8;
/// The `Ring` slots read or written.
pub(crate) const RING_FIELDS: [&str; 2] = ["newest", "amounts"];
pub(crate) const NEWEST: usize = 0;
pub(crate) const AMOUNTS: usize = 1;

/// The value in the slot at `offset` of `object`, an exact instance of the class `offset` was
/// found in (`usage::slot_offset`): what `getattr` gives, without the type's attribute look-up.
pub(crate) fn read<'py>(object: &Bound<'py, PyAny>, offset: isize) -> PyResult<Bound<'py, PyAny>> {
    // SAFETY: `offset` is a plain object slot inside objects of the class, `object` one of them.
    unsafe {
        let slot = *slot_at(object, offset);
        if slot.is_null() {
            return Err(pyo3::exceptions::PyAttributeError::new_err("an unset slot"));
        }
        Ok(Bound::from_borrowed_ptr(object.py(), slot))
    }
}

/// `setattr` of that slot, as `PyMember_SetOne` sets a `Py_T_OBJECT_EX` member.
fn write(object: &Bound<'_, PyAny>, offset: isize, value: Bound<'_, PyAny>) {
    // SAFETY: as in `read`; the slot takes the new reference, the old one is released after.
    unsafe {
        let slot = slot_at(object, offset);
        let old = *slot;
        *slot = value.into_ptr();
        if !old.is_null() {
            ffi::Py_DecRef(old);
        }
    }
}

/// One message's part of a row, as `WindowTotals.add` takes it.
struct Part {
    offset: i64,
    amount: f64,
    spans: i64,
    first: i64,
    last: i64,
    /// The call mix to add: None where `add`'s `if mix:` adds none.
    mix: Option<Vec<f64>>,
}

/// A row's window: its budget (the id as given, and its text), its key, its window start and its
/// bucket size (0: not a rolling window).
struct Fields<'a, 'py> {
    budget_id: &'a Bound<'py, PyAny>,
    budget: &'a str,
    key: &'a str,
    start: i64,
    bucket_ns: i64,
}

/// A row's bucket field as `WindowTotals.add` takes it: null is 0, a negative size is not taken.
fn bucket_size(bucket: Option<i64>) -> Option<i64> {
    match bucket {
        None => Some(0),
        Some(size) if size >= 0 => Some(size),
        Some(_) => None,
    }
}

/// What one sub-batch's rows are added to, looked up by the caller once per call.
struct Target<'a, 'py> {
    partition: i64,
    source: Bound<'py, PyString>,
    now: &'a Bound<'py, PyAny>,
    budgets: &'a Bound<'py, PyDict>,
    totals: &'a Bound<'py, PyDict>,
    changes: &'a Bound<'py, PyAny>,
    table: &'a Bound<'py, PyAny>,
    /// (the store, the pending changes) `changes.target(table)` gives, asked at the first commit:
    /// asked earlier, it would make the partition's pending changes before the reference does.
    written: std::cell::OnceCell<(Bound<'py, PyDict>, Bound<'py, PyDict>)>,
    states: &'a Bound<'py, PyDict>,
    waiting: &'a Bound<'py, PyDict>,
    /// `BudgetJob._new_window`: a new window's empty `WindowTotals` with its kept answer, or None.
    new_window: &'a Bound<'py, PyAny>,
}

impl<'py> Target<'_, 'py> {
    fn written(&self) -> PyResult<&(Bound<'py, PyDict>, Bound<'py, PyDict>)> {
        if let Some(written) = self.written.get() {
            return Ok(written);
        }
        let py = self.changes.py();
        let (store, changed) = self
            .changes
            .call_method1(intern!(py, "target"), (self.table,))?
            .extract::<(Bound<'py, PyDict>, Bound<'py, PyDict>)>()?;
        Ok(self.written.get_or_init(|| (store, changed)))
    }
}

/// A window's totals as a row's parts leave them, worked out before anything is changed.
struct Plan<'py> {
    totals: Bound<'py, PyAny>,
    /// A new window's totals (`BudgetJob._new_window`), not in the table yet: the commit puts them in.
    new: bool,
    state_key: Bound<'py, PyString>,
    applied: Bound<'py, PyDict>,
    mark: i64,
    spent: f64,
    spans: i64,
    first: Option<i64>,
    last: Option<i64>,
    recent: Ring<'py>,
    buckets: Option<Ring<'py>>,
    mix: Option<Vec<f64>>,
    /// How many of the row's parts (from the first asked for) it adds.
    taken: usize,
}

/// A window's numbers as the parts taken so far leave them (`TotalsRows::window`).
struct Running<'py> {
    mark: i64,
    spent: f64,
    spans: i64,
    first: i64,
    last: i64,
    first_before: i64,
    last_before: i64,
    recent: Ring<'py>,
    /// A rolling window's buckets.
    ring: Option<Ring<'py>>,
    /// The window's call mix: Some(None) none yet, Some(Some) a full one; None: another shape.
    mix: Option<Option<Vec<f64>>>,
    mix_changed: bool,
}

impl<'py> Running<'py> {
    /// Adds `part` as `WindowTotals.add` adds it where it is the common case: its amount valid,
    /// above the mark, its spans not overflowing, not moving a rolling window's newest bucket,
    /// and `decision` holding at the spend after it (checked before anything changes: the
    /// reference decides that part, from the numbers before it). False: nothing changed.
    fn take(
        &mut self,
        part: &Part,
        decision: &Decision,
        limit: f64,
        ns_per_minute: i64,
        bucket_ns: i64,
    ) -> bool {
        if !(0.0..f64::INFINITY).contains(&part.amount) || part.offset <= self.mark {
            return false; // a bad amount (refused) or a replay (counted) by the reference
        }
        let Some(spans) = self.spans.checked_add(part.spans) else {
            return false;
        };
        let mut spent = self.spent + part.amount;
        let mut bucket = None;
        if let Some(ring) = &self.ring {
            let index = part.last.div_euclid(bucket_ns);
            // a bucket past the newest moves the rolling window: the reference decides
            let Some(dropped) = ring.dropped(index, part.amount) else {
                return false;
            };
            spent -= dropped;
            bucket = Some(index);
        }
        if !decision.holds(spent, limit) {
            return false;
        }
        (self.mark, self.spent, self.spans) = (part.offset, spent, spans);
        if self.first == 0 || part.first < self.first {
            self.first = part.first;
        }
        if part.last > self.last {
            self.last = part.last;
        }
        self.recent
            .add(part.last.div_euclid(ns_per_minute), part.amount, false);
        if let (Some(ring), Some(index)) = (self.ring.as_mut(), bucket) {
            ring.add(index, part.amount, true);
        }
        if let (Some(added), Some(mix)) = (&part.mix, self.mix.as_mut()) {
            *mix = Some(match mix {
                Some(current) => current.iter().zip(added).map(|(a, b)| a + b).collect(),
                None => added.iter().map(|b| 0.0 + b).collect(),
            });
            self.mix_changed = true;
        }
        true
    }

    /// The plan that commits the `taken` parts to `totals`.
    fn plan(
        self,
        totals: Bound<'py, PyAny>,
        new: bool,
        state_key: Bound<'py, PyString>,
        applied: Bound<'py, PyDict>,
        taken: usize,
    ) -> Plan<'py> {
        Plan {
            totals,
            new,
            state_key,
            applied,
            mark: self.mark,
            spent: self.spent,
            spans: self.spans,
            first: (self.first != self.first_before).then_some(self.first),
            last: (self.last != self.last_before).then_some(self.last),
            recent: self.recent,
            buckets: self.ring,
            mix: if self.mix_changed {
                self.mix.flatten()
            } else {
                None
            },
            taken,
        }
    }
}

/// A `stream/accounting.py:Ring` as a row's parts leave it: its array's buffer (`state::Doubles`), its amounts
/// and newest index worked out on copies, written back at the commit.
struct Ring<'py> {
    ring: Bound<'py, PyAny>,
    buffer: Doubles,
    amounts: Vec<f64>,
    newest: i64,
    moved: bool,
    newest_slot: isize,
}

impl<'py> Ring<'py> {
    /// The ring's state, or None (not a `Ring`, its `amounts` not a writable array of doubles,
    /// `newest` not an int). `slots`: `TotalsRows.ring_slots`.
    fn of(py: Python<'py>, ring: Bound<'py, PyAny>, rows: &TotalsRows) -> PyResult<Option<Ring<'py>>> {
        if !ring.get_type().is(rows.ring_class.bind(py)) {
            return Ok(None);
        }
        let Some(newest) = int(&read(&ring, rows.ring_slots[NEWEST])?) else {
            return Ok(None);
        };
        let Some(buffer) = Doubles::writable(&read(&ring, rows.ring_slots[AMOUNTS])?) else {
            return Ok(None);
        };
        let amounts = buffer.slice().to_vec();
        if amounts.is_empty() {
            return Ok(None);
        }
        Ok(Some(Ring {
            ring,
            buffer,
            amounts,
            newest,
            moved: false,
            newest_slot: rows.ring_slots[NEWEST],
        }))
    }

    /// What `add` of `amount` at `index` gives back where it does not move the newest index on:
    /// the amount itself where `index` is already out of the ring, else nothing; None where it
    /// moves the newest index on (the reference decides after that).
    fn dropped(&self, index: i64, amount: f64) -> Option<f64> {
        let size = i64::try_from(self.amounts.len()).ok()?;
        if index > self.newest {
            return None;
        }
        Some(if index <= self.newest - size { amount } else { 0.0 })
    }

    /// `Ring.add`: adds `amount` at `index`; what fell out of the ring, or None where that is a
    /// `sum()` of the ring and `evicted` is wanted (the reference works it out).
    fn add(&mut self, index: i64, amount: f64, evicted: bool) -> Option<f64> {
        let size = i64::try_from(self.amounts.len()).ok()?;
        let slot = |index: i64| usize::try_from(index.rem_euclid(size)).ok();
        let mut out = 0.0;
        if index > self.newest {
            if self.newest < 0 || index - self.newest >= size {
                if evicted {
                    return None;
                }
                self.amounts.iter_mut().for_each(|amount| *amount = 0.0);
            } else {
                for passed in self.newest + 1..=index {
                    let at = slot(passed)?;
                    out += self.amounts[at];
                    self.amounts[at] = 0.0;
                }
            }
            self.newest = index;
            self.moved = true;
        } else if index <= self.newest - size {
            return Some(amount); // already out of the ring: counted and dropped at once
        }
        self.amounts[slot(index)?] += amount;
        Some(out)
    }

    /// Writes the amounts (and the newest index, if it moved) back into the Python ring.
    fn write(&self, py: Python<'_>) -> PyResult<()> {
        if !self.buffer.write(&self.amounts) {
            return Err(pyo3::exceptions::PyBufferError::new_err(
                "a ring's array changed size",
            ));
        }
        if self.moved {
            write(
                &self.ring,
                self.newest_slot,
                self.newest.into_pyobject(py)?.into_any(),
            );
        }
        Ok(())
    }
}

/// An int that is exactly a Python `int` (not a bool) and fits an int64.
pub(crate) fn int(value: &Bound<'_, PyAny>) -> Option<i64> {
    if !value.is_exact_instance_of::<PyInt>() {
        return None;
    }
    value.extract::<i64>().ok()
}

/// A float that is exactly a Python `float`.
fn float(value: &Bound<'_, PyAny>) -> Option<f64> {
    Some(value.cast_exact::<PyFloat>().ok()?.value())
}

/// The four numbers a row (from its field 3) and a step (from its field 1) both hold in this
/// order: the amount (a float), the spans, the first event time and the last one (a row) or the
/// span of event time (a step); None where one is not of its exact type.
fn amounts(list: &Bound<'_, PyList>, at: usize) -> PyResult<Option<(f64, i64, i64, i64)>> {
    Ok(
        match (
            float(&list.get_item(at)?),
            int(&list.get_item(at + 1)?),
            int(&list.get_item(at + 2)?),
            int(&list.get_item(at + 3)?),
        ) {
            (Some(amount), Some(spans), Some(first), Some(fourth)) => Some((amount, spans, first, fourth)),
            _ => None,
        },
    )
}

/// An exact `str`'s text.
fn text<'a>(value: &'a Bound<'_, PyAny>) -> Option<std::borrow::Cow<'a, str>> {
    value
        .cast_exact::<PyString>()
        .ok()?
        .to_str()
        .ok()
        .map(std::borrow::Cow::Borrowed)
}

#[pymethods]
impl TotalsRows {
    /// `totals_class`: `WindowTotals`, `ring_class`: `Ring` (their slots are read and written
    /// where they are in the objects: `usage::slot_offset`); `ns_per_minute`: the recent ring's index unit; `mix_fields`:
    /// a call mix's length (`MIX_FIELDS`); `row_fields` and `row_fields_with_steps`: a delta row's
    /// and a group's row's lengths (`records.DELTA_ROW_FIELDS*`); `calendar_settled` and
    /// `rolling_settled`: the lengths of `WindowTotals.settled`'s two kinds (`policy.decide_action`).
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        totals_class: Bound<'_, PyType>,
        ring_class: Bound<'_, PyType>,
        ns_per_minute: i64,
        mix_fields: usize,
        row_fields: usize,
        row_fields_with_steps: usize,
        calendar_settled: usize,
        rolling_settled: usize,
    ) -> PyResult<Self> {
        if ns_per_minute <= 0 || calendar_settled == rolling_settled {
            return Err(pyo3::exceptions::PyValueError::new_err("unusable shapes"));
        }
        let totals_slots = slot_offsets(&totals_class, TOTALS_FIELDS)?;
        let ring_slots = slot_offsets(&ring_class, RING_FIELDS)?;
        Ok(TotalsRows {
            totals_class: totals_class.unbind(),
            ring_class: ring_class.unbind(),
            totals_slots,
            ring_slots,
            ns_per_minute,
            mix_fields,
            row_fields,
            row_fields_with_steps,
            calendar_settled,
            rolling_settled,
        })
    }

    /// Adds `rows[at:]` of a sub-batch whose source is (`partition`, `offset`), the row at `at`
    /// from its step `step` on, while each step is the common case (module doc); returns (the
    /// index of the row stopped at, `len(rows)` when all were added, the step of it not added,
    /// whether the caller applies that step alone (then calls again from the next step) or the
    /// row from that step on (then from the next row), the number of keys newly pending in
    /// `changed`).
    ///
    /// `budgets`: the job's budgets by id; `totals`: the `window-totals` store read; `changes` and
    /// `table`: the job's `TableChanges` and the `window-totals` table, whose store and pending
    /// changes (`TableChanges.target`) a commit writes as `TableChanges.set` does; `states`: the
    /// `signal-states` store; `waiting`: the windows waiting for a snapshot; `new_window`:
    /// `BudgetJob._new_window`, asked for a window not in `totals` (budget, start, the first
    /// step's last event, `now`).
    #[allow(clippy::too_many_arguments)]
    fn add<'py>(
        &self,
        py: Python<'py>,
        rows: &Bound<'py, PyList>,
        at: usize,
        step: usize,
        partition: i64,
        offset: i64,
        now: &Bound<'py, PyAny>,
        budgets: &Bound<'py, PyDict>,
        totals: &Bound<'py, PyDict>,
        changes: &Bound<'py, PyAny>,
        table: &Bound<'py, PyAny>,
        states: &Bound<'py, PyDict>,
        waiting: &Bound<'py, PyDict>,
        new_window: &Bound<'py, PyAny>,
    ) -> PyResult<(usize, usize, bool, usize)> {
        let stores = Stores {
            now,
            budgets,
            totals,
            changes,
            table,
            states,
            waiting,
            new_window,
        };
        let target = stores.target(partition);
        let mut added = 0;
        let (mut index, mut from) = (at, step);
        while index < rows.len() {
            let row = rows.get_item(index)?;
            // an error: the reference meets the same one, and raises it
            let taken = self.plan(py, &row, offset, from, &target).unwrap_or_default();
            let stop = taken.stop(from);
            if let Some(plan) = taken.plan {
                added += usize::from(plan.commit(py, self, &target)?);
            }
            if let Some(stop) = stop {
                return Ok((index, stop.step, stop.alone, added));
            }
            (index, from) = (index + 1, 0);
        }
        Ok((index, 0, false, added))
    }

    /// `add` over a record read from its bytes (`record.rs`): its sub-batches' rows in order, each
    /// row's common steps added here, until a step that is not (or a sub-batch's contexts) is
    /// met. Returns (the number of keys newly pending in `changed`, None when the record is done,
    /// else (source partition, source offset, the bytes of that row or context array, whether
    /// they are contexts, the row's step stopped at, whether that step alone is the caller's)),
    /// for the caller to decode and apply in Python, then to call again: the record goes on from
    /// the row's next step (alone) or from the next row. A step alone comes as its own row's
    /// fields instead of the row's bytes (`WireRow::step_row`: a tuple, nothing to decode), with
    /// its message's offset as the source offset.
    #[allow(clippy::too_many_arguments)]
    fn add_record<'py>(
        &self,
        py: Python<'py>,
        record: &Bound<'py, UsageRecord>,
        now: &Bound<'py, PyAny>,
        budgets: &Bound<'py, PyDict>,
        totals: &Bound<'py, PyDict>,
        changes: &Bound<'py, PyAny>,
        table: &Bound<'py, PyAny>,
        states: &Bound<'py, PyDict>,
        waiting: &Bound<'py, PyDict>,
        new_window: &Bound<'py, PyAny>,
    ) -> PyResult<(usize, Option<Handed<'py>>)> {
        let stores = Stores {
            now,
            budgets,
            totals,
            changes,
            table,
            states,
            waiting,
            new_window,
        };
        let mut record = record.borrow_mut();
        let record = &mut *record;
        let payload = record.payload.bind(py).clone();
        let bytes = payload.as_bytes();
        let mut added = 0;
        let mut target: Option<Target<'_, 'py>> = None;
        while let Some(batch) = record.batches.get(record.batch) {
            let handed = |range: (usize, usize), contexts: bool, stop: Stop| {
                let value = PyBytes::new(py, &bytes[range.0..range.1]).into_any();
                Some((
                    batch.partition,
                    batch.offset,
                    value,
                    contexts,
                    stop.step,
                    stop.alone,
                ))
            };
            if let Some(row) = batch.rows.get(record.row) {
                let at = target.get_or_insert_with(|| stores.target(batch.partition));
                let from = record.step;
                let taken = match &row.fields {
                    Some(fields) => self.wire_plan(py, bytes, fields, batch.offset, from, at),
                    None => Ok(Taken::default()),
                }
                .unwrap_or_default();
                let stop = taken.stop(from);
                if let Some(plan) = taken.plan {
                    added += usize::from(plan.commit(py, self, at)?);
                }
                (record.row, record.step) = match stop {
                    Some(Stop { step, alone: true }) => (record.row, step + 1),
                    _ => (record.row + 1, 0),
                };
                if let Some(stop) = stop {
                    let own = match (&row.fields, stop.alone) {
                        (Some(fields), true) => fields.step_row(py, bytes, stop.step, self.mix_fields)?,
                        _ => None,
                    };
                    return Ok((
                        added,
                        match own {
                            Some((fields, offset)) => {
                                Some((batch.partition, offset, fields.into_any(), false, stop.step, true))
                            }
                            None => handed(row.bytes, false, stop),
                        },
                    ));
                }
                continue;
            }
            target = None;
            if !record.contexts_done {
                record.contexts_done = true;
                if let Some(contexts) = batch.contexts {
                    return Ok((added, handed(contexts, true, Stop::WHOLE)));
                }
            }
            record.batch += 1;
            record.row = 0;
            record.contexts_done = false;
        }
        Ok((added, None))
    }
}

/// Where `add` stopped in a row: its first step not added, and whether the caller applies that
/// step alone (then the native rows go on from the next) or the row from that step on.
#[derive(Clone, Copy)]
struct Stop {
    step: usize,
    alone: bool,
}

impl Stop {
    /// A row (or a context array) for the caller whole.
    const WHOLE: Stop = Stop {
        step: 0,
        alone: false,
    };
}

/// What `plan` made of a row from a step on: how many steps the row has and whether they are a
/// group's steps (None: a row not read here, the caller's whole), and the plan of the steps
/// taken (None: none).
#[derive(Default)]
struct Taken<'py> {
    steps: Option<(usize, bool)>,
    plan: Option<Plan<'py>>,
}

impl Taken<'_> {
    /// Where the row stops, asked `from` its step `from` on; None: every step was added. A group's
    /// step is the caller's alone where a step of the row was added just before it, or it is the
    /// row's first: the native rows go on after the reference decides it. Where none was added
    /// since the caller applied the step before, the caller takes the rest (no call per step).
    fn stop(&self, from: usize) -> Option<Stop> {
        let Some((steps, grouped)) = self.steps else {
            return Some(Stop {
                step: from,
                alone: false,
            });
        };
        let taken = self.plan.as_ref().map_or(0, |plan| plan.taken);
        let step = from + taken;
        (step < steps).then_some(Stop {
            step,
            alone: grouped && (taken > 0 || from == 0),
        })
    }
}

/// A row or context array `add_record` hands back: (source partition, source offset, its bytes,
/// whether it is a context array, the row's step stopped at, whether that step alone is the
/// caller's); a step alone: (source partition, its message's offset, its row's fields, ...).
type Handed<'py> = (i64, i64, Bound<'py, PyAny>, bool, usize, bool);

/// The job's budgets, stores and pending changes, as `add` and `add_record` take them.
struct Stores<'a, 'py> {
    now: &'a Bound<'py, PyAny>,
    budgets: &'a Bound<'py, PyDict>,
    totals: &'a Bound<'py, PyDict>,
    changes: &'a Bound<'py, PyAny>,
    table: &'a Bound<'py, PyAny>,
    states: &'a Bound<'py, PyDict>,
    waiting: &'a Bound<'py, PyDict>,
    new_window: &'a Bound<'py, PyAny>,
}

impl<'a, 'py> Stores<'a, 'py> {
    /// What a sub-batch from source `partition` adds to.
    fn target(&self, partition: i64) -> Target<'a, 'py> {
        let py = self.budgets.py();
        Target {
            partition,
            source: PyString::new(py, &partition.to_string()),
            now: self.now,
            budgets: self.budgets,
            totals: self.totals,
            changes: self.changes,
            table: self.table,
            written: std::cell::OnceCell::new(),
            states: self.states,
            waiting: self.waiting,
            new_window: self.new_window,
        }
    }
}

impl TotalsRows {
    /// The row's steps from `from` on taken while each is the common case (`Taken`: none read
    /// where the row is not of stage 1's shapes and types).
    fn plan<'py>(
        &self,
        py: Python<'py>,
        row: &Bound<'py, PyAny>,
        offset: i64,
        from: usize,
        target: &Target<'_, 'py>,
    ) -> PyResult<Taken<'py>> {
        let Ok(row) = row.cast_exact::<PyList>() else {
            return Ok(Taken::default());
        };
        let fields = row.len();
        if fields != self.row_fields && fields != self.row_fields_with_steps {
            return Ok(Taken::default());
        }
        let mix = row.get_item(8)?;
        let (parts, grouped) = if fields == self.row_fields_with_steps {
            let origin = row.get_item(fields - 1)?;
            match int(&origin) {
                Some(offset) => (self.part(row, offset, &mix)?, false),
                None if origin.is_exact_instance_of::<PyList>() => (self.steps(&origin, &mix)?, true),
                None => (None, false),
            }
        } else {
            (self.part(row, offset, &mix)?, false)
        };
        let Some(parts) = parts else {
            return Ok(Taken::default());
        };
        let (budget_id, key) = (row.get_item(0)?, row.get_item(1)?);
        let start_field = row.get_item(2)?;
        let (Some(budget_text), Some(key_text), Some(start)) =
            (text(&budget_id), text(&key), int(&start_field))
        else {
            return Ok(Taken::default());
        };
        let bucket_field = row.get_item(7)?;
        let bucket = if bucket_field.is_none() {
            None
        } else {
            match int(&bucket_field) {
                Some(size) => Some(size),
                None => return Ok(Taken::default()),
            }
        };
        let Some(bucket_ns) = bucket_size(bucket) else {
            return Ok(Taken::default());
        };
        let fields = Fields {
            budget_id: &budget_id,
            budget: &budget_text,
            key: &key_text,
            start,
            bucket_ns,
        };
        self.taken(py, &fields, &parts, grouped, from, target)
    }

    /// `Taken` for a row read whole: its `parts` (a group's steps where `grouped`), those from
    /// `from` on planned by `window`.
    fn taken<'py>(
        &self,
        py: Python<'py>,
        fields: &Fields<'_, 'py>,
        parts: &[Part],
        grouped: bool,
        from: usize,
        target: &Target<'_, 'py>,
    ) -> PyResult<Taken<'py>> {
        let plan = match parts.get(from..) {
            Some(rest) if !rest.is_empty() => self.window(py, fields, rest, target)?,
            _ => None,
        };
        Ok(Taken {
            steps: Some((parts.len(), grouped)),
            plan,
        })
    }

    /// `plan` for a row read from a record's bytes (`bytes`: the record's).
    fn wire_plan<'py>(
        &self,
        py: Python<'py>,
        bytes: &[u8],
        row: &WireRow,
        offset: i64,
        from: usize,
        target: &Target<'_, 'py>,
    ) -> PyResult<Taken<'py>> {
        let (Some(parts), Some(bucket_ns)) = (self.wire_parts(row, offset), bucket_size(row.bucket)) else {
            return Ok(Taken::default());
        };
        let text = |(start, end): (usize, usize)| std::str::from_utf8(&bytes[start..end]).ok();
        let (Some(budget), Some(key)) = (text(row.budget), text(row.key)) else {
            return Ok(Taken::default());
        };
        let budget_id = PyString::new(py, budget).into_any();
        let fields = Fields {
            budget_id: &budget_id,
            budget,
            key,
            start: row.start,
            bucket_ns,
        };
        let grouped = matches!(row.origin, Origin::Steps(_));
        self.taken(py, &fields, &parts, grouped, from, target)
    }

    /// `part` and `steps` for a row read from bytes: its parts, or None (hand it back).
    fn wire_parts(&self, row: &WireRow, offset: i64) -> Option<Vec<Part>> {
        let own = |offset: i64| -> Option<Vec<Part>> {
            Some(vec![Part {
                offset,
                amount: row.amount,
                spans: row.spans,
                first: row.first,
                last: row.last,
                mix: self.wire_mix(&row.mix)?,
            }])
        };
        let steps = match &row.origin {
            Origin::Own => return own(offset),
            Origin::Offset(origin) => return own(*origin),
            Origin::Steps(steps) => steps,
        };
        let mut parts = Vec::with_capacity(steps.len());
        for step in steps {
            let mix = match &step.mix {
                Some(mix) => self.wire_mix(mix)?,
                None if matches!(row.mix, WireMix::Null) => None,
                None => {
                    let mut plain = vec![0.0; self.mix_fields];
                    plain[0] = step.spans as f64; // as in `steps`
                    Some(plain)
                }
            };
            parts.push(Part {
                offset: step.offset,
                amount: step.amount,
                spans: step.spans,
                first: step.first,
                last: step.first.checked_add(step.span)?,
                mix,
            });
        }
        Some(parts)
    }

    /// `mix_of` for a mix read from bytes.
    fn wire_mix(&self, mix: &WireMix) -> Option<Option<Vec<f64>>> {
        match mix {
            WireMix::Null | WireMix::Empty => Some(None),
            WireMix::Floats(values) if values.len() == self.mix_fields => Some(Some(values.clone())),
            WireMix::Floats(_) => None,
        }
    }

    /// A one-message row's part (its fields 3 to 6 and `mix`), with its message's `offset`.
    fn part(
        &self,
        row: &Bound<'_, PyList>,
        offset: i64,
        mix: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Vec<Part>>> {
        let Some((amount, spans, first, last)) = amounts(row, 3)? else {
            return Ok(None);
        };
        let Some(mix) = self.mix_of(mix) else {
            return Ok(None);
        };
        Ok(Some(vec![Part {
            offset,
            amount,
            spans,
            first,
            last,
            mix,
        }]))
    }

    /// A group's row's steps (`records.Step.from_wire`): each step's own mix, else a plain one
    /// (`[spans, 0, 0, 0]`) where the row has a mix.
    fn steps(&self, steps: &Bound<'_, PyAny>, row_mix: &Bound<'_, PyAny>) -> PyResult<Option<Vec<Part>>> {
        let steps = steps.cast::<PyList>()?;
        let mut parts = Vec::with_capacity(steps.len());
        for step in steps.iter() {
            let Ok(step) = step.cast_exact::<PyList>() else {
                return Ok(None);
            };
            if step.len() != 5 && step.len() != 6 {
                return Ok(None);
            }
            let (Some(offset), Some((amount, spans, first, span))) =
                (int(&step.get_item(0)?), amounts(step, 1)?)
            else {
                return Ok(None);
            };
            let Some(last) = first.checked_add(span) else {
                return Ok(None);
            };
            let mix = if step.len() == 6 {
                match self.mix_of(&step.get_item(5)?) {
                    Some(mix) => mix,
                    None => return Ok(None),
                }
            } else if row_mix.is_none() {
                None
            } else {
                let mut plain = vec![0.0; self.mix_fields];
                plain[0] = spans as f64; // `float(spans)`: both round to nearest, ties to even
                Some(plain)
            };
            parts.push(Part {
                offset,
                amount,
                spans,
                first,
                last,
                mix,
            });
        }
        Ok(Some(parts))
    }

    /// `add`'s `if mix:` on a row's mix: Some(None) adds none; Some(Some(floats)) adds a full mix
    /// of floats; None: another mix, the reference's.
    fn mix_of(&self, mix: &Bound<'_, PyAny>) -> Option<Option<Vec<f64>>> {
        if mix.is_none() {
            return Some(None);
        }
        let list = mix.cast_exact::<PyList>().ok()?;
        if list.is_empty() {
            return Some(None);
        }
        if list.len() != self.mix_fields {
            return None;
        }
        let values: Option<Vec<f64>> = list.iter().map(|value| float(&value)).collect();
        Some(Some(values?))
    }

    /// The window's plan for the leading `parts` that are the common case (module doc), each
    /// added as `WindowTotals.add` adds it; None where not even the first one is.
    fn window<'py>(
        &self,
        py: Python<'py>,
        fields: &Fields<'_, 'py>,
        parts: &[Part],
        target: &Target<'_, 'py>,
    ) -> PyResult<Option<Plan<'py>>> {
        let (budget_id, budget_text, key_text) = (fields.budget_id, fields.budget, fields.key);
        let (start, bucket_ns) = (fields.start, fields.bucket_ns);
        if parts.is_empty() || target.partition < 0 {
            return Ok(None);
        }
        let Some(budget) = target.budgets.get_item(budget_id)? else {
            return Ok(None);
        };
        let Some(limit) = float(&budget.getattr(intern!(py, "limit"))?) else {
            return Ok(None);
        };
        // `budget|key` (the key's published state) and `budget|key|start` (its window), made once
        let mut keys = String::with_capacity(budget_text.len() + key_text.len() + 22);
        keys.push_str(budget_text);
        keys.push('|');
        keys.push_str(key_text);
        let key_length = keys.len();
        keys.push('|');
        keys.push_str(&start.to_string());
        let state_key = PyString::new(py, &keys);
        let published_key = PyString::new(py, &keys[..key_length]);
        let (totals, new) = match target.totals.get_item(&state_key)? {
            Some(totals) => (totals, false),
            None => (
                target
                    .new_window
                    .call1((&budget, start, parts[0].last, target.now))?,
                true,
            ),
        };
        if !totals.get_type().is(self.totals_class.bind(py)) {
            return Ok(None);
        }
        let applied = read(&totals, self.totals_slots[APPLIED])?;
        let Ok(applied) = applied.cast_into_exact::<PyDict>() else {
            return Ok(None);
        };
        let Some(mut running) = self.running(py, &totals, &applied, target, bucket_ns)? else {
            return Ok(None);
        };
        if running.mix.is_none() && parts.iter().any(|part| part.mix.is_some()) {
            return Ok(None); // the window's mix of another shape: the reference sums it
        }
        let buckets = read(&totals, self.totals_slots[BUCKETS])?;
        let decision = Decision::of(
            py,
            self,
            &budget,
            &published_key,
            start,
            &totals,
            &buckets,
            target,
        )?;
        let taken = parts
            .iter()
            .take_while(|part| running.take(part, &decision, limit, self.ns_per_minute, bucket_ns))
            .count();
        if taken == 0 {
            return Ok(None);
        }
        Ok(Some(running.plan(totals, new, state_key, applied, taken)))
    }

    /// The window's numbers as `WindowTotals.add` starts from them, or None where one is not of
    /// the type it reads here (the reference adds the row). `Running::mix` is None where the
    /// window's mix is of another shape than a list of `mix_fields` floats.
    fn running<'py>(
        &self,
        py: Python<'py>,
        totals: &Bound<'py, PyAny>,
        applied: &Bound<'py, PyDict>,
        target: &Target<'_, 'py>,
        bucket_ns: i64,
    ) -> PyResult<Option<Running<'py>>> {
        let mark = match applied.get_item(&target.source)? {
            None => -1,
            Some(mark) => match int(&mark) {
                Some(mark) => mark,
                None => return Ok(None),
            },
        };
        let (Some(spent), Some(spans), Some(first), Some(last)) = (
            float(&read(totals, self.totals_slots[SPENT])?),
            int(&read(totals, self.totals_slots[SPANS])?),
            int(&read(totals, self.totals_slots[FIRST])?),
            int(&read(totals, self.totals_slots[LAST])?),
        ) else {
            return Ok(None);
        };
        let Some(recent) = Ring::of(py, read(totals, self.totals_slots[RECENT])?, self)? else {
            return Ok(None);
        };
        let mut ring = None;
        if bucket_ns > 0 {
            let buckets = read(totals, self.totals_slots[BUCKETS])?;
            if buckets.is_none() {
                return Ok(None); // the reference makes the ring
            }
            ring = Ring::of(py, buckets, self)?;
            if ring.is_none() {
                return Ok(None);
            }
        }
        let mix = self.current_mix(&read(totals, self.totals_slots[MIX])?);
        Ok(Some(Running {
            mark,
            spent,
            spans,
            first,
            last,
            first_before: first,
            last_before: last,
            recent,
            ring,
            mix,
            mix_changed: false,
        }))
    }

    /// The window's call mix when `add` sums a full mix into it by its unrolled lines: a list of
    /// `mix_fields` floats (Some(Some)) or None (Some(None), a new window's first mix); None otherwise.
    fn current_mix(&self, mix: &Bound<'_, PyAny>) -> Option<Option<Vec<f64>>> {
        if mix.is_none() {
            return Some(None);
        }
        let list = mix.cast_exact::<PyList>().ok()?;
        if list.len() != self.mix_fields {
            return None;
        }
        let values: Option<Vec<f64>> = list.iter().map(|value| float(&value)).collect();
        Some(Some(values?))
    }
}

/// What `changed_signal` decides after a part is added, when it surely publishes nothing.
enum Decision {
    /// The key's published state is a newer window: nothing is decided.
    Nothing,
    /// A calendar or session window's kept answer: (low, high) hold the published action while
    /// `now` is before its end (`open`, compared once: `now` is the record's).
    Calendar { open: bool, low: f64, high: f64 },
    /// A rolling window's kept answer: (cap) holds it while `now` is in its clock stretch
    /// (`within`, compared once).
    Rolling { within: bool, cap: f64 },
    /// No kept answer that holds the published action: the reference decides.
    Unknown,
}

impl Decision {
    /// From the key's published state (under `state_key`, `budget|key`) and the window's kept answer (`policy.decide_action`;
    /// `kept`: the lengths of its calendar and rolling tuples).
    #[allow(clippy::too_many_arguments)]
    fn of<'py>(
        py: Python<'py>,
        rows: &TotalsRows,
        budget: &Bound<'py, PyAny>,
        state_key: &Bound<'py, PyString>,
        start: i64,
        totals: &Bound<'py, PyAny>,
        buckets: &Bound<'py, PyAny>,
        target: &Target<'_, 'py>,
    ) -> PyResult<Decision> {
        let action = match target.states.get_item(state_key)? {
            None => PyString::new(py, "ok").into_any(),
            Some(previous) => {
                let Ok(previous) = previous.cast_into_exact::<PyDict>() else {
                    return Ok(Decision::Unknown);
                };
                if previous.is_empty() {
                    PyString::new(py, "ok").into_any()
                } else {
                    let (Some(window), Some(action)) = (
                        previous.get_item(intern!(py, "window_start_ns"))?,
                        previous.get_item(intern!(py, "action"))?,
                    ) else {
                        return Ok(Decision::Unknown);
                    };
                    match int(&window) {
                        Some(window) if window > start => return Ok(Decision::Nothing),
                        Some(_) => action,
                        None => return Ok(Decision::Unknown),
                    }
                }
            }
        };
        let settled = read(totals, rows.totals_slots[SETTLED])?;
        let Ok(settled) = settled.cast_into_exact::<PyTuple>() else {
            return Ok(Decision::Unknown);
        };
        let item = |index: usize| settled.get_item(index);
        if !item(0)?.is(budget) || !item(settled.len() - 1)?.eq(&action)? {
            return Ok(Decision::Unknown);
        }
        match settled.len() {
            length if length == rows.calendar_settled => {
                let (Some(kept_start), Some(low), Some(high)) =
                    (int(&item(1)?), float(&item(3)?), float(&item(4)?))
                else {
                    return Ok(Decision::Unknown);
                };
                if kept_start != start {
                    return Ok(Decision::Unknown);
                }
                Ok(Decision::Calendar {
                    open: target.now.lt(item(2)?)?,
                    low,
                    high,
                })
            }
            length if length == rows.rolling_settled => {
                let (Some(newest), Some(cap)) = (int(&item(4)?), float(&item(5)?)) else {
                    return Ok(Decision::Unknown);
                };
                if buckets.is_none()
                    || !item(3)?.is(buckets)
                    || !buckets.get_type().is(rows.ring_class.bind(py))
                    || int(&read(buckets, rows.ring_slots[NEWEST])?) != Some(newest)
                {
                    return Ok(Decision::Unknown);
                }
                Ok(Decision::Rolling {
                    within: item(1)?.le(target.now)? && target.now.lt(item(2)?)?,
                    cap,
                })
            }
            _ => Ok(Decision::Unknown),
        }
    }

    /// Whether `decide_action` answers the published action at this spend (after the part).
    fn holds(&self, spent: f64, limit: f64) -> bool {
        match self {
            Decision::Nothing => true,
            Decision::Calendar { open, low, high } => {
                let ratio = spent / limit;
                *open && *low <= ratio && ratio < *high
            }
            Decision::Rolling { within, cap } => *within && spent < *cap,
            Decision::Unknown => false,
        }
    }
}

impl Plan<'_> {
    /// Does what `WindowTotals.add`, `TableChanges.set` and the snapshot's `waiting` do; whether
    /// the key is newly pending in `changed`.
    fn commit(self, py: Python<'_>, rows: &TotalsRows, target: &Target<'_, '_>) -> PyResult<bool> {
        let totals = &self.totals;
        self.applied.set_item(&target.source, self.mark)?;
        let slots = &rows.totals_slots;
        write(totals, slots[SPENT], PyFloat::new(py, self.spent).into_any());
        write(totals, slots[SPANS], self.spans.into_pyobject(py)?.into_any());
        if let Some(first) = self.first {
            write(totals, slots[FIRST], first.into_pyobject(py)?.into_any());
        }
        if let Some(last) = self.last {
            write(totals, slots[LAST], last.into_pyobject(py)?.into_any());
        }
        self.recent.write(py)?;
        if let Some(buckets) = &self.buckets {
            buckets.write(py)?;
        }
        if let Some(mix) = &self.mix {
            write(totals, slots[MIX], PyList::new(py, mix)?.into_any());
        }
        let (store, changed) = target.written()?;
        if self.new || !store.is(target.totals) {
            store.set_item(&self.state_key, totals)?; // else it holds `totals` under the key already
        }
        let fresh = !changed.contains(&self.state_key)?;
        if !fresh {
            changed.del_item(&self.state_key)?;
        }
        changed.set_item(&self.state_key, totals)?;
        target.waiting.set_item(&self.state_key, py.None())?;
        Ok(fresh)
    }
}
