"""A small, hand-checked scenario whose dashboard answers are known (see EXPECTED).

Two tenants, five workflow runs and one call outside any workflow, inside the
range `START`..`END`; one expensive call a day before the range; budget
signals for two tenant keys. Every number in EXPECTED is worked out by hand in
the comments, not computed by the code under test.

acme / workflow triage / feature triage, session s1:
  A1  workflow root ok      chat 0.10 (1000 in, 100 out), chat 0.20 (1500 in, 100 out), 1 tool
      action a1, user u1
  A2  workflow root FAILED  chat 0.50 (2000 in, 200 out), 2 tools              action a2, user u1
  A3  workflow root ok      chat 0.05 (2500 in, 100 out) gpt-4.1-mini downgraded from gpt-4.1
      action a3, user u2
globex / workflow summarize / feature summarize, session s2:
  G1  no workflow root; root chat ok 0.30 (3000 in, 300 out) standard,
      child chat 0.10 (500 in, 50 out) economy, downgraded from claude-sonnet-4-5      action g1, user u3
  G2  root not stored; child chat FAILED 0.20 (1000 in, 0 out) standard                 action g2, user u3
globex / no workflow / feature chat: chat 0.40 (4000 in, 400 out) premium, user u4 (no session, no action)
acme, a day before the range: chat 9.99 (not in any total below).
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from burnguard.contracts.signals import Signal
from burnguard.contracts.usage import SpanUsage

from tests.factories import make_signal

START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
END = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
T0 = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
INTERVAL_S = 600

_ids = itertools.count(1)


def _ns(at: datetime) -> int:
    return int(at.timestamp()) * 1_000_000_000


def _span(trace: str, at: datetime, operation: str, *, parent: str = "", **fields) -> SpanUsage:
    span_id = f"{next(_ids):016x}"
    model = fields.pop("model", "")
    usage = SpanUsage(
        trace_id=trace.ljust(32, "0"),
        span_id=span_id,
        parent_span_id=parent,
        name=f"{operation} {model or fields.get('tool_name', '')}".strip(),
        start_ns=_ns(at),
        end_ns=_ns(at) + 500_000_000,
        operation=operation,
        request_model=model,
        response_model=model,
        provider="openai" if model.startswith("gpt") else ("anthropic" if model else ""),
        **fields,
    )
    return usage


def _run(trace: str, at: datetime, root: dict | None, calls: list[dict], tools: int, **attribution):
    """A workflow run: an optional root span, its model calls (one a minute) and tool spans."""
    spans = []
    root_id = f"{abs(hash(trace)) % 2**60:016x}"
    if root is not None:
        root_span = _span(trace, at, root.pop("operation", "workflow"), **root, **attribution)
        spans.append(root_span)
        root_id = root_span.span_id
    for index, call in enumerate(calls):
        parent = call.pop("parent", root_id)
        spans.append(
            _span(
                trace, at + timedelta(minutes=index, seconds=1), "chat", parent=parent, **call, **attribution
            )
        )
    for index in range(tools):
        spans.append(
            _span(
                trace,
                at + timedelta(minutes=index, seconds=30),
                "execute_tool",
                parent=root_id,
                tool_name="search",
                **attribution,
            )
        )
    return spans


def scenario_spans() -> list[SpanUsage]:
    acme = {"tenant": "acme", "workflow": "triage", "feature": "triage", "session": "s1"}
    globex = {"tenant": "globex", "workflow": "summarize", "feature": "summarize", "session": "s2"}
    premium = {"model": "gpt-4.1", "model_class": "premium"}
    spans: list[SpanUsage] = []
    spans += _run(
        "a1",
        T0,
        {},
        [
            {**premium, "cost_usd": 0.10, "input_tokens": 1000, "output_tokens": 100, "tool_calls": 1},
            {**premium, "cost_usd": 0.20, "input_tokens": 1500, "output_tokens": 100},
        ],
        1,
        **acme,
        action="a1",
        user="u1",
    )
    spans += _run(
        "a2",
        T0 + timedelta(minutes=10),
        {"status_error": True, "error_type": "TimeoutError"},
        [{**premium, "cost_usd": 0.50, "input_tokens": 2000, "output_tokens": 200, "tool_calls": 2}],
        2,
        **acme,
        action="a2",
        user="u1",
    )
    spans += _run(
        "a3",
        T0 + timedelta(minutes=20),
        {},
        [
            {
                "model": "gpt-4.1-mini",
                "model_class": "standard",
                "downgraded_from": "gpt-4.1",
                "cost_usd": 0.05,
                "input_tokens": 2500,
                "output_tokens": 100,
            }
        ],
        0,
        **acme,
        action="a3",
        user="u2",
    )
    g1_root = _span(
        "g1",
        T0 + timedelta(minutes=30),
        "chat",
        model="claude-sonnet-4-5",
        model_class="standard",
        cost_usd=0.30,
        input_tokens=3000,
        output_tokens=300,
        **globex,
        action="g1",
        user="u3",
    )
    spans.append(g1_root)
    spans += _run(
        "g1",
        T0 + timedelta(minutes=31),
        None,
        [
            {
                "parent": g1_root.span_id,
                "model": "claude-haiku-4-5",
                "model_class": "economy",
                "downgraded_from": "claude-sonnet-4-5",
                "cost_usd": 0.10,
                "input_tokens": 500,
                "output_tokens": 50,
            }
        ],
        0,
        **globex,
        action="g1",
        user="u3",
    )
    spans += _run(
        "g2",
        T0 + timedelta(minutes=40),
        None,
        [
            {
                "model": "claude-sonnet-4-5",
                "model_class": "standard",
                "cost_usd": 0.20,
                "input_tokens": 1000,
                "output_tokens": 0,
                "status_error": True,
                "error_type": "RateLimitError",
            }
        ],
        0,
        **globex,
        action="g2",
        user="u3",
    )
    spans.append(
        _span(
            "c1",
            T0 + timedelta(minutes=50),
            "chat",
            model="gpt-4.1",
            model_class="premium",
            cost_usd=0.40,
            input_tokens=4000,
            output_tokens=400,
            tenant="globex",
            feature="chat",
            user="u4",
        )
    )
    spans.append(
        _span(
            "old",
            T0 - timedelta(days=1),
            "chat",
            model="gpt-4.1",
            model_class="premium",
            cost_usd=9.99,
            input_tokens=10,
            output_tokens=10,
            tenant="acme",
            workflow="triage",
            feature="triage",
            session="s-old",
            action="old",
            user="u1",
        )
    )
    return spans


def redelivered(spans: list[SpanUsage]) -> list[SpanUsage]:
    """The spans of run A1 again, as the sink re-inserts a batch it could not commit."""
    return [span for span in spans if span.trace_id.startswith("a1")]


def _signal(key: str, minutes: int, action: str, spent: float, **extra) -> Signal:
    """A signal for `key`'s tenant-daily budget of 50 USD, issued `minutes` after T0 (its day is T0's)."""
    return make_signal(
        action,
        key=key,
        spent=spent,
        burn_rate_per_hour=6.0,
        issued_at=T0 + timedelta(minutes=minutes),
        reason=f"{key} at {spent / 50:.0%}",
        **extra,
    )


def scenario_signals() -> list[Signal]:
    return [
        _signal("acme", 10, "ok", 25.0),
        _signal("acme", 20, "warn", 37.5),
        _signal("acme", 30, "downgrade", 45.0, downgrade_to="standard"),
        _signal("acme", 35, "downgrade", 46.0, downgrade_to="standard"),  # a refresh: no change
        _signal("acme", 50, "throttle", 51.0),
        _signal("globex", 15, "ok", 10.0),
        _signal("globex", 45, "warn", 36.0),
    ]


#: The answers, by hand (model calls in range: A1 2, A2 1, A3 1, G1 2, G2 1, chat 1 = 8).
EXPECTED = {
    # 0.10 + 0.20 + 0.50 + 0.05 + 0.30 + 0.10 + 0.20 + 0.40
    "spend_total": 1.85,
    "spend_by_tenant": {"acme": 0.85, "globex": 1.00},
    "spend_by_workflow": {"triage": 0.85, "summarize": 0.60, "": 0.40},
    "spend_by_feature": {"triage": 0.85, "summarize": 0.60, "chat": 0.40},
    # premium: A1 0.30 + A2 0.50 + chat 0.40; standard: A3 0.05 + G1 root 0.30 + G2 0.20; economy: G1 child
    "spend_by_model_class": {"premium": 1.20, "standard": 0.55, "economy": 0.10},
    "spend_by_model": {
        "gpt-4.1": 1.20,
        "claude-sonnet-4-5": 0.50,
        "claude-haiku-4-5": 0.10,
        "gpt-4.1-mini": 0.05,
    },
    # u1: A1 0.30 + A2 0.50; u3: G1 0.40 + G2 0.20; u4: 0.40; u2: A3 0.05
    "top_spenders": [("u1", 0.80), ("u3", 0.60), ("u4", 0.40), ("u2", 0.05)],
    # runs A1 ok, A2 failed (root), A3 ok, G1 ok (root chat), G2 failed (a failed span, no root stored)
    "workflow_runs": 5,
    "succeeded_workflows": 3,
    # (A1 0.30 + A3 0.05 + G1 0.40) / 3
    "cost_per_successful_workflow": 0.25,
    # all runs (0.30 + 0.50 + 0.05 + 0.40 + 0.20) / 3 successes
    "cost_per_success_all_in": 1.45 / 3,
    # triage: (0.30 + 0.05) / 2; summarize: 0.40 / 1
    "cost_per_success_by_workflow": {"triage": (3, 2, 0.175), "summarize": (2, 1, 0.40)},
    # tokens of spans with an action: A1 2700, A2 2200, A3 2600, G1 3850, G2 1000 = 12350, over 5 actions
    "tokens_per_action": 2470.0,
    # tool spans in sessions: A1 1 + A2 2 = 3, over sessions s1 and s2
    "tool_calls_per_session": 1.5,
    # downgraded: A3 and G1's child, of 8 model calls
    "fallback_pct": 25.0,
    "fallbacks_by_model_class": {"premium": (4, 0), "standard": (3, 1), "economy": (1, 1)},
    "tool_calls_by_session": {"s1": (3, 3, 4), "s2": (0, 0, 3)},  # executed, requested, model calls
    # s1 inputs 1000, 1500, 2000, 2500; s2 3000, 500, 1000
    "context_growth": {"s1": (4, 1000, 2500, 2500, 500.0), "s2": (3, 3000, 1000, 3000, -1000.0)},
    "context_by_call_index": {1: 2000.0, 2: 1000.0, 3: 1500.0, 4: 2500.0},
    # the latest signal of each key
    "budget_status": {"acme": ("throttle", 51.0, 50.0, 1.02), "globex": ("warn", 36.0, 50.0, 0.72)},
    # changes of action: acme ok, warn, downgrade, throttle; globex ok, warn
    "signal_timeline": [
        ("acme", "ok"),
        ("globex", "ok"),
        ("acme", "warn"),
        ("acme", "downgrade"),
        ("globex", "warn"),
        ("acme", "throttle"),
    ],
    # with tenant = acme only
    "acme": {
        "spend_total": 0.85,
        "cost_per_successful_workflow": 0.175,
        "tokens_per_action": 2500.0,  # (2700 + 2200 + 2600) / 3
        "tool_calls_per_session": 3.0,
        "fallback_pct": 25.0,  # 1 of 4
    },
}
