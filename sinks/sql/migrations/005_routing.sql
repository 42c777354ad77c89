-- Migration 5: routing columns on genai_spans; fallback, routed, escalated and refused calls per
-- minute; refused calls no longer counted as calls in the rollups.
-- Frozen: this is what the migration ran when it shipped (tests/test_schema_sql.py holds its
-- fingerprint). Comments may change; a statement never does: a change is a new migration.
-- A refused call is recorded but reached no model (and a refused tool never ran): model calls
-- and tool spans now also require refused = ''. The views are re-attached, not refilled: the
-- change only affects rows yet to come (no older span is refused), and rollups outlive spans,
-- so a refill would only lose history.

-- The span columns the routing decision writes, after downgraded_from.
ALTER TABLE genai_spans
    ADD COLUMN IF NOT EXISTS routed_from LowCardinality(String) AFTER downgraded_from,
    ADD COLUMN IF NOT EXISTS route LowCardinality(String) AFTER routed_from,
    ADD COLUMN IF NOT EXISTS fallback UInt8 COMMENT 'ran on a cheaper class than requested' AFTER route,
    ADD COLUMN IF NOT EXISTS escalated_from LowCardinality(String) AFTER fallback,
    ADD COLUMN IF NOT EXISTS refused LowCardinality(String) COMMENT 'budget, step_cap or context; the call was never made' AFTER escalated_from,
    ADD COLUMN IF NOT EXISTS stakes LowCardinality(String) AFTER refused;

-- fallback_calls: spans of other instrumentations carry only downgraded_from; a call routed
-- up and then downgraded back to the requested class carries routed_from too and is no fallback.
ALTER TABLE genai_usage_1m
    ADD COLUMN IF NOT EXISTS fallback_calls SimpleAggregateFunction(sum, UInt64)
        COMMENT 'model calls on a cheaper class than requested (routed down or downgraded)',
    ADD COLUMN IF NOT EXISTS routed_calls SimpleAggregateFunction(sum, UInt64)
        COMMENT 'model calls whose model a routing rule changed',
    ADD COLUMN IF NOT EXISTS escalated_calls SimpleAggregateFunction(sum, UInt64)
        COMMENT 'second attempts made because the first answer failed its check',
    ADD COLUMN IF NOT EXISTS escalation_cost_usd SimpleAggregateFunction(sum, Float64),
    ADD COLUMN IF NOT EXISTS refused_calls SimpleAggregateFunction(sum, UInt64)
        COMMENT 'model calls refused before they were made';

DROP VIEW IF EXISTS genai_usage_1m_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS genai_usage_1m_mv TO genai_usage_1m AS
SELECT
    toStartOfMinute(s.start_time) AS minute,
    s.tenant AS tenant,
    s.workflow AS workflow,
    s.feature AS feature,
    s.model_class AS model_class,
    if(s.response_model != '', s.response_model, s.request_model) AS model,
    count() AS spans,
    countIf((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.refused = '')) AS model_calls,
    countIf((s.operation = 'execute_tool' AND s.refused = '')) AS tool_spans,
    sum(s.tool_calls) AS requested_tool_calls,
    countIf((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.refused = '') AND s.downgraded_from != '') AS downgraded_calls,
    countIf((s.status_error = 1 OR s.error_type != '')) AS failed_spans,
    countIf((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.refused = '') AND s.priced = 0) AS unpriced_calls,
    sum(s.cost_usd) AS cost_usd,
    sum(s.input_tokens) AS input_tokens,
    sum(s.output_tokens) AS output_tokens,
    sum(s.cache_read_tokens) AS cache_read_tokens,
    sum(s.reasoning_tokens) AS reasoning_tokens,
    sumIf(s.input_tokens + s.output_tokens, s.action != '') AS action_tokens,
    countIf((s.operation = 'execute_tool' AND s.refused = '') AND s.session != '') AS session_tool_spans,
    countIf((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.refused = '') AND (s.fallback = 1 OR (s.downgraded_from != '' AND s.routed_from = ''))) AS fallback_calls,
    countIf((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.refused = '') AND s.routed_from != '') AS routed_calls,
    countIf((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.refused = '') AND s.escalated_from != '') AS escalated_calls,
    sumIf(s.cost_usd, s.escalated_from != '') AS escalation_cost_usd,
    countIf(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.refused != '') AS refused_calls
FROM genai_spans AS s
GROUP BY minute, tenant, workflow, feature, model_class, model;

DROP VIEW IF EXISTS genai_user_spend_1h_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS genai_user_spend_1h_mv TO genai_user_spend_1h AS
SELECT
    toStartOfHour(s.start_time) AS hour,
    s.tenant AS tenant,
    s.user AS user,
    s.workflow AS workflow,
    s.feature AS feature,
    s.model_class AS model_class,
    countIf((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.refused = '')) AS model_calls,
    sum(s.cost_usd) AS cost_usd,
    sum(s.input_tokens + s.output_tokens) AS tokens
FROM genai_spans AS s
GROUP BY hour, tenant, user, workflow, feature, model_class;

DROP VIEW IF EXISTS genai_traces_mv;

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
    countIf((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.refused = '')) AS model_calls,
    countIf((s.operation = 'execute_tool' AND s.refused = '')) AS tool_spans,
    countIf((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.refused = '') AND s.downgraded_from != '') AS downgraded_calls,
    sumIf(s.cost_usd, (s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.refused = '')) AS model_cost_usd,
    sumIf(s.input_tokens + s.output_tokens, (s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.refused = '')) AS tokens,
    max(s.operation = 'workflow') AS workflow_root,
    max(s.operation = 'workflow' AND (s.status_error = 1 OR s.error_type != '')) AS workflow_root_failed,
    max(s.parent_span_id = '') AS root,
    max(s.parent_span_id = '' AND (s.status_error = 1 OR s.error_type != '')) AS root_failed,
    max((s.status_error = 1 OR s.error_type != '')) AS any_failed
FROM genai_spans AS s
GROUP BY day, trace_hash;

DROP VIEW IF EXISTS genai_sessions_mv;

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
    countIf((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.refused = '')) AS model_calls,
    countIf((s.operation = 'execute_tool' AND s.refused = '')) AS tool_spans,
    sum(s.tool_calls) AS requested_tool_calls,
    sum(s.input_tokens) AS input_tokens,
    sum(s.output_tokens) AS output_tokens,
    sum(s.cost_usd) AS cost_usd,
    maxIf(s.input_tokens, (s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.refused = '')) AS max_input_tokens,
    argMinIfState(s.input_tokens, s.start_time, toUInt8((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.refused = ''))) AS first_input_tokens,
    argMaxIfState(s.input_tokens, s.start_time, toUInt8((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.refused = ''))) AS last_input_tokens,
    groupArraySortedIfState(30)((s.start_time, s.input_tokens), toUInt8((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.refused = ''))) AS first_calls
FROM genai_spans AS s
WHERE s.session != ''
GROUP BY day, session;

DROP VIEW IF EXISTS genai_actions_mv;

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
    countIf((s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content') AND s.refused = '')) AS model_calls,
    countIf((s.operation = 'execute_tool' AND s.refused = '')) AS tool_spans,
    sum(s.input_tokens + s.output_tokens) AS tokens,
    sum(s.cost_usd) AS cost_usd
FROM genai_spans AS s
WHERE s.action != ''
GROUP BY day, action_hash;
