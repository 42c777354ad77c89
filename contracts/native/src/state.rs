//! `ChangelogJson`: a changelog record's key and value as JSON, a window's `WindowTotals` written
//! without the lists in between.
//!
//! `stream/changelog.py:_json_value` is the reference, which `ChangelogJson` calls for whatever it
//! does not write itself. A key (a `str`) of plain printable ASCII is written as the stdlib writes
//! it, between quotes; a signal state (a flat object of such text and ints) as msgspec writes it. For a `WindowTotals` the reference is `_totals_json`: `WindowTotals.to_state` (two `Ring.to_state`
//! lists among its eight fields), then msgspec's JSON encoder. Most changelog records are these
//! (~1 per window per flush), and building the state's lists was most of a record's cost. Here the
//! same bytes are written straight from the object's slots and the rings' arrays: floats as msgspec
//! writes them (the `ryu` crate's shortest round-trip form, which gives msgspec's bytes), ints in
//! their digits, the marks' keys as plain text. A value this does not write exactly as the
//! reference would is handed back as None, and the reference writes it: a float that is not finite
//! (msgspec writes null, the reference then takes the stdlib's encoder), a mark key that is not
//! plain printable ASCII or holds `null` (the reference counts the nulls in its output), an int
//! past 64 bits, any field not of its usual exact type. `tests/test_changelog_encoding.py` holds
//! the two to the same bytes.

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyFloat, PyList, PyString, PyType};

use crate::totals::{int, read, AMOUNTS, APPLIED, BUCKETS, MIX, NEWEST, RECENT, RING_FIELDS, TOTALS_FIELDS};
use crate::usage::slot_offsets;

/// Writes changelog keys and `WindowTotals` values; hands the rest to the reference (module doc).
#[pyclass(frozen, module = "burnguard.contracts._otlp_native")]
pub struct ChangelogJson {
    reference: Py<PyAny>,
    totals_class: Py<PyType>,
    ring_class: Py<PyType>,
    totals_slots: [isize; TOTALS_FIELDS.len()],
    ring_slots: [isize; RING_FIELDS.len()],
}

/// The value was not written: the reference writes it.
pub(crate) struct Refused;

pub(crate) type Written = Result<(), Refused>;

#[pymethods]
impl ChangelogJson {
    /// `reference`: `_json_value`, which writes what this does not; `totals_class`: `WindowTotals`,
    /// `ring_class`: `Ring`; their slots are read where they are in the objects (`usage::slot_offset`).
    #[new]
    fn new(
        reference: Py<PyAny>,
        totals_class: Bound<'_, PyType>,
        ring_class: Bound<'_, PyType>,
    ) -> PyResult<Self> {
        let totals_slots = slot_offsets(&totals_class, TOTALS_FIELDS)?;
        let ring_slots = slot_offsets(&ring_class, RING_FIELDS)?;
        Ok(ChangelogJson {
            reference,
            totals_class: totals_class.unbind(),
            ring_class: ring_class.unbind(),
            totals_slots,
            ring_slots,
        })
    }

    /// `value` (a changelog key or value) as the reference writes it: here for a plain `str`, a
    /// signal state and most `WindowTotals`, by the reference for the rest (its errors are its own).
    fn encode<'py>(&self, value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let py = value.py();
        let written = if value.get_type().is(self.totals_class.bind(py)) {
            let mut out = Vec::with_capacity(256);
            self.write_totals(value, &mut out).ok().map(|()| out)
        } else if let Ok(flat) = value.cast_exact::<PyDict>() {
            plain_flat(flat)
        } else {
            plain_key(value)
        };
        match written {
            Some(out) => Ok(PyBytes::new(py, &out).into_any()),
            None => self.reference.bind(py).call1((value,)),
        }
    }
}

/// A `str` the stdlib's encoder writes as it is, between quotes: printable ASCII without `"` and
/// `\` (it escapes the rest, non-ASCII as `\uXXXX`).
fn plain_key(value: &Bound<'_, PyAny>) -> Option<Vec<u8>> {
    let text = value.cast_exact::<PyString>().ok()?.to_str().ok()?;
    if !text.bytes().all(printable) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() + 2);
    out.push(b'"');
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
    Some(out)
}

/// A flat object msgspec writes as the stdlib does (`changelog._plain_flat`, a signal state):
/// plain text keys, each value plain text or an int64.
fn plain_flat(value: &Bound<'_, PyDict>) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(80);
    out.push(b'{');
    for (at, (key, item)) in value.iter().enumerate() {
        if at > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&plain_key(&key)?);
        out.push(b':');
        match int(&item) {
            Some(number) => write_int(number, &mut out),
            None => out.extend_from_slice(&plain_key(&item)?),
        }
    }
    out.push(b'}');
    Some(out)
}

/// A byte both encoders write as it is inside a JSON string: printable ASCII but `"` and `\`.
fn printable(byte: u8) -> bool {
    (b' '..=b'~').contains(&byte) && byte != b'"' && byte != b'\\'
}

/// A slot's value; an unset slot is refused (the reference raises its `AttributeError`).
fn slot<'py>(object: &Bound<'py, PyAny>, offset: isize) -> Result<Bound<'py, PyAny>, Refused> {
    read(object, offset).map_err(|_| Refused)
}

impl ChangelogJson {
    /// `to_state`'s list: `[spent,spans,first,last,{applied},[recent],[buckets]|null,[mix]|null]`.
    fn write_totals(&self, totals: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> Written {
        let slots = &self.totals_slots;
        out.push(b'[');
        for &offset in &slots[..APPLIED] {
            number(&slot(totals, offset)?, out)?;
            out.push(b',');
        }
        marks(&slot(totals, slots[APPLIED])?, out)?;
        out.push(b',');
        self.ring(&slot(totals, slots[RECENT])?, out)?;
        out.push(b',');
        let buckets = slot(totals, slots[BUCKETS])?;
        if buckets.is_none() {
            out.extend_from_slice(b"null");
        } else {
            self.ring(&buckets, out)?;
        }
        out.push(b',');
        let mix = slot(totals, slots[MIX])?;
        if mix.is_none() {
            out.extend_from_slice(b"null");
        } else {
            numbers(&mix, out)?;
        }
        out.push(b']');
        Ok(())
    }

    /// `Ring.to_state`: `[newest,[amounts from the oldest slot that is not +0.0 to the newest]]`.
    fn ring(&self, ring: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> Written {
        if !ring.get_type().is(self.ring_class.bind(ring.py())) {
            return Err(Refused);
        }
        let newest = int(&slot(ring, self.ring_slots[NEWEST])?).ok_or(Refused)?;
        let amounts = Doubles::of(&slot(ring, self.ring_slots[AMOUNTS])?)?;
        let amounts = amounts.slice();
        let size = i64::try_from(amounts.len()).map_err(|_| Refused)?;
        if size == 0 {
            return Err(Refused);
        }
        // the oldest slot's position: `(newest + 1) % size` as Python's `%` gives it (never negative)
        let cut = usize::try_from((newest + 1).rem_euclid(size)).map_err(|_| Refused)?;
        let ordered = amounts[cut..].iter().chain(&amounts[..cut]);
        out.push(b'[');
        write_int(newest, out);
        out.extend_from_slice(b",[");
        for (at, &amount) in ordered.skip_while(|amount| amount.to_bits() == 0).enumerate() {
            if at > 0 {
                out.push(b',');
            }
            write_float(amount, out)?;
        }
        out.extend_from_slice(b"]]");
        Ok(())
    }
}

/// The marks: `{"partition":offset,...}`, each key plain text, each offset an int64.
fn marks(applied: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> Written {
    let applied = applied.cast_exact::<PyDict>().map_err(|_| Refused)?;
    out.push(b'{');
    for (at, (key, offset)) in applied.iter().enumerate() {
        if at > 0 {
            out.push(b',');
        }
        let key = key.cast_exact::<PyString>().map_err(|_| Refused)?;
        let text = key.to_str().map_err(|_| Refused)?;
        if !plain_text(text) {
            return Err(Refused);
        }
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\":");
        write_int(int(&offset).ok_or(Refused)?, out);
    }
    out.push(b'}');
    Ok(())
}

/// Text msgspec writes as it is, between quotes, with no `null` in it (the reference counts the
/// nulls of its output): printable ASCII without `"` and `\`.
fn plain_text(text: &str) -> bool {
    text.bytes().all(printable) && !text.contains("null")
}

/// A list of numbers (the call mix): `[a,b,...]`.
fn numbers(list: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> Written {
    let list = list.cast_exact::<PyList>().map_err(|_| Refused)?;
    out.push(b'[');
    for (at, item) in list.iter().enumerate() {
        if at > 0 {
            out.push(b',');
        }
        number(&item, out)?;
    }
    out.push(b']');
    Ok(())
}

/// An exact `int` within int64, or an exact finite `float`.
fn number(value: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> Written {
    if let Ok(float) = value.cast_exact::<PyFloat>() {
        return write_float(float.value(), out);
    }
    write_int(int(value).ok_or(Refused)?, out);
    Ok(())
}

/// An int in its decimal digits, as both encoders write it (`itoa`: stage 1's sub-batches are
/// mostly 19-digit event times, `sub_batches.rs`).
pub(crate) fn write_int(value: i64, out: &mut Vec<u8>) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// A ring's `array("d")` read (or written) through the buffer protocol, released when dropped. Not
/// PyO3's `PyBuffer`, which boxes the view and parses its format: most of a record's time (and of
/// a stage-2 row's, `totals.rs`).
pub(crate) struct Doubles {
    view: ffi::Py_buffer,
}

impl Doubles {
    /// The buffer of `array`, refused unless it is C-contiguous native doubles (format `d`).
    fn of(array: &Bound<'_, PyAny>) -> Result<Doubles, Refused> {
        Doubles::view(array, ffi::PyBUF_FORMAT | ffi::PyBUF_C_CONTIGUOUS).ok_or(Refused)
    }

    /// `of` for writing: None also where the buffer is read-only.
    pub(crate) fn writable(array: &Bound<'_, PyAny>) -> Option<Doubles> {
        Doubles::view(
            array,
            ffi::PyBUF_FORMAT | ffi::PyBUF_C_CONTIGUOUS | ffi::PyBUF_WRITABLE,
        )
    }

    fn view(array: &Bound<'_, PyAny>, flags: std::os::raw::c_int) -> Option<Doubles> {
        let mut view = std::mem::MaybeUninit::<ffi::Py_buffer>::uninit();
        // SAFETY: a live object; on success the view is filled and released in `drop`.
        if unsafe { ffi::PyObject_GetBuffer(array.as_ptr(), view.as_mut_ptr(), flags) } != 0 {
            // SAFETY: the error set by the failed call is cleared: the reference raises its own.
            unsafe { ffi::PyErr_Clear() };
            return None;
        }
        // SAFETY: filled by the successful call above.
        let doubles = Doubles {
            view: unsafe { view.assume_init() },
        };
        let format = doubles.view.format;
        // SAFETY: with PyBUF_FORMAT the format is a NUL-terminated string (or null: bytes, "B").
        let native_double = !format.is_null()
            && matches!(
                unsafe { std::ffi::CStr::from_ptr(format) }.to_bytes(),
                b"d" | b"@d"
            );
        if !native_double || doubles.view.itemsize != 8 || doubles.view.len % 8 != 0 {
            return None;
        }
        Some(doubles)
    }

    /// Writes `values` over the buffer's doubles (a writable view of as many: `writable`).
    pub(crate) fn write(&self, values: &[f64]) -> bool {
        if self.view.readonly != 0 || values.len() != self.slice().len() {
            return false;
        }
        // SAFETY: a writable C-contiguous buffer of `values.len()` doubles, held by `self`;
        // `values` is Rust memory, not the buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(values.as_ptr(), self.view.buf.cast::<f64>(), values.len());
        }
        true
    }

    pub(crate) fn slice(&self) -> &[f64] {
        let len = usize::try_from(self.view.len / 8).unwrap_or(0);
        if len == 0 {
            return &[];
        }
        // SAFETY: a C-contiguous buffer of `len` native doubles, held until `self` is dropped;
        // nothing runs Python code (which could resize the array) while the slice is read.
        unsafe { std::slice::from_raw_parts(self.view.buf.cast::<f64>(), len) }
    }
}

impl Drop for Doubles {
    fn drop(&mut self) {
        // SAFETY: the view was filled by `PyObject_GetBuffer` and is released once.
        unsafe { ffi::PyBuffer_Release(&mut self.view) };
    }
}

/// A finite float as msgspec writes it; a NaN or an infinity is refused (msgspec writes null).
pub(crate) fn write_float(value: f64, out: &mut Vec<u8>) -> Written {
    if !value.is_finite() {
        return Err(Refused);
    }
    out.extend_from_slice(ryu::Buffer::new().format_finite(value).as_bytes());
    Ok(())
}
