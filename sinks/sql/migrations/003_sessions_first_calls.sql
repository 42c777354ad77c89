-- Migration 3: genai_sessions.first_calls (context growth by call number).
-- Frozen: this is what the migration ran when it shipped (tests/test_schema_sql.py holds its
-- fingerprint). Comments may change; a statement never does: a change is a new migration.
-- The first calls of each session (start, input tokens), for context growth by call number
-- without a window over the spans; the rollup is refilled from the spans.

ALTER TABLE genai_sessions ADD COLUMN IF NOT EXISTS first_calls
    AggregateFunction(groupArraySortedIf(30), Tuple(DateTime64(9, 'UTC'), UInt64), UInt8)
    COMMENT 'the first 30 model calls (start, input tokens)';

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
    argMaxIfState(s.input_tokens, s.start_time, toUInt8(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content'))) AS last_input_tokens,
    groupArraySortedIfState(30)((s.start_time, s.input_tokens), toUInt8(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content'))) AS first_calls
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
    argMaxIfState(s.input_tokens, s.start_time, toUInt8(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content'))) AS last_input_tokens,
    groupArraySortedIfState(30)((s.start_time, s.input_tokens), toUInt8(s.operation IN ('chat', 'text_completion', 'embeddings', 'generate_content'))) AS first_calls
FROM genai_spans AS s
WHERE s.session != ''
GROUP BY day, session;
