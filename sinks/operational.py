"""The operational signals and spend views, as documented SQL (docs/ARCHITECTURE.md §11).

Every view is one SQL template rendered two ways from the same text:

- `render_grafana` writes it with the grafana-clickhouse-datasource macros and
  dashboard variables (`$__timeFilter(col)`, `$__dateFilter(col)`,
  `$__timeInterval(col)`, `$__conditionalAll(col IN (${tenant:singlequote}), $tenant)`),
  which is what `burnguard.sinks.grafana` puts into the dashboards;
- `render_params` writes it with ClickHouse query parameters, which is what
  `run` (the report, the CLI) executes with a `Filters`.

So the dashboards and the report show the same numbers by construction.

Definitions (see also `sinks/schema.py` for the rollups they read):

- **Spend**: `cost_usd` of the spans (unpriced spans count 0, and are counted
  in `unpriced_calls`).
- **Cost per successful workflow**: a workflow run is a trace attributed to a
  workflow (`burnguard.workflow`). It succeeded when its workflow root span
  (operation `workflow`) has no error; without such a span, when its root span
  (no parent) has no error; when neither was stored (a root that is not a GenAI
  span is not stored), when none of its spans failed. Failed means error status
  or `error.type`. The signal is the cost of the model calls in the succeeded
  runs divided by their number; `cost_per_success_all_in` divides the cost of
  all runs, failed ones included, by the same number (what success really costs).
- **Tokens per user action**: input + output tokens of the spans that carry a
  `burnguard.action`, divided by the number of distinct actions.
- **Tool calls per session**: executed tool calls (`execute_tool` spans) in
  sessions divided by the number of distinct sessions.
- **Fallback percentage**: model calls that ran on a cheaper class than the
  caller asked for — routed down by a rule (`burnguard.fallback`) or
  downgraded by budget pressure (`burnguard.downgraded_from`) — over all model
  calls that were made, in percent. Refused calls are counted apart.
- **Context growth**: per session, input tokens of the first and the last model
  call and the growth per call between them; and the average input tokens of
  the n-th call of a session over all sessions.

Time filters follow the plugin: `col >= toDateTime(from_s) AND col <= toDateTime(to_s)`.
Sums over rollups count a re-delivered span twice until `rebuild_rollups`;
views marked `exact` read `genai_spans FINAL` instead (see `schema`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.client import Client

#: Dashboard variables -> the `Filters` field that holds their selection.
VARIABLES: dict[str, str] = {
    "tenant": "tenants",
    "workflow": "workflows",
    "feature": "features",
    "model_class": "model_classes",
}


@dataclass(frozen=True)
class Filters:
    """A time range (inclusive, whole seconds like the plugin) and variable selections (empty = all)."""

    start: datetime
    end: datetime
    tenants: tuple[str, ...] = ()
    workflows: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    model_classes: tuple[str, ...] = ()
    interval_s: int = 60

    def parameters(self) -> dict[str, Any]:
        return {
            "from_s": int(_aware(self.start).timestamp()),
            "to_s": int(_aware(self.end).timestamp()),
            "interval_s": max(int(self.interval_s), 1),
            **{field_: list(getattr(self, field_)) for field_ in VARIABLES.values()},
        }


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class _Placeholder:
    """A `{name:column}` field of a template; `__format__` gets the column as the spec."""

    def __init__(self, render: Any) -> None:
        self._render = render

    def __format__(self, spec: str) -> str:
        return self._render(spec)


def _grafana_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {
        "time": _Placeholder(lambda col: f"$__timeFilter({col})"),
        "date": _Placeholder(lambda col: f"$__dateFilter({col})"),
        "bucket": _Placeholder(lambda col: f"$__timeInterval({col})"),
        "interval_s": _Placeholder(lambda _: "$__interval_s()"),
        "from_time": _Placeholder(lambda _: "$__fromTime()"),
        "to_time": _Placeholder(lambda _: "$__toTime()"),
    }
    for variable in VARIABLES:
        fields[variable] = _Placeholder(
            lambda col, v=variable: f"$__conditionalAll({col} IN (${{{v}:singlequote}}), ${v})"
        )
    return fields


def _param_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {
        "time": _Placeholder(
            lambda col: f"{col} >= toDateTime({{from_s:Int64}}) AND {col} <= toDateTime({{to_s:Int64}})"
        ),
        "date": _Placeholder(
            lambda col: (
                f"{col} >= toDate(toDateTime({{from_s:Int64}}, 'UTC'))"
                f" AND {col} <= toDate(toDateTime({{to_s:Int64}}, 'UTC'))"
            )
        ),
        "bucket": _Placeholder(
            lambda col: f"toStartOfInterval(toDateTime({col}), toIntervalSecond({{interval_s:UInt32}}))"
        ),
        "interval_s": _Placeholder(lambda _: "{interval_s:UInt32}"),
        "from_time": _Placeholder(lambda _: "toDateTime({from_s:Int64})"),
        "to_time": _Placeholder(lambda _: "toDateTime({to_s:Int64})"),
    }
    for variable, param in VARIABLES.items():
        fields[variable] = _Placeholder(
            lambda col, p=param: f"(empty({{{p}:Array(String)}}) OR has({{{p}:Array(String)}}, {col}))"
        )
    return fields


_GRAFANA = _grafana_fields()
_PARAMS = _param_fields()


@dataclass(frozen=True)
class View:
    """One documented query: what it answers, its SQL template, how it is best drawn."""

    name: str
    title: str
    description: str
    template: str
    kind: str = "table"  # timeseries | table | stat | bar
    unit: str = ""
    exact: bool = False  # reads genai_spans FINAL (exact under re-delivery)
    variables: tuple[str, ...] = field(default=())  # dashboard variables it filters on

    def render_grafana(self) -> str:
        return _dedent(self.template.format(**_GRAFANA))

    def render_params(self) -> str:
        return _dedent(self.template.format(**_PARAMS))


def _nest(sql: str, indent: int) -> str:
    """A subquery, dedented then indented to sit inside another template."""
    return "\n".join(" " * indent + line if line else line for line in _dedent(sql).splitlines())


def _dedent(sql: str) -> str:
    lines = [line.rstrip() for line in sql.strip("\n").splitlines()]
    indent = min((len(line) - len(line.lstrip()) for line in lines if line.strip()), default=0)
    return "\n".join(line[indent:] for line in lines)


_DIMS = (
    "{tenant:tenant}\n        AND {workflow:workflow}\n        AND {feature:feature}"
    "\n        AND {model_class:model_class}"
)

# --- spend ----------------------------------------------------------------------------------------

SPEND_TOTAL = View(
    "spend_total",
    "Spend (USD)",
    "Total spend in the range, from the per-minute rollup (see 'Spend by tenant (exact)' for the "
    "reconciled figure).",
    f"""
    SELECT round(sum(cost_usd), 6) AS spend_usd, sum(unpriced_calls) AS unpriced_calls
    FROM genai_usage_1m
    WHERE {{time:minute}} AND {_DIMS}
    """,
    kind="stat",
    unit="currencyUSD",
)

SPEND_BY_TENANT_EXACT = View(
    "spend_by_tenant",
    "Spend by tenant (exact)",
    "Spend, model calls and tokens per tenant, exact: read from genai_spans FINAL (a re-delivered span "
    "counts once). Costs more than the rollup panels over long ranges.",
    f"""
    SELECT tenant, round(sum(cost_usd), 6) AS spend_usd,
        countIf(operation IN ('chat', 'text_completion', 'embeddings', 'generate_content')) AS model_calls,
        sum(input_tokens + output_tokens) AS tokens
    FROM genai_spans FINAL
    WHERE {{time:start_time}} AND {_DIMS}
    GROUP BY tenant
    ORDER BY spend_usd DESC, tenant
    """,
    exact=True,
)


def _spend_over_time(dimension: str) -> View:
    return View(
        f"spend_over_time_by_{dimension}",
        f"Spend over time by {dimension.replace('_', ' ')}",
        f"USD per interval and {dimension.replace('_', ' ')}, from the per-minute rollup.",
        f"""
        SELECT {{bucket:minute}} AS time, {dimension}, sum(cost_usd) AS spend_usd
        FROM genai_usage_1m
        WHERE {{time:minute}} AND {_DIMS}
        GROUP BY time, {dimension}
        HAVING sum(model_calls) > 0
        ORDER BY time, {dimension}
        """,
        kind="timeseries",
        unit="currencyUSD",
    )


def _spend_by(dimension: str) -> View:
    return View(
        f"spend_by_{dimension}",
        f"Spend by {dimension.replace('_', ' ')}",
        f"USD, model calls and tokens per {dimension.replace('_', ' ')}, from the per-minute rollup.",
        f"""
        SELECT {dimension}, round(sum(cost_usd), 6) AS spend_usd, sum(model_calls) AS model_calls,
            sum(input_tokens + output_tokens) AS tokens
        FROM genai_usage_1m
        WHERE {{time:minute}} AND {_DIMS}
        GROUP BY {dimension}
        HAVING model_calls > 0
        ORDER BY spend_usd DESC, {dimension}
        """,
        kind="bar",
        unit="currencyUSD",
    )


SPEND_OVER_TIME_BY_TENANT = _spend_over_time("tenant")
SPEND_OVER_TIME_BY_MODEL_CLASS = _spend_over_time("model_class")
SPEND_BY_WORKFLOW = _spend_by("workflow")
SPEND_BY_FEATURE = _spend_by("feature")
SPEND_BY_MODEL_CLASS = _spend_by("model_class")
SPEND_BY_MODEL = _spend_by("model")

TOP_SPENDERS = View(
    "top_spenders",
    "Top spenders (users)",
    "The ten users who spent most, from the hourly per-user rollup (hours that overlap the range).",
    f"""
    SELECT user, tenant, round(sum(cost_usd), 6) AS spend_usd, sum(model_calls) AS model_calls,
        sum(tokens) AS tokens
    FROM genai_user_spend_1h
    WHERE {{time:hour}} AND {_DIMS}
    GROUP BY user, tenant
    ORDER BY spend_usd DESC, user
    LIMIT 10
    """,
    unit="currencyUSD",
)

# --- operational signals ------------------------------------------------------------------------

_RUNS = """
    SELECT t.trace_hash AS trace_hash,
        max(t.workflow) AS workflow,
        sum(t.model_cost_usd) AS cost_usd,
        multiIf(max(t.workflow_root) = 1, max(t.workflow_root_failed) = 0,
                max(t.root) = 1, max(t.root_failed) = 0,
                max(t.any_failed) = 0) AS succeeded
    FROM genai_traces AS t
    WHERE {date:t.day} AND {time:t.start_time}
        AND {tenant:t.tenant} AND {workflow:t.workflow} AND {feature:t.feature}
    GROUP BY trace_hash
    HAVING workflow != ''
"""

_ACTIONS_FILTER = """{date:a.day} AND {time:a.first_seen}
        AND {tenant:a.tenant} AND {workflow:a.workflow} AND {feature:a.feature}"""
_SESSIONS_FILTER = """{date:g.day} AND {time:g.first_seen}
        AND {tenant:g.tenant} AND {workflow:g.workflow} AND {feature:g.feature}"""

SIGNALS_SUMMARY = View(
    "signals_summary",
    "Operational signals",
    "The four signals over the range: cost per successful workflow, tokens per user action, tool calls "
    "per session, percentage of model calls that fell back to a cheaper model. The model class "
    "variable filters the fallback percentage only (runs, actions and sessions mix classes).",
    f"""
    SELECT
        runs.succeeded_runs AS succeeded_workflows,
        runs.runs AS workflow_runs,
        round(runs.success_cost / nullIf(runs.succeeded_runs, 0), 6) AS cost_per_successful_workflow,
        round(runs.all_cost / nullIf(runs.succeeded_runs, 0), 6) AS cost_per_success_all_in,
        round(actions.tokens / nullIf(actions.actions, 0), 3) AS tokens_per_action,
        round(sessions.tool_calls / nullIf(sessions.sessions, 0), 3) AS tool_calls_per_session,
        round(100 * usage.fallback / nullIf(usage.model_calls, 0), 3) AS fallback_pct
    FROM
    (
        SELECT count() AS runs, countIf(succeeded) AS succeeded_runs,
            sumIf(cost_usd, succeeded) AS success_cost, sum(cost_usd) AS all_cost
        FROM
        (
{_nest(_RUNS, 12)}
        )
    ) AS runs,
    (
        SELECT sum(a.tokens) AS tokens, uniqExact(a.action_hash) AS actions
        FROM genai_actions AS a
        WHERE {_ACTIONS_FILTER}
    ) AS actions,
    (
        SELECT sum(g.tool_spans) AS tool_calls, uniqExact(g.session) AS sessions
        FROM genai_sessions AS g
        WHERE {_SESSIONS_FILTER}
    ) AS sessions,
    (
        SELECT sum(fallback_calls) AS fallback, sum(model_calls) AS model_calls
        FROM genai_usage_1m
        WHERE {{time:minute}} AND {_DIMS}
    ) AS usage
    """,
    kind="stat",
)

SIGNALS_OVER_TIME = View(
    "signals_over_time",
    "Tokens per action, tool calls per session, fallback % over time",
    "Per interval: tokens per action (actions by their first span), tool calls per session (sessions "
    "by their first span of the day), fallback percentage of the model calls.",
    f"""
    SELECT time, max(tokens_per_action) AS tokens_per_action,
        max(tool_calls_per_session) AS tool_calls_per_session, max(fallback_pct) AS fallback_pct
    FROM
    (
        SELECT {{bucket:a.first_seen}} AS time,
            CAST(sum(a.tokens) / uniqExact(a.action_hash), 'Nullable(Float64)') AS tokens_per_action,
            CAST(NULL, 'Nullable(Float64)') AS tool_calls_per_session,
            CAST(NULL, 'Nullable(Float64)') AS fallback_pct
        FROM genai_actions AS a
        WHERE {_ACTIONS_FILTER}
        GROUP BY time
        UNION ALL
        SELECT {{bucket:g.first_seen}} AS time, NULL,
            CAST(sum(g.tool_spans) / uniqExact(g.session), 'Nullable(Float64)'), NULL
        FROM genai_sessions AS g
        WHERE {_SESSIONS_FILTER}
        GROUP BY time
        UNION ALL
        SELECT {{bucket:minute}} AS time, NULL, NULL,
            CAST(100 * sum(fallback_calls) / nullIf(sum(model_calls), 0), 'Nullable(Float64)')
        FROM genai_usage_1m
        WHERE {{time:minute}} AND {_DIMS}
        GROUP BY time
    )
    GROUP BY time
    ORDER BY time
    """,
    kind="timeseries",
)

COST_PER_WORKFLOW = View(
    "cost_per_successful_workflow",
    "Cost per successful workflow, by workflow",
    "Workflow runs, successes and the cost of the model calls per successful run.",
    f"""
    SELECT workflow, count() AS runs, countIf(succeeded) AS succeeded_runs,
        round(sumIf(cost_usd, succeeded) / nullIf(countIf(succeeded), 0), 6) AS cost_per_success_usd,
        round(100 * countIf(succeeded) / count(), 2) AS success_pct
    FROM
    (
{_nest(_RUNS, 8)}
    )
    GROUP BY workflow
    ORDER BY workflow
    """,
    unit="currencyUSD",
)

FALLBACKS_BY_MODEL_CLASS = View(
    "fallbacks_by_model_class",
    "Fallbacks to cheaper models by model class",
    "Model calls per model class: how many ran on a cheaper class than requested (routed down or "
    "downgraded), how many a routing rule moved, how many were escalations and what those cost, and "
    "how many calls were refused before they were made.",
    f"""
    SELECT model_class, sum(model_calls) AS calls, sum(fallback_calls) AS fallback,
        round(100 * fallback / nullIf(calls, 0), 3) AS fallback_pct,
        sum(routed_calls) AS routed, sum(escalated_calls) AS escalated,
        round(sum(escalation_cost_usd), 6) AS escalation_cost_usd, sum(refused_calls) AS refused
    FROM genai_usage_1m
    WHERE {{time:minute}} AND {_DIMS}
    GROUP BY model_class
    HAVING calls + refused > 0
    ORDER BY model_class
    """,
)

_SESSIONS = """
    SELECT g.session AS session, max(g.tenant) AS tenant, sum(g.model_calls) AS model_calls,
        sum(g.tool_spans) AS tool_calls, sum(g.requested_tool_calls) AS requested_tool_calls,
        sum(g.input_tokens) AS input_tokens, sum(g.cost_usd) AS cost_usd,
        max(g.max_input_tokens) AS max_input,
        argMinIfMerge(g.first_input_tokens) AS first_input, argMaxIfMerge(g.last_input_tokens) AS last_input
    FROM genai_sessions AS g
    WHERE {date:g.day} AND {time:g.first_seen}
        AND {tenant:g.tenant} AND {workflow:g.workflow} AND {feature:g.feature}
    GROUP BY session
"""

TOOL_CALLS_BY_SESSION = View(
    "tool_calls_by_session",
    "Tool calls per session (top sessions)",
    "Executed tool calls, tool calls the models asked for, and model calls of the busiest sessions.",
    f"""
    SELECT session, tenant, tool_calls, requested_tool_calls, model_calls, round(cost_usd, 6) AS cost_usd
    FROM
    (
{_nest(_SESSIONS, 8)}
    )
    ORDER BY tool_calls DESC, session
    LIMIT 20
    """,
)

CONTEXT_GROWTH = View(
    "context_growth",
    "Context growth by session",
    "Input tokens of the first and last model call of each session and the growth per call between "
    "them: long contexts with weak pruning grow call after call.",
    f"""
    SELECT session, tenant, model_calls, first_input, last_input, max_input,
        round((toFloat64(last_input) - first_input) / greatest(model_calls - 1, 1), 1) AS growth_per_call
    FROM
    (
{_nest(_SESSIONS, 8)}
    )
    WHERE model_calls > 0
    ORDER BY growth_per_call DESC, session
    LIMIT 20
    """,
)

CONTEXT_BY_CALL = View(
    "context_by_call_index",
    "Input tokens by call number in a session",
    "Average input tokens of the n-th model call of a session (first 30 calls), over the 1,000 sessions "
    "seen last in the range, from the first calls kept by the sessions rollup.",
    f"""
    SELECT call_no, round(avg(call.2), 1) AS avg_input_tokens, count() AS sessions
    FROM
    (
        SELECT g.session AS session, groupArraySortedIfMerge(30)(g.first_calls) AS calls
        FROM genai_sessions AS g
        WHERE {_SESSIONS_FILTER}
            AND g.session IN
            (
                SELECT DISTINCT session FROM
                (
                    SELECT g.session AS session
                    FROM genai_sessions AS g
                    WHERE {_SESSIONS_FILTER}
                    ORDER BY g.last_seen DESC
                    LIMIT 2000
                )
                LIMIT 1000
            )
        GROUP BY session
    )
    ARRAY JOIN calls AS call, arrayEnumerate(calls) AS call_no
    GROUP BY call_no
    ORDER BY call_no
    """,
    kind="bar",
)

# --- budgets ------------------------------------------------------------------------------------

BUDGET_STATUS = View(
    "budget_status",
    "Spend against each budget",
    "The latest signal of every budget key in the range: spent, limit, ratio and the action in force.",
    """
    SELECT budget, scope, key, metric,
        argMax(toString(action), issued_at) AS action,
        round(argMax(spent, issued_at), 6) AS spent,
        argMax(`limit`, issued_at) AS `limit`,
        round(argMax(ratio, issued_at), 4) AS ratio,
        round(argMax(burn_rate_per_hour, issued_at), 6) AS burn_rate_per_hour,
        argMax(window_end, issued_at) AS window_end,
        max(issued_at) AS last_issued_at
    FROM budget_signals FINAL
    WHERE {time:issued_at}
    GROUP BY budget, scope, key, metric
    ORDER BY ratio DESC, budget, key
    """,
    exact=True,
)

BUDGET_BURNDOWN = View(
    "budget_burndown",
    "Budget burn-down (remaining)",
    "Remaining budget (limit - spent) per budget key and interval, from the budget snapshots.",
    """
    SELECT {bucket:minute} AS time, concat(budget, ' ', key) AS budget_key,
        greatest(argMaxMerge(`limit`) - argMaxMerge(spent), 0) AS remaining
    FROM budget_usage_1m
    WHERE {time:minute}
    GROUP BY time, budget_key
    ORDER BY time, budget_key
    """,
    kind="timeseries",
)

BUDGET_RATIO = View(
    "budget_ratio",
    "Budget usage ratio",
    "Spent / limit per budget key and interval (the highest in the interval).",
    """
    SELECT {bucket:minute} AS time, concat(budget, ' ', key) AS budget_key, max(max_ratio) AS ratio
    FROM budget_usage_1m
    WHERE {time:minute}
    GROUP BY time, budget_key
    ORDER BY time, budget_key
    """,
    kind="timeseries",
    unit="percentunit",
)

SIGNAL_TIMELINE = View(
    "signal_timeline",
    "Signals timeline",
    "Every change of action of a budget key: when it was warned, downgraded, throttled or lifted.",
    """
    SELECT issued_at AS time, budget, scope, key, action, round(ratio, 4) AS ratio, round(spent, 6) AS spent,
        `limit`, reason
    FROM
    (
        SELECT issued_at, budget, scope, key, toString(action) AS action, ratio, spent, `limit`, reason,
            lagInFrame(toString(action), 1, '') OVER (PARTITION BY budget, scope, key ORDER BY issued_at
                ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS previous
        FROM budget_signals FINAL
        WHERE {time:issued_at}
    )
    WHERE action != previous
    ORDER BY time, budget, key
    """,
    exact=True,
)

#: Dashboard uid -> (title, views in panel order).
DASHBOARDS: dict[str, tuple[str, tuple[View, ...]]] = {
    "burnguard-spend": (
        "burnguard — spend overview",
        (
            SPEND_TOTAL,
            SPEND_OVER_TIME_BY_TENANT,
            SPEND_OVER_TIME_BY_MODEL_CLASS,
            SPEND_BY_TENANT_EXACT,
            SPEND_BY_WORKFLOW,
            SPEND_BY_FEATURE,
            SPEND_BY_MODEL_CLASS,
            SPEND_BY_MODEL,
            TOP_SPENDERS,
        ),
    ),
    "burnguard-budgets": (
        "burnguard — budgets, burn-down and signals",
        (BUDGET_STATUS, BUDGET_RATIO, BUDGET_BURNDOWN, SIGNAL_TIMELINE),
    ),
    "burnguard-operations": (
        "burnguard — operational signals and agent behaviour",
        (
            SIGNALS_SUMMARY,
            SIGNALS_OVER_TIME,
            COST_PER_WORKFLOW,
            FALLBACKS_BY_MODEL_CLASS,
            TOOL_CALLS_BY_SESSION,
            CONTEXT_GROWTH,
            CONTEXT_BY_CALL,
        ),
    ),
}

ALL_VIEWS: dict[str, View] = {view.name: view for _, views in DASHBOARDS.values() for view in views}


def run(client: Client, view: View | str, filters: Filters) -> list[dict[str, Any]]:
    """Run a view with `filters`; rows as dicts in the view's column order."""
    if isinstance(view, str):
        view = ALL_VIEWS[view]
    sql = view.render_params()
    parameters = {name: value for name, value in filters.parameters().items() if "{" + name + ":" in sql}
    result = client.query(sql, parameters=parameters or None)
    return list(result.named_results())
