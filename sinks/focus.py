"""FOCUS export: the spend history in ClickHouse as FinOps Foundation FOCUS 1.4 rows, for chargeback.

`burnguard export focus --period 2026-11 -o FILE` writes one row per charge
period (day or hour), provider, model, attribution (tenant, workflow, feature,
service; in `Tags` and, for the tenant, `SubAccountId`) and token kind.

Token kinds are separate rows (one SKU each), not columns, because a FOCUS row
has one `ConsumedQuantity`/`ConsumedUnit` and one unit price, and the kinds are
priced differently: `input` (uncached prompt tokens), `cache-read`,
`cache-write`, `output` (completion tokens that are not reasoning) and
`reasoning` (the reasoning part of the completion, at the output rate). Each
token is in exactly one row, so the quantities add up to the tokens used.

Costs: `BilledCost` = `EffectiveCost` = `ContractedCost` is the recorded cost of
the spans (`cost_usd` in `genai_spans FINAL`, priced by the app or the stream
with the price book and the budget file's `prices:` overrides), split across
the kinds in proportion to tokens x contracted unit price; the last kind takes
the remainder so that each group's rows add up to the group's recorded cost.
`ContractedUnitPrice` is that cost over the quantity (the override's or the list
rate when the spans were priced at a flat rate, FOCUS: ContractedCost =
ContractedUnitPrice x PricingQuantity). `ListUnitPrice` is genai-prices'
(base-tier) rate and `ListCost` = quantity x list rate; a model genai-prices
does not know (a `prices:` override only) has list = contracted. Unpriced spans
(unknown model, no override) are exported at a unit price of 0, the rate they
were recorded and budgeted at, with the tag `burnguard.unpriced`, so their
tokens are not lost.

Columns are the mandatory and the applicable conditional columns of the FOCUS
1.4 Cost and Usage dataset (see `APPLICABILITY_CRITERIA`); conditional columns
of features burnguard does not have (commitments, contracts, capacity
reservations, regions, resources, invoices, split cost allocation) are present
and null. See README "FOCUS export" for how it is validated.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from burnguard.contracts.attributes import MODEL_CALL_OPERATIONS
from burnguard.contracts.pricing import ModelRates, PriceBook, resolve_rates
from clickhouse_connect.driver.client import Client

CURRENCY = "USD"
FOCUS_VERSION = "1.4"
#: FOCUS 1.4 applicability criteria that hold for this export; the conditional columns they
#: govern are filled. The others (commitments, contracts, capacity reservations, regions,
#: availability zones, provisioned resources, invoices, split cost allocation, virtual or
#: second currencies, several pricing categories or account types) are not burnguard features.
APPLICABILITY_CRITERIA = (
    "ACCOUNT_NAMING_SUPPORTED",  # BillingAccountName: the provider's display name
    "NEGOTIATED_PRICING_SUPPORTED",  # the budget file's `prices:` overrides are contracted rates
    "PUBLIC_PRICE_LIST_SUPPORTED",  # genai-prices' list rates
    "SUB_ACCOUNT_SUPPORTED",  # SubAccountId: the tenant
    "TAGGING_SUPPORTED",  # Tags: tenant, workflow, feature, service
    "UNIT_PRICING_SUPPORTED",  # a price per token (or per request)
    "USAGE_MEASUREMENT_SUPPORTED",  # ConsumedQuantity: tokens
)
GRANULARITIES = ("day", "hour")
TOKEN_KINDS = ("input", "cache-read", "cache-write", "output", "reasoning")
_METER = {
    "input": "Input Tokens",
    "cache-read": "Cache Read Tokens",
    "cache-write": "Cache Write Tokens",
    "output": "Output Tokens",
    "reasoning": "Reasoning Tokens",
    "calls": "Requests",
}
#: OpenTelemetry provider names -> display names of who sells the service.
_PROVIDER_NAMES = {
    "openai": "OpenAI",
    "anthropic": "Anthropic",
    "aws.bedrock": "AWS",
    "azure.ai.openai": "Microsoft",
    "azure.ai.inference": "Microsoft",
    "gcp.gemini": "Google",
    "gcp.vertex_ai": "Google",
    "gcp.gen_ai": "Google",
    "mistral_ai": "Mistral AI",
    "groq": "Groq",
    "deepseek": "DeepSeek",
    "x_ai": "xAI",
    "cohere": "Cohere",
    "perplexity": "Perplexity",
}

#: Every exported column, in order.
COLUMNS: tuple[str, ...] = (
    "AllocatedMethodDetails",
    "AllocatedMethodId",
    "AllocatedResourceId",
    "AllocatedResourceName",
    "AllocatedTags",
    "AvailabilityZone",
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingAccountType",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "CapacityReservationId",
    "CapacityReservationStatus",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "CommitmentDiscountCategory",
    "CommitmentDiscountId",
    "CommitmentDiscountName",
    "CommitmentDiscountQuantity",
    "CommitmentDiscountStatus",
    "CommitmentDiscountType",
    "CommitmentDiscountUnit",
    "CommitmentProgramEligibilityDetails",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractApplied",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "HostProviderName",
    "InvoiceDetailId",
    "InvoiceId",
    "InvoiceIssuerName",
    "ListCost",
    "ListUnitPrice",
    "PricingCategory",
    "PricingCurrency",
    "PricingCurrencyContractedUnitPrice",
    "PricingCurrencyEffectiveCost",
    "PricingCurrencyListUnitPrice",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "RegionId",
    "RegionName",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "ServiceCategory",
    "ServiceName",
    "ServiceProviderName",
    "ServiceSubcategory",
    "SkuId",
    "SkuMeter",
    "SkuPriceDetails",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
    "SubAccountType",
    "Tags",
)
DECIMAL_COLUMNS = frozenset(
    {
        "BilledCost",
        "ConsumedQuantity",
        "ContractedCost",
        "ContractedUnitPrice",
        "EffectiveCost",
        "ListCost",
        "ListUnitPrice",
        "PricingQuantity",
        "CommitmentDiscountQuantity",
        "PricingCurrencyContractedUnitPrice",
        "PricingCurrencyEffectiveCost",
        "PricingCurrencyListUnitPrice",
    }
)
DATETIME_COLUMNS = frozenset(
    {"BillingPeriodEnd", "BillingPeriodStart", "ChargePeriodEnd", "ChargePeriodStart"}
)


class ExportError(ValueError):
    """A period, granularity or output path the export cannot use; the message is for the user."""


@dataclass(frozen=True, slots=True)
class Period:
    """A billing period: a calendar month in UTC."""

    start: datetime
    end: datetime

    @classmethod
    def parse(cls, text: str, now: datetime | None = None) -> Period:
        """`YYYY-MM`; a month that has not started yet is an error (there is nothing to bill)."""
        try:
            start = datetime.strptime(text.strip(), "%Y-%m").replace(tzinfo=UTC)
        except ValueError:
            raise ExportError(f"period {text!r}: use a calendar month, YYYY-MM (e.g. 2026-11)") from None
        end = (start + timedelta(days=32)).replace(day=1)
        if start > (now or datetime.now(UTC)):
            raise ExportError(f"period {text}: is in the future")
        return cls(start, end)


@dataclass(frozen=True, slots=True)
class UsageGroup:
    """The spans of one charge period, provider, model and attribution, summed by ClickHouse."""

    charge_start: datetime
    provider: str
    model: str
    tenant: str
    workflow: str
    feature: str
    service: str
    calls: int
    cost_usd: float
    unpriced_calls: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_creation_tokens: int
    reasoning_tokens: int

    def quantities(self) -> dict[str, int]:
        """Tokens per kind; each token in exactly one kind (see the module doc)."""
        uncached = max(self.input_tokens - self.cache_read_tokens - self.cache_creation_tokens, 0)
        reasoning = min(self.reasoning_tokens, self.output_tokens)
        return {
            "input": uncached,
            "cache-read": self.cache_read_tokens,
            "cache-write": self.cache_creation_tokens,
            "output": self.output_tokens - reasoning,
            "reasoning": reasoning,
        }


_GROUPS_SQL = """
SELECT
    {bucket}(start_time) AS charge_start,
    provider,
    if(response_model != '', response_model, request_model) AS model,
    tenant, workflow, feature, service,
    countIf(operation IN {model_ops:Array(String)}) AS calls,
    sum(s.cost_usd) AS group_cost,
    countIf(priced = 0 AND operation IN {model_ops:Array(String)}) AS unpriced_calls,
    sum(input_tokens), sum(output_tokens), sum(cache_read_tokens),
    sum(cache_creation_tokens), sum(reasoning_tokens)
FROM genai_spans AS s FINAL
WHERE s.start_time >= {start:DateTime64(9, 'UTC')} AND s.start_time < {end:DateTime64(9, 'UTC')}
  AND (s.cost_usd > 0 OR s.input_tokens > 0 OR s.output_tokens > 0)
GROUP BY charge_start, provider, model, tenant, workflow, feature, service
ORDER BY charge_start, provider, model, tenant, workflow, feature, service
"""


def usage_groups(client: Client, period: Period, granularity: str) -> list[UsageGroup]:
    """Sum the period's spans (read with FINAL: exact under re-delivery) per charge period and group."""
    if granularity not in GRANULARITIES:
        raise ExportError(f"granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")
    bucket = "toStartOfDay" if granularity == "day" else "toStartOfHour"  # from this module only
    result = client.query(
        _GROUPS_SQL.replace("{bucket}", bucket),
        parameters={
            "model_ops": sorted(MODEL_CALL_OPERATIONS),
            "start": period.start,
            "end": period.end,
        },
    )
    return [UsageGroup(*_as_utc(row)) for row in result.result_rows]


def recorded_total(client: Client, period: Period) -> float:
    """ClickHouse's own total spend of the period, what the export must add up to."""
    result = client.query(
        "SELECT sum(cost_usd) FROM genai_spans FINAL "
        "WHERE start_time >= {start:DateTime64(9, 'UTC')} AND start_time < {end:DateTime64(9, 'UTC')}",
        parameters={"start": period.start, "end": period.end},
    )
    return float(result.result_rows[0][0] or 0.0)


def _as_utc(row: Iterable[Any]) -> list[Any]:
    values = list(row)
    start = values[0]
    if isinstance(start, datetime):
        values[0] = start.replace(tzinfo=UTC) if start.tzinfo is None else start.astimezone(UTC)
    else:  # toStartOfDay of a DateTime64 may come back as a date
        values[0] = datetime(start.year, start.month, start.day, tzinfo=UTC)
    return values


def _unit_rates(rates: ModelRates | None) -> dict[str, float] | None:
    """USD per token of each kind at the base tier; None for an unknown model."""
    if rates is None:
        return None
    return {
        "input": rates.input.base,
        "cache-read": (rates.cache_read or rates.input).base,
        "cache-write": (rates.cache_write or rates.input).base,
        "output": rates.output.base,
        "reasoning": rates.output.base,
    }


def split_cost(
    cost: float, quantities: Mapping[str, int], rates: Mapping[str, float] | None
) -> dict[str, float]:
    """Split a group's recorded cost over its token kinds by tokens x rate; the parts add up to `cost`.

    Without rates (or when every weight is 0) the split is by tokens. The last
    kind with tokens takes the remainder, so no rounding is lost.
    """
    kinds = [kind for kind, quantity in quantities.items() if quantity > 0]
    if not kinds:
        return {}
    weights = {kind: quantities[kind] * (rates[kind] if rates else 1.0) for kind in kinds}
    total = sum(weights.values())
    if total <= 0:
        weights = {kind: float(quantities[kind]) for kind in kinds}
        total = sum(weights.values())
    parts = {kind: cost * weights[kind] / total for kind in kinds[:-1]}
    parts[kinds[-1]] = cost - sum(parts.values())
    return parts


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FocusRows:
    """Turns usage groups into FOCUS rows with the price book's list and contracted rates."""

    def __init__(
        self, period: Period, granularity: str, overrides: Mapping[str, Mapping[str, float]]
    ) -> None:
        self.period = period
        self.step = timedelta(days=1) if granularity == "day" else timedelta(hours=1)
        self.contracted = PriceBook(overrides)
        self._list: dict[tuple[str, str], dict[str, float] | None] = {}

    def list_rates(self, model: str, provider: str) -> dict[str, float] | None:
        key = (provider, model)
        if key not in self._list:
            self._list[key] = _unit_rates(resolve_rates(model, provider) if model else None)
        return self._list[key]

    def rows(self, groups: Iterable[UsageGroup]) -> Iterable[dict[str, Any]]:
        for group in groups:
            yield from self.group_rows(group)

    def group_rows(self, group: UsageGroup) -> list[dict[str, Any]]:
        quantities = group.quantities()
        contracted = _unit_rates(self.contracted.rates(group.model, group.provider) if group.model else None)
        listed = self.list_rates(group.model, group.provider)
        costs = split_cost(group.cost_usd, quantities, contracted)
        if not costs and group.cost_usd > 0:  # priced without tokens: bill it per request
            quantities, costs = {"calls": max(group.calls, 1)}, {"calls": group.cost_usd}
            listed = None
        return [self._row(group, kind, quantities[kind], cost, listed) for kind, cost in costs.items()]

    def _row(
        self,
        group: UsageGroup,
        kind: str,
        quantity: int,
        cost: float,
        listed: Mapping[str, float] | None,
    ) -> dict[str, Any]:
        provider = _PROVIDER_NAMES.get(group.provider, group.provider or "unknown")
        account = group.provider or "unknown"
        unit = "Requests" if kind == "calls" else "Tokens"
        contracted_price = cost / quantity  # FOCUS: ContractedCost = ContractedUnitPrice x PricingQuantity
        list_price = listed[kind] if listed else contracted_price
        sku = f"{account}/{group.model or 'unknown'}/{kind}"
        tags = {"tenant": group.tenant, "workflow": group.workflow, "feature": group.feature}
        tags |= {"service": group.service}
        tags = {f"burnguard.{name}": value for name, value in tags.items() if value}
        if group.unpriced_calls:
            tags["burnguard.unpriced"] = str(group.unpriced_calls)
        return {
            **dict.fromkeys(COLUMNS),
            "BilledCost": cost,
            "BillingAccountId": account,
            "BillingAccountName": provider,
            "BillingAccountType": "API Account",
            "BillingCurrency": CURRENCY,
            "BillingPeriodStart": _iso(self.period.start),
            "BillingPeriodEnd": _iso(self.period.end),
            "ChargeCategory": "Usage",
            "ChargeDescription": f"{group.model or 'unknown model'} {_METER[kind].lower()}",
            "ChargeFrequency": "Usage-Based",
            "ChargePeriodStart": _iso(group.charge_start),
            "ChargePeriodEnd": _iso(min(group.charge_start + self.step, self.period.end)),
            "ConsumedQuantity": float(quantity),
            "ConsumedUnit": unit,
            "ContractedCost": cost,
            "ContractedUnitPrice": contracted_price,
            "EffectiveCost": cost,
            "HostProviderName": provider,
            "InvoiceIssuerName": provider,
            "ListCost": quantity * list_price,
            "ListUnitPrice": list_price,
            "PricingCategory": "Standard",
            # Prices are in the billing currency; FOCUS 1.4 allows these columns in that case too.
            "PricingCurrency": CURRENCY,
            "PricingCurrencyContractedUnitPrice": contracted_price,
            "PricingCurrencyEffectiveCost": cost,
            "PricingCurrencyListUnitPrice": list_price,
            "PricingQuantity": float(quantity),
            "PricingUnit": unit,
            "ProviderName": provider,
            "PublisherName": provider,
            "ServiceCategory": "AI and Machine Learning",
            "ServiceName": f"{provider} API",
            "ServiceProviderName": provider,
            "ServiceSubcategory": "Generative AI",
            "SkuId": sku,
            "SkuMeter": _METER[kind],
            "SkuPriceDetails": json.dumps({"x_Model": group.model, "x_TokenKind": kind}, sort_keys=True),
            "SkuPriceId": f"{sku}@{CURRENCY}",
            "SubAccountId": group.tenant or None,
            "SubAccountName": group.tenant or None,
            "SubAccountType": "Tenant" if group.tenant else None,
            "Tags": json.dumps(tags, sort_keys=True),
        }


def _arrow_table(rows: list[dict[str, Any]]):
    import pyarrow as pa

    def column_type(name: str) -> pa.DataType:
        if name in DECIMAL_COLUMNS:
            return pa.float64()
        if name in DATETIME_COLUMNS:
            return pa.timestamp("s", tz="UTC")
        return pa.string()

    schema = pa.schema([(name, column_type(name)) for name in COLUMNS])
    columns = {}
    for name in COLUMNS:
        values = [row[name] for row in rows]
        if name in DATETIME_COLUMNS:
            values = [datetime.fromisoformat(v.replace("Z", "+00:00")) for v in values]
        columns[name] = values
    return pa.table(columns, schema=schema)


def _write_csv(rows: list[dict[str, Any]], handle) -> None:
    writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({name: "" if value is None else _csv_value(value) for name, value in row.items()})


def _csv_value(value: Any) -> str:
    return repr(float(value)) if isinstance(value, float | int) else str(value)


def output_format(path: Path, requested: str | None = None) -> str:
    """`csv` or `parquet`: as requested, else from the file name."""
    fmt = requested or ("parquet" if path.suffix.lower() in (".parquet", ".pq") else "csv")
    if fmt not in ("csv", "parquet"):
        raise ExportError(f"format {fmt!r}: use csv or parquet")
    return fmt


def write_rows(rows: list[dict[str, Any]], path: Path, fmt: str) -> None:
    """Write to a temporary file next to `path`, then rename: a failed run leaves no half-written file."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise ExportError(f"{path}: folder {directory} does not exist")
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise ExportError(f"{path}: cannot write in {directory}: {exc.strerror}") from None
    tmp = Path(name)
    try:
        with open(fd, "w", encoding="utf-8", newline="") as handle:
            if fmt == "csv":
                _write_csv(rows, handle)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(_arrow_table(rows), tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise ExportError(f"{path}: cannot write: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def export_focus(
    client: Client,
    period: Period,
    path: Path,
    *,
    granularity: str = "day",
    overrides: Mapping[str, Mapping[str, float]] | None = None,
    fmt: str | None = None,
) -> tuple[int, float]:
    """Export the period to `path`; returns (rows, total BilledCost). No data is an error."""
    fmt = output_format(path, fmt)
    groups = usage_groups(client, period, granularity)
    if not groups:
        raise ExportError(f"period {period.start:%Y-%m}: no spans with usage or cost in ClickHouse")
    rows = list(FocusRows(period, granularity, overrides or {}).rows(groups))
    write_rows(rows, path, fmt)
    return len(rows), sum(row["BilledCost"] for row in rows)
