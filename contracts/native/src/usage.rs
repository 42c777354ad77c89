//! `SpanUsage` objects made here, not by `SpanUsage(*values)` in Python: the dataclass's
//! `__init__` took ~0.6 µs a span, more than a third of the walk. An object is allocated as
//! `SpanUsage.__new__` allocates it and each field is set through its slot's descriptor, as
//! `__init__` sets it; a field the dataclass fills with a fresh dict (`extra`) gets a new dict.
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

/// The class and the descriptors of its slots, in field order.
pub struct Usages {
    class: Py<PyType>,
    alloc: ffi::allocfunc,
    set: ffi::descrsetfunc,
    fields: Vec<Py<PyAny>>,
    fresh_dicts: Vec<Py<PyAny>>,
}

impl Usages {
    /// `fields`: the slots set from a span's values, in their order; `fresh_dicts`: the slots that
    /// get an empty dict each. Together they must be every slot of `class`, which must be a
    /// class of its own (its base `object`, no `__new__` of its own).
    pub fn new(class: &Bound<'_, PyType>, fields: &[String], fresh_dicts: &[String]) -> PyResult<Self> {
        let (alloc, set) = plain_class(class)?;
        let slots: Vec<String> = class.getattr("__slots__")?.extract()?;
        let slots: HashSet<String> = slots.into_iter().collect();
        let named: HashSet<String> = fields.iter().chain(fresh_dicts).cloned().collect();
        if slots != named || named.len() != fields.len() + fresh_dicts.len() {
            return Err(PyValueError::new_err(
                "the fields and fresh dicts must name each slot of the class once",
            ));
        }
        let descriptors = |names: &[String]| -> PyResult<Vec<Py<PyAny>>> {
            names.iter().map(|name| slot_descriptor(class, name)).collect()
        };
        Ok(Usages {
            class: class.clone().unbind(),
            alloc,
            set,
            fields: descriptors(fields)?,
            fresh_dicts: descriptors(fresh_dicts)?,
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
        for (descriptor, value) in self.fields.iter().zip(values) {
            self.set_slot(py, &object, descriptor, value.as_ptr())?;
        }
        for descriptor in &self.fresh_dicts {
            self.set_slot(py, &object, descriptor, PyDict::new(py).as_ptr())?;
        }
        Ok(object)
    }

    fn set_slot(
        &self,
        py: Python<'_>,
        object: &Bound<'_, PyAny>,
        descriptor: &Py<PyAny>,
        value: *mut ffi::PyObject,
    ) -> PyResult<()> {
        // SAFETY: `set` is the `tp_descr_set` of member descriptors, `descriptor` one of this
        // class's (both checked in `new`); it takes its own reference to `value`.
        let status = unsafe { (self.set)(descriptor.as_ptr(), object.as_ptr(), value) };
        if status < 0 {
            return Err(PyErr::fetch(py));
        }
        Ok(())
    }
}

/// A field's value: a borrowed default or a new object.
pub enum ValueRef<'py, 'v> {
    Borrowed(&'v Py<PyAny>),
    Owned(Bound<'py, PyAny>),
}

impl ValueRef<'_, '_> {
    fn as_ptr(&self) -> *mut ffi::PyObject {
        match self {
            ValueRef::Borrowed(value) => value.as_ptr(),
            ValueRef::Owned(value) => value.as_ptr(),
        }
    }
}

/// The `tp_alloc` of a class whose base is `object` and whose `__new__` is `object.__new__`,
/// and the member descriptors' `tp_descr_set`.
fn plain_class(class: &Bound<'_, PyType>) -> PyResult<(ffi::allocfunc, ffi::descrsetfunc)> {
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

        let alloc = (*class).tp_alloc.ok_or_else(|| refused("no tp_alloc"))?;
        let set = (*addr_of_mut!(ffi::PyMemberDescr_Type))
            .tp_descr_set
            .ok_or_else(|| refused("member descriptors cannot set"))?;
        Ok((alloc, set))
    }
}

/// The member descriptor of one of the class's own slots.
fn slot_descriptor(class: &Bound<'_, PyType>, name: &str) -> PyResult<Py<PyAny>> {
    let descriptor = class.getattr("__dict__")?.get_item(name)?;
    let member_type = addr_of_mut!(ffi::PyMemberDescr_Type);
    // SAFETY: comparing a live object's type pointer with a static type's address.
    if unsafe { ffi::Py_TYPE(descriptor.as_ptr()) } != member_type {
        return Err(PyValueError::new_err(format!("{name} is not a plain slot")));
    }
    Ok(descriptor.unbind())
}
