//! An attribute's `AnyValue` and the four ways `contracts/otlp.py` reads one (`_READERS`):
//! the same results, or `Unsure` wherever Python would reject the span or the result
//! takes Python's own text rules (a number written as a string, a double written as text).

use std::borrow::Cow;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyString};

use crate::wire::{Field, Fields, Unsure, Walk};

/// A `SpanUsage` field value under construction; `truthy` is Python's `bool(value)`.
#[derive(Debug, Clone)]
pub enum Value<'a> {
    None,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(Cow<'a, str>),
    /// Bytes written as lowercase hex (`bytes.hex()`): trace and span ids.
    Hex(&'a [u8]),
}

impl Value<'_> {
    pub fn truthy(&self) -> bool {
        match self {
            Value::None => false,
            Value::Bool(value) => *value,
            Value::Int(value) => *value != 0,
            Value::UInt(value) => *value != 0,
            Value::Float(value) => *value != 0.0, // NaN is true, as in Python
            Value::Str(value) => !value.is_empty(),
            Value::Hex(bytes) => !bytes.is_empty(),
        }
    }

    pub fn to_python<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        match self {
            Value::None => py.None().into_bound(py),
            Value::Bool(value) => PyBool::new(py, *value).to_owned().into_any(),
            Value::Int(value) => value.into_pyobject(py).expect("an int").into_any(),
            Value::UInt(value) => value.into_pyobject(py).expect("an int").into_any(),
            Value::Float(value) => PyFloat::new(py, *value).into_any(),
            Value::Str(value) => PyString::new(py, value).into_any(),
            Value::Hex(bytes) => hex(py, bytes),
        }
    }

    /// A default from Python (`_DEFAULTS`): None, bool, int, float or str.
    pub fn from_python(value: &Bound<'_, PyAny>) -> PyResult<Value<'static>> {
        Ok(if value.is_none() {
            Value::None
        } else if let Ok(flag) = value.cast::<PyBool>() {
            Value::Bool(flag.is_true())
        } else if let Ok(number) = value.extract::<i64>() {
            Value::Int(number)
        } else if let Ok(number) = value.cast::<PyFloat>() {
            Value::Float(number.value())
        } else {
            Value::Str(Cow::Owned(value.extract::<String>()?))
        })
    }
}

/// How a field reads an attribute (`_STR`, `_INT`, `_FLOAT`, `_BOOL` in contracts/otlp.py).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    Str,
    Int,
    Float,
    Bool,
}

/// Which member of `AnyValue`'s oneof is set: the last one on the wire, as protobuf merges.
#[derive(Debug, Clone, Copy)]
pub enum Any<'a> {
    Unset,
    Str(&'a [u8]),
    Bool(bool),
    Int(i64),
    Double(f64),
    /// array, kvlist or bytes: no reader here handles them (but `_as_bool` reads them as false)
    Other,
}

impl<'a> Any<'a> {
    pub fn parse(message: &'a [u8]) -> Walk<Any<'a>> {
        let mut any = Any::Unset;
        for field in Fields::of(message) {
            any = match field? {
                (1, field) => Any::Str(field.bytes()?),
                (2, field) => Any::Bool(field.varint()? != 0),
                (3, field) => Any::Int(field.varint()? as i64),
                (4, field) => Any::Double(f64::from_bits(field.fixed64()?)),
                (5..=7, Field::Bytes(_)) => Any::Other,
                // 8: OTLP 1.10's string_value_strindex, a member Python reads by its own rules
                (1..=8, _) => return Err(Unsure),
                _ => any,
            };
        }
        Ok(any)
    }

    /// `value.string_value` (empty unless the string member is set).
    pub fn string_value(self) -> Walk<&'a str> {
        match self {
            Any::Str(bytes) => text(bytes),
            _ => Ok(""),
        }
    }

    pub fn read(self, reader: Reader) -> Walk<Value<'a>> {
        match reader {
            Reader::Str => self.as_str(),
            Reader::Int => self.as_int(),
            Reader::Float => self.as_float(),
            Reader::Bool => self.as_bool(),
        }
    }

    /// `_read_str`: text as is, a bool or an int as `str()` writes it.
    fn as_str(self) -> Walk<Value<'a>> {
        Ok(Value::Str(match self {
            Any::Str(bytes) => Cow::Borrowed(text(bytes)?),
            Any::Unset => Cow::Borrowed(""),
            Any::Bool(true) => Cow::Borrowed("True"),
            Any::Bool(false) => Cow::Borrowed("False"),
            Any::Int(number) => Cow::Owned(number.to_string()),
            Any::Double(_) | Any::Other => return Err(Unsure),
        }))
    }

    /// `_read_int`: an int, or a finite double truncated (`int(x)`); unset reads as 0.
    fn as_int(self) -> Walk<Value<'a>> {
        match self {
            Any::Int(number) => Ok(Value::Int(number)),
            Any::Unset => Ok(Value::Int(0)),
            Any::Double(number) => whole(number).map(Value::Int),
            Any::Str(_) | Any::Bool(_) | Any::Other => Err(Unsure),
        }
    }

    /// `_read_float`: a double, or an int as `float(x)`; unset reads as None.
    fn as_float(self) -> Walk<Value<'a>> {
        match self {
            Any::Double(number) => Ok(Value::Float(number)),
            Any::Int(number) => Ok(Value::Float(number as f64)),
            Any::Unset => Ok(Value::None),
            Any::Str(_) | Any::Bool(_) | Any::Other => Err(Unsure),
        }
    }

    /// `_as_bool`: a bool, or a number that is not 0; what is no number reads as false.
    fn as_bool(self) -> Walk<Value<'a>> {
        Ok(Value::Bool(match self {
            Any::Bool(flag) => flag,
            Any::Int(number) => number != 0,
            Any::Double(number) => number.is_finite() && number.abs() >= 1.0,
            Any::Unset | Any::Other => false,
            Any::Str(_) => return Err(Unsure),
        }))
    }
}

/// `int(x)` of a finite double that fits an i64; anything else is for Python to judge.
fn whole(number: f64) -> Walk<i64> {
    const LIMIT: f64 = 9_223_372_036_854_775_808.0; // 2**63
    let truncated = number.trunc();
    if (-LIMIT..LIMIT).contains(&truncated) {
        Ok(truncated as i64)
    } else {
        Err(Unsure)
    }
}

/// A protobuf string: UTF-8, or the message is not ours to decode.
pub fn text(bytes: &[u8]) -> Walk<&str> {
    std::str::from_utf8(bytes).map_err(|_| Unsure)
}

/// `bytes.hex()`: the digits written straight into a new ASCII `str` (no buffer to copy from and
/// no UTF-8 decoding of it: a span's own and parent ids are new texts in every span).
fn hex<'py>(py: Python<'py>, bytes: &[u8]) -> Bound<'py, PyAny> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let length = bytes.len() * 2;
    // SAFETY: `PyUnicode_New` with a maximum character of 127 makes a compact ASCII `str` of
    // `length` one-byte characters (null on error, which `from_owned_ptr` raises as a panic, as
    // `PyString::new` does); its data is written here, every byte, before anything reads it.
    unsafe {
        let text = ffi::PyUnicode_New(length as ffi::Py_ssize_t, 127);
        let text = Bound::from_owned_ptr(py, text);
        let data = ffi::PyUnicode_DATA(text.as_ptr()).cast::<u8>();
        for (at, byte) in bytes.iter().enumerate() {
            *data.add(2 * at) = DIGITS[usize::from(byte >> 4)];
            *data.add(2 * at + 1) = DIGITS[usize::from(byte & 15)];
        }
        text
    }
}
