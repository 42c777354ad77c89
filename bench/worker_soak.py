"""Stream worker soak: simulated days of new sessions and new calendar windows; state must stay flat.

One worker runs with session, daily and rolling budgets (`BUDGETS_YAML`). Each simulated day
sends --sessions-per-day new agent sessions (two model calls and two tool calls each, of a
tenant and user among --tenants x 20), their spans stamped through that day, so event time
runs a day per few real seconds. The worker's allowed skew ahead is widened to a year so the
spans keep their stamps (the broker's LogAppendTime bounds them otherwise), and its eviction
clock, the latest trusted event time, moves with them (`stream/eviction.py`). The changelog
segments roll every few seconds so the broker's cleaner can drop what eviction tombstoned.

At the end of each day, once everything sent is accounted and swept: the worker's VmRSS, its
table sizes (its `table sizes` log line), whether the day's tenant totals on
`burnguard.budget_usage` equal the sums sent (live windows stay exact), the changelog records
on the broker; then the worker is restarted and the time until it is ready again (its tables
recovered) is the recovery time, and VmRSS is read again.

    .venv/bin/python bench/worker_soak.py [--days 6] [--sessions-per-day 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

from burnguard.contracts import attributes as attr
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from pipeline_setup import (
    BenchPipeline,
    GroupOffsets,
    end_offsets,
    latest_usage,
    machine_note,
    note,
    proc_status_kb,
    produce_all,
    topic_sizes,
)

BUDGETS_YAML = """\
budgets:
  - {id: session-steps, scope: session, window: session, metric: tool_calls, limit: 1.0e9}
  - {id: session-cost, scope: session, window: session, metric: tokens, limit: 1.0e12}
  - {id: tenant-day, scope: tenant, window: day, metric: tokens, limit: 1.0e12}
  - {id: user-day, scope: user, window: day, metric: tokens, limit: 1.0e12}
  - {id: tenant-1h, scope: tenant, window: 1h, metric: tokens, limit: 1.0e12}
context_guards:
  - {id: long-context, max_input_tokens: 1000000, growth_calls: 50}
"""
DAY_NS = 86_400 * 1_000_000_000
SESSIONS_PER_MESSAGE = 25
USERS_PER_TENANT = 20
SIZES = re.compile(r"table sizes: (\{[^}]*\})")
WORKER_ENV = {
    "BURNGUARD_CLOCK_SKEW_AHEAD_S": str(400 * 86400),
    "BURNGUARD_EVICT_INTERVAL_S": "1",
    "BURNGUARD_SNAPSHOT_INTERVAL_S": "1",
    "BURNGUARD_CHANGELOG_SEGMENT_S": "5",
    "BURNGUARD_CHANGELOG_TOMBSTONE_S": "5",
}


class SessionLoad:
    """New sessions, each with two model calls and two tool calls; the tokens sent per tenant and day."""

    def __init__(self, tenants: int) -> None:
        self.tenants = tenants
        self.sessions = 0
        self.sent = 0  # messages
        self.tokens: Counter[tuple[str, int]] = Counter()

    def messages(self, day: int, start_ns: int, sessions: int) -> list[tuple[bytes, bytes]]:
        """The day's messages, their spans stamped from the start of the day to its end, in order."""
        out = []
        for first in range(0, sessions, SESSIONS_PER_MESSAGE):
            at_ns = start_ns + (first + SESSIONS_PER_MESSAGE) * DAY_NS // (sessions + SESSIONS_PER_MESSAGE)
            out.append(self._message(day, at_ns, min(SESSIONS_PER_MESSAGE, sessions - first)))
        return out

    def _message(self, day: int, at_ns: int, sessions: int) -> tuple[bytes, bytes]:
        tenant_index = self.sent % self.tenants
        self.sent += 1
        tenant = f"tenant-{tenant_index:03d}"
        request = ExportTraceServiceRequest()
        spans = request.resource_spans.add().scope_spans.add().spans
        for _ in range(sessions):
            self.sessions += 1
            user = f"user-{tenant_index:03d}-{self.sessions * 7 % USERS_PER_TENANT:02d}"
            labels = {attr.TENANT: tenant, attr.USER_ID: user, attr.SESSION_ID: f"s-{self.sessions:09d}"}
            for step in range(4):
                span = spans.add()
                span.trace_id, span.span_id = os.urandom(16), os.urandom(8)
                span.start_time_unix_nano = at_ns - 2_000_000_000 + step
                span.end_time_unix_nano = at_ns - 1_000_000_000 + step
                values: dict[str, str | int | float] = dict(labels)
                if step % 2:
                    values |= {attr.GEN_AI_OPERATION_NAME: attr.OP_EXECUTE_TOOL, attr.GEN_AI_TOOL_NAME: "t"}
                else:
                    tokens_in = 100 + self.sessions % 50
                    values |= {
                        attr.GEN_AI_OPERATION_NAME: attr.OP_CHAT,
                        attr.GEN_AI_PROVIDER_NAME: "openai",
                        attr.GEN_AI_REQUEST_MODEL: "gpt-4.1",
                        attr.GEN_AI_USAGE_INPUT_TOKENS: tokens_in,
                        attr.GEN_AI_USAGE_OUTPUT_TOKENS: 10,
                        attr.COST_USD: 0.001,
                    }
                    self.tokens[(tenant, day)] += tokens_in + 10
                for key, value in values.items():
                    kv = span.attributes.add()
                    kv.key = key
                    if isinstance(value, int):
                        kv.value.int_value = value
                    elif isinstance(value, float):
                        kv.value.double_value = value
                    else:
                        kv.value.string_value = value
        return tenant.encode(), request.SerializeToString()


def wait_accounted(pipeline: BenchPipeline, topics: list[str], timeout: float) -> None:
    """Until the worker's group committed the ends of `topics` as they are now (later sweeps aside)."""
    ends = {topic: end_offsets(pipeline.bootstrap, topic) for topic in topics}
    offsets = GroupOffsets(pipeline.bootstrap, pipeline.app_id)
    deadline = time.monotonic() + timeout
    try:
        for topic in topics:
            while not offsets.caught_up(topic, ends[topic]):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the worker did not account {topic} in {timeout:.0f}s")
                time.sleep(0.5)
    finally:
        offsets.close()


def table_sizes(pipeline: BenchPipeline, name: str) -> dict[str, int]:
    found = SIZES.findall(pipeline.log(name))
    return json.loads(found[-1]) if found else {}


def exact_day_totals(pipeline: BenchPipeline, load: SessionLoad, day: int, day_start: datetime) -> bool:
    """Whether every tenant's snapshot of `day` equals the tokens sent for it (waits up to 60 s)."""
    expected = {
        f"tenant:{tenant}@tenant-day#{day_start.isoformat()}": float(tokens)
        for (tenant, sent_day), tokens in load.tokens.items()
        if sent_day == day
    }
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        usage = latest_usage(pipeline.bootstrap, pipeline.topics.budget_usage)
        if all(key in usage and usage[key].spent == value for key, value in expected.items()):
            return True
        time.sleep(1)
    return False


def changelog_records(pipeline: BenchPipeline) -> int:
    sizes = topic_sizes(pipeline.bootstrap)
    return sum(size for topic, size in sizes.items() if topic.endswith("-changelog"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--days", type=int, default=6, help="simulated days (default 6)")
    parser.add_argument(
        "--sessions-per-day", type=int, default=3000, help="new sessions a day (default 3000)"
    )
    parser.add_argument("--tenants", type=int, default=50, help="tenants (default 50)")
    parser.add_argument("--keep", action="store_true", help="keep the broker dir and logs")
    args = parser.parse_args()

    now = datetime.now(UTC)
    first_day = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
    load = SessionLoad(args.tenants)
    rows = []
    with BenchPipeline("worker_soak", keep=args.keep) as pipeline:
        budgets = pipeline.write("budgets.yaml", BUDGETS_YAML)
        env = {**WORKER_ENV, "BURNGUARD_BUDGETS_FILE": str(budgets)}
        name = "worker-0"
        worker = pipeline.start_worker(env, name=name)
        for day in range(args.days):
            day_start = first_day + timedelta(days=day)
            start_ns = int(day_start.timestamp()) * 1_000_000_000
            produce_all(
                pipeline.bootstrap, pipeline.topics.spans, load.messages(day, start_ns, args.sessions_per_day)
            )
            wait_accounted(pipeline, [pipeline.topics.spans, pipeline.topics.usage], timeout=600)
            time.sleep(4)  # a few sweeps at the day's latest clock
            exact = exact_day_totals(pipeline, load, day, day_start)
            sizes, rss = table_sizes(pipeline, name), proc_status_kb(worker.pid, "VmRSS") / 1024
            changelog = changelog_records(pipeline)
            pipeline.stop(name)
            name = f"worker-{day + 1}"
            started = time.monotonic()
            worker = pipeline.start_worker(env, name=name)
            recovery_s = time.monotonic() - started
            time.sleep(3)
            recovered_rss = proc_status_kb(worker.pid, "VmRSS") / 1024
            rows.append((day + 1, rss, sizes, recovery_s, recovered_rss, changelog, exact))
            note(
                f"day {day + 1}: {load.sessions} sessions so far; RSS {rss:.0f} MB; tables {sizes}; "
                f"day totals exact: {exact}; changelog records written {changelog}; "
                f"restart ready in {recovery_s:.1f}s, RSS after recovery {recovered_rss:.0f} MB"
            )
    print(f"\nmachine: {machine_note()}")
    print("day  rss_mb  window-totals  context-growth  signal-states  recovery_s  rss_after_mb  exact")
    for day, rss, sizes, recovery_s, recovered_rss, _, exact in rows:
        print(
            f"{day:>3}  {rss:>6.0f}  {sizes.get('window-totals', -1):>13}"
            f"  {sizes.get('context-growth', -1):>14}  {sizes.get('signal-states', -1):>13}"
            f"  {recovery_s:>10.1f}  {recovered_rss:>12.0f}  {exact}"
        )
    later = rows[1:] or rows
    totals = [r[2].get("window-totals", 0) for r in later]
    print(
        f"RESULT worker_soak days={len(rows)} sessions={load.sessions} "
        f"rss_mb_day2_to_end={min(r[1] for r in later):.0f}-{max(r[1] for r in later):.0f} "
        f"window_totals_day2_to_end={min(totals)}-{max(totals)} "
        f"recovery_s_day2_to_end={min(r[3] for r in later):.1f}-{max(r[3] for r in later):.1f} "
        f"exact={all(r[6] for r in rows)}"
    )


if __name__ == "__main__":
    main()
