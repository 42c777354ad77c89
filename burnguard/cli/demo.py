"""`burnguard demo`: a simulated multi-tenant app against the real pipeline.

Three tenants call models through `burnguard.llm_call` with enforcement on.
Their spans go through a real Kafka broker to the Faust worker, signals come
back to the app's BudgetGuard, and the sink writes everything to ClickHouse.
The demo ends when acme is throttled and globex has been downgraded, then
checks that ClickHouse holds exactly the spend the app recorded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from burnguard.cli.devstack import SINK_GROUP, DevStack, wait_until_consumed
from burnguard.contracts.budgets import load_budget_file
from burnguard.contracts.signals import Signal
from burnguard.contracts.topics import KafkaSettings, Topics

DEMO_BUDGETS = Path(str(resources.files("burnguard.cli") / "demo_budgets.yaml"))
_TICK_S = 0.25
_GLOBEX_CALLS_AFTER_DOWNGRADE = 5


@dataclass
class Tenant:
    """One simulated tenant: which model it asks for, how big its calls are, how often."""

    name: str
    model: str
    input_tokens: int
    output_tokens: int
    calls_per_tick: int = 1
    every_n_ticks: int = 1
    calls: int = 0
    downgraded_calls: int = 0
    denied: int = 0
    recorded_usd: float = 0.0
    last_model: str = ""
    state: str = "ok"
    done: bool = False

    def due(self, tick: int) -> bool:
        return not self.done and tick % self.every_n_ticks == 0


@dataclass
class DemoResult:
    tenants: list[Tenant]
    signals: list[Signal] = field(default_factory=list)
    clickhouse_usd: dict[str, float] = field(default_factory=dict)
    clickhouse_spans: int = 0

    @property
    def recorded_usd(self) -> dict[str, float]:
        return {t.name: t.recorded_usd for t in self.tenants}

    @property
    def totals_match(self) -> bool:
        return all(abs(self.clickhouse_usd.get(t.name, 0.0) - t.recorded_usd) < 1e-9 for t in self.tenants)

    def final_action(self, tenant: str) -> str:
        actions = [s.action for s in self.signals if s.key == tenant]
        return actions[-1] if actions else "ok"

    def saw_action(self, tenant: str, action: str) -> bool:
        return any(s.key == tenant and s.action == action for s in self.signals)

    @property
    def succeeded(self) -> bool:
        return (
            self.totals_match
            and self.saw_action("acme", "throttle")
            and self.saw_action("globex", "downgrade")
            and not self.saw_action("globex", "throttle")
        )


def demo_tenants() -> list[Tenant]:
    return [
        Tenant("acme", "gpt-4.1", input_tokens=30_000, output_tokens=2_000, calls_per_tick=2),
        Tenant("globex", "gpt-4.1", input_tokens=10_000, output_tokens=500),
        Tenant("initech", "gpt-4.1-mini", input_tokens=5_000, output_tokens=500, every_n_ticks=4),
    ]


def _table(tenants: list[Tenant], elapsed: float) -> Table:
    table = Table(title=f"burnguard demo — {elapsed:5.1f}s")
    for column in ("tenant", "model", "calls", "downgr.", "denied", "USD", "signal"):
        table.add_column(column, justify="left" if column in ("tenant", "model", "signal") else "right")
    colors = {"ok": "green", "warn": "yellow", "downgrade": "magenta", "throttle": "red"}
    for t in tenants:
        table.add_row(
            t.name,
            t.last_model or t.model,
            str(t.calls),
            str(t.downgraded_calls),
            str(t.denied),
            f"{t.recorded_usd:.4f}",
            f"[{colors[t.state]}]{t.state}[/]",
        )
    return table


@contextmanager
def live_display(renderable: Table, console: Console) -> Iterator[Live]:
    """rich's `Live`, whose last frame ends its line wherever the output goes.

    On a terminal `Live` ends with a newline; into a pipe or a log (`make demo | tee`) it does
    not, and the next table's title would be printed on the last frame's bottom border.
    """
    with Live(renderable, console=console, refresh_per_second=8) as live:
        yield live
    if not console.is_terminal:
        console.line()


def _call(tenant: Tenant) -> None:
    import burnguard

    with burnguard.attribute(tenant=tenant.name, workflow="demo", feature="chat"):
        try:
            with burnguard.llm_call(tenant.model, "openai") as call:
                call.set_usage(tenant.input_tokens, tenant.output_tokens)
        except burnguard.BudgetExceeded:
            tenant.denied += 1
            return
    tenant.calls += 1
    tenant.last_model = call.model
    tenant.recorded_usd += call.cost_usd or 0.0
    if call.model != call.requested_model:
        tenant.downgraded_calls += 1


def _finished(tenants: dict[str, Tenant]) -> bool:
    acme, globex = tenants["acme"], tenants["globex"]
    if globex.downgraded_calls >= _GLOBEX_CALLS_AFTER_DOWNGRADE:
        globex.done = True
    if acme.denied >= 3:
        acme.done = True
    return acme.done and globex.done


def simulate(bootstrap: str, console: Console, timeout_s: float = 180.0) -> DemoResult:
    """Run the simulated app until acme is throttled and globex downgraded."""
    import burnguard
    from burnguard.instrumentation import Settings

    os.environ.setdefault("OTEL_BSP_SCHEDULE_DELAY", "50")
    tenants = demo_tenants()
    by_name = {t.name: t for t in tenants}
    result = DemoResult(tenants)

    def on_signal(signal: Signal) -> None:
        result.signals.append(signal)
        if signal.key in by_name:
            by_name[signal.key].state = signal.action

    settings = Settings(kafka=KafkaSettings(bootstrap=bootstrap), topics=Topics.from_env())
    budgets = load_budget_file(DEMO_BUDGETS)
    guard = burnguard.BudgetGuard(settings.kafka, settings.topics, budgets, on_signal=on_signal)
    runtime = burnguard.configure(settings, service_name="demo-app", budgets=budgets, guard=guard)
    started = time.monotonic()
    try:
        with live_display(_table(tenants, 0), console) as live:
            tick = 0
            while not _finished(by_name):
                if time.monotonic() - started > timeout_s:
                    raise TimeoutError(f"no throttle/downgrade within {timeout_s:.0f}s")
                for tenant in tenants:
                    if tenant.due(tick):
                        for _ in range(tenant.calls_per_tick):
                            _call(tenant)
                tick += 1
                live.update(_table(tenants, time.monotonic() - started))
                time.sleep(_TICK_S)
    finally:
        runtime.flush()
        runtime.shutdown()
    return result


def read_back(stack: DevStack, bootstrap: str, result: DemoResult, console: Console) -> None:
    """Let the sink finish, stop it (chDB allows one process per directory), and read ClickHouse."""
    topics = Topics.from_env()
    lag = wait_until_consumed(bootstrap, SINK_GROUP, [topics.spans, topics.signals], timeout=120)
    if lag:
        console.print(f"[red]the sink still has {lag} messages to write[/]")
    stack.stop_component("sink")
    from burnguard.sinks import queries
    from burnguard.sinks.clickhouse import connect

    client = connect(stack.clickhouse_dsn)
    try:
        result.clickhouse_usd = queries.spend_by_tenant(client)
        result.clickhouse_spans = queries.span_count(client)
    finally:
        client.close()


def print_summary(result: DemoResult, console: Console) -> None:
    signals = Table(title="signals received by the app's BudgetGuard")
    for column in ("issued", "key@budget", "action", "spent", "limit", "ratio"):
        signals.add_column(column)
    for s in result.signals:
        signals.add_row(
            s.issued_at.strftime("%H:%M:%S.%f")[:-3],
            s.kafka_key,
            s.action,
            f"{s.spent:.4f}",
            f"{s.limit:g}",
            f"{s.ratio:.2f}",
        )
    console.print(signals)
    totals = Table(title="per-tenant spend: recorded by the app vs read back from ClickHouse")
    for column in ("tenant", "app USD", "ClickHouse USD", "equal", "last signal"):
        totals.add_column(column)
    for t in result.tenants:
        stored = result.clickhouse_usd.get(t.name, 0.0)
        same = abs(stored - t.recorded_usd) < 1e-9
        totals.add_row(
            t.name,
            f"{t.recorded_usd:.6f}",
            f"{stored:.6f}",
            "[green]yes[/]" if same else "[red]NO[/]",
            result.final_action(t.name),
        )
    console.print(totals)
    console.print(f"spans in ClickHouse: {result.clickhouse_spans}")
