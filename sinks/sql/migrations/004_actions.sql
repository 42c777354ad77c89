-- Migration 4: genai_actions rollup; genai_usage_1m without uniq states.
-- Frozen: this is what the migration ran when it shipped (tests/test_schema_sql.py holds its
-- fingerprint). Comments may change; a statement never does: a change is a new migration.
-- Distinct actions and sessions are counted on their own rollups (a uniqExact over one UInt64 /
-- String column) instead of merging `uniq` states of every per-minute row, which cost seconds
-- over millions of rows; the per-minute rollup loses its three `uniq` columns.

CREATE TABLE IF NOT EXISTS genai_actions
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
TTL day + toIntervalDay({rollup_ttl_days:UInt32});

DROP VIEW IF EXISTS genai_actions_mv;

TRUNCATE TABLE IF EXISTS genai_actions;

INSERT INTO genai_actions
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
    countIf(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AS model_calls,
    countIf(s.operation = 'execute_tool') AS tool_spans,
    sum(s.input_tokens + s.output_tokens) AS tokens,
    sum(s.cost_usd) AS cost_usd
FROM genai_spans AS s FINAL
WHERE s.action != ''
GROUP BY day, action_hash;

CREATE MATERIALIZED VIEW IF NOT EXISTS genai_actions_mv TO genai_actions AS
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
    countIf(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AS model_calls,
    countIf(s.operation = 'execute_tool') AS tool_spans,
    sum(s.input_tokens + s.output_tokens) AS tokens,
    sum(s.cost_usd) AS cost_usd
FROM genai_spans AS s
WHERE s.action != ''
GROUP BY day, action_hash;

-- genai_usage_1m keeps its rows: only the view changes.
DROP VIEW IF EXISTS genai_usage_1m_mv;

ALTER TABLE genai_usage_1m
    DROP COLUMN IF EXISTS actions,
    DROP COLUMN IF EXISTS sessions,
    DROP COLUMN IF EXISTS users;

CREATE MATERIALIZED VIEW IF NOT EXISTS genai_usage_1m_mv TO genai_usage_1m AS
SELECT
    toStartOfMinute(s.start_time) AS minute,
    s.tenant AS tenant,
    s.workflow AS workflow,
    s.feature AS feature,
    s.model_class AS model_class,
    if(s.response_model != '', s.response_model, s.request_model) AS model,
    count() AS spans,
    countIf(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AS model_calls,
    countIf(s.operation = 'execute_tool') AS tool_spans,
    sum(s.tool_calls) AS requested_tool_calls,
    countIf(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.downgraded_from != '') AS downgraded_calls,
    countIf((s.status_error = 1 OR s.error_type != '')) AS failed_spans,
    countIf(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.priced = 0) AS unpriced_calls,
    sum(s.cost_usd) AS cost_usd,
    sum(s.input_tokens) AS input_tokens,
    sum(s.output_tokens) AS output_tokens,
    sum(s.cache_read_tokens) AS cache_read_tokens,
    sum(s.reasoning_tokens) AS reasoning_tokens,
    sumIf(s.input_tokens + s.output_tokens, s.action != '') AS action_tokens,
    countIf(s.operation = 'execute_tool' AND s.session != '') AS session_tool_spans
FROM genai_spans AS s
GROUP BY minute, tenant, workflow, feature, model_class, model;
