//! The `str` made of each attribute text, kept from one decode to the next: a tenant's, a model's,
//! a session's or a service's text repeats from message to message, and a look-up of its bytes
//! is cheaper than making a new `str` of them each message (perf of `Decoder.decode` on small
//! messages: making `str`s ~9%, growing a new text cache each message ~3%). The key is the text's
//! exact bytes: a text that differs in any byte, or in length, is another entry. Bounded: the
//! cache is emptied when it holds `MAX_TEXTS` (keys are user ids, sessions, ...).

use pyo3::prelude::*;
use pyo3::types::PyString;
use rustc_hash::FxHashMap;

/// Texts kept before the cache is emptied.
pub const MAX_TEXTS: usize = 4096;

/// Text bytes -> the `str` made of them.
#[derive(Default)]
pub struct Texts {
    made: FxHashMap<Box<[u8]>, Py<PyAny>>,
}

impl Texts {
    /// The `str` of `text`, made once.
    #[inline]
    pub fn of<'py>(&mut self, py: Python<'py>, text: &str) -> Bound<'py, PyAny> {
        if let Some(made) = self.made.get(text.as_bytes()) {
            return made.bind(py).clone();
        }
        if self.made.len() >= MAX_TEXTS {
            self.made.clear();
        }
        let made = PyString::new(py, text).into_any();
        self.made.insert(text.as_bytes().into(), made.clone().unbind());
        made
    }

    /// How many texts are kept (`Decoder.kept_texts`, for the tests).
    pub fn len(&self) -> usize {
        self.made.len()
    }
}
