"""BudgetGuard decisions (docs/ARCHITECTURE.md §12), fed with `apply()`: no Kafka, never `start()`."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
from burnguard.contracts.budgets import BudgetConfig, parse_budget_yaml
from burnguard.contracts.signals import Signal
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.instrumentation.guard import BudgetExceeded, BudgetGuard

import burnguard
from tests import factories
from tests.factories import MODEL_CLASSES_YAML

NOW = datetime(2025, 5, 14, 13, 0, tzinfo=UTC)
ACME = {"tenant": "acme"}

CONFIG = parse_budget_yaml(MODEL_CLASSES_YAML)


def make_guard(fail_mode: str = "open", now: datetime = NOW, config: BudgetConfig = CONFIG) -> BudgetGuard:
    return BudgetGuard(KafkaSettings(), Topics(), config, fail_mode=fail_mode, clock=lambda: now)


#: A signal for acme issued a minute before NOW, so it expires at NOW + 4 min.
make_signal = partial(factories.make_signal, issued_at=NOW - timedelta(minutes=1))


def test_no_signals_allows() -> None:
    guard = make_guard()
    decision = guard.check("gpt-4.1", ACME)
    assert decision.action == "allow" and decision.allowed
    assert decision.signal is None
    assert guard.enforce("gpt-4.1", ACME) == "gpt-4.1"


def test_throttle_denies_and_enforce_raises() -> None:
    guard = make_guard()
    guard.apply(make_signal("throttle"))
    decision = guard.check("gpt-4.1", ACME)
    assert decision.action == "deny"
    assert not decision.allowed
    assert decision.signal is not None and decision.signal.budget == "tenant-daily"
    with pytest.raises(BudgetExceeded) as caught:
        guard.enforce("gpt-4.1", ACME)
    error = caught.value
    message = str(error)
    assert "tenant-daily" in message  # the budget
    assert "52.5" in message  # the spend
    assert re.search(r"(?<![\d.])50(?![\d.])", message)  # the limit
    assert "2025-05-15T00:00:00+00:00" in message  # when it resets
    assert "acme" in message
    assert (error.budget, error.spent, error.limit) == ("tenant-daily", 52.5, 50.0)
    assert error.resets_at == datetime(2025, 5, 15, tzinfo=UTC)
    assert guard.stats.denied == 2
    assert guard.stats.signals_received == 1


def test_throttle_applies_only_to_its_key() -> None:
    guard = make_guard()
    guard.apply(make_signal("throttle"))
    assert guard.check("gpt-4.1", {"tenant": "globex"}).action == "allow"
    assert guard.check("gpt-4.1", {"user": "acme"}).action == "allow"
    assert guard.check("gpt-4.1", {}).action == "allow"


def test_warn_allows_unchanged() -> None:
    guard = make_guard()
    guard.apply(make_signal("warn"))
    assert guard.check("gpt-4.1", ACME).action == "allow"
    assert guard.enforce("gpt-4.1", ACME) == "gpt-4.1"


@pytest.mark.parametrize(
    ("model", "target", "expected"),
    [
        ("gpt-4.1", "standard", "gpt-4.1-mini"),
        ("gpt-4.1", "economy", "gpt-4.1-nano"),
        ("o3", "economy", "gpt-4.1-nano"),
        ("claude-opus-4-1", "economy", "claude-haiku-4-5"),
        ("claude-opus-4-1", None, "claude-sonnet-4-5"),  # no target class: one step down
        ("gpt-4.1-mini", None, "gpt-4.1-nano"),
    ],
)
def test_downgrade_walks_the_ladder(model: str, target: str | None, expected: str) -> None:
    guard = make_guard()
    guard.apply(make_signal("downgrade", downgrade_to=target))
    decision = guard.check(model, ACME)
    assert decision.action == "downgrade"
    assert decision.model == expected
    assert guard.enforce(model, ACME) == expected
    assert guard.stats.downgraded == 2


def test_downgrade_with_nothing_cheaper_allows_the_model() -> None:
    guard = make_guard()
    guard.apply(make_signal("downgrade", downgrade_to="standard"))
    for model in ("gpt-4.1-mini", "gpt-4.1-nano", "some-local-model"):
        decision = guard.check(model, ACME)
        assert decision.action == "allow", model
        assert guard.enforce(model, ACME) == model
    assert guard.stats.downgraded == 0


def test_most_severe_signal_wins() -> None:
    guard = make_guard()
    guard.apply(make_signal("warn", budget="tenant-hourly"))
    guard.apply(make_signal("downgrade", budget="tenant-daily", downgrade_to="standard"))
    guard.apply(make_signal("downgrade", scope="user", key="u1", budget="user-daily", downgrade_to="economy"))
    assert guard.check("gpt-4.1", ACME).model == "gpt-4.1-mini"
    guard.apply(make_signal("throttle", scope="feature", key="summarize", budget="feature-monthly"))
    # Without the throttled feature: the downgrade is the worst.
    assert guard.check("gpt-4.1", {"tenant": "acme", "feature": "translate"}).action == "downgrade"
    # With it: deny, whatever order the signals arrived in.
    decision = guard.check("gpt-4.1", {"tenant": "acme", "feature": "summarize", "user": "u1"})
    assert decision.action == "deny"
    assert decision.signal.budget == "feature-monthly"


def test_ok_for_the_same_budget_lifts_the_restriction() -> None:
    guard = make_guard()
    guard.apply(make_signal("throttle"))
    guard.apply(make_signal("downgrade", budget="tenant-monthly", downgrade_to="standard"))
    assert guard.check("gpt-4.1", ACME).action == "deny"
    guard.apply(make_signal("ok"))  # tenant-daily rolled over
    decision = guard.check("gpt-4.1", ACME)
    assert decision.action == "downgrade"  # tenant-monthly still holds
    guard.apply(make_signal("ok", budget="tenant-monthly"))
    assert guard.check("gpt-4.1", ACME).action == "allow"
    assert guard.enforce("gpt-4.1", ACME) == "gpt-4.1"


def test_ok_for_another_budget_or_key_lifts_nothing() -> None:
    guard = make_guard()
    guard.apply(make_signal("throttle"))
    guard.apply(make_signal("ok", budget="tenant-monthly"))
    guard.apply(make_signal("ok", key="globex"))
    assert guard.check("gpt-4.1", ACME).action == "deny"


def test_a_newer_signal_of_the_same_budget_replaces_the_old_one() -> None:
    guard = make_guard()
    guard.apply(make_signal("throttle"))
    guard.apply(make_signal("warn"))
    assert guard.check("gpt-4.1", ACME).action == "allow"


def test_combined_scope_needs_both_dimensions() -> None:
    guard = make_guard()
    guard.apply(make_signal("throttle", scope="tenant+feature", key="acme/summarize", budget="tf"))
    assert guard.check("gpt-4.1", {"tenant": "acme", "feature": "summarize"}).action == "deny"
    assert guard.check("gpt-4.1", {"tenant": "acme", "feature": "summarize", "user": "u"}).action == "deny"
    assert guard.check("gpt-4.1", {"tenant": "acme"}).action == "allow"
    assert guard.check("gpt-4.1", {"feature": "summarize"}).action == "allow"
    assert guard.check("gpt-4.1", {"tenant": "acme", "feature": "translate"}).action == "allow"
    assert guard.check("gpt-4.1", {"tenant": "globex", "feature": "summarize"}).action == "allow"
    # The key is "tenant/feature", in the scope's order.
    assert guard.check("gpt-4.1", {"tenant": "summarize", "feature": "acme"}).action == "allow"


def test_model_class_scope_uses_the_called_model() -> None:
    guard = make_guard()
    guard.apply(make_signal("throttle", scope="model_class", key="premium", budget="premium-daily"))
    assert guard.check("gpt-4.1", ACME).action == "deny"
    assert guard.check("claude-opus-4-1", {}).action == "deny"
    assert guard.check("gpt-4.1-mini", ACME).action == "allow"
    assert guard.check(None, ACME).action == "allow"


def test_stale_signal_fail_open_is_ignored() -> None:
    guard = make_guard("open")
    guard.apply(make_signal("throttle", expires_at=NOW - timedelta(seconds=1)))
    assert guard.check("gpt-4.1", ACME).action == "allow"
    assert guard.enforce("gpt-4.1", ACME) == "gpt-4.1"
    assert guard.stats.stale_decisions == 2
    assert guard.stats.denied == 0


def test_stale_signal_fail_closed_is_kept() -> None:
    guard = make_guard("closed")
    guard.apply(make_signal("throttle", expires_at=NOW - timedelta(seconds=1)))
    assert guard.check("gpt-4.1", ACME).action == "deny"
    with pytest.raises(BudgetExceeded):
        guard.enforce("gpt-4.1", ACME)
    assert guard.stats.stale_decisions == 2


def test_stale_is_judged_by_the_injected_clock() -> None:
    signal = make_signal("throttle", expires_at=NOW + timedelta(minutes=4))
    fresh, later = make_guard("open"), make_guard("open", now=NOW + timedelta(minutes=4))
    fresh.apply(signal)
    later.apply(signal)
    assert fresh.check("gpt-4.1", ACME).action == "deny"
    assert fresh.stats.stale_decisions == 0
    assert later.check("gpt-4.1", ACME).action == "allow"  # expires_at is exclusive
    assert later.stats.stale_decisions == 1


def test_fresh_signal_is_not_counted_stale() -> None:
    guard = make_guard("closed")
    guard.apply(make_signal("downgrade", downgrade_to="standard"))
    assert guard.check("gpt-4.1", ACME).model == "gpt-4.1-mini"
    assert guard.stats.stale_decisions == 0


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_signal_of_an_ended_window_is_ignored(fail_mode: str) -> None:
    guard = make_guard(fail_mode)
    guard.apply(
        make_signal(
            "throttle",
            window_start=datetime(2025, 5, 13, tzinfo=UTC),
            window_end=datetime(2025, 5, 14, tzinfo=UTC),
            expires_at=NOW + timedelta(minutes=4),
        )
    )
    assert guard.check("gpt-4.1", ACME).action == "allow"
    guard.apply(make_signal("downgrade", budget="hourly", window_end=NOW, downgrade_to="standard"))
    assert guard.check("gpt-4.1", ACME).action == "allow"  # window_end is exclusive


def test_attribution_defaults_to_the_current_baggage() -> None:
    guard = make_guard()
    guard.apply(make_signal("throttle"))
    assert guard.check("gpt-4.1").action == "allow"
    with burnguard.attribute(tenant="acme"):
        assert guard.check("gpt-4.1").action == "deny"
        with pytest.raises(BudgetExceeded):
            guard.enforce("gpt-4.1")
    with burnguard.attribute(tenant="globex"):
        assert guard.enforce("gpt-4.1") == "gpt-4.1"


def test_malformed_signal_payload_is_counted_not_applied() -> None:
    guard = make_guard()
    guard._ingest(b"tenant:acme@x", b'{"v": 1, "action": "panic"}')
    guard._ingest(b"tenant:acme@x", None)  # a tombstone for a signal it never had
    assert guard.stats.malformed_signals == 1
    assert guard.stats.signals_received == 0
    throttle = make_signal("throttle")
    guard._ingest(throttle.kafka_key.encode(), throttle.to_json())
    assert guard.stats.signals_received == 1
    assert guard.check("gpt-4.1", ACME).action == "deny"


def test_a_tombstone_removes_the_signal_of_a_deleted_budget() -> None:
    guard = make_guard()
    throttle = make_signal("throttle")
    guard._ingest(throttle.kafka_key.encode(), throttle.to_json())
    assert guard.check("gpt-4.1", ACME).action == "deny"
    guard._ingest(throttle.kafka_key.encode(), None)
    assert guard.check("gpt-4.1", ACME).action == "allow"


@pytest.mark.parametrize("economy_first", [False, True])
def test_deepest_of_several_downgrades_wins_whatever_the_arrival_order(economy_first: bool) -> None:
    # Two budgets both ask for a downgrade: the tenant's to standard, the user's to economy.
    # Honouring both means going to economy; the answer must not depend on which signal arrived first.
    tenant = make_signal("downgrade", budget="tenant-daily", downgrade_to="standard")
    user = make_signal("downgrade", scope="user", key="u1", budget="user-daily", downgrade_to="economy")
    guard = make_guard()
    for signal in (user, tenant) if economy_first else (tenant, user):
        guard.apply(signal)
    decision = guard.check("gpt-4.1", {"tenant": "acme", "user": "u1"})
    assert decision.action == "downgrade"
    assert decision.model == "gpt-4.1-nano"
    assert decision.signal.budget == "user-daily"


def test_service_scoped_signals_apply_to_the_guards_own_service() -> None:
    guard = make_guard()
    guard.apply(make_signal("throttle", scope="service", key="checkout"))
    assert guard.check("gpt-4.1", ACME).action == "allow"  # the guard does not know its service yet
    guard.service = "checkout"
    assert guard.check("gpt-4.1", ACME).action == "deny"
    guard.service = "search"
    assert guard.check("gpt-4.1", ACME).action == "allow"


def test_the_guard_holds_only_restrictions_and_live_baselines() -> None:
    guard = make_guard()
    long_ago = NOW - timedelta(hours=3)
    for n in range(50):  # `ok`s a replayed topic is full of: expired long ago
        old_ok = make_signal("ok", key=f"old-{n}", issued_at=long_ago)
        guard._ingest(old_ok.kafka_key.encode(), old_ok.to_json())
    assert guard.held == (0, 0)
    assert guard.stats.signals_received == 50

    guard.apply(make_signal("ok", key="fresh"))  # not yet expired: a local-accounting baseline
    guard.apply(make_signal("warn", key="warned"))
    guard.apply(make_signal("throttle"))
    ended = make_signal("throttle", key="yesterday", window_end=NOW - timedelta(minutes=1))
    guard.apply(ended)  # its window is over: it can restrict nothing
    assert guard.held == (2, 3)
    assert guard.check("gpt-4.1", {"tenant": "yesterday"}).action == "allow"
    assert guard.check("gpt-4.1", ACME).action == "deny"

    guard.apply(make_signal("ok"))  # acme's restriction lifted
    assert guard.check("gpt-4.1", ACME).action == "allow"
    assert guard.held == (1, 3)
    guard._ingest(b"tenant:warned@tenant-daily", None)
    assert guard.held == (0, 2)


def test_an_expired_ok_from_the_topic_lifts_a_restriction_and_leaves_nothing() -> None:
    guard = make_guard()
    throttle = make_signal("throttle")
    guard._ingest(throttle.kafka_key.encode(), throttle.to_json())
    assert guard.check("gpt-4.1", ACME).action == "deny"
    lifted = make_signal("ok", issued_at=NOW - timedelta(minutes=10))
    guard._ingest(lifted.kafka_key.encode(), lifted.to_json())
    assert guard.check("gpt-4.1", ACME).action == "allow"
    assert guard.held == (0, 0)


def test_a_malformed_ok_is_skipped_and_the_restriction_stays() -> None:
    guard = make_guard()
    guard.apply(make_signal("throttle"))
    bad = make_signal("ok", issued_at=NOW - timedelta(minutes=10)).to_json()
    bad = bad.replace(b'"spent":1', b'"spent":-1')  # not a valid signal: spent is negative
    assert b'"spent":-1' in bad
    guard._ingest(b"tenant:acme@tenant-daily", bad)
    assert guard.stats.malformed_signals == 1
    assert guard.check("gpt-4.1", ACME).action == "deny"


def test_an_expired_ok_of_a_key_holding_nothing_is_skipped_from_its_bytes() -> None:
    """The replay's shortcut: such an `ok` is not validated (it could change nothing), others are."""
    guard = make_guard()
    bad = make_signal("ok", issued_at=NOW - timedelta(minutes=10)).to_json()
    bad = bad.replace(b'"spent":1', b'"spent":-1')
    guard._ingest(b"tenant:acme@tenant-daily", bad)
    assert (guard.stats.signals_received, guard.stats.malformed_signals, guard.held) == (1, 0, (0, 0))
    live_ok = make_signal("ok")  # not expired: a local-accounting baseline, no restriction
    guard._ingest(live_ok.kafka_key.encode(), live_ok.to_json())
    assert guard.held == (0, 1)
    guard._ingest(live_ok.kafka_key.encode(), bad)  # would lift the baseline: validated, refused
    assert guard.stats.malformed_signals == 1 and guard.held == (0, 1)


def test_an_expired_ok_not_in_compact_form_still_lifts_a_restriction() -> None:
    guard = make_guard()
    guard.apply(make_signal("throttle"))
    spaced = make_signal("ok", issued_at=NOW - timedelta(minutes=10)).model_dump_json(indent=1).encode()
    guard._ingest(b"tenant:acme@tenant-daily", spaced)
    assert guard.check("gpt-4.1", ACME).action == "allow" and guard.held == (0, 0)


def test_a_replay_through_the_shortcut_holds_what_applying_every_signal_holds() -> None:
    """Mixed oks (expired and live), restrictions and tombstones over few keys, in one order."""
    rng = random.Random(17)
    records = []
    for _ in range(600):
        tenant = f"t{rng.randrange(40)}"
        action = rng.choice(["ok", "ok", "ok", "warn", "downgrade", "throttle", None])
        if action is None:
            records.append((f"tenant:{tenant}@tenant-daily".encode(), None))
            continue
        issued = NOW - timedelta(minutes=rng.choice([1, 10]))
        signal = make_signal(action, key=tenant, issued_at=issued)
        records.append((signal.kafka_key.encode(), signal.to_json()))
    fast, slow = make_guard(), make_guard()
    for key, payload in records:
        fast._ingest(key, payload)
        if payload is None:
            slow.forget(key.decode())
        else:
            slow.apply(Signal.from_json(payload), payload)
    assert fast.held == slow.held and fast.held[0] > 0
    for n in range(40):
        who = {"tenant": f"t{n}"}
        assert fast.check("gpt-4.1", who) == slow.check("gpt-4.1", who)
