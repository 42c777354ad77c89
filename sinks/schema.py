"""ClickHouse tables of burnguard and the versioned migrations that create them.

Every statement here is frozen once released: a later change to a table is a
new `Migration` appended to `MIGRATIONS`, never an edit of an old one, so every
database walks the same path. Statements use `IF NOT EXISTS` so that a
migration interrupted after its DDL but before its version was recorded is
simply run again. Identifiers come only from this module; values (the span
TTL) are server-side query parameters.

Deduplication: Kafka delivers at least once and the sink commits offsets only
after ClickHouse has the rows, so a crash between insert and commit re-inserts
a batch. Both tables are ReplacingMergeTree keyed by the identity of a row, so
duplicates collapse on merge, and queries that need exact totals read with
`FINAL`. `genai_spans` sorts by (tenant, day, trace_id, span_id): tenant and
day lead because dashboards filter on them, and both are fixed properties of a
span, so a re-delivered span always lands on the same key and collapses.

Rollups (migration 2) keep the dashboards fast over months: materialized
views aggregate every inserted block into per-minute usage by tenant,
workflow, feature, model class and model (`genai_usage_1m`), hourly spend
per user (`genai_user_spend_1h`), one row per trace (`genai_traces`, the
workflow runs), per session (`genai_sessions`) and per user action
(`genai_actions`, migration 4), and per-minute budget snapshots from the
signals (`budget_usage_1m`). Rows of a trace, session or action are per day
and per inserted block; queries merge them with GROUP BY.

The trade-off of those rollups, stated once: a materialized view sees each
INSERT, not the collapsed table, so a span that the sink re-delivers (a
crash between the insert and the offset commit, a rebalance) is added to
the sums of the rollups a second time, while `genai_spans FINAL` counts it
once. Distinct counts (of traces, sessions, actions), minima,
maxima and argMin/argMax states (first/last input tokens of a session,
budget snapshots) are not affected. So: panels that answer "how much
exactly" over a short range, and the reconciliation of a budget, read the
base table with FINAL; trends and long ranges read the rollups, which are
exact unless a batch was re-delivered and are made exact again by
`rebuild_rollups` (`burnguard db rebuild-rollups`, run while no sink
writes), which recomputes them from `genai_spans FINAL`.

Retention: spans keep `span_ttl_days` (default 400), rollups
`rollup_ttl_days` (default 800: trends outlive raw spans), signals and
budget snapshots `signal_ttl_days` (default 400). `migrate` applies them
when it creates a table; `set_retention` changes them on existing tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clickhouse_connect.driver.client import Client

SPANS_TABLE = "genai_spans"
SIGNALS_TABLE = "budget_signals"
MIGRATIONS_TABLE = "schema_migrations"
USAGE_1M_TABLE = "genai_usage_1m"
USER_SPEND_1H_TABLE = "genai_user_spend_1h"
TRACES_TABLE = "genai_traces"
SESSIONS_TABLE = "genai_sessions"
BUDGET_USAGE_1M_TABLE = "budget_usage_1m"
ACTIONS_TABLE = "genai_actions"
#: Rollup table -> the materialized view that feeds it.
ROLLUPS: dict[str, str] = {
    USAGE_1M_TABLE: "genai_usage_1m_mv",
    USER_SPEND_1H_TABLE: "genai_user_spend_1h_mv",
    TRACES_TABLE: "genai_traces_mv",
    SESSIONS_TABLE: "genai_sessions_mv",
    BUDGET_USAGE_1M_TABLE: "budget_usage_1m_mv",
    ACTIONS_TABLE: "genai_actions_mv",
}
DEFAULT_SPAN_TTL_DAYS = 400
DEFAULT_ROLLUP_TTL_DAYS = 800
DEFAULT_SIGNAL_TTL_DAYS = 400

_MIGRATIONS_DDL = f"""
CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE}
(
    version UInt32,
    name String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(applied_at)
ORDER BY version
"""

_SPANS_V1 = f"""
CREATE TABLE IF NOT EXISTS {SPANS_TABLE}
(
    trace_id String,
    span_id String,
    parent_span_id String,
    name String,
    start_time DateTime64(9, 'UTC'),
    end_time DateTime64(9, 'UTC'),
    operation LowCardinality(String),
    provider LowCardinality(String),
    request_model LowCardinality(String),
    response_model LowCardinality(String),
    service LowCardinality(String),
    tenant LowCardinality(String),
    user String,
    workflow LowCardinality(String),
    feature LowCardinality(String),
    session String,
    action LowCardinality(String),
    input_tokens UInt64,
    output_tokens UInt64,
    cache_read_tokens UInt64,
    cache_creation_tokens UInt64,
    reasoning_tokens UInt64,
    tool_calls UInt64,
    tool_name LowCardinality(String),
    agent_name LowCardinality(String),
    conversation_id String,
    cost_usd Float64 COMMENT '0 when priced = 0',
    priced UInt8,
    model_class LowCardinality(String),
    downgraded_from LowCardinality(String),
    error_type LowCardinality(String),
    status_error UInt8,
    extra Map(String, String),
    kafka_topic LowCardinality(String),
    kafka_partition Int32 COMMENT '-1 when not read from Kafka',
    kafka_offset Int64 COMMENT '-1 when not read from Kafka',
    inserted_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toYYYYMM(start_time)
ORDER BY (tenant, toDate(start_time), trace_id, span_id)
TTL toDateTime(start_time) + toIntervalDay({{span_ttl_days:UInt32}})
"""

_SIGNALS_V1 = f"""
CREATE TABLE IF NOT EXISTS {SIGNALS_TABLE}
(
    kafka_key String,
    v UInt8,
    scope LowCardinality(String),
    key String,
    budget LowCardinality(String),
    action LowCardinality(String),
    downgrade_to Nullable(String),
    metric LowCardinality(String),
    spent Float64,
    `limit` Float64,
    ratio Float64,
    window_start DateTime64(6, 'UTC'),
    window_end DateTime64(6, 'UTC'),
    burn_rate_per_hour Float64,
    projected_exhaustion Nullable(DateTime64(6, 'UTC')),
    issued_at DateTime64(6, 'UTC'),
    expires_at DateTime64(6, 'UTC'),
    reason String,
    kafka_topic LowCardinality(String),
    kafka_partition Int32,
    kafka_offset Int64,
    inserted_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toYYYYMM(issued_at)
ORDER BY (budget, scope, key, issued_at)
"""


# --- migration 2: rollups, budget snapshots, retention -----------------------------
# Literal copies of contracts.attributes (frozen with the migration): the model-call
# operations, and what makes a span failed.
# Source columns are qualified (`s.`) because the outputs reuse their names as aliases.
_MODEL_CALL = "s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')"
_TOOL = "s.operation = 'execute_tool'"
_FAILED = "(s.status_error = 1 OR s.error_type != '')"
_MODEL = "if(s.response_model != '', s.response_model, s.request_model)"

#: Per minute and tenant / workflow / feature / model class / model.
_USAGE_1M_COLUMNS = """
    spans SimpleAggregateFunction(sum, UInt64),
    model_calls SimpleAggregateFunction(sum, UInt64),
    tool_spans SimpleAggregateFunction(sum, UInt64) COMMENT 'execute_tool spans: tool calls made',
    requested_tool_calls SimpleAggregateFunction(sum, UInt64) COMMENT 'tool calls the models asked for',
    downgraded_calls SimpleAggregateFunction(sum, UInt64) COMMENT 'model calls with downgraded_from set',
    failed_spans SimpleAggregateFunction(sum, UInt64),
    unpriced_calls SimpleAggregateFunction(sum, UInt64),
    cost_usd SimpleAggregateFunction(sum, Float64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cache_read_tokens SimpleAggregateFunction(sum, UInt64),
    reasoning_tokens SimpleAggregateFunction(sum, UInt64),
    action_tokens SimpleAggregateFunction(sum, UInt64) COMMENT 'input+output tokens of spans with an action',
    session_tool_spans SimpleAggregateFunction(sum, UInt64) COMMENT 'tool_spans of spans with a session',
    actions AggregateFunction(uniq, Nullable(String)),
    sessions AggregateFunction(uniq, Nullable(String)),
    users AggregateFunction(uniq, Nullable(String))
"""
_USAGE_1M_V2 = f"""
CREATE TABLE IF NOT EXISTS {USAGE_1M_TABLE}
(
    minute DateTime('UTC'),
    tenant LowCardinality(String),
    workflow LowCardinality(String),
    feature LowCardinality(String),
    model_class LowCardinality(String),
    model LowCardinality(String),
{_USAGE_1M_COLUMNS}
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, tenant, workflow, feature, model_class, model)
TTL minute + toIntervalDay({{rollup_ttl_days:UInt32}})
"""
_USAGE_1M_SELECT = f"""
SELECT
    toStartOfMinute(s.start_time) AS minute,
    s.tenant AS tenant,
    s.workflow AS workflow,
    s.feature AS feature,
    s.model_class AS model_class,
    {_MODEL} AS model,
    count() AS spans,
    countIf({_MODEL_CALL}) AS model_calls,
    countIf({_TOOL}) AS tool_spans,
    sum(s.tool_calls) AS requested_tool_calls,
    countIf({_MODEL_CALL} AND s.downgraded_from != '') AS downgraded_calls,
    countIf({_FAILED}) AS failed_spans,
    countIf({_MODEL_CALL} AND s.priced = 0) AS unpriced_calls,
    sum(s.cost_usd) AS cost_usd,
    sum(s.input_tokens) AS input_tokens,
    sum(s.output_tokens) AS output_tokens,
    sum(s.cache_read_tokens) AS cache_read_tokens,
    sum(s.reasoning_tokens) AS reasoning_tokens,
    sumIf(s.input_tokens + s.output_tokens, s.action != '') AS action_tokens,
    countIf({_TOOL} AND s.session != '') AS session_tool_spans,
    uniqState(nullIf(s.action, '')) AS actions,
    uniqState(nullIf(s.session, '')) AS sessions,
    uniqState(nullIf(s.user, '')) AS users
FROM {SPANS_TABLE} AS s{{final}}
GROUP BY minute, tenant, workflow, feature, model_class, model
"""

#: Hourly spend per user (top spenders): users are too many for a per-minute rollup.
_USER_SPEND_1H_V2 = f"""
CREATE TABLE IF NOT EXISTS {USER_SPEND_1H_TABLE}
(
    hour DateTime('UTC'),
    tenant LowCardinality(String),
    user String,
    workflow LowCardinality(String),
    feature LowCardinality(String),
    model_class LowCardinality(String),
    model_calls SimpleAggregateFunction(sum, UInt64),
    cost_usd SimpleAggregateFunction(sum, Float64),
    tokens SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, tenant, user, workflow, feature, model_class)
TTL hour + toIntervalDay({{rollup_ttl_days:UInt32}})
"""
_USER_SPEND_1H_SELECT = f"""
SELECT
    toStartOfHour(s.start_time) AS hour,
    s.tenant AS tenant,
    s.user AS user,
    s.workflow AS workflow,
    s.feature AS feature,
    s.model_class AS model_class,
    countIf({_MODEL_CALL}) AS model_calls,
    sum(s.cost_usd) AS cost_usd,
    sum(s.input_tokens + s.output_tokens) AS tokens
FROM {SPANS_TABLE} AS s{{final}}
GROUP BY hour, tenant, user, workflow, feature, model_class
"""

#: One row per trace and day (rows of one trace are merged at query time with
#: GROUP BY trace_hash): a trace attributed to a workflow is a workflow run.
_TRACES_V2 = f"""
CREATE TABLE IF NOT EXISTS {TRACES_TABLE}
(
    day Date,
    trace_hash UInt64 COMMENT 'cityHash64(trace_id): a cheap GROUP BY key',
    trace_id SimpleAggregateFunction(any, String),
    start_time SimpleAggregateFunction(min, DateTime64(9, 'UTC')),
    end_time SimpleAggregateFunction(max, DateTime64(9, 'UTC')),
    tenant SimpleAggregateFunction(max, String),
    workflow SimpleAggregateFunction(max, String),
    feature SimpleAggregateFunction(max, String),
    session SimpleAggregateFunction(max, String),
    user SimpleAggregateFunction(max, String),
    spans SimpleAggregateFunction(sum, UInt64),
    model_calls SimpleAggregateFunction(sum, UInt64),
    tool_spans SimpleAggregateFunction(sum, UInt64),
    downgraded_calls SimpleAggregateFunction(sum, UInt64),
    model_cost_usd SimpleAggregateFunction(sum, Float64) COMMENT 'cost of the model calls',
    tokens SimpleAggregateFunction(sum, UInt64),
    workflow_root SimpleAggregateFunction(max, UInt8) COMMENT 'a span with operation workflow was seen',
    workflow_root_failed SimpleAggregateFunction(max, UInt8),
    root SimpleAggregateFunction(max, UInt8) COMMENT 'a span without parent was seen',
    root_failed SimpleAggregateFunction(max, UInt8),
    any_failed SimpleAggregateFunction(max, UInt8)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, trace_hash)
TTL day + toIntervalDay({{rollup_ttl_days:UInt32}})
"""
_TRACES_SELECT = f"""
SELECT
    toDate(s.start_time) AS day,
    cityHash64(s.trace_id) AS trace_hash,
    any(s.trace_id) AS trace_id,
    min(s.start_time) AS start_time,
    max(s.end_time) AS end_time,
    max(toString(s.tenant)) AS tenant,
    max(toString(s.workflow)) AS workflow,
    max(toString(s.feature)) AS feature,
    max(s.session) AS session,
    max(s.user) AS user,
    count() AS spans,
    countIf({_MODEL_CALL}) AS model_calls,
    countIf({_TOOL}) AS tool_spans,
    countIf({_MODEL_CALL} AND s.downgraded_from != '') AS downgraded_calls,
    sumIf(s.cost_usd, {_MODEL_CALL}) AS model_cost_usd,
    sumIf(s.input_tokens + s.output_tokens, {_MODEL_CALL}) AS tokens,
    max(s.operation = 'workflow') AS workflow_root,
    max(s.operation = 'workflow' AND {_FAILED}) AS workflow_root_failed,
    max(s.parent_span_id = '') AS root,
    max(s.parent_span_id = '' AND {_FAILED}) AS root_failed,
    max({_FAILED}) AS any_failed
FROM {SPANS_TABLE} AS s{{final}}
GROUP BY day, trace_hash
"""

#: One row per session and day; context growth from the first and last call's input.
_SESSIONS_V2 = f"""
CREATE TABLE IF NOT EXISTS {SESSIONS_TABLE}
(
    day Date,
    session String,
    tenant SimpleAggregateFunction(max, String),
    user SimpleAggregateFunction(max, String),
    workflow SimpleAggregateFunction(max, String),
    feature SimpleAggregateFunction(max, String),
    first_seen SimpleAggregateFunction(min, DateTime64(9, 'UTC')),
    last_seen SimpleAggregateFunction(max, DateTime64(9, 'UTC')),
    model_calls SimpleAggregateFunction(sum, UInt64),
    tool_spans SimpleAggregateFunction(sum, UInt64),
    requested_tool_calls SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cost_usd SimpleAggregateFunction(sum, Float64),
    max_input_tokens SimpleAggregateFunction(max, UInt64),
    first_input_tokens AggregateFunction(argMinIf, UInt64, DateTime64(9, 'UTC'), UInt8),
    last_input_tokens AggregateFunction(argMaxIf, UInt64, DateTime64(9, 'UTC'), UInt8)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, session)
TTL day + toIntervalDay({{rollup_ttl_days:UInt32}})
"""
_SESSIONS_SELECT = f"""
SELECT
    toDate(s.start_time) AS day,
    s.session AS session,
    max(toString(s.tenant)) AS tenant,
    max(s.user) AS user,
    max(toString(s.workflow)) AS workflow,
    max(toString(s.feature)) AS feature,
    min(s.start_time) AS first_seen,
    max(s.start_time) AS last_seen,
    countIf({_MODEL_CALL}) AS model_calls,
    countIf({_TOOL}) AS tool_spans,
    sum(s.tool_calls) AS requested_tool_calls,
    sum(s.input_tokens) AS input_tokens,
    sum(s.output_tokens) AS output_tokens,
    sum(s.cost_usd) AS cost_usd,
    maxIf(s.input_tokens, {_MODEL_CALL}) AS max_input_tokens,
    argMinIfState(s.input_tokens, s.start_time, toUInt8({_MODEL_CALL})) AS first_input_tokens,
    argMaxIfState(s.input_tokens, s.start_time, toUInt8({_MODEL_CALL})) AS last_input_tokens
FROM {SPANS_TABLE} AS s{{final}}
WHERE s.session != ''
GROUP BY day, session
"""

# Migration 3: the first calls of each session (start, input tokens), for context
# growth by call number without a window over the spans.
_SESSIONS_FIRST_CALLS_V3 = f"""
ALTER TABLE {SESSIONS_TABLE} ADD COLUMN IF NOT EXISTS first_calls
    AggregateFunction(groupArraySortedIf(30), Tuple(DateTime64(9, 'UTC'), UInt64), UInt8)
    COMMENT 'the first 30 model calls (start, input tokens)'
"""
_LAST_INPUT = f"    argMaxIfState(s.input_tokens, s.start_time, toUInt8({_MODEL_CALL})) AS last_input_tokens"
_FIRST_CALLS = (
    f"    groupArraySortedIfState(30)((s.start_time, s.input_tokens), toUInt8({_MODEL_CALL})) AS first_calls"
)
_SESSIONS_SELECT_V3 = _SESSIONS_SELECT.replace(_LAST_INPUT + "\n", _LAST_INPUT + ",\n" + _FIRST_CALLS + "\n")
assert _SESSIONS_SELECT_V3 != _SESSIONS_SELECT

#: Budget usage snapshots: the latest signal of each budget key per minute.
_BUDGET_USAGE_1M_V2 = f"""
CREATE TABLE IF NOT EXISTS {BUDGET_USAGE_1M_TABLE}
(
    minute DateTime('UTC'),
    budget LowCardinality(String),
    scope LowCardinality(String),
    key String,
    metric LowCardinality(String),
    spent AggregateFunction(argMax, Float64, DateTime64(6, 'UTC')),
    `limit` AggregateFunction(argMax, Float64, DateTime64(6, 'UTC')),
    ratio AggregateFunction(argMax, Float64, DateTime64(6, 'UTC')),
    action AggregateFunction(argMax, String, DateTime64(6, 'UTC')),
    window_start AggregateFunction(argMax, DateTime64(6, 'UTC'), DateTime64(6, 'UTC')),
    window_end AggregateFunction(argMax, DateTime64(6, 'UTC'), DateTime64(6, 'UTC')),
    burn_rate_per_hour AggregateFunction(argMax, Float64, DateTime64(6, 'UTC')),
    max_ratio SimpleAggregateFunction(max, Float64),
    signals SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (budget, scope, key, metric, minute)
TTL minute + toIntervalDay({{signal_ttl_days:UInt32}})
"""
_BUDGET_USAGE_1M_SELECT = f"""
SELECT
    toStartOfMinute(s.issued_at) AS minute,
    s.budget AS budget,
    s.scope AS scope,
    s.key AS key,
    s.metric AS metric,
    argMaxState(s.spent, s.issued_at) AS spent,
    argMaxState(s.`limit`, s.issued_at) AS `limit`,
    argMaxState(s.ratio, s.issued_at) AS ratio,
    argMaxState(toString(s.action), s.issued_at) AS action,
    argMaxState(s.window_start, s.issued_at) AS window_start,
    argMaxState(s.window_end, s.issued_at) AS window_end,
    argMaxState(s.burn_rate_per_hour, s.issued_at) AS burn_rate_per_hour,
    max(s.ratio) AS max_ratio,
    count() AS signals
FROM {SIGNALS_TABLE} AS s{{final}}
GROUP BY minute, budget, scope, key, metric
"""

# Migration 4: distinct actions and sessions are counted on their own rollups (a
# uniqExact over one UInt64 / String column) instead of merging `uniq` states of
# every per-minute row, which cost seconds over millions of rows; the per-minute
# rollup loses its three `uniq` columns (and gets cheaper to feed).
_ACTIONS_V4 = f"""
CREATE TABLE IF NOT EXISTS {ACTIONS_TABLE}
(
    day Date,
    action_hash UInt64 COMMENT 'cityHash64(action)',
    action SimpleAggregateFunction(any, String),
    tenant SimpleAggregateFunction(max, String),
    workflow SimpleAggregateFunction(max, String),
    feature SimpleAggregateFunction(max, String),
    session SimpleAggregateFunction(max, String),
    user SimpleAggregateFunction(max, String),
    first_seen SimpleAggregateFunction(min, DateTime64(9, 'UTC')),
    spans SimpleAggregateFunction(sum, UInt64),
    model_calls SimpleAggregateFunction(sum, UInt64),
    tool_spans SimpleAggregateFunction(sum, UInt64),
    tokens SimpleAggregateFunction(sum, UInt64) COMMENT 'input + output tokens',
    cost_usd SimpleAggregateFunction(sum, Float64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, action_hash)
TTL day + toIntervalDay({{rollup_ttl_days:UInt32}})
"""
_ACTIONS_SELECT = f"""
SELECT
    toDate(s.start_time) AS day,
    cityHash64(s.action) AS action_hash,
    any(s.action) AS action,
    max(toString(s.tenant)) AS tenant,
    max(toString(s.workflow)) AS workflow,
    max(toString(s.feature)) AS feature,
    max(s.session) AS session,
    max(s.user) AS user,
    min(s.start_time) AS first_seen,
    count() AS spans,
    countIf({_MODEL_CALL}) AS model_calls,
    countIf({_TOOL}) AS tool_spans,
    sum(s.input_tokens + s.output_tokens) AS tokens,
    sum(s.cost_usd) AS cost_usd
FROM {SPANS_TABLE} AS s{{final}}
WHERE s.action != ''
GROUP BY day, action_hash
"""
_USAGE_1M_UNIQ = (
    "    uniqState(nullIf(s.action, '')) AS actions,\n"
    "    uniqState(nullIf(s.session, '')) AS sessions,\n"
    "    uniqState(nullIf(s.user, '')) AS users\n"
)
assert _USAGE_1M_UNIQ in _USAGE_1M_SELECT
_USAGE_1M_SELECT_V4 = _USAGE_1M_SELECT.replace(
    f"    countIf({_TOOL} AND s.session != '') AS session_tool_spans,\n" + _USAGE_1M_UNIQ,
    f"    countIf({_TOOL} AND s.session != '') AS session_tool_spans\n",
)
assert _USAGE_1M_SELECT_V4 != _USAGE_1M_SELECT
_USAGE_1M_V4 = (
    f"DROP VIEW IF EXISTS {ROLLUPS[USAGE_1M_TABLE]}",
    f"ALTER TABLE {USAGE_1M_TABLE} DROP COLUMN IF EXISTS actions, DROP COLUMN IF EXISTS sessions,"
    " DROP COLUMN IF EXISTS users",
    f"CREATE MATERIALIZED VIEW IF NOT EXISTS {ROLLUPS[USAGE_1M_TABLE]} TO {USAGE_1M_TABLE} AS "
    + _USAGE_1M_SELECT_V4.format(final=""),
)

# --- migration 5: routing, escalation, refusals ----------------------------------------
#: The span columns the routing decision writes (DESIGN.md §7), after `downgraded_from`.
_SPANS_ROUTING_V5 = (
    f"ALTER TABLE {SPANS_TABLE}"
    " ADD COLUMN IF NOT EXISTS routed_from LowCardinality(String) AFTER downgraded_from,"
    " ADD COLUMN IF NOT EXISTS route LowCardinality(String) AFTER routed_from,"
    " ADD COLUMN IF NOT EXISTS fallback UInt8 COMMENT 'ran on a cheaper class than requested' AFTER route,"
    " ADD COLUMN IF NOT EXISTS escalated_from LowCardinality(String) AFTER fallback,"
    " ADD COLUMN IF NOT EXISTS refused LowCardinality(String) COMMENT 'budget, step_cap or context; the call"
    " was never made' AFTER escalated_from,"
    " ADD COLUMN IF NOT EXISTS stakes LowCardinality(String) AFTER refused"
)
#: A refused call is recorded but reached no model (and a refused tool never ran): no rollup
#: counts it as a call any more.
_MODEL_CALL_V5 = f"({_MODEL_CALL} AND s.refused = '')"
_TOOL_V5 = f"({_TOOL} AND s.refused = '')"


def _counting_only_calls_made(select: str) -> str:
    """`select` with model calls and tool spans that exclude refused ones."""
    changed = select.replace(_MODEL_CALL, _MODEL_CALL_V5).replace(_TOOL, _TOOL_V5)
    assert changed != select or (_MODEL_CALL not in select and _TOOL not in select)
    return changed


_USAGE_1M_ROUTING_COLUMNS_V5 = (
    f"ALTER TABLE {USAGE_1M_TABLE}"
    " ADD COLUMN IF NOT EXISTS fallback_calls SimpleAggregateFunction(sum, UInt64)"
    " COMMENT 'model calls on a cheaper class than requested (routed down or downgraded)',"
    " ADD COLUMN IF NOT EXISTS routed_calls SimpleAggregateFunction(sum, UInt64)"
    " COMMENT 'model calls whose model a routing rule changed',"
    " ADD COLUMN IF NOT EXISTS escalated_calls SimpleAggregateFunction(sum, UInt64)"
    " COMMENT 'second attempts made because the first answer failed its check',"
    " ADD COLUMN IF NOT EXISTS escalation_cost_usd SimpleAggregateFunction(sum, Float64),"
    " ADD COLUMN IF NOT EXISTS refused_calls SimpleAggregateFunction(sum, UInt64)"
    " COMMENT 'model calls refused before they were made'"
)
_USAGE_1M_LAST_V5 = f"    countIf({_TOOL_V5} AND s.session != '') AS session_tool_spans\n"
_USAGE_1M_ROUTING_V5 = (
    # Spans of other instrumentations carry only downgraded_from; a call routed up and then
    # downgraded back to the requested class carries routed_from too and is no fallback.
    f"    countIf({_MODEL_CALL_V5} AND (s.fallback = 1 OR (s.downgraded_from != '' AND s.routed_from = '')))"
    " AS fallback_calls,\n"
    f"    countIf({_MODEL_CALL_V5} AND s.routed_from != '') AS routed_calls,\n"
    f"    countIf({_MODEL_CALL_V5} AND s.escalated_from != '') AS escalated_calls,\n"
    "    sumIf(s.cost_usd, s.escalated_from != '') AS escalation_cost_usd,\n"
    f"    countIf({_MODEL_CALL} AND s.refused != '') AS refused_calls\n"
)
_USAGE_1M_SELECT_V5 = _counting_only_calls_made(_USAGE_1M_SELECT_V4).replace(
    _USAGE_1M_LAST_V5, _USAGE_1M_LAST_V5.rstrip("\n") + ",\n" + _USAGE_1M_ROUTING_V5
)
assert "refused_calls" in _USAGE_1M_SELECT_V5
_USER_SPEND_1H_SELECT_V5 = _counting_only_calls_made(_USER_SPEND_1H_SELECT)
_TRACES_SELECT_V5 = _counting_only_calls_made(_TRACES_SELECT)
_SESSIONS_SELECT_V5 = _counting_only_calls_made(_SESSIONS_SELECT_V3)
_ACTIONS_SELECT_V5 = _counting_only_calls_made(_ACTIONS_SELECT)

#: Rollup table -> the SELECT that computes it from its source (`{final}`: "" for the
#: materialized view, " FINAL" for a backfill or a rebuild).
ROLLUP_SELECTS: dict[str, str] = {
    USAGE_1M_TABLE: _USAGE_1M_SELECT_V5,
    USER_SPEND_1H_TABLE: _USER_SPEND_1H_SELECT_V5,
    TRACES_TABLE: _TRACES_SELECT_V5,
    SESSIONS_TABLE: _SESSIONS_SELECT_V5,
    BUDGET_USAGE_1M_TABLE: _BUDGET_USAGE_1M_SELECT,
    ACTIONS_TABLE: _ACTIONS_SELECT_V5,
}


def _rollup_statements(table: str, create: str, select: str) -> tuple[str, ...]:
    """Create the rollup, fill it from what the source already holds, then attach its view.

    Re-running after an interruption is safe: the table is emptied before the
    backfill. Run migrations while no sink writes (the sink migrates before it
    consumes), or rows inserted between backfill and view would be missed.
    """
    view = ROLLUPS[table]
    return (
        create,
        f"DROP VIEW IF EXISTS {view}",
        f"TRUNCATE TABLE IF EXISTS {table}",
        f"INSERT INTO {table} " + select.format(final=" FINAL"),
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {view} TO {table} AS " + select.format(final=""),
    )


_SIGNALS_TTL_V2 = (
    f"ALTER TABLE {SIGNALS_TABLE} MODIFY TTL"
    " toDateTime(issued_at) + toIntervalDay({signal_ttl_days:UInt32})"
)
#: Context-growth drill-down reads the spans of a few sessions: skip granules by session.
_SPANS_SESSION_INDEX_V2 = (
    f"ALTER TABLE {SPANS_TABLE} ADD INDEX IF NOT EXISTS idx_session session"
    " TYPE bloom_filter(0.01) GRANULARITY 1"
)


def _view_statements(table: str, select: str) -> tuple[str, ...]:
    """Re-attach a rollup's view with a new SELECT, keeping the rows it already holds.

    For a change that only affects rows yet to come (here: refused calls, which no
    older span can be), a backfill would only lose history: rollups outlive spans.
    """
    view = ROLLUPS[table]
    return (
        f"DROP VIEW IF EXISTS {view}",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {view} TO {table} AS " + select.format(final=""),
    )


_ROLLUPS_V5 = (
    _SPANS_ROUTING_V5,
    _USAGE_1M_ROUTING_COLUMNS_V5,
    *_view_statements(USAGE_1M_TABLE, _USAGE_1M_SELECT_V5),
    *_view_statements(USER_SPEND_1H_TABLE, _USER_SPEND_1H_SELECT_V5),
    *_view_statements(TRACES_TABLE, _TRACES_SELECT_V5),
    *_view_statements(SESSIONS_TABLE, _SESSIONS_SELECT_V5),
    *_view_statements(ACTIONS_TABLE, _ACTIONS_SELECT_V5),
)


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema version: statements run in order, then the version is recorded."""

    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "genai_spans and budget_signals", (_SPANS_V1, _SIGNALS_V1)),
    Migration(
        2,
        "rollups (usage per minute, user spend per hour, traces, sessions, budget snapshots), retention",
        (
            *_rollup_statements(USAGE_1M_TABLE, _USAGE_1M_V2, _USAGE_1M_SELECT),
            *_rollup_statements(USER_SPEND_1H_TABLE, _USER_SPEND_1H_V2, _USER_SPEND_1H_SELECT),
            *_rollup_statements(TRACES_TABLE, _TRACES_V2, _TRACES_SELECT),
            *_rollup_statements(SESSIONS_TABLE, _SESSIONS_V2, _SESSIONS_SELECT),
            *_rollup_statements(BUDGET_USAGE_1M_TABLE, _BUDGET_USAGE_1M_V2, _BUDGET_USAGE_1M_SELECT),
            _SIGNALS_TTL_V2,
            _SPANS_SESSION_INDEX_V2,
        ),
    ),
    Migration(
        3,
        "genai_sessions.first_calls (context growth by call number)",
        _rollup_statements(SESSIONS_TABLE, _SESSIONS_FIRST_CALLS_V3, _SESSIONS_SELECT_V3),
    ),
    Migration(
        4,
        "genai_actions rollup; genai_usage_1m without uniq states",
        (*_rollup_statements(ACTIONS_TABLE, _ACTIONS_V4, _ACTIONS_SELECT), *_USAGE_1M_V4),
    ),
    Migration(
        5,
        "routing columns on genai_spans; fallback, routed, escalated and refused calls per minute;"
        " refused calls no longer counted as calls in the rollups",
        _ROLLUPS_V5,
    ),
)


def applied_versions(client: Client) -> set[int]:
    """Versions recorded in `schema_migrations` (the table is created if missing)."""
    client.command(_MIGRATIONS_DDL)
    result = client.query(f"SELECT DISTINCT version FROM {MIGRATIONS_TABLE}")
    return {int(row[0]) for row in result.result_rows}


def migrate(
    client: Client,
    *,
    span_ttl_days: int = DEFAULT_SPAN_TTL_DAYS,
    rollup_ttl_days: int = DEFAULT_ROLLUP_TTL_DAYS,
    signal_ttl_days: int = DEFAULT_SIGNAL_TTL_DAYS,
) -> list[int]:
    """Apply the missing migrations in order; return the versions applied by this call.

    The TTLs (days) are used when a table is created; they do not alter the
    TTL of a table that already exists (see `set_retention` for that).
    """
    parameters = _retention_parameters(span_ttl_days, rollup_ttl_days, signal_ttl_days)
    done = applied_versions(client)
    applied = []
    for migration in sorted(MIGRATIONS, key=lambda m: m.version):
        if migration.version in done:
            continue
        for statement in migration.statements:
            client.command(statement, parameters=_used(parameters, statement))
        client.insert(
            MIGRATIONS_TABLE, [[migration.version, migration.name]], column_names=["version", "name"]
        )
        applied.append(migration.version)
    return applied


def _retention_parameters(span_ttl_days: int, rollup_ttl_days: int, signal_ttl_days: int) -> dict[str, Any]:
    days = {
        "span_ttl_days": span_ttl_days,
        "rollup_ttl_days": rollup_ttl_days,
        "signal_ttl_days": signal_ttl_days,
    }
    for name, value in days.items():
        if int(value) <= 0:
            raise ValueError(f"{name} must be positive")
    return {name: int(value) for name, value in days.items()}


#: Table -> its TTL expression with the parameter that sets the days.
_TTL_EXPRESSIONS: dict[str, str] = {
    SPANS_TABLE: "toDateTime(start_time) + toIntervalDay({span_ttl_days:UInt32})",
    SIGNALS_TABLE: "toDateTime(issued_at) + toIntervalDay({signal_ttl_days:UInt32})",
    USAGE_1M_TABLE: "minute + toIntervalDay({rollup_ttl_days:UInt32})",
    USER_SPEND_1H_TABLE: "hour + toIntervalDay({rollup_ttl_days:UInt32})",
    TRACES_TABLE: "day + toIntervalDay({rollup_ttl_days:UInt32})",
    SESSIONS_TABLE: "day + toIntervalDay({rollup_ttl_days:UInt32})",
    BUDGET_USAGE_1M_TABLE: "minute + toIntervalDay({signal_ttl_days:UInt32})",
    ACTIONS_TABLE: "day + toIntervalDay({rollup_ttl_days:UInt32})",
}


def set_retention(
    client: Client,
    *,
    span_ttl_days: int = DEFAULT_SPAN_TTL_DAYS,
    rollup_ttl_days: int = DEFAULT_ROLLUP_TTL_DAYS,
    signal_ttl_days: int = DEFAULT_SIGNAL_TTL_DAYS,
) -> None:
    """Change the TTL of every table (the schema must be migrated).

    Rows past the new TTL go at the next merge (`OPTIMIZE ... FINAL` or
    `ALTER TABLE ... MATERIALIZE TTL` to force it).
    """
    parameters = _retention_parameters(span_ttl_days, rollup_ttl_days, signal_ttl_days)
    for table, expression in _TTL_EXPRESSIONS.items():
        statement = f"ALTER TABLE {table} MODIFY TTL {expression}"
        client.command(statement, parameters=_used(parameters, statement))


def rebuild_rollups(client: Client, tables: tuple[str, ...] | None = None) -> dict[str, int]:
    """Recompute rollups from their source read with FINAL; return the rows each now holds.

    Makes the rollups exact again after the sink re-delivered a batch (see the
    module docstring). Run it while no sink writes: rows inserted during the
    rebuild would be counted twice or not at all.
    """
    counts = {}
    for table in tables or tuple(ROLLUPS):
        client.command(f"TRUNCATE TABLE {table}")
        client.command(f"INSERT INTO {table} " + ROLLUP_SELECTS[table].format(final=" FINAL"))
        counts[table] = int(client.command(f"SELECT count() FROM {table}"))
    return counts


def _used(parameters: dict[str, Any], statement: str) -> dict[str, Any] | None:
    """Only the parameters a statement names: servers may reject unknown ones."""
    used = {name: value for name, value in parameters.items() if "{" + name + ":" in statement}
    return used or None
