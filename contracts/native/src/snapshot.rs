//! `UsageValues`: a budget usage snapshot's bytes from its parts, its amounts written here.
//!
//! `contracts/snapshots.py:usage_value` is the reference, which `UsageValues` calls for whatever it
//! does not write itself: the JSON of a `BudgetUsage` from its remembered parts (the head up to
//! `window`, the bounds, the run's stamp) and the four amounts pydantic writes for `spent`,
//! `limit`, `ratio` (`spent / limit`) and `spans`. pydantic writes a float as the `ryu` crate's
//! shortest round-trip form with a `+` after the `e` of a positive exponent (`1e+16`), an int in its
//! digits. Handed to the reference: a spend or limit not an exact float or an int within 2^53
//! (`float()` of it is exact), a zero limit (the reference raises), a non-finite amount or ratio
//! (pydantic's `ser_json_inf_nan`), `spans` not an int64, a part not `bytes`.
//! `tests/test_snapshot_encoding.py` holds the two to the same bytes.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyFloat, PyInt};

use crate::state::{write_float, write_int};

/// Writes snapshot values; hands the rest to the reference (module doc).
#[pyclass(frozen, module = "burnguard.contracts._otlp_native")]
pub struct UsageValues {
    reference: Py<PyAny>,
}

#[pymethods]
impl UsageValues {
    /// `reference`: `usage_value`, which writes what this does not.
    #[new]
    fn new(reference: Py<PyAny>) -> Self {
        UsageValues { reference }
    }

    /// `usage_value(head, bounds, spent, limit, spans, stamp)`'s bytes.
    fn write<'py>(
        &self,
        head: &Bound<'py, PyAny>,
        bounds: &Bound<'py, PyAny>,
        spent: &Bound<'py, PyAny>,
        limit: &Bound<'py, PyAny>,
        spans: &Bound<'py, PyAny>,
        stamp: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = head.py();
        match written(head, bounds, spent, limit, spans, stamp) {
            Some(out) => Ok(PyBytes::new(py, &out).into_any()),
            None => self
                .reference
                .bind(py)
                .call1((head, bounds, spent, limit, spans, stamp)),
        }
    }
}

/// The value's bytes, or None where the reference writes it.
fn written(
    head: &Bound<'_, PyAny>,
    bounds: &Bound<'_, PyAny>,
    spent: &Bound<'_, PyAny>,
    limit: &Bound<'_, PyAny>,
    spans: &Bound<'_, PyAny>,
    stamp: &Bound<'_, PyAny>,
) -> Option<Vec<u8>> {
    let head = head.cast_exact::<PyBytes>().ok()?.as_bytes();
    let bounds = bounds.cast_exact::<PyBytes>().ok()?.as_bytes();
    let stamp = stamp.cast_exact::<PyBytes>().ok()?.as_bytes();
    let (spent, limit) = (amount(spent)?, amount(limit)?);
    if limit == 0.0 {
        return None;
    }
    let ratio = spent / limit;
    let spans = crate::totals::int(spans)?;
    let mut out = Vec::with_capacity(head.len() + bounds.len() + stamp.len() + 96);
    out.extend_from_slice(head);
    out.extend_from_slice(bounds);
    out.extend_from_slice(b",\"spent\":");
    pydantic_float(spent, &mut out)?;
    out.extend_from_slice(b",\"limit\":");
    pydantic_float(limit, &mut out)?;
    out.extend_from_slice(b",\"ratio\":");
    pydantic_float(ratio, &mut out)?;
    out.extend_from_slice(b",\"spans\":");
    write_int(spans, &mut out);
    out.extend_from_slice(stamp);
    Some(out)
}

/// `float(value)` of an exact float, or of an exact int within 2^53 (converted exactly).
fn amount(value: &Bound<'_, PyAny>) -> Option<f64> {
    if let Ok(float) = value.cast_exact::<PyFloat>() {
        return Some(float.value());
    }
    if !value.is_exact_instance_of::<PyInt>() {
        return None;
    }
    let int = value.extract::<i64>().ok()?;
    const EXACT: i64 = 1 << 53;
    (-EXACT..=EXACT).contains(&int).then_some(int as f64)
}

/// A finite float as pydantic writes it: msgspec's form (`state::write_float`), `e+` before a
/// positive exponent.
fn pydantic_float(value: f64, out: &mut Vec<u8>) -> Option<()> {
    let start = out.len();
    write_float(value, out).ok()?;
    if let Some(at) = out[start..].iter().position(|&byte| byte == b'e') {
        let exponent = start + at + 1;
        if out.get(exponent) != Some(&b'-') {
            out.insert(exponent, b'+');
        }
    }
    Some(())
}
