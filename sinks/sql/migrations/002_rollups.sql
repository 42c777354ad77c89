-- Migration 2: rollups (usage per minute, user spend per hour, traces, sessions, budget
-- snapshots), retention.
-- Frozen: this is what the migration ran when it shipped (tests/test_schema_sql.py holds its
-- fingerprint). Comments may change; a statement never does: a change is a new migration.
-- Each rollup: create its table, drop its view, empty the table, fill it from the source read
-- with FINAL, then attach the view (re-running after an interruption is safe).
-- The predicates are literal copies of contracts.attributes, frozen with the migration: a model
-- call is operation IN ('chat', 'text_completion', 'embeddings', 'generate_content'), a tool span
-- is operation = 'execute_tool', a failed span has status_error = 1 OR error_type != ''.
-- Source columns are qualified (s.) because the outputs reuse their names as aliases.

-- Per minute and tenant / workflow / feature / model class / model.
CREATE TABLE IF NOT EXISTS genai_usage_1m
(
    minute DateTime('UTC'),
    tenant LowCardinality(String),
    workflow LowCardinality(String),
    feature LowCardinality(String),
    model_class LowCardinality(String),
    model LowCardinality(String),

    spans SimpleAggregateFunction(sum, UInt64),
    model_calls SimpleAggregateFunction(sum, UInt64),
    tool_spans SimpleAggregateFunction(sum, UInt64) COMMENT 'execute_tool spans: tool calls made',
    requested_tool_calls SimpleAggregateFunction(sum, UInt64) COMMENT 'tool calls the models asked for',
    downgraded_calls SimpleAggregateFunction(sum, UInt64)
        COMMENT 'model calls with downgraded_from set',
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

)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, tenant, workflow, feature, model_class, model)
TTL minute + toIntervalDay({rollup_ttl_days:UInt32});

DROP VIEW IF EXISTS genai_usage_1m_mv;

TRUNCATE TABLE IF EXISTS genai_usage_1m;

INSERT INTO genai_usage_1m
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
    countIf(s.operation = 'execute_tool' AND s.session != '') AS session_tool_spans,
    uniqState(nullIf(s.action, '')) AS actions,
    uniqState(nullIf(s.session, '')) AS sessions,
    uniqState(nullIf(s.user, '')) AS users
FROM genai_spans AS s FINAL
GROUP BY minute, tenant, workflow, feature, model_class, model;

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
    countIf(s.operation = 'execute_tool' AND s.session != '') AS session_tool_spans,
    uniqState(nullIf(s.action, '')) AS actions,
    uniqState(nullIf(s.session, '')) AS sessions,
    uniqState(nullIf(s.user, '')) AS users
FROM genai_spans AS s
GROUP BY minute, tenant, workflow, feature, model_class, model;

-- Hourly spend per user (top spenders): users are too many for a per-minute rollup.
CREATE TABLE IF NOT EXISTS genai_user_spend_1h
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
TTL hour + toIntervalDay({rollup_ttl_days:UInt32});

DROP VIEW IF EXISTS genai_user_spend_1h_mv;

TRUNCATE TABLE IF EXISTS genai_user_spend_1h;

INSERT INTO genai_user_spend_1h
SELECT
    toStartOfHour(s.start_time) AS hour,
    s.tenant AS tenant,
    s.user AS user,
    s.workflow AS workflow,
    s.feature AS feature,
    s.model_class AS model_class,
    countIf(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AS model_calls,
    sum(s.cost_usd) AS cost_usd,
    sum(s.input_tokens + s.output_tokens) AS tokens
FROM genai_spans AS s FINAL
GROUP BY hour, tenant, user, workflow, feature, model_class;

CREATE MATERIALIZED VIEW IF NOT EXISTS genai_user_spend_1h_mv TO genai_user_spend_1h AS
SELECT
    toStartOfHour(s.start_time) AS hour,
    s.tenant AS tenant,
    s.user AS user,
    s.workflow AS workflow,
    s.feature AS feature,
    s.model_class AS model_class,
    countIf(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AS model_calls,
    sum(s.cost_usd) AS cost_usd,
    sum(s.input_tokens + s.output_tokens) AS tokens
FROM genai_spans AS s
GROUP BY hour, tenant, user, workflow, feature, model_class;

-- One row per trace and day (rows of one trace are merged at query time with
-- GROUP BY trace_hash): a trace attributed to a workflow is a workflow run.
CREATE TABLE IF NOT EXISTS genai_traces
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
TTL day + toIntervalDay({rollup_ttl_days:UInt32});

DROP VIEW IF EXISTS genai_traces_mv;

TRUNCATE TABLE IF EXISTS genai_traces;

INSERT INTO genai_traces
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
    countIf(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AS model_calls,
    countIf(s.operation = 'execute_tool') AS tool_spans,
    countIf(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.downgraded_from != '') AS downgraded_calls,
    sumIf(s.cost_usd, s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AS model_cost_usd,
    sumIf(s.input_tokens + s.output_tokens, s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AS tokens,
    max(s.operation = 'workflow') AS workflow_root,
    max(s.operation = 'workflow' AND (s.status_error = 1 OR s.error_type != '')) AS workflow_root_failed,
    max(s.parent_span_id = '') AS root,
    max(s.parent_span_id = '' AND (s.status_error = 1 OR s.error_type != '')) AS root_failed,
    max((s.status_error = 1 OR s.error_type != '')) AS any_failed
FROM genai_spans AS s FINAL
GROUP BY day, trace_hash;

CREATE MATERIALIZED VIEW IF NOT EXISTS genai_traces_mv TO genai_traces AS
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
    countIf(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AS model_calls,
    countIf(s.operation = 'execute_tool') AS tool_spans,
    countIf(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.downgraded_from != '') AS downgraded_calls,
    sumIf(s.cost_usd, s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AS model_cost_usd,
    sumIf(s.input_tokens + s.output_tokens, s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AS tokens,
    max(s.operation = 'workflow') AS workflow_root,
    max(s.operation = 'workflow' AND (s.status_error = 1 OR s.error_type != '')) AS workflow_root_failed,
    max(s.parent_span_id = '') AS root,
    max(s.parent_span_id = '' AND (s.status_error = 1 OR s.error_type != '')) AS root_failed,
    max((s.status_error = 1 OR s.error_type != '')) AS any_failed
FROM genai_spans AS s
GROUP BY day, trace_hash;

-- One row per session and day; context growth from the first and last call's input.
CREATE TABLE IF NOT EXISTS genai_sessions
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
TTL day + toIntervalDay({rollup_ttl_days:UInt32});

DROP VIEW IF EXISTS genai_sessions_mv;

TRUNCATE TABLE IF EXISTS genai_sessions;

INSERT INTO genai_sessions
SELECT
    toDate(s.start_time) AS day,
    s.session AS session,
    max(toString(s.tenant)) AS tenant,
    max(s.user) AS user,
    max(toString(s.workflow)) AS workflow,
    max(toString(s.feature)) AS feature,
    min(s.start_time) AS first_seen,
    max(s.start_time) AS last_seen,
    countIf(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AS model_calls,
    countIf(s.operation = 'execute_tool') AS tool_spans,
    sum(s.tool_calls) AS requested_tool_calls,
    sum(s.input_tokens) AS input_tokens,
    sum(s.output_tokens) AS output_tokens,
    sum(s.cost_usd) AS cost_usd,
    maxIf(s.input_tokens, s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AS max_input_tokens,
    argMinIfState(s.input_tokens, s.start_time, toUInt8(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content'))) AS first_input_tokens,
    argMaxIfState(s.input_tokens, s.start_time, toUInt8(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content'))) AS last_input_tokens
FROM genai_spans AS s FINAL
WHERE s.session != ''
GROUP BY day, session;

CREATE MATERIALIZED VIEW IF NOT EXISTS genai_sessions_mv TO genai_sessions AS
SELECT
    toDate(s.start_time) AS day,
    s.session AS session,
    max(toString(s.tenant)) AS tenant,
    max(s.user) AS user,
    max(toString(s.workflow)) AS workflow,
    max(toString(s.feature)) AS feature,
    min(s.start_time) AS first_seen,
    max(s.start_time) AS last_seen,
    countIf(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AS model_calls,
    countIf(s.operation = 'execute_tool') AS tool_spans,
    sum(s.tool_calls) AS requested_tool_calls,
    sum(s.input_tokens) AS input_tokens,
    sum(s.output_tokens) AS output_tokens,
    sum(s.cost_usd) AS cost_usd,
    maxIf(s.input_tokens, s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AS max_input_tokens,
    argMinIfState(s.input_tokens, s.start_time, toUInt8(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content'))) AS first_input_tokens,
    argMaxIfState(s.input_tokens, s.start_time, toUInt8(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content'))) AS last_input_tokens
FROM genai_spans AS s
WHERE s.session != ''
GROUP BY day, session;

-- Budget usage snapshots: the latest signal of each budget key per minute.
CREATE TABLE IF NOT EXISTS budget_usage_1m
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
TTL minute + toIntervalDay({signal_ttl_days:UInt32});

DROP VIEW IF EXISTS budget_usage_1m_mv;

TRUNCATE TABLE IF EXISTS budget_usage_1m;

INSERT INTO budget_usage_1m
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
FROM budget_signals AS s FINAL
GROUP BY minute, budget, scope, key, metric;

CREATE MATERIALIZED VIEW IF NOT EXISTS budget_usage_1m_mv TO budget_usage_1m AS
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
FROM budget_signals AS s
GROUP BY minute, budget, scope, key, metric;

-- Signals keep signal_ttl_days (a query parameter) days.
ALTER TABLE budget_signals MODIFY TTL toDateTime(issued_at) + toIntervalDay({signal_ttl_days:UInt32});

-- Context-growth drill-down reads the spans of a few sessions: skip granules by session.
ALTER TABLE genai_spans ADD INDEX IF NOT EXISTS idx_session session TYPE bloom_filter(0.01) GRANULARITY 1;
