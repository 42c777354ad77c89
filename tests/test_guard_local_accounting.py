"""The guard's local accounting between signals (docs/ARCHITECTURE.md §12), fed with `apply()`: no Kafka."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
from burnguard.contracts import attributes as attr
from burnguard.contracts.budgets import BudgetConfig, parse_budget_yaml
from burnguard.contracts.signals import Signal
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.instrumentation.guard import BudgetExceeded, BudgetGuard
from burnguard.instrumentation.local_accounting import MAX_IN_FLIGHT_S, Reservation

from tests import factories
from tests.factories import LADDER_YAML

NOW = datetime(2025, 5, 14, 13, 0, tzinfo=UTC)
ACME = {"tenant": "acme"}
CALL = {attr.GEN_AI_USAGE_INPUT_TOKENS: 2000, attr.GEN_AI_USAGE_OUTPUT_TOKENS: 500}
MODELS = LADDER_YAML
NO_BUDGETS = parse_budget_yaml(MODELS)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def make_guard(config: BudgetConfig = NO_BUDGETS, clock: Clock | None = None) -> BudgetGuard:
    return BudgetGuard(KafkaSettings(), Topics(), config, clock=clock or Clock())


#: A warn at 14 of 20 for acme, issued a second before NOW, valid for two minutes.
make_signal = partial(
    factories.make_signal,
    spent=14.0,
    limit=20.0,
    issued_at=NOW - timedelta(seconds=1),
    ttl=timedelta(minutes=2),
    window_start=datetime(2025, 5, 14, tzinfo=UTC),
    window_end=datetime(2025, 5, 15, tzinfo=UTC),
)


def prime(guard: BudgetGuard, cost: float, tool_calls: int = 0) -> None:
    """End one call of gpt-4.1 for another tenant, so the guard knows what the next one is likely to use."""
    guard.reserve("gpt-4.1", {"tenant": "someone-else"}).settle(cost, {**CALL, attr.TOOL_CALLS: tool_calls})


def hold(guard: BudgetGuard, attribution: dict[str, str] = ACME) -> int:
    """Reserve calls without ending them until the guard refuses one; how many it let through."""
    count = 0
    with pytest.raises(BudgetExceeded):
        while count < 1_000:
            guard.reserve("gpt-4.1", attribution)
            count += 1
    return count


def test_calls_in_flight_count_toward_the_limit() -> None:
    guard = make_guard()
    prime(guard, 0.25)
    guard.apply(make_signal(spent=9.0, limit=10.0))
    assert hold(guard) == 4  # 9 + 4 x 0.25 reaches 10: the fifth is refused
    assert guard.stats.local_denied == guard.stats.denied == 1


def test_a_call_that_ends_settles_what_it_used() -> None:
    guard = make_guard()
    prime(guard, 0.25)
    guard.apply(make_signal(spent=9.0, limit=10.0))
    calls = [guard.reserve("gpt-4.1", ACME) for _ in range(4)]
    calls[0].settle(None, {})  # failed before it was priced: it used nothing (and sets no estimate)
    calls[1].settle(0.5, CALL)  # cost more than estimated
    calls[1].settle(0.5, CALL)  # settling twice counts once
    # 9 + 0.5 settled + 2 x 0.25 in flight = 10: refused.
    with pytest.raises(BudgetExceeded):
        guard.reserve("gpt-4.1", ACME)
    calls[2].settle(0.0, CALL)
    assert guard.enforce("gpt-4.1", ACME) == "gpt-4.1"  # 9.75 now


def test_local_deny_names_budget_estimated_spend_limit_and_reset() -> None:
    guard = make_guard()
    prime(guard, 1.0)
    guard.apply(make_signal(spent=14.0, limit=20.0))
    for _ in range(6):
        guard.reserve("gpt-4.1", ACME).settle(1.0, CALL)
    decision = guard.check("gpt-4.1", ACME)
    assert decision.action == "deny" and decision.signal is not None
    assert decision.signal.spent == pytest.approx(20.0)
    with pytest.raises(BudgetExceeded) as caught:
        guard.enforce("gpt-4.1", ACME)
    error = caught.value
    assert (error.budget, error.limit) == ("tenant-daily", 20.0)
    assert error.spent == pytest.approx(20.0)
    assert error.resets_at == datetime(2025, 5, 15, tzinfo=UTC)
    assert "tenant-daily" in str(error) and "20.0000 of 20 USD" in str(error) and "2025-05-15" in str(error)
    assert guard.stats.local_denied == 2
    assert guard.check("gpt-4.1", {"tenant": "globex"}).action == "allow"  # other keys are untouched


def test_a_burst_of_concurrent_callers_after_a_warn_stops_at_the_limit() -> None:
    guard = make_guard()
    prime(guard, 0.008)
    guard.apply(make_signal(spent=14.0, limit=20.0))
    spent = [0.0]
    lock = threading.Lock()
    start = threading.Barrier(50)

    def caller() -> None:
        start.wait()
        for _ in range(1_000):  # ends even when nothing denies
            try:
                call = guard.reserve("gpt-4.1", ACME)
            except BudgetExceeded:
                return
            call.settle(0.008, CALL)
            with lock:
                spent[0] += 0.008

    threads = [threading.Thread(target=caller) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # At most the call that found the projection just under the limit goes past it.
    assert 20.0 - 0.008 <= 14.0 + spent[0] < 20.0 + 0.008 + 1e-9
    assert guard.stats.local_denied == 50


def test_a_signal_counts_the_calls_already_in_flight() -> None:
    guard = make_guard()
    prime(guard, 0.25)
    in_flight = [guard.reserve("gpt-4.1", ACME) for _ in range(3)]
    guard.apply(make_signal(spent=9.0, limit=10.0))
    assert hold(guard) == 1  # 9 + 3 x 0.25 in flight leaves room for one more
    for call in in_flight:
        call.settle(0.0, CALL)
    assert guard.check("gpt-4.1", ACME).action == "allow"


@pytest.mark.parametrize(
    "newer",
    [  # issued when the test runs: one issued at collection may have expired by then
        partial(make_signal, "warn", spent=14.5, limit=20.0),  # the worker has counted the calls since
        partial(make_signal, "ok", spent=0.2, limit=20.0),  # the window rolled over
        partial(make_signal, "warn", spent=15.0, limit=40.0),  # the limit was raised
    ],
    ids=["refresh", "ok", "raised"],
)
def test_a_newer_signal_lifts_a_local_deny(newer: Callable[[], Signal]) -> None:
    guard = make_guard()
    prime(guard, 1.0)
    guard.apply(make_signal(spent=14.0, limit=20.0))
    for _ in range(6):
        guard.reserve("gpt-4.1", ACME).settle(1.0, CALL)
    assert guard.check("gpt-4.1", ACME).action == "deny"
    guard.apply(newer())
    assert guard.check("gpt-4.1", ACME).action == "allow"
    assert guard.enforce("gpt-4.1", ACME) == "gpt-4.1"


def test_a_local_deny_ends_with_the_window_or_when_the_signal_goes_stale() -> None:
    clock = Clock()
    guard = make_guard(clock=clock)
    prime(guard, 1.0)
    guard.apply(make_signal(spent=14.0, limit=20.0, window_end=NOW + timedelta(seconds=30)))
    guard.apply(make_signal(spent=14.0, limit=20.0, budget="tenant-weekly"))
    for _ in range(6):
        guard.reserve("gpt-4.1", ACME).settle(1.0, CALL)
    assert guard.check("gpt-4.1", ACME).action == "deny"
    clock.advance(30)
    assert guard.check("gpt-4.1", ACME).signal.budget == "tenant-weekly"  # the daily window is over
    clock.advance(90)
    assert guard.check("gpt-4.1", ACME).action == "allow"  # the weekly signal expired: no base to count on


def test_a_tombstone_removes_the_tally() -> None:
    guard = make_guard()
    prime(guard, 1.0)
    signal = make_signal(spent=19.5, limit=20.0)
    guard.apply(signal)
    guard.reserve("gpt-4.1", ACME)
    assert guard.check("gpt-4.1", ACME).action == "deny"
    guard._ingest(signal.kafka_key.encode(), None)
    assert guard.check("gpt-4.1", ACME).action == "allow"


@pytest.mark.parametrize(
    ("metric", "spent", "limit", "allowed"),
    [
        ("tokens", 90_000, 100_000, 4),  # 2,500 tokens a call: 90,000 + 4 x 2,500 = 100,000
        ("input_tokens", 90_000, 100_000, 5),  # 2,000 input tokens a call
        ("calls", 7, 10, 3),
        ("tool_calls", 7, 10, 2),  # each call requested 2 tools
    ],
)
def test_the_signals_metric_is_the_one_counted(metric: str, spent: float, limit: float, allowed: int) -> None:
    guard = make_guard()
    prime(guard, 0.5, tool_calls=2)
    guard.apply(make_signal(spent=spent, limit=limit, metric=metric))
    assert hold(guard) == allowed


def test_an_unknown_metric_is_not_accounted() -> None:
    guard = make_guard()
    prime(guard, 1.0)
    guard.apply(make_signal(spent=19.99, limit=20.0, metric="gpu_seconds"))
    assert [guard.reserve("gpt-4.1", ACME) for _ in range(5)]


def test_calls_count_toward_every_matching_scope_key_only() -> None:
    guard = make_guard()
    prime(guard, 1.0)
    guard.apply(make_signal(spent=17.0, limit=20.0, scope="tenant+feature", key="acme/chat", budget="tf"))
    guard.apply(make_signal(spent=5.0, limit=20.0, scope="model_class", key="premium", budget="premium"))
    search = {"tenant": "acme", "feature": "search"}
    for _ in range(5):
        guard.reserve("gpt-4.1", search)  # counted on model_class premium only
    assert hold(guard, {"tenant": "acme", "feature": "chat"}) == 3  # acme/chat: 17 + 3 = 20
    assert hold(guard, search) == 7  # premium: 5 + 5 + 3 + 7 = 20
    assert guard.reserve("gpt-4.1-mini", search)  # standard: not premium


def test_a_downgraded_call_counts_under_its_new_model_class() -> None:
    guard = make_guard()
    prime(guard, 1.0)
    guard.apply(make_signal("downgrade", spent=17.0, limit=20.0, downgrade_to="standard", budget="td"))
    guard.apply(make_signal(spent=9.999, limit=10.0, scope="model_class", key="standard", budget="std"))
    assert guard.check("gpt-4.1", ACME).model == "gpt-4.1-mini"
    call = admit(guard, "gpt-4.1", ACME)  # downgraded to gpt-4.1-mini ($0.0016), counted on `standard`
    assert call.model == "gpt-4.1-mini"
    with pytest.raises(BudgetExceeded) as caught:
        admit(guard, "gpt-4.1", ACME)
    assert caught.value.budget == "std"


def admit(guard: BudgetGuard, model: str, attribution: dict[str, str]) -> Reservation:
    """The guard's two steps as `decide_call` takes them: the signals decide, local accounting reserves."""
    verdict = guard.check_signals(model, attribution)
    assert verdict.action != "deny"
    return guard.reserve(verdict.model or model, attribution)


def settle_downgraded_calls_until_refused(guard: BudgetGuard, clock: Clock) -> int:
    """Downgraded acme calls, one every 0.2 s, each ended at once, until the guard refuses one; how many."""
    allowed = 0
    with pytest.raises(BudgetExceeded):
        while allowed < 100:
            clock.advance(0.2)
            admit(guard, "gpt-4.1", ACME).settle(STANDARD_USD, BIG_CALL)
            allowed += 1
    return allowed


def test_a_budget_that_never_throttles_is_never_denied_locally() -> None:
    config = parse_budget_yaml(
        MODELS
        + """\
budgets:
  - {id: tenant-daily, scope: tenant, limit: 20, actions: [{at: 0.7, do: warn}, {at: 0.9, do: downgrade}]}
  - {id: tenant-soft, scope: tenant, limit: 20, actions: [{at: 0.5, do: warn}, {at: 1.5, do: throttle}]}
"""
    )
    guard = make_guard(config)
    prime(guard, 1.0)
    guard.apply(make_signal(spent=19.0, limit=20.0))
    guard.apply(make_signal(spent=19.0, limit=20.0, budget="tenant-soft"))
    assert hold(guard) == 11  # tenant-daily never throttles; tenant-soft at 1.5 x 20 = 30


def test_calls_ended_after_the_signal_was_issued_count_the_ones_before_do_not() -> None:
    config = parse_budget_yaml(MODELS + "budgets:\n  - {id: tenant-daily, scope: tenant, limit: 20}\n")
    clock = Clock()
    guard = make_guard(config, clock)
    prime(guard, 1.0)
    calls = [guard.reserve("gpt-4.1", ACME) for _ in range(4)]
    calls[0].settle(1.0, CALL)  # ended before the signal was issued: may be in its spend
    clock.advance(1)
    issued = clock.now
    clock.advance(1)
    calls[1].settle(1.0, CALL)  # ended after it was issued, before it arrived: not in its spend
    clock.advance(1)
    # The signal counts calls[0] (this process spends alone on acme: share 1).
    guard.apply(make_signal(spent=1.0, limit=5.0, issued_at=issued, burn_rate_per_hour=60.0))
    calls[2].settle(1.0, CALL)  # ended after it arrived
    # 1 + 2 settled since issued_at + 1 in flight (estimated at $1): one more call fits.
    assert guard.check("gpt-4.1", ACME).action == "allow"
    guard.reserve("gpt-4.1", ACME)
    assert guard.check("gpt-4.1", ACME).action == "deny"


def test_own_use_stands_for_the_whole_key_by_this_process_share() -> None:
    # Another process spends as much as this one: the key's burn rate is twice this process's.
    config = parse_budget_yaml(MODELS + "budgets:\n  - {id: tenant-daily, scope: tenant, limit: 20}\n")
    clock = Clock()
    guard = make_guard(config, clock)
    for _ in range(7):
        guard.reserve("gpt-4.1", ACME).settle(1.0, CALL)
        clock.advance(1)
    # The worker measures at least a minute: $14 (7 ours, 7 theirs) over a minute = $840/h.
    guard.apply(make_signal(spent=14.0, limit=20.0, issued_at=clock.now, burn_rate_per_hour=840.0))
    clock.advance(1)
    assert hold(guard) == 3  # 14 + 3 x $1 of ours x 2 = 20


def test_share_is_one_when_the_budget_is_not_configured_or_this_process_was_idle() -> None:
    config = parse_budget_yaml(MODELS + "budgets:\n  - {id: tenant-daily, scope: tenant, limit: 20}\n")
    clock = Clock()
    guard = make_guard(config, clock)
    prime(guard, 1.0)
    guard.apply(make_signal(spent=14.0, limit=20.0, issued_at=clock.now, burn_rate_per_hour=840.0))
    guard.apply(
        make_signal(spent=14.0, limit=20.0, issued_at=clock.now, budget="elsewhere", burn_rate_per_hour=840.0)
    )
    assert hold(guard) == 6


def test_a_reservation_never_settled_is_released_after_a_while() -> None:
    clock = Clock()
    guard = make_guard(clock=clock)
    prime(guard, 0.25)
    guard.apply(make_signal(spent=9.0, limit=10.0, expires_at=NOW + timedelta(hours=1)))
    for _ in range(4):
        guard.reserve("gpt-4.1", ACME)  # calls whose `end` never comes
    assert guard.check("gpt-4.1", ACME).action == "deny"
    clock.advance(MAX_IN_FLIGHT_S + 1)
    guard.reserve("gpt-4.1", {"tenant": "globex"})  # any call lets the guard sweep
    assert guard.check("gpt-4.1", ACME).action == "allow"


def test_check_does_not_reserve() -> None:
    guard = make_guard()
    prime(guard, 0.25)
    guard.apply(make_signal(spent=9.0, limit=10.0))
    for _ in range(20):
        assert guard.check("gpt-4.1", ACME).action == "allow"
        assert guard.enforce("gpt-4.1", ACME) == "gpt-4.1"
    assert hold(guard) == 4


def test_the_call_path_reserves_at_start_and_settles_at_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    from burnguard.instrumentation.calls import start_llm_call
    from burnguard.instrumentation.runtime import reset_runtime
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import burnguard

    for name in ("BURNGUARD_ENFORCE", "BURNGUARD_BUDGETS_FILE", "BURNGUARD_FAIL_MODE"):
        monkeypatch.delenv(name, raising=False)
    guard = make_guard()
    monkeypatch.setattr(guard, "start", lambda wait_s=10.0: guard)  # fed by apply(): no Kafka
    monkeypatch.setattr(guard, "stop", lambda timeout_s=10.0: None)
    exporter = InMemorySpanExporter()
    reset_runtime()
    runtime = burnguard.configure(
        service_name="app", exporter=exporter, budgets=NO_BUDGETS, guard=guard, batch=False, set_global=False
    )
    try:
        with burnguard.attribute(tenant="acme"):
            burnguard.record_llm_call("gpt-4.1", "openai", 2000, 500, enforce=True)  # $0.008: the estimate
            guard.apply(make_signal(spent=0.975, limit=1.0))
            calls = [start_llm_call("gpt-4.1", "openai") for _ in range(4)]  # 0.975 + 3 x 0.008 < 1
            with pytest.raises(BudgetExceeded):
                start_llm_call("gpt-4.1", "openai")
            calls[0].set_usage(2000, 500)
            calls[0].end()  # settled at its real cost: the projection stays
            with pytest.raises(BudgetExceeded):
                start_llm_call("gpt-4.1", "openai")
            calls[1].fail(TimeoutError("provider timed out"))
            calls[1].end()  # used nothing: its reservation is released
            start_llm_call("gpt-4.1", "openai").end()
    finally:
        runtime.shutdown()
        reset_runtime()
    refused = [
        s for s in exporter.get_finished_spans() if s.attributes.get(attr.ERROR_TYPE) == "BudgetExceeded"
    ]
    assert len(refused) == 2
    assert all(s.attributes[attr.COST_USD] == 0.0 for s in refused)
    assert guard.stats.local_denied == 2


#: The issue-16 ladder: $1 a day, downgrade to standard at half, throttle at the limit.
DOWNGRADE_THEN_THROTTLE = parse_budget_yaml(
    MODELS
    + """\
budgets:
  - {id: tenant-daily, scope: tenant, limit: 1,
     actions: [{at: 0.5, do: downgrade, to: standard}, {at: 1.0, do: throttle}]}
"""
)
BIG_CALL = {attr.GEN_AI_USAGE_INPUT_TOKENS: 30_000, attr.GEN_AI_USAGE_OUTPUT_TOKENS: 6_000}
PREMIUM_USD, STANDARD_USD = 0.108, 0.0216  # BIG_CALL on gpt-4.1 and on gpt-4.1-mini


def daily_signal(action: str, spent: float, issued_at: datetime, **fields: object) -> Signal:
    return make_signal(action, spent=spent, limit=1.0, issued_at=issued_at, **fields)


def test_a_downgraded_call_reserves_the_price_of_the_model_it_runs_on() -> None:
    # Calls in flight right after a downgrade: no gpt-4.1-mini call has ended yet, so the estimate
    # is the last gpt-4.1 call's usage priced at gpt-4.1-mini's price, not gpt-4.1's cost.
    clock = Clock()
    guard = make_guard(DOWNGRADE_THEN_THROTTLE, clock)
    for _ in range(5):
        guard.reserve("gpt-4.1", ACME).settle(PREMIUM_USD, BIG_CALL)
    clock.advance(0.5)
    guard.apply(daily_signal("downgrade", 0.54, clock.now, downgrade_to="standard"))
    in_flight = 0
    with pytest.raises(BudgetExceeded):
        while in_flight < 100:
            admit(guard, "gpt-4.1", ACME)  # downgraded: runs on gpt-4.1-mini
            in_flight += 1
    # 0.54 + 21 x 0.0216 = 0.9936 < 1: the 22nd fits; 22 reach 1.0152 and the 23rd is refused.
    assert in_flight == 22


def test_a_lone_process_after_a_downgrade_is_not_refused_while_a_call_still_fits() -> None:
    # One process: dear calls first, then downgraded ones for over a minute. The worker's burn rate
    # averages its whole span (the dear calls too); this process's last minute holds only cheap ones.
    # Their ratio is no share: the process spent everything the signal counts.
    clock = Clock()
    guard = make_guard(DOWNGRADE_THEN_THROTTLE, clock)
    started = clock.now
    for _ in range(5):
        guard.reserve("gpt-4.1", ACME).settle(PREMIUM_USD, BIG_CALL)
        clock.advance(0.2)
    guard.apply(daily_signal("downgrade", 0.54, clock.now, downgrade_to="standard"))
    spent = 0.54
    for _ in range(10):  # one downgraded call every 8 s
        clock.advance(8)
        admit(guard, "gpt-4.1", ACME).settle(STANDARD_USD, BIG_CALL)
        spent += STANDARD_USD
    clock.advance(1)
    seconds = (clock.now - started).total_seconds()
    # A refresh: the worker has counted every call; its rate is the spend over the time it saw.
    guard.apply(
        daily_signal(
            "downgrade", spent, clock.now, downgrade_to="standard", burn_rate_per_hour=spent / seconds * 3600
        )
    )
    allowed = settle_downgraded_calls_until_refused(guard, clock)
    # 0.756 + 11 x 0.0216 = 0.9936 < 1: the 12th call fits, the 13th would not.
    assert round(spent, 4) == 0.756 and allowed == 12


def test_a_call_is_estimated_by_its_keys_last_call_of_the_model_not_another_keys() -> None:
    # One process serves a tenant near its limit with small calls and another tenant with big ones
    # on the same model: acme's next call is estimated by acme's last one, not globex's.
    guard = make_guard()
    guard.apply(make_signal(spent=9.905, limit=10.0))
    guard.reserve("gpt-4.1", ACME).settle(0.01, CALL)  # acme: 9.915
    guard.reserve("gpt-4.1", {"tenant": "globex"}).settle(1.0, CALL)  # the process's last gpt-4.1 call
    guard.apply(
        make_signal(spent=9.915, limit=10.0)
    )  # a refresh that counted acme's call: learned carries over
    assert hold(guard) == 9  # 9.915 + 8 x 0.01 = 9.995 < 10: the 9th fits, the 10th would not


def test_two_processes_after_a_downgrade_stand_for_each_other_by_their_share_of_the_window() -> None:
    # Two processes spend alike on acme: three dear calls each, then downgraded ones, one every 12 s
    # each, for over a minute. The worker's burn rate spans all of it (the dear calls too); this
    # process's last minute holds only cheap ones, so the ratio of the two rates (0.145) is no share
    # and would stand one call for seven. Over the same span as the signal's `spent` (the window up
    # to `issued_at`) this process spent half of it.
    clock = Clock()
    guard = make_guard(DOWNGRADE_THEN_THROTTLE, clock)
    started = clock.now
    for _ in range(3):
        guard.reserve("gpt-4.1", ACME).settle(PREMIUM_USD, BIG_CALL)
        clock.advance(0.2)
    guard.apply(daily_signal("downgrade", 6 * PREMIUM_USD, clock.now, downgrade_to="standard"))
    for _ in range(6):
        clock.advance(12)
        admit(guard, "gpt-4.1", ACME).settle(STANDARD_USD, BIG_CALL)
    clock.advance(1)
    spent = 6 * PREMIUM_USD + 12 * STANDARD_USD  # the other process's calls too
    rate = spent / (clock.now - started).total_seconds() * 3600
    guard.apply(daily_signal("downgrade", spent, clock.now, downgrade_to="standard", burn_rate_per_hour=rate))
    allowed = settle_downgraded_calls_until_refused(guard, clock)
    # 0.9072 + 2 x 2 x 0.0216 = 0.9936 < 1: a third call of ours (and one of theirs) fits; then 1.0368.
    assert round(spent, 4) == 0.9072 and allowed == 3


def test_a_process_that_started_later_stands_for_the_others_by_its_share_since_the_last_signal() -> None:
    # This process joined late: $1 of the $6 the first signal counts. Since then both processes
    # spent alike ($3 each): a second signal at $12. Over the whole window this process's share is
    # a third (each call of ours would stand for three); since the first signal it is a half.
    config = parse_budget_yaml(MODELS + "budgets:\n  - {id: tenant-daily, scope: tenant, limit: 20}\n")
    clock = Clock()
    guard = make_guard(config, clock)
    guard.reserve("gpt-4.1", ACME).settle(1.0, CALL)
    clock.advance(1)
    guard.apply(make_signal(spent=6.0, limit=20.0, issued_at=clock.now, burn_rate_per_hour=360.0))
    for _ in range(3):
        clock.advance(1)
        guard.reserve("gpt-4.1", ACME).settle(1.0, CALL)
    clock.advance(1)
    guard.apply(make_signal(spent=12.0, limit=20.0, issued_at=clock.now, burn_rate_per_hour=720.0))
    clock.advance(1)
    # 12 + 3 x $1 of ours x 2 = 18 < 20: a fourth call fits (by a third: 12 + 2 x 3 = 18, the third
    # would be the last).
    assert hold(guard) == 4
