//! The duplicate digest of an `otlp_spans` message (`stream/duplicates.py:digest`, whose
//! blake3-py call is the reference): the same 16 bytes of BLAKE3, computed holding the GIL.
//!
//! blake3-py releases the GIL for inputs of 2 kB and more, which lets Faust's consumer thread
//! take it: in the worker a small message's ~4 µs hash took ~38 µs of the main thread's time
//! (py-spy; ~6 holding the GIL: BENCHMARKS.md, "Stage 1 per message, again").

use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// The digest's length: `stream/duplicates.py` keeps 16 bytes of each message's BLAKE3.
const DIGEST_BYTES: usize = 16;

/// The first 16 bytes of the BLAKE3 hash of `payload` (its extended output, as blake3-py's
/// `digest(16)`), without releasing the GIL.
#[pyfunction]
pub fn blake3_16<'py>(py: Python<'py>, payload: &[u8]) -> Bound<'py, PyBytes> {
    let hash = blake3::hash(payload);
    PyBytes::new(py, &hash.as_bytes()[..DIGEST_BYTES])
}
