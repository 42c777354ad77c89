"""Unknown models are not free: the budget file's `unpriced:` rule charges them, a `warn` names them.

Real broker, worker and sink, with a fine-tune name genai-prices does not know.
"""

from __future__ import annotations

import time

import pytest
from burnguard.contracts.budgets import (
    DEFAULT_UNPRICED_INPUT_MTOK,
    DEFAULT_UNPRICED_OUTPUT_MTOK,
    BudgetFileError,
    parse_budget_yaml,
)
from burnguard.contracts.pricing import PriceBook, price_if_unpriced, resolve_rates
from burnguard.contracts.snapshots import BudgetUsage
from burnguard.contracts.usage import SpanUsage
from kafka import KafkaProducer

from burnguard.cli.devstack import wait_until_consumed
from tests.factories import budgets_yaml, span_usage, tenant_cost
from tests.fixtures.pipeline import Pipeline, read_to_end
from tests.support.otlp_batches import otlp_batch

FINE_TUNE = "ft:gpt-4.1-2025-04-14:acme:support:xyz"
BUDGETS = budgets_yaml(tenant_cost(100.0))


def call(model: str, input_tokens: int = 1000, output_tokens: int = 200) -> SpanUsage:
    return span_usage(request_model=model, input_tokens=input_tokens, output_tokens=output_tokens)


def test_the_default_charge_is_never_zero() -> None:
    assert resolve_rates(FINE_TUNE, "openai") is None, "pick a model genai-prices does not know"
    usage = call(FINE_TUNE)
    assert price_if_unpriced(usage, PriceBook.for_config(parse_budget_yaml("budgets: []")))
    expected = (1000 * DEFAULT_UNPRICED_INPUT_MTOK + 200 * DEFAULT_UNPRICED_OUTPUT_MTOK) / 1e6
    assert usage.cost_usd == pytest.approx(expected) and expected > 0


def test_charge_as_prices_like_the_named_model() -> None:
    config = parse_budget_yaml("unpriced: {charge_as: gpt-4.1}\nbudgets: []")
    usage, known = call(FINE_TUNE), call("gpt-4.1")
    book = PriceBook.for_config(config)
    assert price_if_unpriced(usage, book) and not price_if_unpriced(known, book)
    assert usage.cost_usd == known.cost_usd > 0
    assert usage.extra == {"burnguard.cost.charged_as": "gpt-4.1"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("unpriced:\n  charge_as: no-such-model-anywhere\n", "b.yaml:2: unpriced.charge_as: model"),
        ("unpriced: {}\n", "b.yaml:1: unpriced: "),
        ("unpriced:\n  input_mtok: -1\n", "b.yaml:2: unpriced.input_mtok: "),
        ("unpriced:\n  charge_as: gpt-4.1\n  input_mtok: 3\n", "b.yaml:1: unpriced: "),
        ("prices:\n  m:\n    output_mtok: .inf\n", "b.yaml:3: prices.m.output_mtok: "),
    ],
)
def test_a_bad_unpriced_setting_names_file_line_and_field(text: str, problem: str) -> None:
    with pytest.raises(BudgetFileError) as raised:
        parse_budget_yaml(text, "b.yaml")
    assert str(raised.value).startswith(problem), str(raised.value)


@pytest.mark.slow
def test_an_unknown_model_counts_against_the_budget_and_a_warn_names_it(pipeline: Pipeline) -> None:
    pipeline.write_budgets(BUDGETS + "unpriced: {input_mtok: 2.0, output_mtok: 8.0}\n")
    pipeline.start_worker()
    sink = pipeline.start_sink()
    producer = KafkaProducer(bootstrap_servers=pipeline.broker.bootstrap, acks="all")
    for _ in range(2):  # no cost on the spans: the worker prices them, as from a Collector
        producer.send(pipeline.topics.spans, value=otlp_batch("acme", [("chat", 1000, 500)], model=FINE_TUNE))
    producer.flush()
    producer.close()
    expected = 2 * (1000 * 2.0 + 500 * 8.0) / 1e6

    warn = pipeline.wait_for_signal(lambda s: s.scope == "model", "naming the model", 60)
    assert (warn.key, warn.action, warn.budget) == (FINE_TUNE, "warn", "unpriced")
    assert FINE_TUNE in warn.reason and "prices:" in warn.reason
    deadline, spent = time.monotonic() + 60, None
    while time.monotonic() < deadline and spent != pytest.approx(expected):
        records = read_to_end(pipeline.broker.bootstrap, pipeline.topics.budget_usage)
        spent = [BudgetUsage.from_json(r.value).spent for r in records][-1:] or [None]
        spent = spent[0]
    assert spent == pytest.approx(expected)

    topics = [pipeline.topics.spans]
    assert wait_until_consumed(pipeline.broker.bootstrap, pipeline.env["BURNGUARD_SINK_GROUP"], topics) == 0
    assert pipeline.stop(sink) == 0
    stored = pipeline.clickhouse_query(
        'client.query("SELECT toString(sum(cost_usd)), max(priced) FROM genai_spans FINAL").result_rows[0]'
    )
    assert float(stored[0]) == pytest.approx(expected) and stored[1] == 0  # charged, still marked unpriced
