"""The native loop of `usage_rows` (contracts/native `Summer`) against the Python reference.

Random budget files (scopes of one and two dimensions, globs, calendar, rolling and session
windows, every metric, an `unpriced:` rule or none) and random batches of spans (plain, unpriced
and unclassed calls, refused, fallen back, escalated and routed calls, tools, other operations
with and without tool calls, late spans, spans without an event time, costs of -0.0, 0.0 and
NaN, counts and times past an int64, values of unexpected types, a subclass of `SpanUsage`) go
through both; the rows must be the same rows in the same order with the same floats to the last
bit (compared by `repr`: -0.0, NaN), the same `BatchStats`, and the spans priced and classed alike.
"""

from __future__ import annotations

import logging
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from burnguard.contracts.budgets import BudgetConfig, parse_budget_yaml
from burnguard.contracts.pricing import PriceBook
from burnguard.contracts.usage import SpanUsage
from burnguard.stream import accounting
from burnguard.stream.accounting import BatchStats, usage_rows, usage_rows_detached
from burnguard.stream.records import GroupRows, combined_row

from tests.fixtures.sums import required_native_sums

NS = 1_000_000_000
T0 = datetime(2025, 5, 14, 9, tzinfo=UTC)

BUDGET_POOL = [
    "{id: tenant-cost, scope: tenant, window: day, metric: cost_usd, limit: 50}",
    "{id: tenant-week, scope: tenant, window: week, timezone: Asia/Tokyo, limit: 50}",
    "{id: feature-tokens, scope: [tenant, feature], window: day, metric: tokens, limit: 1000000}",
    "{id: user-input, scope: user, window: 1h, metric: input_tokens, limit: 100000}",
    "{id: session-tools, scope: session, window: session, metric: tool_calls, limit: 20}",
    "{id: acme-calls, scope: tenant, match: 'acme*', window: day, metric: calls, limit: 100}",
    "{id: exact-globex, scope: tenant, match: globex, window: month, metric: cost_usd, limit: 100}",
    "{id: premium-cost, scope: model_class, match: premium, window: day, limit: 10}",
    "{id: class-user, scope: [user, model_class], window: 15m, metric: calls, limit: 10}",
    "{id: service-day, scope: service, window: day, metric: tokens, limit: 1000000}",
    "{id: workflow-2h, scope: workflow, window: 2h, metric: cost_usd, limit: 5}",
    "{id: session-cost, scope: session, window: session, metric: cost_usd, limit: 5}",
    "{id: tenant-tools, scope: tenant, window: day, metric: tool_calls, limit: 500}",
]
UNPRICED_RULES = ["", "unpriced: {charge_as: gpt-4.1}\n", "unpriced: {input_mtok: 2, output_mtok: 8}\n"]


def random_config(rng: random.Random) -> BudgetConfig:
    budgets = rng.sample(BUDGET_POOL, rng.randrange(1, len(BUDGET_POOL) + 1))
    text = "model_classes:\n  premium: [gpt-4.1, o3]\n  standard: [gpt-4.1-mini]\n"
    text += rng.choice(UNPRICED_RULES) + "budgets:\n" + "".join(f"  - {budget}\n" for budget in budgets)
    return parse_budget_yaml(text)


class OtherUsage(SpanUsage):
    """Not the class the native loop reads: handed to the reference."""


def odd(rng: random.Random, usual: Any) -> Any:
    """Mostly `usual`; now and then a value of the same meaning but another type, or past an int64."""
    if rng.random() > 0.04:
        return usual
    if isinstance(usual, bool):
        return rng.choice([0, 1, None])
    if isinstance(usual, int):
        return rng.choice([True, float(usual), usual + 2**64, -1])
    if isinstance(usual, str):
        return rng.choice([None, 7, type("Text", (str,), {})(usual)])
    return usual


def random_span(rng: random.Random, n: int) -> SpanUsage:
    at = T0 + timedelta(minutes=rng.choice([0, 1, 2, 59, 61, 60 * 15, 60 * 24 * 3]), seconds=rng.random())
    end_ns = int(at.timestamp() * NS)
    cost = rng.choice([None, None, 0.0, -0.0, float("nan"), rng.random() / 7, rng.random() / 3, 1e-17])
    fields: dict[str, Any] = dict(
        trace_id=f"{n:032x}",
        span_id=f"{n:016x}",
        parent_span_id="",
        name=f"span-{n}",
        start_ns=end_ns - NS,
        end_ns=end_ns,
        operation=rng.choice(
            ["chat"] * 6 + ["embeddings", "text_completion", "execute_tool", "invoke_agent", ""]
        ),
        tenant=rng.choice(["acme", "acme-2", "globex", ""]),
        user=rng.choice(["u1", "u2", "ü3", ""]),
        feature=rng.choice(["summarize", "translate", ""]),
        workflow=rng.choice(["wf", ""]),
        session=rng.choice(["s1", "s2", "s3", ""]),
        service=rng.choice(["svc", "other", ""]),
        request_model=rng.choice(["gpt-4.1", "gpt-4.1-mini", "o3", "unknown-model", ""]),
        model_class=rng.choice(["", "premium", "standard", "premium"]),
        input_tokens=rng.randrange(5000),
        output_tokens=rng.randrange(500),
        tool_calls=rng.choice([0, 0, 0, 2]),
        cost_usd=cost,
    )
    kind = rng.random()
    if kind < 0.06:
        fields.update(refused=rng.choice(["budget", "step_cap"]))
    elif kind < 0.10:
        fields.update(fallback=True)
    elif kind < 0.14:
        fields.update(downgraded_from="gpt-4.1", routed_from=rng.choice(["", "gpt-4.1"]))
    elif kind < 0.17:
        fields.update(escalated_from="gpt-4.1-mini")
    elif kind < 0.19:
        fields.update(end_ns=0)  # the event time falls back to the start
    for name in ("tenant", "session", "model_class", "operation", "refused", "tool_calls", "input_tokens"):
        fields[name] = odd(rng, fields.get(name, ""))
    fields["end_ns"] = odd(rng, fields["end_ns"])
    fields["fallback"] = odd(rng, fields.get("fallback", False))
    return (OtherUsage if rng.random() < 0.02 else SpanUsage)(**fields)


def copied(spans: list[SpanUsage]) -> list[SpanUsage]:
    """Fresh copies (`usage_rows` prices and classes the spans it is given)."""
    return [
        type(span)(**{name: getattr(span, name) for name in SpanUsage.__slots__ if name != "extra"}, extra={})
        for span in spans
    ]


def state_of(span: SpanUsage) -> str:
    return repr((span.cost_usd, span.model_class, sorted(span.extra.items())))


def summed(
    impl: Any, spans: list[SpanUsage], config: BudgetConfig, closed_before_ns: int
) -> tuple[str, BatchStats, list[str]]:
    """`usage_rows` with the module `impl` (None: the reference): repr of the rows (or of the error
    it raised: a value of an unexpected type may break a rule, e.g. a glob on an int key), the
    stats, the span states."""
    accounting._native = impl
    batch = copied(spans)
    stats = BatchStats()
    try:
        outcome = repr(usage_rows(batch, config, PriceBook.for_config(config), stats, closed_before_ns))
    except TypeError as exc:
        outcome = repr(exc)
    return outcome, stats, [state_of(span) for span in batch]


def plain_spans(rng: random.Random, count: int) -> list[SpanUsage]:
    """Priced, classed plain calls (every fifth a tool span) with every dimension set, in one minute."""
    spans = []
    for n in range(count):
        drawn = random_span(random.Random(rng.random()), n)
        span = SpanUsage(**{name: getattr(drawn, name) for name in SpanUsage.__slots__})
        for name in ("tenant", "session", "user", "workflow", "feature", "service", "model_class"):
            setattr(span, name, str(getattr(span, name) or "x"))
        span.operation = "execute_tool" if n % 5 == 0 else "chat"
        span.tool_calls, span.input_tokens, span.end_ns = 0, 10, int(T0.timestamp()) * NS + n
        span.start_ns = span.end_ns - NS
        span.refused = span.downgraded_from = span.escalated_from = ""
        span.fallback, span.cost_usd = False, 0.01
        spans.append(span)
    return spans


@pytest.fixture
def native(monkeypatch: pytest.MonkeyPatch) -> Any:
    module = required_native_sums()
    monkeypatch.setattr(accounting, "_native", module)
    return module


@pytest.mark.parametrize("seed", range(300))
def test_the_native_loop_sums_exactly_as_the_reference(seed: int, native: Any) -> None:
    rng = random.Random(seed)
    config = random_config(rng)
    spans = [random_span(rng, n) for n in range(rng.randrange(1, 160))]
    if rng.random() < 0.05:  # no event time at all: the whole batch is the per-span path's
        spans[rng.randrange(len(spans))].end_ns = spans[0].start_ns = 0
    closed_before = int((T0 + timedelta(minutes=rng.choice([-10, 30, 60 * 24 * 2]))).timestamp()) * NS
    reference = summed(None, spans, config, closed_before)
    assert summed(native, spans, config, closed_before) == reference


def test_the_native_loop_sums_the_common_spans_itself(native: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Priced and classed calls and tools are summed natively; an unpriced call is only prepared
    (priced, classed) in Python; a refused call is handed over whole."""
    config = parse_budget_yaml("budgets:\n" + "".join(f"  - {budget}\n" for budget in BUDGET_POOL))
    spans = plain_spans(random.Random(7), 200)
    spans[3].cost_usd = None
    spans[4].refused = "budget"
    calls: dict[str, int] = {"add": 0, "prepare": 0, "count": 0}
    for name in calls:
        real = getattr(accounting._Batch, name)

        def counting(self: Any, *args: Any, _name: str = name, _real: Any = real) -> Any:
            calls[_name] += 1
            return _real(self, *args)

        monkeypatch.setattr(accounting._Batch, name, counting)
    stats = BatchStats()
    usage_rows(spans, config, PriceBook.for_config(config), stats)
    # the refused call: `add` (which prepares and counts it); the unpriced one: `prepare` alone
    assert calls == {"add": 1, "prepare": 2, "count": 1}
    assert stats.spans == 200


class Failing:
    """A native loop that prepares half the spans through the batch, then raises as a panic would."""

    def __init__(self, error: type[BaseException]) -> None:
        self.error = error

    def add_all(self, usages: list[SpanUsage], batch: Any, closed_before_ns: int) -> int:
        for usage in usages[: len(usages) // 2]:
            batch.add(usage)
        raise self.error("broken")

    def add_all_detached(self, usages: list[SpanUsage], batch: Any, closed_before_ns: int, mix: Any) -> Any:
        return self.add_all(usages, batch, closed_before_ns)


@pytest.mark.parametrize("detached", [False, True], ids=["lists", "own-rows"])
@pytest.mark.parametrize("error", [RuntimeError, "PanicException"])
def test_a_failing_native_loop_is_counted_and_the_reference_sums_the_batch_again(
    error: Any, detached: bool, native: Any, caplog: pytest.LogCaptureFixture
) -> None:
    error = getattr(native, error) if isinstance(error, str) else error
    config = parse_budget_yaml(
        "unpriced: {charge_as: gpt-4.1}\nbudgets:\n" + "".join(f"  - {budget}\n" for budget in BUDGET_POOL)
    )
    spans = plain_spans(random.Random(3), 120)
    for span in spans:
        span.cost_usd, span.request_model = None, "unknown-model"  # each call charged by the `unpriced:` rule
    reference = summed(None, spans, config, 0)
    accounting._native = native
    budgets = accounting._budget_set(config)
    budgets.summer = (native, Failing(error))
    before = accounting.native_sum_failures.count
    batch = copied(spans)
    stats = BatchStats()
    with caplog.at_level(logging.ERROR):
        rows = (usage_rows_detached if detached else usage_rows)(
            batch, config, PriceBook.for_config(config), stats, 0
        )
    assert (repr(rows), stats, [state_of(span) for span in batch]) == reference
    assert reference[1].unpriced > 0
    assert accounting.native_sum_failures.count == before + 1
    assert "native usage sums failed" in caplog.text
    budgets.summer = (None, None)


def test_a_module_without_a_usable_summer_leaves_the_reference_in_charge(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Stale:
        """A build older than this checkout: no `Summer`."""

    before = accounting.native_sum_failures.count
    with caplog.at_level(logging.WARNING):
        assert accounting._new_summer(Stale(), accounting._BudgetSet(())) is None
    assert "native usage sums not used" in caplog.text
    assert accounting.native_sum_failures.count == before + 1


def common_or_odd(rng: random.Random, n: int, common: float) -> SpanUsage:
    """A random span; at the rate `common` made one the native loop sums itself (priced, classed,
    a plain call or a tool, str dimensions, int times), so that whole batches of them occur."""
    span = random_span(rng, n)
    if rng.random() >= common:
        return span
    span = SpanUsage(
        **{name: getattr(span, name) for name in SpanUsage.__slots__ if name != "extra"}, extra={}
    )
    span.refused = span.downgraded_from = span.escalated_from = span.routed_from = ""
    span.fallback, span.cost_usd = False, rng.choice([0.0, -0.0, rng.random() / 7, 1e-17])
    span.operation = rng.choice(["chat", "chat", "execute_tool", "invoke_agent"])
    for name in ("tenant", "session", "model_class"):
        if type(getattr(span, name)) is not str:
            setattr(span, name, "")
    span.model_class = span.model_class or "standard"
    span.tool_calls = span.tool_calls if type(span.tool_calls) is int and span.tool_calls >= 0 else 0
    span.input_tokens = span.input_tokens if type(span.input_tokens) is int and span.input_tokens >= 0 else 3
    span.end_ns = span.end_ns if type(span.end_ns) is int and 0 < span.end_ns < 2**63 else span.start_ns
    return span


def random_batch(rng: random.Random) -> list[SpanUsage]:
    """Spans of one message: every one common about half the time (the native loop keeps its own rows)."""
    common = rng.choice([1.0, 0.9])
    return [common_or_odd(rng, n, common) for n in range(rng.randrange(1, 40))]


def detached_summed(
    native: Any, spans: list[SpanUsage], config: BudgetConfig, closed_before_ns: int
) -> tuple[str, BatchStats, list[str], bool]:
    """`summed` through `usage_rows_detached`: the rows as lists (`MessageRows.lists()`), and whether
    they came as the native loop's own."""
    accounting._native = native
    batch = copied(spans)
    stats = BatchStats()
    own = False
    try:
        rows = usage_rows_detached(batch, config, PriceBook.for_config(config), stats, closed_before_ns)
        own = isinstance(rows, native.MessageRows)
        outcome = repr(rows.lists() if own else rows)
    except TypeError as exc:
        outcome = repr(exc)
    return outcome, stats, [state_of(span) for span in batch], own


@pytest.mark.parametrize("seed", range(300))
def test_the_native_loops_own_rows_are_the_references_rows(seed: int, native: Any) -> None:
    """`usage_rows_detached` gives the reference's rows (order, floats by `repr`, call mixes settled),
    stats and span states, whether the loop kept the rows itself or handed a span over."""
    rng = random.Random(seed)
    config = random_config(rng)
    spans = random_batch(rng)
    closed_before = int((T0 + timedelta(minutes=rng.choice([-10, 30, 60 * 24 * 2]))).timestamp()) * NS
    *found, _own = detached_summed(native, spans, config, closed_before)
    assert tuple(found) == summed(None, spans, config, closed_before)


def test_the_native_loop_keeps_the_rows_of_common_spans_and_makes_lists_once_one_is_handed_over(
    native: Any,
) -> None:
    config = parse_budget_yaml("budgets:\n" + "".join(f"  - {budget}\n" for budget in BUDGET_POOL))
    spans = plain_spans(random.Random(7), 50)
    assert detached_summed(native, spans, config, 0)[3]
    spans[30].refused = "budget"  # handed over: the rows made so far become lists, in their order
    outcome, *_rest, own = detached_summed(native, spans, config, 0)
    assert not own and outcome == summed(None, spans, config, 0)[0]


@pytest.mark.parametrize("seed", range(200))
def test_a_native_group_of_the_loops_own_rows_sends_what_group_rows_sends_of_the_references(
    seed: int, native: Any
) -> None:
    """The differential of a micro-batch: each message's spans through the reference into `GroupRows`,
    and through `usage_rows_detached` into the native `Groups` (own rows and lists mixed): the same
    wire rows and weights, by `repr`."""
    rng = random.Random(seed)
    config = random_config(rng)
    messages = [random_batch(rng) for _ in range(rng.randrange(1, 8))]
    offsets = sorted(rng.sample(range(1000), len(messages)))
    reference, group = GroupRows(), native.Groups(combined_row)
    for offset, spans in zip(offsets, messages, strict=True):
        accounting._native = None
        try:
            rows = usage_rows(copied(spans), config, PriceBook.for_config(config), None, 0)
        except TypeError:  # a glob on an int key: the message is parked, in neither group
            continue
        if any(not isinstance(row[1], str) for row in rows):
            continue  # a key that is not a str: no decoded span makes one, `Groups` refuses it
        reference.add(offset, rows)
        accounting._native = native
        group.add(offset, usage_rows_detached(copied(spans), config, PriceBook.for_config(config), None, 0))
    assert repr((group.rows(), group.last_offset)) == repr((reference.rows(), reference.last_offset))


def test_one_loop_over_batches_across_window_boundaries_sums_each_in_its_own_windows(native: Any) -> None:
    """The native loop keeps the window starts of one call's last event time, and the range of
    times they hold for, for the next call (`LastStarts` in contracts/native/src/sums.rs): a batch
    in later windows, back in earlier ones (late spans) or straddling a boundary is summed in its
    own windows, as the reference sums it."""
    config = parse_budget_yaml("budgets:\n" + "".join(f"  - {budget}\n" for budget in BUDGET_POOL))
    midnight = 15 * 60  # T0 is 09:00 UTC: the calendar windows (day, week, month) start anew
    minutes = [0, 5, midnight - 1, midnight, midnight + 1, 3, midnight, 60 * 24 * 8, midnight - 2, midnight]
    batches = []
    for batch, minute in enumerate(minutes):
        spans = plain_spans(random.Random(batch), 12)
        for n, span in enumerate(spans):  # a minute's spans from 30 s before `minute`
            span.end_ns = int((T0 + timedelta(minutes=minute)).timestamp()) * NS + n * 5 * NS - 30 * NS
            span.start_ns = span.end_ns - NS
        batches.append(spans)
    # every native call first: switching to the reference makes the next native call a new loop
    natively = [detached_summed(native, spans, config, 0) for spans in batches]
    for spans, (*found, own) in zip(batches, natively, strict=True):
        assert own
        assert tuple(found) == summed(None, spans, config, 0)
