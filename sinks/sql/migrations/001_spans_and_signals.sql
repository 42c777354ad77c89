-- Migration 1: genai_spans and budget_signals.
-- Frozen: this is what the migration ran when it shipped (tests/test_schema_sql.py holds its
-- fingerprint). Comments may change; a statement never does: a change is a new migration.
-- Both are ReplacingMergeTree keyed by the identity of a row: a batch that Kafka re-delivers
-- collapses on merge, and exact totals read with FINAL. {span_ttl_days:UInt32} is a server-side
-- query parameter (migrate's span_ttl_days).

CREATE TABLE IF NOT EXISTS genai_spans
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
TTL toDateTime(start_time) + toIntervalDay({span_ttl_days:UInt32});

CREATE TABLE IF NOT EXISTS budget_signals
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
ORDER BY (budget, scope, key, issued_at);
