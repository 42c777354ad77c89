CREATE TABLE default.budget_signals
(
    `kafka_key` String,
    `v` UInt8,
    `scope` LowCardinality(String),
    `key` String,
    `budget` LowCardinality(String),
    `action` LowCardinality(String),
    `downgrade_to` Nullable(String),
    `metric` LowCardinality(String),
    `spent` Float64,
    `limit` Float64,
    `ratio` Float64,
    `window_start` DateTime64(6, 'UTC'),
    `window_end` DateTime64(6, 'UTC'),
    `burn_rate_per_hour` Float64,
    `projected_exhaustion` Nullable(DateTime64(6, 'UTC')),
    `issued_at` DateTime64(6, 'UTC'),
    `expires_at` DateTime64(6, 'UTC'),
    `reason` String,
    `kafka_topic` LowCardinality(String),
    `kafka_partition` Int32,
    `kafka_offset` Int64,
    `inserted_at` DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toYYYYMM(issued_at)
ORDER BY (budget, scope, key, issued_at)
TTL toDateTime(issued_at) + toIntervalDay(_CAST(400, 'UInt32'))
SETTINGS index_granularity = 8192;

CREATE TABLE default.budget_usage_1m
(
    `minute` DateTime('UTC'),
    `budget` LowCardinality(String),
    `scope` LowCardinality(String),
    `key` String,
    `metric` LowCardinality(String),
    `spent` AggregateFunction(argMax, Float64, DateTime64(6, 'UTC')),
    `limit` AggregateFunction(argMax, Float64, DateTime64(6, 'UTC')),
    `ratio` AggregateFunction(argMax, Float64, DateTime64(6, 'UTC')),
    `action` AggregateFunction(argMax, String, DateTime64(6, 'UTC')),
    `window_start` AggregateFunction(argMax, DateTime64(6, 'UTC'), DateTime64(6, 'UTC')),
    `window_end` AggregateFunction(argMax, DateTime64(6, 'UTC'), DateTime64(6, 'UTC')),
    `burn_rate_per_hour` AggregateFunction(argMax, Float64, DateTime64(6, 'UTC')),
    `max_ratio` SimpleAggregateFunction(max, Float64),
    `signals` SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (budget, scope, key, metric, minute)
TTL minute + toIntervalDay(_CAST(400, 'UInt32'))
SETTINGS index_granularity = 8192;

CREATE MATERIALIZED VIEW default.budget_usage_1m_mv TO default.budget_usage_1m
(
    `minute` DateTime('UTC'),
    `budget` LowCardinality(String),
    `scope` LowCardinality(String),
    `key` String,
    `metric` LowCardinality(String),
    `spent` AggregateFunction(argMax, Float64, DateTime64(6, 'UTC')),
    `limit` AggregateFunction(argMax, Float64, DateTime64(6, 'UTC')),
    `ratio` AggregateFunction(argMax, Float64, DateTime64(6, 'UTC')),
    `action` AggregateFunction(argMax, String, DateTime64(6, 'UTC')),
    `window_start` AggregateFunction(argMax, DateTime64(6, 'UTC'), DateTime64(6, 'UTC')),
    `window_end` AggregateFunction(argMax, DateTime64(6, 'UTC'), DateTime64(6, 'UTC')),
    `burn_rate_per_hour` AggregateFunction(argMax, Float64, DateTime64(6, 'UTC')),
    `max_ratio` Float64,
    `signals` UInt64
)
AS SELECT
    toStartOfMinute(s.issued_at) AS minute,
    s.budget AS budget,
    s.scope AS scope,
    s.key AS key,
    s.metric AS metric,
    argMaxState(s.spent, s.issued_at) AS spent,
    argMaxState(s.limit, s.issued_at) AS limit,
    argMaxState(s.ratio, s.issued_at) AS ratio,
    argMaxState(toString(s.action), s.issued_at) AS action,
    argMaxState(s.window_start, s.issued_at) AS window_start,
    argMaxState(s.window_end, s.issued_at) AS window_end,
    argMaxState(s.burn_rate_per_hour, s.issued_at) AS burn_rate_per_hour,
    max(s.ratio) AS max_ratio,
    count() AS signals
FROM default.budget_signals AS s
GROUP BY
    minute,
    budget,
    scope,
    key,
    metric;

CREATE TABLE default.genai_actions
(
    `day` Date,
    `action_hash` UInt64 COMMENT 'cityHash64(action)',
    `action` SimpleAggregateFunction(any, String),
    `tenant` SimpleAggregateFunction(max, String),
    `workflow` SimpleAggregateFunction(max, String),
    `feature` SimpleAggregateFunction(max, String),
    `session` SimpleAggregateFunction(max, String),
    `user` SimpleAggregateFunction(max, String),
    `first_seen` SimpleAggregateFunction(min, DateTime64(9, 'UTC')),
    `spans` SimpleAggregateFunction(sum, UInt64),
    `model_calls` SimpleAggregateFunction(sum, UInt64),
    `tool_spans` SimpleAggregateFunction(sum, UInt64),
    `tokens` SimpleAggregateFunction(sum, UInt64) COMMENT 'input + output tokens',
    `cost_usd` SimpleAggregateFunction(sum, Float64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, action_hash)
TTL day + toIntervalDay(_CAST(800, 'UInt32'))
SETTINGS index_granularity = 8192;

CREATE MATERIALIZED VIEW default.genai_actions_mv TO default.genai_actions
(
    `day` Date,
    `action_hash` LowCardinality(UInt64),
    `action` String,
    `tenant` String,
    `workflow` String,
    `feature` String,
    `session` String,
    `user` String,
    `first_seen` DateTime64(9, 'UTC'),
    `spans` UInt64,
    `model_calls` UInt64,
    `tool_spans` UInt64,
    `tokens` UInt64,
    `cost_usd` Float64
)
AS SELECT
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
    countIf(((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AND (s.refused = ''))) AS model_calls,
    countIf(((s.operation = 'execute_tool') AND (s.refused = ''))) AS tool_spans,
    sum(s.input_tokens + s.output_tokens) AS tokens,
    sum(s.cost_usd) AS cost_usd
FROM default.genai_spans AS s
WHERE s.action != ''
GROUP BY
    day,
    action_hash;

CREATE TABLE default.genai_sessions
(
    `day` Date,
    `session` String,
    `tenant` SimpleAggregateFunction(max, String),
    `user` SimpleAggregateFunction(max, String),
    `workflow` SimpleAggregateFunction(max, String),
    `feature` SimpleAggregateFunction(max, String),
    `first_seen` SimpleAggregateFunction(min, DateTime64(9, 'UTC')),
    `last_seen` SimpleAggregateFunction(max, DateTime64(9, 'UTC')),
    `model_calls` SimpleAggregateFunction(sum, UInt64),
    `tool_spans` SimpleAggregateFunction(sum, UInt64),
    `requested_tool_calls` SimpleAggregateFunction(sum, UInt64),
    `input_tokens` SimpleAggregateFunction(sum, UInt64),
    `output_tokens` SimpleAggregateFunction(sum, UInt64),
    `cost_usd` SimpleAggregateFunction(sum, Float64),
    `max_input_tokens` SimpleAggregateFunction(max, UInt64),
    `first_input_tokens` AggregateFunction(argMinIf, UInt64, DateTime64(9, 'UTC'), UInt8),
    `last_input_tokens` AggregateFunction(argMaxIf, UInt64, DateTime64(9, 'UTC'), UInt8),
    `first_calls` AggregateFunction(groupArraySortedIf(30), Tuple(
        DateTime64(9, 'UTC'),
        UInt64), UInt8) COMMENT 'the first 30 model calls (start, input tokens)'
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, session)
TTL day + toIntervalDay(_CAST(800, 'UInt32'))
SETTINGS index_granularity = 8192;

CREATE MATERIALIZED VIEW default.genai_sessions_mv TO default.genai_sessions
(
    `day` Date,
    `session` String,
    `tenant` String,
    `user` String,
    `workflow` String,
    `feature` String,
    `first_seen` DateTime64(9, 'UTC'),
    `last_seen` DateTime64(9, 'UTC'),
    `model_calls` UInt64,
    `tool_spans` UInt64,
    `requested_tool_calls` UInt64,
    `input_tokens` UInt64,
    `output_tokens` UInt64,
    `cost_usd` Float64,
    `max_input_tokens` UInt64,
    `first_input_tokens` AggregateFunction(argMinIf, UInt64, DateTime64(9, 'UTC'), UInt8),
    `last_input_tokens` AggregateFunction(argMaxIf, UInt64, DateTime64(9, 'UTC'), UInt8),
    `first_calls` AggregateFunction(groupArraySortedIf(30), Tuple(
        DateTime64(9, 'UTC'),
        UInt64), UInt8)
)
AS SELECT
    toDate(s.start_time) AS day,
    s.session AS session,
    max(toString(s.tenant)) AS tenant,
    max(s.user) AS user,
    max(toString(s.workflow)) AS workflow,
    max(toString(s.feature)) AS feature,
    min(s.start_time) AS first_seen,
    max(s.start_time) AS last_seen,
    countIf(((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AND (s.refused = ''))) AS model_calls,
    countIf(((s.operation = 'execute_tool') AND (s.refused = ''))) AS tool_spans,
    sum(s.tool_calls) AS requested_tool_calls,
    sum(s.input_tokens) AS input_tokens,
    sum(s.output_tokens) AS output_tokens,
    sum(s.cost_usd) AS cost_usd,
    maxIf(s.input_tokens, ((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AND (s.refused = ''))) AS max_input_tokens,
    argMinIfState(s.input_tokens, s.start_time, toUInt8(((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AND (s.refused = '')))) AS first_input_tokens,
    argMaxIfState(s.input_tokens, s.start_time, toUInt8(((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AND (s.refused = '')))) AS last_input_tokens,
    groupArraySortedIfState(30)((s.start_time, s.input_tokens), toUInt8(((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AND (s.refused = '')))) AS first_calls
FROM default.genai_spans AS s
WHERE s.session != ''
GROUP BY
    day,
    session;

CREATE TABLE default.genai_spans
(
    `trace_id` String,
    `span_id` String,
    `parent_span_id` String,
    `name` String,
    `start_time` DateTime64(9, 'UTC'),
    `end_time` DateTime64(9, 'UTC'),
    `operation` LowCardinality(String),
    `provider` LowCardinality(String),
    `request_model` LowCardinality(String),
    `response_model` LowCardinality(String),
    `service` LowCardinality(String),
    `tenant` LowCardinality(String),
    `user` String,
    `workflow` LowCardinality(String),
    `feature` LowCardinality(String),
    `session` String,
    `action` LowCardinality(String),
    `input_tokens` UInt64,
    `output_tokens` UInt64,
    `cache_read_tokens` UInt64,
    `cache_creation_tokens` UInt64,
    `reasoning_tokens` UInt64,
    `tool_calls` UInt64,
    `tool_name` LowCardinality(String),
    `agent_name` LowCardinality(String),
    `conversation_id` String,
    `cost_usd` Float64 COMMENT '0 when priced = 0',
    `priced` UInt8,
    `model_class` LowCardinality(String),
    `downgraded_from` LowCardinality(String),
    `routed_from` LowCardinality(String),
    `route` LowCardinality(String),
    `fallback` UInt8 COMMENT 'ran on a cheaper class than requested',
    `escalated_from` LowCardinality(String),
    `refused` LowCardinality(String) COMMENT 'budget, step_cap or context; the call was never made',
    `stakes` LowCardinality(String),
    `error_type` LowCardinality(String),
    `status_error` UInt8,
    `extra` Map(String, String),
    `kafka_topic` LowCardinality(String),
    `kafka_partition` Int32 COMMENT '-1 when not read from Kafka',
    `kafka_offset` Int64 COMMENT '-1 when not read from Kafka',
    `inserted_at` DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX idx_session session TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toYYYYMM(start_time)
ORDER BY (tenant, toDate(start_time), trace_id, span_id)
TTL toDateTime(start_time) + toIntervalDay(_CAST(400, 'UInt32'))
SETTINGS index_granularity = 8192;

CREATE TABLE default.genai_traces
(
    `day` Date,
    `trace_hash` UInt64 COMMENT 'cityHash64(trace_id): a cheap GROUP BY key',
    `trace_id` SimpleAggregateFunction(any, String),
    `start_time` SimpleAggregateFunction(min, DateTime64(9, 'UTC')),
    `end_time` SimpleAggregateFunction(max, DateTime64(9, 'UTC')),
    `tenant` SimpleAggregateFunction(max, String),
    `workflow` SimpleAggregateFunction(max, String),
    `feature` SimpleAggregateFunction(max, String),
    `session` SimpleAggregateFunction(max, String),
    `user` SimpleAggregateFunction(max, String),
    `spans` SimpleAggregateFunction(sum, UInt64),
    `model_calls` SimpleAggregateFunction(sum, UInt64),
    `tool_spans` SimpleAggregateFunction(sum, UInt64),
    `downgraded_calls` SimpleAggregateFunction(sum, UInt64),
    `model_cost_usd` SimpleAggregateFunction(sum, Float64) COMMENT 'cost of the model calls',
    `tokens` SimpleAggregateFunction(sum, UInt64),
    `workflow_root` SimpleAggregateFunction(max, UInt8) COMMENT 'a span with operation workflow was seen',
    `workflow_root_failed` SimpleAggregateFunction(max, UInt8),
    `root` SimpleAggregateFunction(max, UInt8) COMMENT 'a span without parent was seen',
    `root_failed` SimpleAggregateFunction(max, UInt8),
    `any_failed` SimpleAggregateFunction(max, UInt8)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, trace_hash)
TTL day + toIntervalDay(_CAST(800, 'UInt32'))
SETTINGS index_granularity = 8192;

CREATE MATERIALIZED VIEW default.genai_traces_mv TO default.genai_traces
(
    `day` Date,
    `trace_hash` UInt64,
    `trace_id` String,
    `start_time` DateTime64(9, 'UTC'),
    `end_time` DateTime64(9, 'UTC'),
    `tenant` String,
    `workflow` String,
    `feature` String,
    `session` String,
    `user` String,
    `spans` UInt64,
    `model_calls` UInt64,
    `tool_spans` UInt64,
    `downgraded_calls` UInt64,
    `model_cost_usd` Float64,
    `tokens` UInt64,
    `workflow_root` UInt8,
    `workflow_root_failed` UInt8,
    `root` UInt8,
    `root_failed` UInt8,
    `any_failed` UInt8
)
AS SELECT
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
    countIf(((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AND (s.refused = ''))) AS model_calls,
    countIf(((s.operation = 'execute_tool') AND (s.refused = ''))) AS tool_spans,
    countIf(((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AND (s.refused = '')) AND (s.downgraded_from != '')) AS downgraded_calls,
    sumIf(s.cost_usd, ((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AND (s.refused = ''))) AS model_cost_usd,
    sumIf(s.input_tokens + s.output_tokens, ((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AND (s.refused = ''))) AS tokens,
    max(s.operation = 'workflow') AS workflow_root,
    max((s.operation = 'workflow') AND ((s.status_error = 1) OR (s.error_type != ''))) AS workflow_root_failed,
    max(s.parent_span_id = '') AS root,
    max((s.parent_span_id = '') AND ((s.status_error = 1) OR (s.error_type != ''))) AS root_failed,
    max(((s.status_error = 1) OR (s.error_type != ''))) AS any_failed
FROM default.genai_spans AS s
GROUP BY
    day,
    trace_hash;

CREATE TABLE default.genai_usage_1m
(
    `minute` DateTime('UTC'),
    `tenant` LowCardinality(String),
    `workflow` LowCardinality(String),
    `feature` LowCardinality(String),
    `model_class` LowCardinality(String),
    `model` LowCardinality(String),
    `spans` SimpleAggregateFunction(sum, UInt64),
    `model_calls` SimpleAggregateFunction(sum, UInt64),
    `tool_spans` SimpleAggregateFunction(sum, UInt64) COMMENT 'execute_tool spans: tool calls made',
    `requested_tool_calls` SimpleAggregateFunction(sum, UInt64) COMMENT 'tool calls the models asked for',
    `downgraded_calls` SimpleAggregateFunction(sum, UInt64) COMMENT 'model calls with downgraded_from set',
    `failed_spans` SimpleAggregateFunction(sum, UInt64),
    `unpriced_calls` SimpleAggregateFunction(sum, UInt64),
    `cost_usd` SimpleAggregateFunction(sum, Float64),
    `input_tokens` SimpleAggregateFunction(sum, UInt64),
    `output_tokens` SimpleAggregateFunction(sum, UInt64),
    `cache_read_tokens` SimpleAggregateFunction(sum, UInt64),
    `reasoning_tokens` SimpleAggregateFunction(sum, UInt64),
    `action_tokens` SimpleAggregateFunction(sum, UInt64) COMMENT 'input+output tokens of spans with an action',
    `session_tool_spans` SimpleAggregateFunction(sum, UInt64) COMMENT 'tool_spans of spans with a session',
    `fallback_calls` SimpleAggregateFunction(sum, UInt64) COMMENT 'model calls on a cheaper class than requested (routed down or downgraded)',
    `routed_calls` SimpleAggregateFunction(sum, UInt64) COMMENT 'model calls whose model a routing rule changed',
    `escalated_calls` SimpleAggregateFunction(sum, UInt64) COMMENT 'second attempts made because the first answer failed its check',
    `escalation_cost_usd` SimpleAggregateFunction(sum, Float64),
    `refused_calls` SimpleAggregateFunction(sum, UInt64) COMMENT 'model calls refused before they were made'
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, tenant, workflow, feature, model_class, model)
TTL minute + toIntervalDay(_CAST(800, 'UInt32'))
SETTINGS index_granularity = 8192;

CREATE MATERIALIZED VIEW default.genai_usage_1m_mv TO default.genai_usage_1m
(
    `minute` DateTime('UTC'),
    `tenant` LowCardinality(String),
    `workflow` LowCardinality(String),
    `feature` LowCardinality(String),
    `model_class` LowCardinality(String),
    `model` String,
    `spans` UInt64,
    `model_calls` UInt64,
    `tool_spans` UInt64,
    `requested_tool_calls` UInt64,
    `downgraded_calls` UInt64,
    `failed_spans` UInt64,
    `unpriced_calls` UInt64,
    `cost_usd` Float64,
    `input_tokens` UInt64,
    `output_tokens` UInt64,
    `cache_read_tokens` UInt64,
    `reasoning_tokens` UInt64,
    `action_tokens` UInt64,
    `session_tool_spans` UInt64,
    `fallback_calls` UInt64,
    `routed_calls` UInt64,
    `escalated_calls` UInt64,
    `escalation_cost_usd` Float64,
    `refused_calls` UInt64
)
AS SELECT
    toStartOfMinute(s.start_time) AS minute,
    s.tenant AS tenant,
    s.workflow AS workflow,
    s.feature AS feature,
    s.model_class AS model_class,
    if(s.response_model != '', s.response_model, s.request_model) AS model,
    count() AS spans,
    countIf(((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AND (s.refused = ''))) AS model_calls,
    countIf(((s.operation = 'execute_tool') AND (s.refused = ''))) AS tool_spans,
    sum(s.tool_calls) AS requested_tool_calls,
    countIf(((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AND (s.refused = '')) AND (s.downgraded_from != '')) AS downgraded_calls,
    countIf(((s.status_error = 1) OR (s.error_type != ''))) AS failed_spans,
    countIf(((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AND (s.refused = '')) AND (s.priced = 0)) AS unpriced_calls,
    sum(s.cost_usd) AS cost_usd,
    sum(s.input_tokens) AS input_tokens,
    sum(s.output_tokens) AS output_tokens,
    sum(s.cache_read_tokens) AS cache_read_tokens,
    sum(s.reasoning_tokens) AS reasoning_tokens,
    sumIf(s.input_tokens + s.output_tokens, s.action != '') AS action_tokens,
    countIf(((s.operation = 'execute_tool') AND (s.refused = '')) AND (s.session != '')) AS session_tool_spans,
    countIf(((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AND (s.refused = '')) AND ((s.fallback = 1) OR ((s.downgraded_from != '') AND (s.routed_from = '')))) AS fallback_calls,
    countIf(((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AND (s.refused = '')) AND (s.routed_from != '')) AS routed_calls,
    countIf(((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AND (s.refused = '')) AND (s.escalated_from != '')) AS escalated_calls,
    sumIf(s.cost_usd, s.escalated_from != '') AS escalation_cost_usd,
    countIf((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AND (s.refused != '')) AS refused_calls
FROM default.genai_spans AS s
GROUP BY
    minute,
    tenant,
    workflow,
    feature,
    model_class,
    model;

CREATE TABLE default.genai_user_spend_1h
(
    `hour` DateTime('UTC'),
    `tenant` LowCardinality(String),
    `user` String,
    `workflow` LowCardinality(String),
    `feature` LowCardinality(String),
    `model_class` LowCardinality(String),
    `model_calls` SimpleAggregateFunction(sum, UInt64),
    `cost_usd` SimpleAggregateFunction(sum, Float64),
    `tokens` SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, tenant, user, workflow, feature, model_class)
TTL hour + toIntervalDay(_CAST(800, 'UInt32'))
SETTINGS index_granularity = 8192;

CREATE MATERIALIZED VIEW default.genai_user_spend_1h_mv TO default.genai_user_spend_1h
(
    `hour` DateTime('UTC'),
    `tenant` LowCardinality(String),
    `user` String,
    `workflow` LowCardinality(String),
    `feature` LowCardinality(String),
    `model_class` LowCardinality(String),
    `model_calls` UInt64,
    `cost_usd` Float64,
    `tokens` UInt64
)
AS SELECT
    toStartOfHour(s.start_time) AS hour,
    s.tenant AS tenant,
    s.user AS user,
    s.workflow AS workflow,
    s.feature AS feature,
    s.model_class AS model_class,
    countIf(((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AND (s.refused = ''))) AS model_calls,
    sum(s.cost_usd) AS cost_usd,
    sum(s.input_tokens + s.output_tokens) AS tokens
FROM default.genai_spans AS s
GROUP BY
    hour,
    tenant,
    user,
    workflow,
    feature,
    model_class;

CREATE TABLE default.schema_migrations
(
    `version` UInt32,
    `name` String,
    `applied_at` DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(applied_at)
ORDER BY version
SETTINGS index_granularity = 8192;
