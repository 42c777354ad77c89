//! `SpanUsage` objects made here, not by `SpanUsage(*values)` in Python: the dataclass's
//! `__init__` took ~0.6 µs a span, more than a third of the walk. An object is allocated as
//! `SpanUsage.__new__` allocates it and each field is stored in its slot, where the slot's
//! member descriptor (a plain object slot, checked at construction) stores what `__init__`
//! sets; a field the dataclass fills with a fresh dict (`extra`) gets a new dict.
//! Which class, which fields in which order, and which are fresh dicts is handed in by
//! contracts/otlp.py; a class this cannot make exactly as `__init__` would (its own `__new__`,
//! a base class, a slot no field names, a field that is not a plain slot) is refused at
//! construction, and `native_decoder` leaves decoding to the reference.

use std::collections::HashSet;
use std::ptr::addr_of_mut;

use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyType};

/// The class and where its slots are in an object, in field order.
pub struct Usages {
    class: Py<PyType>,
    alloc: ffi::allocfunc,
    fields: Vec<isize>,
    fresh_dicts: Vec<isize>,
}

impl Usages {
    /// `fields`: the slots set from a span's values, in their order; `fresh_dicts`: the slots that
    /// get an empty dict each. Together they must be every slot of `class`, which must be a
    /// class of its own (its base `object`, no `__new__` of its own).
    pub fn new(class: &Bound<'_, PyType>, fields: &[String], fresh_dicts: &[String]) -> PyResult<Self> {
        let alloc = plain_class(class)?;
        let slots: Vec<String> = class.getattr("__slots__")?.extract()?;
        let slots: HashSet<String> = slots.into_iter().collect();
        let named: HashSet<String> = fields.iter().chain(fresh_dicts).cloned().collect();
        if slots != named || named.len() != fields.len() + fresh_dicts.len() {
            return Err(PyValueError::new_err(
                "the fields and fresh dicts must name each slot of the class once",
            ));
        }
        let offsets = |names: &[String]| -> PyResult<Vec<isize>> {
            names.iter().map(|name| slot_offset(class, name)).collect()
        };
        Ok(Usages {
            class: class.clone().unbind(),
            alloc,
            fields: offsets(fields)?,
            fresh_dicts: offsets(fresh_dicts)?,
        })
    }

    pub fn fields(&self) -> usize {
        self.fields.len()
    }

    /// A new object with `values` (one per field, in field order) and a fresh dict per fresh slot.
    pub fn make<'py, 'v>(
        &self,
        py: Python<'py>,
        values: impl Iterator<Item = ValueRef<'py, 'v>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let class = self.class.bind(py).as_type_ptr();
        // SAFETY: `alloc` is the class's `tp_alloc` (checked in `plain_class`), called as
        // `object.__new__` calls it; a null result is the error PyO3 fetches.
        let object = unsafe { Bound::from_owned_ptr_or_err(py, (self.alloc)(class, 0))? };
        for (&offset, value) in self.fields.iter().zip(values) {
            store(&object, offset, value.into_ptr());
        }
        for &offset in &self.fresh_dicts {
            store(&object, offset, PyDict::new(py).into_any().into_ptr());
        }
        Ok(object)
    }
}

/// The address of the object slot at `offset` of `object`.
///
/// # Safety
///
/// `offset` must be one `slot_offset` found in `object`'s exact class.
pub unsafe fn slot_at(object: &Bound<'_, PyAny>, offset: isize) -> *mut *mut ffi::PyObject {
    unsafe {
        object
            .as_ptr()
            .cast::<u8>()
            .offset(offset)
            .cast::<*mut ffi::PyObject>()
    }
}

/// A new reference into the empty object slot at `offset` (what `PyMember_SetOne` does for a
/// `Py_T_OBJECT_EX` member on an object just allocated: the slot is null, nothing to release).
fn store(object: &Bound<'_, PyAny>, offset: isize, value: *mut ffi::PyObject) {
    // SAFETY: `offset` is a `Py_T_OBJECT_EX` slot inside objects of the class (`slot_offset`),
    // and `object` one just allocated by the class's `tp_alloc`, which zeroes it.
    unsafe {
        let slot = slot_at(object, offset);
        debug_assert!((*slot).is_null());
        *slot = value;
    }
}

/// A field's value: a borrowed default or a new object.
pub enum ValueRef<'py, 'v> {
    Borrowed(&'v Py<PyAny>),
    Owned(Bound<'py, PyAny>),
}

impl ValueRef<'_, '_> {
    /// A new reference to the value.
    fn into_ptr(self) -> *mut ffi::PyObject {
        match self {
            ValueRef::Borrowed(value) => {
                // SAFETY: a live object; the reference made is the slot's.
                unsafe { ffi::Py_IncRef(value.as_ptr()) };
                value.as_ptr()
            }
            ValueRef::Owned(value) => value.into_ptr(),
        }
    }
}

/// The `tp_alloc` of a class whose base is `object` and whose `__new__` is `object.__new__`.
fn plain_class(class: &Bound<'_, PyType>) -> PyResult<ffi::allocfunc> {
    let refused = |why: &str| PyValueError::new_err(format!("cannot make {class} natively: {why}"));
    let object_new = class.py().get_type::<PyAny>().getattr("__new__")?;
    if !class.getattr("__new__")?.is(&object_new) {
        return Err(refused("it has a __new__ of its own"));
    }
    // SAFETY: reading type slots of live type objects (the class and two static CPython types).
    unsafe {
        let object = addr_of_mut!(ffi::PyBaseObject_Type);
        let class = class.as_type_ptr();
        if (*class).tp_base != object {
            return Err(refused("its base is not object"));
        }

        (*class).tp_alloc.ok_or_else(|| refused("no tp_alloc"))
    }
}

/// Where the class's slots `names` are in its objects, in that order (`slot_offset` each).
pub(crate) fn slot_offsets<const N: usize>(
    class: &Bound<'_, PyType>,
    names: [&str; N],
) -> PyResult<[isize; N]> {
    let mut offsets = [0; N];
    for (offset, name) in offsets.iter_mut().zip(names) {
        *offset = slot_offset(class, name)?;
    }
    Ok(offsets)
}

/// Where one of the class's own slots is in its objects: a writable `Py_T_OBJECT_EX` member.
pub fn slot_offset(class: &Bound<'_, PyType>, name: &str) -> PyResult<isize> {
    let not_plain = || PyValueError::new_err(format!("{name} is not a plain slot of {class}"));
    let descriptor = class.getattr("__dict__")?.get_item(name)?;
    // SAFETY: the descriptor is read as a `PyMemberDescrObject` only once its type says it is
    // one (pyo3-ffi types its `d_member` as a `PyGetSetDef`; CPython's is a `PyMemberDef`).
    unsafe {
        if ffi::Py_TYPE(descriptor.as_ptr()) != addr_of_mut!(ffi::PyMemberDescr_Type) {
            return Err(not_plain());
        }
        let descriptor = descriptor.as_ptr().cast::<ffi::PyMemberDescrObject>();
        let member = &*(*descriptor).d_member.cast::<ffi::PyMemberDef>();
        let pointer = std::mem::size_of::<*mut ffi::PyObject>() as isize;
        let header = std::mem::size_of::<ffi::PyObject>() as isize;
        let inside = header..=(*class.as_type_ptr()).tp_basicsize - pointer;
        let plain = (*descriptor).d_common.d_type == class.as_type_ptr()
            && member.type_code == ffi::Py_T_OBJECT_EX
            && member.flags & ffi::Py_READONLY == 0
            && inside.contains(&member.offset);
        if !plain {
            return Err(not_plain());
        }
        Ok(member.offset)
    }
}
