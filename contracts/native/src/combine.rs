//! `combined`: the combined row of a key several messages touched in one micro-batch, as
//! `stream/records.py:_combined` (the reference) makes it, for the rows stage 1 makes (floats
//! for amounts and call mixes, ints for spans and event times). Anything else answers None and
//! the reference makes the row; `tests/test_usage_records.py` runs both and compares them.

use pyo3::prelude::*;
use pyo3::types::{PyFloat, PyInt, PyList};

use crate::groups::{BEFORE_MIX, MIX_FIELDS};
/// Past this a span count compared with a float is not exact the same way in both languages.
const EXACT_IN_F64: i64 = 1 << 53;

fn exact_int(value: &Bound<'_, PyAny>) -> Option<i64> {
    if value.is_exact_instance_of::<PyInt>() {
        value.extract::<i64>().ok()
    } else {
        None
    }
}

fn exact_float(value: &Bound<'_, PyAny>) -> Option<f64> {
    value
        .cast::<PyFloat>()
        .ok()
        .filter(|_| value.is_exact_instance_of::<PyFloat>())
        .map(|f| f.value())
}

/// A call mix of four exact floats, or None (the reference makes the row).
pub(crate) fn mix_values(mix: &Bound<'_, PyAny>) -> PyResult<Option<[f64; MIX_FIELDS]>> {
    let Ok(list) = mix.cast::<PyList>() else {
        return Ok(None);
    };
    if list.len() != MIX_FIELDS {
        return Ok(None);
    }
    let mut values = [0.0; MIX_FIELDS];
    for (field, value) in values.iter_mut().enumerate() {
        match exact_float(&list.get_item(field)?) {
            Some(found) => *value = found,
            None => return Ok(None),
        }
    }
    Ok(Some(values))
}

/// `made` is `[offset, row, offset, row, ...]` of at least two messages, in offset order; the
/// answer is `_combined(made)`'s row, or None where this does not take the rows.
#[pyfunction]
pub fn combined<'py>(py: Python<'py>, made: &Bound<'py, PyList>) -> PyResult<Option<Bound<'py, PyList>>> {
    let count = made.len();
    if count < 4 || count % 2 != 0 {
        return Ok(None);
    }
    let mut rows = Vec::with_capacity(count / 2);
    let mut counts_calls = false;
    for index in (1..count).step_by(2) {
        let Ok(row) = made.get_item(index)?.cast_into::<PyList>() else {
            return Ok(None);
        };
        let fields = row.len();
        if fields != BEFORE_MIX && fields != BEFORE_MIX + 1 {
            return Ok(None);
        }
        if fields > BEFORE_MIX && !row.get_item(BEFORE_MIX)?.is_none() {
            counts_calls = true;
        }
        rows.push(row);
    }
    let steps = PyList::empty(py);
    let mut total: Option<[f64; MIX_FIELDS]> = None;
    let (mut amount, mut spans, mut first_ns, mut last_ns) = (0.0_f64, 0_i64, 0_i64, 0_i64);
    for (at, row) in rows.iter().enumerate() {
        let (row_amount, row_spans, row_first, row_last) = (
            row.get_item(3)?,
            row.get_item(4)?,
            row.get_item(5)?,
            row.get_item(6)?,
        );
        let (Some(value), Some(span_count), Some(first), Some(last)) = (
            exact_float(&row_amount),
            exact_int(&row_spans),
            exact_int(&row_first),
            exact_int(&row_last),
        ) else {
            return Ok(None);
        };
        let (Some(sum), Some(duration)) = (spans.checked_add(span_count), last.checked_sub(first)) else {
            return Ok(None);
        };
        if span_count.abs() > EXACT_IN_F64 {
            return Ok(None);
        }
        amount += value;
        spans = sum;
        if first != 0 && (first_ns == 0 || first < first_ns) {
            first_ns = first;
        }
        if last > last_ns {
            last_ns = last;
        }
        let offset = made.get_item(2 * at)?;
        let duration = duration.into_pyobject(py)?.into_any();
        let step = PyList::new(py, [offset, row_amount, row_spans, row_first, duration])?;
        let mix = if row.len() > BEFORE_MIX {
            Some(row.get_item(BEFORE_MIX)?)
        } else {
            None
        };
        match mix.filter(|mix| !mix.is_none()) {
            None if counts_calls => step.append(py.None())?,
            None => {}
            Some(mix) => {
                let Some(values) = mix_values(&mix)? else {
                    return Ok(None);
                };
                let plain = values[0] == span_count as f64 && values[1..].iter().all(|value| *value == 0.0);
                if !plain {
                    step.append(&mix)?;
                }
                match total.as_mut() {
                    None => total = Some(values),
                    Some(sums) => sums.iter_mut().zip(values).for_each(|(sum, value)| *sum += value),
                }
            }
        }
        steps.append(step)?;
    }
    let head = &rows[0];
    let total = match total {
        Some(sums) => PyList::new(py, sums)?.into_any(),
        None => py.None().into_bound(py),
    };
    let row = PyList::new(
        py,
        [
            head.get_item(0)?,
            head.get_item(1)?,
            head.get_item(2)?,
            amount.into_pyobject(py)?.into_any(),
            spans.into_pyobject(py)?.into_any(),
            first_ns.into_pyobject(py)?.into_any(),
            last_ns.into_pyobject(py)?.into_any(),
            head.get_item(7)?,
            total,
            steps.into_any(),
        ],
    )?;
    Ok(Some(row))
}
