//! Which spans the walk may vouch for against `span_checks.span_problem`, so Python need not run
//! it on every span (~0.5 µs a span, a third of what the walk cost). This is not a second copy
//! of the rule: it says "inside the ceilings" only for values `span_problem` surely passes (a
//! finite amount in [0, max], counts that are ints in [0, max], keys of at most max characters)
//! and answers "fall back" for anything else, so the reference decodes that message and
//! `span_problem` judges every span with its reasons. The fields it looks at and the ceilings
//! are handed in by contracts/otlp.py from `span_checks` (`COST_FIELD`, `COUNT_FIELDS`,
//! `KEY_FIELDS`, `SpanLimits`).

use crate::value::Value;

/// The ceilings of one decode (`SpanLimits.ceilings()`): max cost, max count, max key characters.
pub type Ceilings = (f64, i64, usize);

/// The field indices the checks read.
pub struct Checks {
    pub cost: usize,
    pub counts: Vec<usize>,
    pub keys: Vec<usize>,
}

impl Checks {
    /// True when `span_problem` passes the span whose fields are `field(index)`.
    pub fn vouch<'v>(&self, field: impl Fn(usize) -> &'v Value<'v>, ceilings: Ceilings) -> bool {
        let (max_cost, max_count, max_chars) = ceilings;
        let cost_ok = match field(self.cost) {
            Value::None => true,
            Value::Float(cost) => (0.0..=max_cost).contains(cost), // NaN is outside
            _ => false,
        };
        let count_ok =
            |index: &usize| matches!(field(*index), Value::Int(count) if (0..=max_count).contains(count));
        let key_ok = |index: &usize| match field(*index) {
            Value::Str(text) => text.len() <= max_chars || text.chars().count() <= max_chars,
            _ => false,
        };
        cost_ok && self.counts.iter().all(count_ok) && self.keys.iter().all(key_ok)
    }
}
