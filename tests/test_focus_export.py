"""`burnguard export focus`: a seeded month on the real chDB engine, exported as CSV and Parquet.

The export must pass the FinOps Foundation's validator (`focus-validator` 2.x,
run as its own command in its own Python >= 3.12 virtualenv, see
tests/fixtures/focus_validator.py) against FOCUS 1.4, and its cost sums must
equal ClickHouse's to the cent, per tenant and in total. Bad input (budget file, period, output
path) is one clear line and a non-zero exit, and leaves no file behind.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from burnguard.contracts.pricing import PriceBook
from burnguard.contracts.usage import SpanUsage
from burnguard.sinks.clickhouse import ClickHouseWriter, connect
from burnguard.sinks.focus import APPLICABILITY_CRITERIA, FOCUS_VERSION, Period, split_cost
from burnguard.sinks.schema import migrate
from typer.testing import CliRunner

from burnguard.cli import app
from tests.factories import span_usage
from tests.fixtures import focus_validator

runner = CliRunner()
OVERRIDES = {"my-finetune": {"input_mtok": 3.0, "output_mtok": 12.0}}
BUDGETS = "prices:\n  my-finetune: {input_mtok: 3, output_mtok: 12}\n"
_book = PriceBook(OVERRIDES)


def _call(at: datetime, model: str, provider: str, tenant: str, **tokens: int) -> SpanUsage:
    span = span_usage(
        at,
        duration_s=0.5,
        name=f"chat {model}",
        provider=provider,
        request_model=model,
        response_model=model,
        tenant=tenant,
        workflow=f"{tenant}-flow",
        feature="summarize",
        **tokens,
    )
    span.cost_usd = _book.price(
        model,
        provider,
        input_tokens=span.input_tokens,
        output_tokens=span.output_tokens,
        cache_read_tokens=span.cache_read_tokens,
        cache_creation_tokens=span.cache_creation_tokens,
    )
    return span


def seeded_spans() -> list[SpanUsage]:
    """November 2026 for three tenants, an unpriced model, a tool span, and spans just outside."""
    day = datetime(2026, 11, 2, 10, 0, tzinfo=UTC)
    acme = [
        _call(
            day, "gpt-4.1", "openai", "acme", input_tokens=12_000, output_tokens=800, cache_read_tokens=4_000
        ),
        _call(
            day + timedelta(minutes=30), "gpt-4.1", "openai", "acme", input_tokens=3_000, output_tokens=500
        ),
        _call(
            day + timedelta(hours=4),
            "o3",
            "openai",
            "acme",
            input_tokens=2_000,
            output_tokens=3_000,
            reasoning_tokens=2_200,
        ),
    ]
    globex = [
        _call(
            datetime(2026, 11, 15, 8, 5, tzinfo=UTC),
            "claude-sonnet-4-5",
            "anthropic",
            "globex",
            input_tokens=20_000,
            output_tokens=1_000,
            cache_read_tokens=6_000,
            cache_creation_tokens=9_000,
        )
    ]
    initech = [
        _call(datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC), "my-finetune", "openai", "initech", **t)
        for t in (
            {"input_tokens": 1_000_000, "output_tokens": 100_000},
            {"input_tokens": 10, "output_tokens": 1},
        )
    ]
    unpriced = _call(datetime(2026, 11, 3, tzinfo=UTC), "mystery-model", "acme-ai", "acme", input_tokens=500)
    tool = _call(datetime(2026, 11, 3, tzinfo=UTC), "", "", "acme")
    tool.operation, tool.name = "execute_tool", "execute_tool search"
    outside = [
        _call(
            datetime(2026, 10, 31, 23, 59, 59, tzinfo=UTC), "gpt-4.1", "openai", "acme", input_tokens=99_999
        ),
        _call(datetime(2026, 12, 1, tzinfo=UTC), "gpt-4.1", "openai", "acme", input_tokens=99_999),
    ]
    return [*acme, *globex, *initech, unpriced, tool, *outside]


@pytest.fixture(scope="module")
def dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    dsn = f"chdb://{tmp_path_factory.mktemp('focus') / 'clickhouse'}"
    spans = seeded_spans()
    assert all(s.cost_usd is not None for s in spans if s.model not in ("", "mystery-model"))
    client = connect(dsn)
    try:
        migrate(client)
        writer = ClickHouseWriter(client)
        writer.insert_spans(spans)
        writer.insert_spans(spans[:1])  # a re-delivered span: FINAL must count it once
    finally:
        client.close()
    return dsn


def _clickhouse(dsn: str, sql: str) -> list[tuple]:
    client = connect(dsn)
    try:
        return client.query(sql).result_rows
    finally:
        client.close()


def _export(dsn: str, out: Path, *extra: str) -> None:
    budgets = out.parent / "budgets.yaml"
    budgets.write_text(BUDGETS)
    args = ["export", "focus", "--period", "2026-11", "-o", str(out), "--dsn", dsn, "--budgets", str(budgets)]
    result = runner.invoke(app, [*args, *extra], terminal_width=300)
    assert result.exit_code == 0, result.output
    assert "FOCUS 1.4 rows" in result.output


def _validate(path: Path, tmp_path: Path) -> ET.Element:
    """The validator's JUnit report for `path` against FOCUS 1.4, with the criteria the export claims.

    No rule is overridden: the only change to the FOCUS rules is the spec's
    published 1.4 erratum that lets the validator load them (see the fixture).
    """
    return focus_validator.validate(
        path, tmp_path / f"{path.name}.xml", version=FOCUS_VERSION, criteria=APPLICABILITY_CRITERIA
    )


def _outcomes(report: ET.Element) -> dict[str, str]:
    """Rule id -> "passed", "failure", "error" or "skipped", from the report's test cases."""
    outcomes = {}
    for case in report.iter("testcase"):
        marks = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name", "").split(" ::")[0]] = marks[0] if marks else "passed"
    return outcomes


def _required_rules() -> set[str]:
    """Each FOCUS 1.4 "MUST include <Column>" rule that applies to this export, and that column's root rule.

    Read from the validator's own 1.4 rules: the mandatory columns, and the
    conditional ones whose applicability criteria the export claims.
    """
    rules = focus_validator.model_rules()["ModelRules"]
    required = set()
    for rule_id, rule in rules.items():
        match = re.match(r"CostAndUsage MUST include (\w+)\b", rule["ValidationCriteria"]["MustSatisfy"])
        criteria = set(rule.get("ApplicabilityCriteria") or [])
        if not match or rule["Status"] == "Removed" or not rule_id.startswith("CAU-CostAndUsage-D-"):
            continue
        if rule_id.endswith("-M") or (criteria and criteria <= set(APPLICABILITY_CRITERIA)):
            required.add(rule_id)
            required |= {
                root
                for root, column_rule in rules.items()
                if root.startswith(f"CAU-{match[1]}-C-000-") and column_rule["Status"] == "Active"
            }
    return required


def _read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _period_where() -> str:
    return "start_time >= '2026-11-01 00:00:00' AND start_time < '2026-12-01 00:00:00'"


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_export_passes_the_focus_1_4_validator(dsn: str, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"focus.{suffix}"
    _export(dsn, out)
    report = _validate(out, tmp_path)
    outcomes = _outcomes(report)
    assert [rule for rule, outcome in outcomes.items() if outcome in ("failure", "error")] == []
    assert report.get("failures") == "0" and report.get("errors") == "0"
    passed = {rule for rule, outcome in outcomes.items() if outcome == "passed"}
    required = _required_rules()
    assert len(required) > 60 and "CAU-CostAndUsage-D-040-M" in required  # MUST include ServiceCategory
    assert required - passed == set()  # every applicable column is there, and its rules pass
    assert len(passed) > 300


def test_the_validator_run_catches_a_broken_export(dsn: str, tmp_path: Path) -> None:
    """The check above can fail: the same export with a mandatory column dropped and a bad currency."""
    import csv

    out = tmp_path / "focus.csv"
    _export(dsn, out)
    rows = _read_csv(out)
    broken = tmp_path / "broken.csv"
    with broken.open("w", encoding="utf-8", newline="") as handle:
        columns = [c for c in rows[0] if c != "ChargeCategory"]
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**row, "BillingCurrency": "DOLLARS"} for row in rows)
    failed = {
        rule for rule, outcome in _outcomes(_validate(broken, tmp_path)).items() if outcome == "failure"
    }
    # MUST include ChargeCategory; BillingCurrency MUST conform to CurrencyFormat
    assert {"CAU-CostAndUsage-D-008-M", "CAU-BillingCurrency-C-003-M"} <= failed


def test_csv_and_parquet_cost_sums_equal_clickhouse_to_the_cent(dsn: str, tmp_path: Path) -> None:
    _export(dsn, tmp_path / "focus.csv")
    _export(dsn, tmp_path / "focus.parquet")
    expected = dict(
        _clickhouse(
            dsn, f"SELECT tenant, sum(cost_usd) FROM genai_spans FINAL WHERE {_period_where()} GROUP BY 1"
        )
    )
    tokens = dict(
        _clickhouse(
            dsn,
            "SELECT tenant, sum(input_tokens + output_tokens) FROM genai_spans FINAL "
            f"WHERE {_period_where()} GROUP BY 1",
        )
    )
    csv_rows = _read_csv(tmp_path / "focus.csv")
    parquet_rows = pq.read_table(tmp_path / "focus.parquet").to_pylist()
    for rows in (csv_rows, parquet_rows):
        for column in ("BilledCost", "EffectiveCost", "ContractedCost"):
            by_tenant: dict[str, float] = defaultdict(float)
            quantity: dict[str, float] = defaultdict(float)
            for row in rows:
                by_tenant[row["SubAccountId"]] += float(row[column])
                quantity[row["SubAccountId"]] += float(row["ConsumedQuantity"])
            assert {t: round(v, 2) for t, v in by_tenant.items()} == {
                t: round(v, 2) for t, v in expected.items()
            }
            assert round(sum(by_tenant.values()), 2) == round(sum(expected.values()), 2)
            assert quantity == {t: float(v) for t, v in tokens.items() if v}  # every token once, none lost
    # the seeded month is not trivial: November only (the $0.2 spans outside are not in it), re-delivery once
    assert round(sum(expected.values()), 2) == round(sum(s.cost_usd or 0 for s in seeded_spans()[:-2]), 2)


def test_rows_per_token_kind_with_list_and_contracted_prices(dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "focus.csv"
    _export(dsn, out, "--granularity", "hour")
    rows = _read_csv(out)
    acme_gpt = [r for r in rows if r["SkuId"].startswith("openai/gpt-4.1/")]
    assert {r["ChargePeriodStart"] for r in acme_gpt} == {"2026-11-02T10:00:00Z"}
    assert {r["SkuMeter"]: float(r["ConsumedQuantity"]) for r in acme_gpt} == {
        "Input Tokens": 11_000,  # 12,000 + 3,000 input, 4,000 of them cache reads
        "Cache Read Tokens": 4_000,
        "Output Tokens": 1_300,
    }
    o3 = {r["SkuMeter"]: float(r["ConsumedQuantity"]) for r in rows if r["SkuId"].startswith("openai/o3/")}
    assert o3 == {"Input Tokens": 2_000, "Output Tokens": 800, "Reasoning Tokens": 2_200}
    globex = {r["SkuMeter"]: r for r in rows if r["SubAccountId"] == "globex"}
    assert set(globex) == {"Input Tokens", "Cache Read Tokens", "Cache Write Tokens", "Output Tokens"}
    assert float(globex["Input Tokens"]["ConsumedQuantity"]) == 5_000
    finetune = {r["SkuMeter"]: r for r in rows if r["SkuId"].startswith("openai/my-finetune/")}
    # the override is the contracted price: $3 and $12 per million tokens; genai-prices has no list
    # price for it, so list = contracted
    assert float(finetune["Input Tokens"]["ContractedUnitPrice"]) == pytest.approx(3e-6)
    assert float(finetune["Output Tokens"]["ContractedUnitPrice"]) == pytest.approx(12e-6)
    assert float(finetune["Input Tokens"]["ListUnitPrice"]) == pytest.approx(3e-6)
    assert float(finetune["Input Tokens"]["BilledCost"]) == pytest.approx(1_000_010 * 3e-6)
    assert float(finetune["Output Tokens"]["BilledCost"]) == pytest.approx(100_001 * 12e-6)
    assert finetune["Input Tokens"]["ChargePeriodEnd"] == "2026-12-01T00:00:00Z"
    unpriced = [r for r in rows if "mystery-model" in r["SkuId"]]
    assert len(unpriced) == 1 and float(unpriced[0]["BilledCost"]) == 0.0
    assert float(unpriced[0]["ConsumedQuantity"]) == 500 and float(unpriced[0]["ListUnitPrice"]) == 0.0
    for row in rows:  # FOCUS: cost = unit price x PricingQuantity, list and contracted
        quantity = float(row["PricingQuantity"])
        assert float(row["ListCost"]) == pytest.approx(float(row["ListUnitPrice"]) * quantity)
        assert float(row["ContractedCost"]) == pytest.approx(float(row["ContractedUnitPrice"]) * quantity)
        assert row["PricingCurrencyEffectiveCost"] == row["EffectiveCost"] and row["PricingCurrency"] == "USD"
    # genai-prices' list rate for gpt-4.1 input ($2 per million tokens)
    gpt_input = next(r for r in acme_gpt if r["SkuMeter"] == "Input Tokens")
    assert float(gpt_input["ListUnitPrice"]) == pytest.approx(2e-6)
    assert json.loads(unpriced[0]["Tags"])["burnguard.unpriced"] == "1"
    assert json.loads(acme_gpt[0]["Tags"]) == {
        "burnguard.tenant": "acme",
        "burnguard.workflow": "acme-flow",
        "burnguard.feature": "summarize",
    }
    details = json.loads(acme_gpt[0]["SkuPriceDetails"])
    assert details["x_Model"] == "gpt-4.1" and details["x_TokenKind"] in ("input", "cache-read", "output")
    assert {r["ServiceCategory"] for r in rows} == {"AI and Machine Learning"}
    assert {r["ServiceSubcategory"] for r in rows} == {"Generative AI"}


def test_no_python_for_the_validator_is_a_clear_failure() -> None:
    with pytest.raises(focus_validator.ValidatorUnavailable, match=r"python3\.12.*\.pyenv/versions"):
        focus_validator.find_python(["/nonexistent/python3.12"])


def test_split_cost_keeps_every_cent() -> None:
    parts = split_cost(0.1, {"input": 3, "cache-read": 0, "output": 7}, {"input": 1.0, "output": 1.0})
    assert set(parts) == {"input", "output"} and sum(parts.values()) == 0.1
    assert split_cost(0.5, {"input": 0}, None) == {}


@pytest.mark.parametrize(
    ("period", "message"),
    [("2099-01", "is in the future"), ("2026-09", "no spans"), ("2026-13", "use a calendar month")],
)
def test_bad_period_is_one_clear_line_and_leaves_the_old_file(
    dsn: str, tmp_path: Path, period: str, message: str
) -> None:
    out = tmp_path / "focus.csv"
    out.write_text("previous export\n")
    result = runner.invoke(
        app, ["export", "focus", "--period", period, "-o", str(out), "--dsn", dsn], terminal_width=300
    )
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output
    assert out.read_text() == "previous export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["focus.csv"]  # no temporary file left


def test_unwritable_output_is_a_clear_error(dsn: str, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    for out in (blocker / "focus.csv", tmp_path / "missing" / "focus.csv"):
        result = runner.invoke(
            app, ["export", "focus", "--period", "2026-11", "-o", str(out), "--dsn", dsn], terminal_width=300
        )
        assert result.exit_code == 1 and "does not exist" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder"]


def test_invalid_budget_file_names_file_line_and_field(dsn: str, tmp_path: Path) -> None:
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("prices:\n  my-finetune: {input_mtok: cheap}\n")
    out = tmp_path / "focus.csv"
    result = runner.invoke(
        app,
        ["export", "focus", "--period", "2026-11", "-o", str(out), "--dsn", dsn, "--budgets", str(budgets)],
        terminal_width=300,
    )
    assert result.exit_code == 1 and f"{budgets}:2: prices.my-finetune.input_mtok" in result.output
    assert not out.exists()


def test_period_parsing() -> None:
    now = datetime(2026, 12, 1, 9, tzinfo=UTC)
    assert Period.parse("2026-12", now) == Period(
        datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
    )
