"""stream/accounting.py: a batch of decoded spans -> one delta per (budget, key, window).

The tests of `usage_deltas` run over both implementations of its loop (`sums_impl`: the Python
reference and the native `Summer`); tests/test_native_sums.py compares the two on random input.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from burnguard.contracts.budgets import BudgetConfig, parse_budget_yaml
from burnguard.contracts.pricing import PriceBook
from burnguard.contracts.topics import KafkaSettings
from burnguard.contracts.usage import SpanUsage
from burnguard.contracts.windows import ROLLING_BUCKETS, Window
from burnguard.stream import partitioner
from burnguard.stream.accounting import (
    RECENT_MINUTES,
    BatchStats,
    Ring,
    UsageDelta,
    WindowClock,
    WindowTotals,
    usage_deltas,
)
from burnguard.stream.app import BATCH_ROWS, BudgetJob
from burnguard.stream.partitioner import murmur2, producer_partitioner, usage_partition
from burnguard.stream.records import Step
from burnguard.stream.settings import StreamSettings
from faust.serializers import codecs

from tests.fixtures.decoders import required_native_decoder

NS = 1_000_000_000
ZONES = ("UTC", "Asia/Tokyo", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe")
DAY = datetime(2025, 5, 14, tzinfo=UTC)
T0 = DAY + timedelta(hours=9)

CONFIG_YAML = """\
model_classes:
  premium:  [gpt-4.1, o3]
  standard: [gpt-4.1-mini]
budgets:
  - {id: tenant-cost, scope: tenant, window: day, metric: cost_usd, limit: 50}
  - {id: feature-tokens, scope: [tenant, feature], window: day, metric: tokens, limit: 1000000}
  - {id: user-input, scope: user, window: 1h, metric: input_tokens, limit: 100000}
  - {id: session-tools, scope: session, window: session, metric: tool_calls, limit: 20}
  - {id: acme-calls, scope: tenant, match: acme, window: day, metric: calls, limit: 100}
  - {id: premium-cost, scope: model_class, match: premium, window: day, limit: 10}
"""


def ns(at: datetime) -> int:
    return int(at.timestamp()) * NS


def span(n: int, at: datetime, **fields) -> SpanUsage:
    base = dict(
        trace_id=f"{n:032x}",
        span_id=f"{n:016x}",
        parent_span_id="",
        name=f"span-{n}",
        start_ns=ns(at) - NS,
        end_ns=ns(at),
        operation="chat",
    )
    base.update(fields)
    return SpanUsage(**base)


@pytest.fixture
def config() -> BudgetConfig:
    return parse_budget_yaml(CONFIG_YAML)


def by_slot(deltas: list[UsageDelta]) -> dict[tuple[str, str], UsageDelta]:
    slots = {(d.budget, d.key): d for d in deltas}
    assert len(slots) == len(deltas), "one delta per (budget, key) in a single window"
    return slots


def batch() -> list[SpanUsage]:
    return [
        span(1, T0, tenant="acme", feature="summarize", user="u1", session="s1", request_model="gpt-4.1",
             input_tokens=1000, output_tokens=200, cost_usd=0.5, tool_calls=2),
        span(2, T0 + timedelta(minutes=5), tenant="acme", feature="summarize", user="u1", session="s1",
             request_model="gpt-4.1-mini", input_tokens=3000, output_tokens=100, cost_usd=0.25),
        span(3, T0 + timedelta(minutes=10), tenant="acme", feature="translate", user="u2",
             request_model="gpt-4.1-mini", input_tokens=500, output_tokens=50, cost_usd=0.125),
        span(4, T0 + timedelta(minutes=15), tenant="globex", feature="summarize", user="u3", session="s2",
             request_model="o3", input_tokens=2000, output_tokens=1000, cost_usd=1.0),
        # A tool execution: counts for tool_calls, not for cost, tokens or calls.
        span(5, T0 + timedelta(minutes=20), operation="execute_tool", tool_name="search",
             tenant="acme", feature="summarize", user="u1", session="s1"),
    ]  # fmt: skip


@pytest.mark.usefixtures("sums_impl")
def test_sums_per_budget_key_and_window(config: BudgetConfig) -> None:
    deltas = by_slot(usage_deltas(batch(), config, PriceBook()))
    assert deltas[("tenant-cost", "acme")].amount == pytest.approx(0.875)
    assert deltas[("tenant-cost", "acme")].spans == 3
    assert deltas[("tenant-cost", "globex")].amount == pytest.approx(1.0)

    assert deltas[("feature-tokens", "acme/summarize")].amount == 1200 + 3100
    assert deltas[("feature-tokens", "acme/translate")].amount == 550
    assert deltas[("feature-tokens", "globex/summarize")].amount == 3000

    assert deltas[("user-input", "u1")].amount == 4000
    assert deltas[("user-input", "u2")].amount == 500
    assert deltas[("user-input", "u3")].amount == 2000

    # Session s1: 2 tool calls requested by the model in span 1, plus one execute_tool span.
    assert deltas[("session-tools", "s1")].amount == 3
    assert deltas[("session-tools", "s1")].spans == 2
    assert ("session-tools", "s2") not in deltas  # span 4 made no tool calls

    assert deltas[("acme-calls", "acme")].amount == 3
    assert ("acme-calls", "globex") not in deltas  # match: acme

    # model_class is filled from the configured classes: gpt-4.1 and o3 are premium.
    assert deltas[("premium-cost", "premium")].amount == pytest.approx(1.5)

    assert len(deltas) == 2 + 3 + 3 + 1 + 1 + 1


@pytest.mark.usefixtures("sums_impl")
def test_window_start_and_event_times(config: BudgetConfig) -> None:
    deltas = by_slot(usage_deltas(batch(), config, PriceBook()))
    cost = deltas[("tenant-cost", "acme")]
    assert cost.window_start_ns == ns(DAY)
    assert cost.first_event_ns == ns(T0)
    assert cost.last_event_ns == ns(T0 + timedelta(minutes=10))
    assert deltas[("user-input", "u1")].window_start_ns == 0  # a rolling hour: one state per key
    assert deltas[("user-input", "u1")].bucket_ns == 60 * 1_000_000_000
    assert deltas[("session-tools", "s1")].window_start_ns == 0
    assert cost.partition_key == "tenant-cost|acme"
    assert cost.state_key == f"tenant-cost|acme|{ns(DAY)}"
    assert UsageDelta.from_row(cost.to_row(), cost.source_partition, cost.source_offset) == cost


@pytest.mark.usefixtures("sums_impl")
def test_spans_in_different_windows_get_different_deltas(config: BudgetConfig) -> None:
    spans = [
        span(1, DAY + timedelta(hours=23, minutes=59), tenant="acme", cost_usd=1.0),
        span(2, DAY + timedelta(days=1, minutes=1), tenant="acme", cost_usd=2.0),
        span(3, DAY + timedelta(hours=10), tenant="acme", cost_usd=4.0),
    ]
    deltas = [d for d in usage_deltas(spans, config, PriceBook()) if d.budget == "tenant-cost"]
    amounts = {d.window_start_ns: d.amount for d in deltas}
    assert amounts == {ns(DAY): 5.0, ns(DAY + timedelta(days=1)): 2.0}
    today = next(d for d in deltas if d.window_start_ns == ns(DAY))
    # Events arrive out of order: first/last are the min/max, not arrival order.
    assert today.first_event_ns == ns(DAY + timedelta(hours=10))
    assert today.last_event_ns == ns(DAY + timedelta(hours=23, minutes=59))


@pytest.mark.usefixtures("sums_impl")
def test_event_time_falls_back_to_start(config: BudgetConfig) -> None:
    no_end = span(1, T0, tenant="acme", cost_usd=1.0, end_ns=0, start_ns=ns(DAY - timedelta(minutes=1)))
    (delta,) = [d for d in usage_deltas([no_end], config, PriceBook()) if d.budget == "tenant-cost"]
    assert delta.window_start_ns == ns(DAY - timedelta(days=1))


@pytest.mark.usefixtures("sums_impl")
def test_unpriced_spans_are_priced_by_the_stream(config: BudgetConfig) -> None:
    book = PriceBook()
    unpriced = span(1, T0, tenant="acme", provider="openai", request_model="gpt-4.1",
                    response_model="gpt-4.1-mini", input_tokens=10_000, output_tokens=2_000,
                    cache_read_tokens=4_000)  # fmt: skip
    stats = BatchStats()
    deltas = by_slot(usage_deltas([unpriced], config, book, stats))
    want = PriceBook().price("gpt-4.1-mini", "openai", input_tokens=10_000, output_tokens=2_000,
                             cache_read_tokens=4_000)  # fmt: skip
    assert want is not None and want > 0
    # Priced at the billed (response) model, with its cache tokens.
    assert deltas[("tenant-cost", "acme")].amount == pytest.approx(want, rel=1e-12)
    assert unpriced.cost_usd == pytest.approx(want, rel=1e-12)
    assert unpriced.model_class == "standard"
    assert (stats.spans, stats.unpriced) == (1, 0)


@pytest.mark.usefixtures("sums_impl")
def test_a_price_on_the_span_is_kept(config: BudgetConfig) -> None:
    priced = span(1, T0, tenant="acme", request_model="gpt-4.1", input_tokens=10_000, cost_usd=123.0)
    deltas = by_slot(usage_deltas([priced], config, PriceBook()))
    assert deltas[("tenant-cost", "acme")].amount == 123.0


@pytest.mark.usefixtures("sums_impl")
def test_unknown_models_are_counted_unpriced(config: BudgetConfig) -> None:
    spans = [
        span(1, T0, tenant="acme", provider="acme-ai", request_model="acme-llm-9000", input_tokens=100),
        span(2, T0, tenant="acme", provider="acme-ai", request_model="acme-llm-9000", input_tokens=300),
        span(3, T0, tenant="acme", provider="openai", request_model="gpt-4.1", input_tokens=1000),
        span(4, T0, operation="execute_tool", tenant="acme", session="s9"),  # not a model call
    ]
    stats = BatchStats()
    deltas = by_slot(usage_deltas(spans, config, PriceBook(), stats))
    assert (stats.spans, stats.unpriced) == (4, 2)
    assert spans[0].cost_usd is None
    # Never guessed: the unknown model adds nothing to cost, but its tokens and calls still count.
    want = PriceBook().price("gpt-4.1", "openai", input_tokens=1000)
    assert deltas[("tenant-cost", "acme")].amount == pytest.approx(want, rel=1e-12)
    assert deltas[("acme-calls", "acme")].amount == 3
    assert spans[0].model_class == ""


@pytest.mark.usefixtures("sums_impl")
def test_spans_missing_a_scope_dimension_do_not_count(config: BudgetConfig) -> None:
    spans = [
        span(
            1, T0, feature="summarize", user="u1", cost_usd=5.0, input_tokens=100, output_tokens=10
        ),  # no tenant
        span(2, T0, tenant="acme", cost_usd=1.0, input_tokens=7, output_tokens=3),  # no feature, no user
    ]
    deltas = by_slot(usage_deltas(spans, config, PriceBook()))
    assert deltas[("tenant-cost", "acme")].amount == 1.0
    assert deltas[("tenant-cost", "acme")].spans == 1
    assert not any(budget == "feature-tokens" for budget, _ in deltas)
    assert deltas[("user-input", "u1")].amount == 100
    assert set(deltas) == {("tenant-cost", "acme"), ("user-input", "u1"), ("acme-calls", "acme")}


@pytest.mark.usefixtures("sums_impl")
def test_non_model_spans_do_not_count_for_cost_or_calls(config: BudgetConfig) -> None:
    spans = [
        span(1, T0, operation="invoke_agent", tenant="acme", cost_usd=9.0, input_tokens=500),
        span(2, T0, operation="workflow", tenant="acme", cost_usd=9.0),
    ]
    stats = BatchStats()
    assert usage_deltas(spans, config, PriceBook(), stats) == []
    assert (stats.spans, stats.unpriced) == (2, 0)


@pytest.mark.usefixtures("sums_impl")
def test_empty_batch(config: BudgetConfig) -> None:
    stats = BatchStats()
    assert usage_deltas([], config, PriceBook(), stats) == []
    assert stats == BatchStats()


@pytest.mark.usefixtures("sums_impl")
def test_late_spans_count_in_their_window_within_the_allowed_lateness(config: BudgetConfig) -> None:
    now = DAY + timedelta(days=1, minutes=30)  # 00:30 the next day
    late = [span(1, DAY + timedelta(hours=23, minutes=50), tenant="acme", cost_usd=2.0)]
    stats = BatchStats()
    # Allowed lateness one hour: yesterday's window closed 30 minutes ago, the span still counts there.
    deltas = usage_deltas(late, config, PriceBook(), stats, closed_before_ns=ns(now - timedelta(hours=1)))
    cost = next(d for d in deltas if d.budget == "tenant-cost")
    assert (cost.window_start_ns, cost.amount, stats.too_late) == (ns(DAY), 2.0, 0)
    # Allowed lateness ten minutes: the window is closed; counted as too late, not in any window.
    stats = BatchStats()
    deltas = usage_deltas(late, config, PriceBook(), stats, closed_before_ns=ns(now - timedelta(minutes=10)))
    assert not [d for d in deltas if d.budget == "tenant-cost"]
    assert stats.too_late >= 1


ATTRIBUTION = dict(
    tenant="acme", user="u1", workflow="triage", feature="chat", session="s1", service="support-bot"
)


@pytest.mark.parametrize(
    ("scope", "key"),
    [
        ("tenant", "acme"),
        ("user", "u1"),
        ("workflow", "triage"),
        ("feature", "chat"),
        ("model_class", "premium"),
        ("session", "s1"),
        ("service", "support-bot"),
        ("tenant+feature", "acme/chat"),
        ("tenant+workflow", "acme/triage"),
        ("tenant+model_class", "acme/premium"),
    ],
)
@pytest.mark.parametrize(
    ("metric", "expected"),
    [("cost_usd", 0.75), ("tokens", 3300.0), ("input_tokens", 3000.0), ("tool_calls", 3.0), ("calls", 2.0)],
)
@pytest.mark.usefixtures("sums_impl")
def test_every_scope_and_metric(scope: str, key: str, metric: str, expected: float) -> None:
    yaml_text = f"""
model_classes:
  premium: [gpt-4.1]
budgets:
  - {{id: b, scope: "{scope}", window: day, metric: {metric}, limit: 1000000}}
"""
    config = parse_budget_yaml(yaml_text)
    spans = [
        span(1, T0, model_class="", response_model="gpt-4.1", input_tokens=1000, output_tokens=100,
             cost_usd=0.25, tool_calls=2, **ATTRIBUTION),
        span(2, T0, response_model="gpt-4.1", input_tokens=2000, output_tokens=200, cost_usd=0.5,
             **ATTRIBUTION),
        span(3, T0, operation="execute_tool", tool_name="search", **ATTRIBUTION),
        # A call of another key of this scope, which must not count under `key`:
        span(4, T0, response_model="gpt-4.1", input_tokens=5, cost_usd=9.0,
             **{**ATTRIBUTION, scope.split("+")[-1]: "other"}),
    ]  # fmt: skip
    if metric == "tool_calls" and "model_class" in scope:
        expected -= 1  # a tool execution has no model class: only the model's requested tool calls count
    deltas = {d.key: d for d in usage_deltas(spans, config, PriceBook())}
    assert deltas[key].amount == pytest.approx(expected)
    if metric != "tool_calls":  # the other key's call made no tool calls
        assert set(deltas) - {key}, "the other key's call was not accounted separately"


@pytest.mark.usefixtures("sums_impl")
def test_budgets_sharing_a_scope_or_window_stay_apart_and_deltas_follow_the_file_order() -> None:
    # The per-span loop works out each scope's key and each window's start once for all budgets.
    yaml_text = """
budgets:
  - {id: utc-day, scope: tenant, window: day, limit: 10}
  - {id: tools, scope: tenant, window: day, metric: tool_calls, limit: 10}
  - {id: tokyo-day, scope: tenant, window: day, timezone: Asia/Tokyo, limit: 10}
  - {id: acme-only, scope: tenant, match: "ac*", window: day, metric: calls, limit: 10}
  - {id: per-feature, scope: [tenant, feature], window: day, metric: tokens, limit: 10}
"""
    config = parse_budget_yaml(yaml_text)
    at = datetime(2025, 5, 14, 20, tzinfo=UTC)  # May 15 in Tokyo
    spans = [
        span(
            1, at, tenant="globex", feature="f", input_tokens=10, output_tokens=1, cost_usd=0.5, tool_calls=2
        ),
        span(2, at, tenant="acme", input_tokens=20, cost_usd=0.25),
    ]
    deltas = usage_deltas(spans, config, PriceBook())
    assert [(d.budget, d.key) for d in deltas] == [
        ("utc-day", "globex"),
        ("tools", "globex"),
        ("tokyo-day", "globex"),
        ("per-feature", "globex/f"),
        ("utc-day", "acme"),
        ("tokyo-day", "acme"),
        ("acme-only", "acme"),
    ]
    slots = {(d.budget, d.key): d for d in deltas}
    assert slots["utc-day", "globex"].window_start_ns == ns(datetime(2025, 5, 14, tzinfo=UTC))
    assert slots["tokyo-day", "globex"].window_start_ns == ns(datetime(2025, 5, 14, 15, tzinfo=UTC))
    assert (slots["tools", "globex"].amount, slots["tools", "globex"].mix) == (2.0, None)
    assert slots["utc-day", "globex"].mix == [1.0, 0.0, 0.0, 0.0]
    assert (slots["acme-only", "acme"].amount, slots["per-feature", "globex/f"].amount) == (1.0, 11.0)


def test_the_window_clock_agrees_with_the_window_across_zones_and_boundaries() -> None:
    rng = random.Random(7)
    windows = [Window(spec, zone) for spec in ("day", "week", "month") for zone in ZONES]
    # Instants around the DST changes of 2025 (US: Mar 9, Nov 2; EU: Mar 30, Oct 26), in order and shuffled.
    base = ns(datetime(2025, 3, 1, tzinfo=UTC))
    instants = sorted(base + rng.randrange(0, 250 * 86400) * NS + rng.randrange(NS) for _ in range(3000))
    late = instants[:]
    rng.shuffle(late)
    for window in windows:
        clock = WindowClock(window)
        for at in instants + late:
            assert clock.start_ns(at) == window.start_ns(at), (window, at)


def test_a_ring_keeps_the_newest_indices_like_a_dict_of_them() -> None:
    """The compact rolling state against the dict it replaced: same evictions, same contents."""
    rng = random.Random(11)
    for _ in range(500):
        size = rng.choice([3, 15, 61])
        ring, model = Ring(size), {}
        newest = base = rng.randrange(100, 10_000)
        for _ in range(rng.randrange(1, 40)):
            index = max(base + rng.randrange(-5, 3 * size), 0)
            amount = float(rng.randrange(0, 5))
            evicted = ring.add(index, amount)
            model[index] = model.get(index, 0.0) + amount
            newest = max(model)
            assert evicted == sum(model.pop(i) for i in [i for i in model if i <= newest - size])
            first = rng.randrange(newest - size - 3, newest + 2)
            assert ring.items(first) == sorted((i, a) for i, a in model.items() if i >= first and a)
            restored = Ring.from_state(size, ring.to_state())
            assert (restored.newest, restored.items(0)) == (ring.newest, ring.items(0))


def test_a_ring_that_restarts_evicts_what_it_held_and_a_new_one_nothing() -> None:
    """The first add to an empty ring (newest -1) or a jump past the ring evicts every slot's sum
    and leaves only the new amount; an empty ring's slots are skipped, not summed (its 0.0)."""
    fresh = Ring(15)
    assert fresh.add(1_000, 2.5) == 0.0
    assert fresh.items(0) == [(1_000, 2.5)]
    held = Ring(3, -1, array("d", [1.0, 2.0, -0.0]))
    assert held.add(7, 4.0) == 3.0
    assert held.items(0) == [(7, 4.0)] and held.amounts.tobytes() == array("d", [0.0, 4.0, 0.0]).tobytes()
    assert held.add(20, 1.0) == 4.0
    assert held.items(0) == [(20, 1.0)]


def test_window_totals_survive_the_changelog_and_read_the_older_dict_state() -> None:
    minute = 60 * NS
    totals = WindowTotals()
    assert totals.add(2, 40, 1.5, 3, 100 * minute, 101 * minute, minute)
    assert totals.add(2, 41, 2.0, 1, 170 * minute, 170 * minute, minute)  # the 101 bucket falls out
    assert not totals.add(2, 41, 2.0, 1, 170 * minute, 170 * minute, minute), "a replay counted twice"
    # The table holds the object; Faust's JSON codec writes it to the changelog through `__json__`.
    restored = WindowTotals.from_state(codecs.loads("json", codecs.dumps("json", totals)))
    assert restored.to_state() == totals.to_state()
    assert (restored.spent, restored.spans, restored.applied) == (2.0, 4, {"2": 41})
    # A state written by the version that kept rings as {index-as-string: amount} dicts:
    older = [
        3.5,
        4,
        100 * minute,
        170 * minute,
        {"2": 41},
        {"170": 2.0, "160": 1.5},
        {"120": 1.5, "170": 2.0},
    ]
    converted = WindowTotals.from_state(older)
    assert converted.rolling_buckets(170 * minute, 60 * minute, minute) == [(120, 1.5), (170, 2.0)]
    assert converted.rolling_buckets(185 * minute, 60 * minute, minute) == [(170, 2.0)]
    assert converted.recent_spend(160 * minute) == 3.5
    assert not converted.add(2, 41, 9.0, 1, 170 * minute, 170 * minute, minute)


@pytest.mark.usefixtures("sums_impl")
def test_batch_records_route_each_key_to_its_partition(tmp_path: Path, config: BudgetConfig) -> None:
    settings = StreamSettings(kafka=KafkaSettings(bootstrap="127.0.0.1:9"), data_dir=tmp_path, partitions=4)
    job = BudgetJob(settings, config)
    deltas = [UsageDelta("tenant-cost", f"t{n}", 0, 1.0, 1, 5, 5, 3, 77).to_row() for n in range(5000)]
    observations = [["long-context", "s1", [10, 20]]]
    records = [(p, batch.to_wire()) for p, batch in job._batch_records(deltas, observations, (3, 77))]
    partitioner = DefaultPartitioner()
    rows = 0
    for partition, record in records:
        assert (record["kind"], record["source_partition"], record["source_offset"]) == ("batch", 3, 77)
        assert len(record["deltas"]) <= BATCH_ROWS
        for row in record["deltas"]:
            expected = partitioner(f"{row[0]}|{row[1]}".encode(), [0, 1, 2, 3], [0, 1, 2, 3])
            assert partition == expected, "a key's batch went to another partition than its ticks would"
        rows += len(record["deltas"])
    assert rows == 5000 and len(records) > 4, "5000 deltas over 4 partitions need more than one record each"
    contexts = [(p, r["contexts"]) for p, r in records if r["contexts"]]
    assert contexts == [(usage_partition("long-context|s1", 4), observations)]


@pytest.fixture(params=["python", "native"])
def murmur2_impl(request: pytest.FixtureRequest) -> Callable[[bytes], int]:
    """Each murmur2: the reference (`partitioner._murmur2`) and the native module's."""
    if request.param == "python":
        return partitioner._murmur2
    required_native_decoder()  # fails under `make test` when the module is missing, else skips
    return partitioner.native_module().murmur2  # type: ignore[union-attr]


def test_the_fast_murmur2_is_kafkas(murmur2_impl: Callable[[bytes], int]) -> None:
    """Both implementations against aiokafka's byte-by-byte one: every tail length, the extreme
    bytes, keys as long as budget keys and snapshot keys get; and the one in use too."""
    rng = random.Random(3)
    keys = [bytes(rng.randrange(256) for _ in range(length)) for length in range(120) for _ in range(30)]
    keys += [b"\xff" * length for length in range(9)] + [b"\x00" * length for length in range(9)]
    keys.append("tenant-daily|acme/ünïcode-user@x".encode())
    for data in keys:
        assert murmur2_impl(data) == aiokafka_murmur2(data), data
        assert murmur2(data) == aiokafka_murmur2(data), data


def test_the_producers_partitioner_is_aiokafkas_default() -> None:
    """Keyed records land where aiokafka's own partitioner puts them (signals, dead letters), for
    any partition count; a record without a key goes to one of the available partitions."""
    rng = random.Random(5)
    for _ in range(2000):
        key = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 90)))
        partitions = list(range(rng.randrange(1, 13)))
        assert producer_partitioner(key, partitions, partitions) == DefaultPartitioner()(
            key, partitions, partitions
        )
    assert all(producer_partitioner(None, [0, 1, 2, 3], [1, 3]) in (1, 3) for _ in range(50))


# --- the call mix: routing and escalation visibility (docs/ARCHITECTURE.md §8) --------------------
def routed_batch() -> list[SpanUsage]:
    acme = {"tenant": "acme", "feature": "extract", "user": "u1"}
    at = [T0 + timedelta(minutes=m) for m in range(6)]
    return [
        span(11, at[0], request_model="gpt-4.1", cost_usd=0.01, **acme),
        span(12, at[1], request_model="gpt-4.1-nano", cost_usd=0.001, routed_from="gpt-4.1", fallback=True,
             **acme),
        span(13, at[2], request_model="gpt-4.1-mini", cost_usd=0.004, downgraded_from="gpt-4.1", **acme),
        span(14, at[3], request_model="gpt-4.1-mini", cost_usd=0.004, escalated_from="gpt-4.1-nano", **acme),
        span(15, at[4], request_model="gpt-4.1", cost_usd=0.0, refused="budget", **acme),
        span(16, at[5], operation="execute_tool", tool_name="search", refused="step_cap", session="s1",
             **acme),
    ]  # fmt: skip


@pytest.mark.usefixtures("sums_impl")
def test_the_call_mix_counts_fallbacks_escalation_cost_and_refusals(config: BudgetConfig) -> None:
    slots = by_slot(usage_deltas(routed_batch(), config, PriceBook()))
    cost = slots[("tenant-cost", "acme")]
    assert cost.amount == pytest.approx(0.019)  # the refused call cost nothing
    assert cost.mix == pytest.approx([4, 2, 1, 0.004])  # calls, fell back, refused, escalation USD
    assert slots[("acme-calls", "acme")].amount == 4  # a refused call is no call
    assert ("session-tools", "s1") not in slots  # a refused tool never ran


@pytest.mark.usefixtures("sums_impl")
def test_the_call_mix_of_plain_and_refused_calls_only(config: BudgetConfig) -> None:
    # Plain calls are not added one by one: a delta's calls are its spans less the refused ones.
    acme = {"tenant": "acme", "request_model": "gpt-4.1", "cost_usd": 0.01}
    plain = [span(n, T0 + timedelta(minutes=n), **acme) for n in range(3)]
    refused = [span(n, T0 + timedelta(minutes=n), **{**acme, "refused": "budget"}) for n in range(3, 5)]
    late = span(9, T0 - timedelta(days=3), **acme)  # its window closed: not in the mix either
    closed = ns(T0 - timedelta(days=1))
    for batch, mix in [
        (plain, [3.0, 0.0, 0.0, 0.0]),
        (refused, [0.0, 0.0, 2.0, 0.0]),
        (plain + refused, [3.0, 0.0, 2.0, 0.0]),
    ]:
        slots = by_slot(usage_deltas([late, *batch], config, PriceBook(), closed_before_ns=closed))
        assert slots[("tenant-cost", "acme")].mix == mix


@pytest.mark.usefixtures("sums_impl")
def test_the_call_mix_survives_the_batch_row_and_the_changelog(config: BudgetConfig) -> None:
    (delta,) = [d for d in usage_deltas(routed_batch(), config, PriceBook()) if d.budget == "tenant-cost"]
    row = UsageDelta.from_row(delta.to_row(), 3, 7)
    assert row.mix == delta.mix
    totals = WindowTotals()
    assert totals.apply(row) and totals.apply(UsageDelta.from_row(delta.to_row(), 3, 8))
    restored = WindowTotals.from_state(codecs.loads("json", codecs.dumps("json", totals)))
    assert restored.mix == pytest.approx([8, 4, 2, 0.008])
    older = delta.to_row()[:8]  # a row written before the call mix existed
    assert UsageDelta.from_row(older).mix is None
    assert WindowTotals.from_state(totals.to_state()[:7]).mix is None


@pytest.mark.usefixtures("sums_impl")
def test_the_signal_reason_reports_the_call_mix(config: BudgetConfig) -> None:
    from burnguard.stream.policy import signal_for_window

    budget = config.budget("tenant-cost")
    assert budget is not None
    (delta,) = [d for d in usage_deltas(routed_batch(), config, PriceBook()) if d.budget == "tenant-cost"]
    totals = WindowTotals()
    totals.apply(delta)
    signal = signal_for_window(
        budget, "acme", delta.window_start_ns, totals, T0 + timedelta(hours=1), timedelta(minutes=2)
    )
    assert "4 calls, 50.0% fell back to cheaper models, escalations cost $0.0040, 1 refused" in signal.reason


# --- the grouped path against the per-span reference path ------------------------------------------
DIFFERENTIAL_YAML = """\
model_classes:
  premium:  [gpt-4.1, o3]
  standard: [gpt-4.1-mini]
unpriced: {charge_as: gpt-4.1}
budgets:
  - {id: tenant-cost, scope: tenant, window: day, metric: cost_usd, limit: 50}
  - {id: tenant-week, scope: tenant, window: week, timezone: Asia/Tokyo, limit: 50}
  - {id: feature-tokens, scope: [tenant, feature], window: day, metric: tokens, limit: 1000000}
  - {id: user-input, scope: user, window: 1h, metric: input_tokens, limit: 100000}
  - {id: session-tools, scope: session, window: session, metric: tool_calls, limit: 20}
  - {id: acme-calls, scope: tenant, match: "acme*", window: day, metric: calls, limit: 100}
  - {id: premium-cost, scope: model_class, match: premium, window: day, limit: 10}
  - {id: class-user, scope: [user, model_class], window: 15m, metric: calls, limit: 10}
"""


def random_spans(rng: random.Random, count: int) -> list[SpanUsage]:
    """Spans of a few sessions: calls (plain, refused, fallen back, escalated, unpriced), tools, others."""
    spans = []
    for n in range(count):
        at = T0 + timedelta(minutes=rng.choice([0, 1, 2, 59, 61, 60 * 15, 60 * 24 * 3]), seconds=rng.random())
        kind = rng.random()
        fields = dict(
            tenant=rng.choice(["acme", "acme-2", "globex", ""]),
            user=rng.choice(["u1", "u2", ""]),
            feature=rng.choice(["summarize", "translate"]),
            session=rng.choice(["s1", "s2", ""]),
            request_model=rng.choice(["gpt-4.1", "gpt-4.1-mini", "o3", "unknown-model"]),
            input_tokens=rng.randrange(5000),
            output_tokens=rng.randrange(500),
            tool_calls=rng.choice([0, 0, 2]),
            cost_usd=None if rng.random() < 0.2 else rng.random() / 7,
        )
        if kind < 0.2:
            fields.update(operation="execute_tool", tool_name="search")
        elif kind < 0.3:
            fields.update(refused="budget")
        elif kind < 0.4:
            fields.update(fallback=True, escalated_from=rng.choice(["", "gpt-4.1-mini"]))
        elif kind < 0.45:
            fields.update(operation="invoke_agent")
        spans.append(span(n, at, **fields))
    if rng.random() < 0.2:  # a span without an event time makes the first event time order-dependent
        spans[rng.randrange(count)].end_ns = spans[0].start_ns = 0
    return spans


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.usefixtures("sums_impl")
def test_the_grouped_path_sums_exactly_as_the_per_span_reference(seed: int) -> None:
    rng = random.Random(seed)
    config = parse_budget_yaml(DIFFERENTIAL_YAML)
    spans = random_spans(rng, rng.randrange(1, 120))
    closed_before = ns(T0 + timedelta(minutes=rng.choice([-10, 30, 60 * 24 * 2])))
    runs = []
    for per_span in (False, True):
        stats = BatchStats()
        batch = [SpanUsage(**{**vars_of(s), "extra": dict(s.extra)}) for s in spans]
        deltas = usage_deltas(
            batch, config, PriceBook(config.prices), stats, (3, 7), closed_before, per_span=per_span
        )
        runs.append(([(d.to_row(), d.source_partition, d.source_offset) for d in deltas], stats))
    assert runs[0] == runs[1]  # the same rows, in the same order, to the last bit of every float
    assert runs[0][0], "the batch counted somewhere"


def vars_of(usage: SpanUsage) -> dict:
    return {name: getattr(usage, name) for name in SpanUsage.__slots__}


def test_adding_to_a_window_is_adding_to_its_rings_one_by_one() -> None:
    """`WindowTotals.add` inlines `Ring.add` for a row in the ring's newest slot; against the rings
    themselves, rows in random order (same minute, later, earlier, far later) give the same state."""
    rng = random.Random(16)
    minute = 60 * 1_000_000_000
    bucket_ns = 2 * minute
    fast = WindowTotals()
    recent, buckets, spent = Ring(RECENT_MINUTES), Ring(ROLLING_BUCKETS + 1), 0.0
    at = 10_000 * minute
    for offset in range(3000):
        steps = [0, 0, 0, rng.randrange(minute), rng.randrange(3 * minute), -rng.randrange(30 * minute)]
        at += rng.choice(steps)
        if rng.random() < 0.01:
            at += rng.randrange(200 * minute)
        amount = rng.choice([0.0, 0.5, rng.random()])
        assert fast.add(0, offset, amount, 1, at, at, bucket_ns, None)
        spent += amount
        recent.add(at // minute, amount)
        spent -= buckets.add(at // bucket_ns, amount)
        assert fast.spent == spent
        assert (fast.recent.newest, fast.recent.amounts) == (recent.newest, recent.amounts)
        assert fast.buckets is not None
        assert (fast.buckets.newest, fast.buckets.amounts) == (buckets.newest, buckets.amounts)


@pytest.mark.parametrize("seed", range(4))
def test_adding_a_rows_steps_at_once_is_adding_each_step_as_its_own_row(seed: int) -> None:
    """`WindowTotals.add_steps` (stage 2's path for a row decided once) against `add` per step, as
    `Step.from_wire` reads each: steps in the same and later minutes and buckets, earlier ones, at
    or below the mark, with a plain mix, an own mix or an explicit null, in windows with and
    without rolling buckets and a mix: the same state, floats bit for bit."""
    rng = random.Random(seed)
    minute = 60 * NS
    for counts_calls, bucket_ns in ((True, 0), (False, 0), (True, 2 * minute), (False, 5 * minute)):
        stepwise, at_once = WindowTotals(), WindowTotals()
        at, offset = 10_000 * minute, 0
        for _ in range(300):
            steps = []
            for _ in range(rng.randrange(1, 8)):
                offset += rng.choice([1, 1, 1, 3, -2])  # some at or below the mark: skipped by both
                at += rng.choice([0, 0, 0, rng.randrange(minute), rng.randrange(4 * minute), -minute])
                first = at - rng.randrange(minute)
                step = [offset, rng.choice([0.0, 0.25, rng.random()]), rng.randrange(1, 4), first, at - first]
                if counts_calls and rng.random() < 0.2:
                    step.append(rng.choice([None, [rng.random(), 1.0, 0.0, rng.random()]]))
                steps.append(step)
            for step in steps:
                own = Step.from_wire(step, counts_calls)
                stepwise.add(2, *own[:5], bucket_ns, own.mix)
            at_once.add_steps(2, steps, bucket_ns, counts_calls)
            assert at_once.to_state() == stepwise.to_state()
        assert stepwise.spans > 300 and stepwise.applied["2"] > 300
        assert (stepwise.mix is not None) == counts_calls
