"""BudgetGuard: the app-side half of enforcement (docs/ARCHITECTURE.md §12).

A background thread follows the compacted `burnguard.signals` topic, replaying
it from the beginning at start so the guard knows the current state before
the first call. `check()` then answers from memory, with no network round
trip: allow, downgrade (a cheaper model along the configured ladder), or deny.

A signal whose window has ended no longer applies. A signal past `expires_at`
is stale: the stream job stopped refreshing it. The guard then applies its
fail mode — open (ignore it, the default) or closed (keep its restriction in
force) — and counts the decision in `stats.stale_decisions`.

The guard holds only what can still matter (docs/ARCHITECTURE.md §12): the
current restrictions (`warn`, `downgrade`, `throttle`) of windows not yet
ended, and the local-accounting baselines of signals not yet expired. An `ok`
or a tombstone removes its key's restriction; an `ok` whose `expires_at` has
passed by the time it is read (most of a replayed topic) leaves nothing behind.

Between signals the guard accounts locally (`local_accounting.LocalLedger`):
`reserve()` holds each call's expected use on the budget keys it counts
toward until the call settles what it used, and refuses the call once a
key's projected spend reaches its throttle rung. `check()` and `enforce()`
apply the same projection without reserving. A local deny is a
`BudgetExceeded` like any other, its signal a copy of the last one with the
estimated spend; it is counted in `stats.local_denied` as well as `denied`.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from burnguard.contracts.attributes import REFUSED_BUDGET
from burnguard.contracts.budget_rules import key_of_values
from burnguard.contracts.budgets import BudgetConfig
from burnguard.contracts.compacted_topics import CompactedTopicFollower, read_compacted_topic
from burnguard.contracts.signal_checkpoints import (
    CLOCK_MARGIN,
    CheckpointPart,
    decode_parts,
    latest_checkpoints,
    usable_at,
)
from burnguard.contracts.signals import Signal, signal_of_record
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.instrumentation.local_accounting import LocalLedger, Reservation, Tally
from burnguard.instrumentation.refusals import CallRefused
from kafka import KafkaConsumer, TopicPartition

logger = logging.getLogger(__name__)
FailMode = Literal["open", "closed"]
#: An `ok` as the worker writes it (compact JSON, a flat object: inside a string these quotes are escaped).
_OK_ACTION = b'"action":"ok"'
_EXPIRES_AT = re.compile(rb'"expires_at":"([^"]+)"')


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _epoch_ms(iso: str) -> int:
    """A checkpoint's `taken_at` (checked by `usable_at` already) in Kafka's milliseconds."""
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


class BudgetExceeded(CallRefused):
    """A call was refused before it was made, because a budget is throttled."""

    reason = REFUSED_BUDGET

    def __init__(self, signal: Signal) -> None:
        self.signal = signal
        self.budget = signal.budget
        self.spent = signal.spent
        self.limit = signal.limit
        self.resets_at = signal.window_end
        unit = "USD" if signal.metric == "cost_usd" else signal.metric
        super().__init__(
            f"budget {signal.budget!r} for {signal.scope} {signal.key!r} is exhausted: "
            f"spent {signal.spent:.4f} of {signal.limit:g} {unit} "
            f"(ratio {signal.ratio:.2f}); resets at {signal.window_end.isoformat()}"
        )


@dataclass(frozen=True, slots=True)
class GuardVerdict:
    """The guard's answer for one call: `allow`, `downgrade` (use `model`) or `deny`, and the signal why.

    Budget pressure only; the whole decision on a call (routing, context budget, step cap, this)
    is `decisions.CallDecision`.
    """

    action: Literal["allow", "downgrade", "deny"]
    model: str | None = None
    signal: Signal | None = None

    @property
    def allowed(self) -> bool:
        return self.action != "deny"


ALLOW = GuardVerdict("allow")


@dataclass
class GuardStats:
    signals_received: int = 0
    malformed_signals: int = 0
    stale_decisions: int = 0  # decisions where a stale signal met the fail mode
    denied: int = 0
    downgraded: int = 0
    local_denied: int = 0  # of `denied`: by local accounting, between signals
    checkpoint_partitions: int = 0  # partitions the last start read from a checkpoint, not from offset 0
    checkpoint_records: int = 0  # records those checkpoints held


@dataclass(frozen=True, slots=True)
class _Restriction:
    """A held restriction in compact form: what a decision reads, and the signal's JSON for the verdict.

    About a third of a `Signal` model's memory; the model is built again only for a verdict
    that downgrades or denies (`signal`).
    """

    scope: str
    key: str
    budget: str
    action: str
    severity: int
    downgrade_to: str | None
    window_end: datetime
    expires_at: datetime
    payload: bytes

    @classmethod
    def of(cls, signal: Signal, payload: bytes) -> _Restriction:
        fields = (signal.scope, signal.key, signal.budget, signal.action, signal.severity)
        return cls(*fields, signal.downgrade_to, signal.window_end, signal.expires_at, payload)

    @property
    def signal(self) -> Signal:
        return Signal.from_json(self.payload)


class BudgetGuard:
    def __init__(
        self,
        kafka: KafkaSettings | None = None,
        topics: Topics | None = None,
        config: BudgetConfig | None = None,
        *,
        fail_mode: FailMode = "open",
        clock: Callable[[], datetime] | None = None,
        on_signal: Callable[[Signal], None] | None = None,
        checkpoints: bool = True,
    ) -> None:
        self._kafka = kafka or KafkaSettings.from_env()
        topics = topics or Topics.from_env()
        self._topic = topics.signals
        self._checkpoint_topic = topics.signal_checkpoints
        self.config = config or BudgetConfig()
        self.fail_mode = fail_mode
        self._clock = clock or _utc_now
        #: Seconds for local accounting: `time.time` unless a test injects a clock (0.07 us, not 0.6).
        self._seconds = time.time if clock is None else lambda: self._clock().timestamp()
        self._on_signal = on_signal
        #: This process's `service.name`, for `service`-scoped budgets (set by `configure()`).
        self.service = ""
        #: The current restrictions (non-ok signals) by Kafka key, and by scope and key for the calls.
        self._restrictions: dict[str, _Restriction] = {}
        self._by_scope: dict[str, dict[str, list[_Restriction]]] = {}
        self._lock = threading.Lock()
        self._ledger = LocalLedger(self.config, self._seconds)
        #: A checkpoint holds only what can still matter: an `on_signal` callback asked for every signal.
        start_at = self._start_from_checkpoints if checkpoints and on_signal is None else None
        self._follower = CompactedTopicFollower(
            self._kafka, self._topic, self._ingest, "burnguard-guard", start_at=start_at
        )
        self.stats = GuardStats()

    # --- following the topic ---------------------------------------------------
    def start(self, wait_s: float = 10.0) -> BudgetGuard:
        """Start following (once); wait up to `wait_s` for the replay of the compacted state.

        The replay goes on in the background after the wait: until it ends the guard decides
        from the signals it has (none at first), so a down broker never stalls the app.
        """
        self._follower.start(wait_s)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._follower.stop(timeout_s)

    @property
    def held(self) -> tuple[int, int]:
        """(restrictions, local-accounting baselines) the guard holds: what bounds its memory."""
        with self._lock:
            restrictions = len(self._restrictions)
        return restrictions, self._ledger.tallies

    @property
    def ready(self) -> bool:
        """True once the state on the topic at start has been replayed."""
        return self._follower.ready.is_set()

    def _start_from_checkpoints(self, consumer: KafkaConsumer, end_offsets: dict[int, int]) -> dict[int, int]:
        """Apply each partition's newest checkpoint the topic still continues; where to read on from.

        Runs on the follower thread before it reads the signals topic. Without a usable
        checkpoint a partition is replayed from its beginning, as it always could be. After a
        lost connection the guard goes on from where it was: a checkpoint past that would skip
        the records that lifted what it holds, and one before it would bring back what they lifted.
        """
        if self._follower.positions:
            return self._resume_at(end_offsets)
        try:
            parts, problems = decode_parts(read_compacted_topic(self._kafka, self._checkpoint_topic))
            checkpoints = self._continued(consumer, self._usable(parts, end_offsets))
        except Exception as exc:  # a checkpoint only saves time: nothing in it may stop the guard
            logger.warning("burnguard guard: no signal checkpoints (%s); replaying %s", exc, self._topic)
            return {}
        for problem in problems:
            logger.warning("burnguard guard: passing over a checkpoint part %s", problem)
        records = 0
        for checkpoint in checkpoints.values():
            for part in checkpoint:
                for key, value in part.records:
                    self._ingest_safely(key, value)
                records += len(part.records)
        self.stats.checkpoint_partitions, self.stats.checkpoint_records = len(checkpoints), records
        return {partition: checkpoint[0].next_offset for partition, checkpoint in checkpoints.items()}

    def _usable(
        self, parts: list[CheckpointPart], end_offsets: dict[int, int]
    ) -> dict[int, list[CheckpointPart]]:
        """The newest complete checkpoint of each partition, if within its end and `usable_at` now."""
        usable = {}
        for partition, checkpoint in latest_checkpoints(parts, self._topic).items():
            next_offset = checkpoint[0].next_offset
            if next_offset > end_offsets.get(partition, -1):
                continue  # beyond the partition's end: a checkpoint of an earlier topic of this name
            if not usable_at(checkpoint[0].taken_at, self._clock(), next_offset < end_offsets[partition]):
                logger.warning(
                    "burnguard guard: checkpoint of %s/%d taken at %s: too old, or over %s ahead of this "
                    "clock; replaying",
                    self._topic,
                    partition,
                    checkpoint[0].taken_at[:40],
                    CLOCK_MARGIN,
                )
                continue
            usable[partition] = checkpoint
        return usable

    def _continued(
        self, consumer: KafkaConsumer, found: dict[int, list[CheckpointPart]]
    ) -> dict[int, list[CheckpointPart]]:
        """The checkpoints this topic continues: no record before their offset written after them
        (`CLOCK_MARGIN` allowed); else the topic was deleted and created again since, and the
        checkpoint would skip its first records."""
        if not found:
            return {}
        after = {
            TopicPartition(self._topic, p): _epoch_ms(c[0].taken_at)
            + int(CLOCK_MARGIN.total_seconds() * 1000)
            for p, c in found.items()
        }
        first_after = consumer.offsets_for_times(after)
        return {
            p: c
            for p, c in found.items()
            if (at := first_after.get(TopicPartition(self._topic, p))) is None
            or at.offset >= c[0].next_offset
        }

    def _resume_at(self, end_offsets: dict[int, int]) -> dict[int, int]:
        """Where the follower was in each partition before a reconnect (none at the first start).

        A partition now shorter than that (a re-created topic) is replayed from its beginning.
        """
        positions = dict(self._follower.positions)
        return {p: at for p, at in positions.items() if at <= end_offsets.get(p, -1)}

    def _ingest_safely(self, key: bytes, payload: bytes) -> None:
        """`_ingest` a checkpoint's record; like the follower, pass over one it raises on."""
        try:
            self._ingest(key, payload)
        except Exception:
            logger.exception("burnguard guard: could not apply a checkpoint record (key %.200r)", key)

    def _ingest(self, key: bytes | None, payload: bytes | None) -> None:
        if payload is None:  # a tombstone: no restriction (a removed budget, or an `ok` retired)
            if key is not None:
                self.forget(key.decode())
            return
        if key is not None and self._on_signal is None and self._expired_ok_of_nothing(key, payload):
            self.stats.signals_received += 1
            return
        try:
            signal = signal_of_record(key, payload)
        except ValueError as exc:  # a pydantic ValidationError too
            self.stats.malformed_signals += 1
            logger.warning("burnguard guard: ignoring malformed signal: %s", exc)
            return
        self.apply(signal, payload)

    def _expired_ok_of_nothing(self, key: bytes, payload: bytes) -> bool:
        """True for an already expired `ok` whose key the guard holds nothing for: most of a replay.

        `apply` would leave nothing behind for it, valid or not, so it is read from the bytes
        (~1 us instead of ~6 us to validate a `Signal` and apply it). Anything not in the
        worker's compact form, and an `ok` that would lift something held, is validated: a
        malformed `ok` never lifts a restriction (it is then counted in `malformed_signals`;
        one that would lift nothing is not).
        """
        if _OK_ACTION not in payload or (found := _EXPIRES_AT.search(payload)) is None:
            return False
        try:
            expires_at = datetime.fromisoformat(found.group(1).decode())
        except ValueError:
            return False
        if expires_at.tzinfo is None or self._clock() < expires_at:
            return False
        kafka_key = key.decode()
        return kafka_key not in self._restrictions and not self._ledger.holds(kafka_key)

    def forget(self, kafka_key: str) -> None:
        """Drop what the guard holds under `kafka_key`: its restriction and its local tally."""
        with self._lock:
            self._unrestrict(kafka_key)
        self._ledger.forget(kafka_key)

    def _unrestrict(self, kafka_key: str) -> None:
        """Remove the key's restriction (under the lock); a scope key left with none is dropped."""
        signal = self._restrictions.pop(kafka_key, None)
        if signal is None:
            return
        by_key = self._by_scope[signal.scope]
        remaining = [s for s in by_key[signal.key] if s.budget != signal.budget]
        if remaining:
            by_key[signal.key] = remaining
        else:
            del by_key[signal.key]

    def apply(self, signal: Signal, payload: bytes | None = None) -> None:
        """Record a signal (the follower thread calls this with its JSON; tests and local accounting may too).

        Only a restriction whose window has not ended is kept; an `ok` just removes the key's.
        """
        payload = payload or signal.to_json()
        with self._lock:
            self.stats.signals_received += 1
            self._unrestrict(signal.kafka_key)
            if signal.action != "ok" and self._clock() < signal.window_end:
                held = _Restriction.of(signal, payload)
                self._restrictions[signal.kafka_key] = held
                self._by_scope.setdefault(signal.scope, {}).setdefault(signal.key, []).append(held)
        self._ledger.on_signal(signal, payload)
        if self._on_signal is not None:
            self._on_signal(signal)

    # --- deciding ------------------------------------------------------------------
    def _values(self, attribution: dict[str, str] | None, model: str | None) -> dict[str, str]:
        """The call's value of each scope dimension: attribution (`current_attribution()`), service, class."""
        if attribution is None:
            from burnguard.instrumentation.attribution import current_attribution

            attribution = current_attribution()
        values = dict(attribution)
        if self.service and "service" not in values:
            values["service"] = self.service
        if model and (model_class := self.config.model_class(model)):
            values["model_class"] = model_class
        return values

    def _signals_matching(self, values: dict[str, str]) -> list[_Restriction]:
        found: list[_Restriction] = []
        with self._lock:
            for scope, by_key in self._by_scope.items():
                key = key_of_values(values, scope.split("+"))
                if key is not None:
                    found.extend(by_key.get(key, ()))
        return found

    def check(self, model: str | None = None, attribution: dict[str, str] | None = None) -> GuardVerdict:
        """Decide one call: by the signals, then by local accounting (nothing reserved).

        `attribution` defaults to `current_attribution()` (the baggage's, then the resource's).
        """
        now = self._clock()
        values = self._values(attribution, model)
        decision = self._verdict_by_signals(values, model, now)
        if decision.action == "deny":
            return decision
        final = decision.model or model
        if final != model:
            values = self._values(attribution, final)  # a downgrade changes the model class
        tally = self._ledger.exceeded(values, self._seconds())
        return decision if tally is None else self._deny_locally(tally)

    def check_signals(
        self, model: str | None = None, attribution: dict[str, str] | None = None
    ) -> GuardVerdict:
        """Decide one call by the signals alone; `reserve` then applies local accounting.

        The call path uses the two steps so local accounting scans the call's keys once.
        """
        return self._verdict_by_signals(self._values(attribution, model), model, self._clock())

    def reserve(self, model: str | None = None, attribution: dict[str, str] | None = None) -> Reservation:
        """Hold the expected use of a call about to be made with `model`; `settle()` it when it ends.

        Local accounting only (the call was decided by the signals already): checking and
        reserving are one step, so concurrent callers cannot all slip under the limit.
        Raises `BudgetExceeded` when the projected spend has reached a throttle rung.
        """
        now_s = self._seconds()
        admitted = self._ledger.admit(self._values(attribution, model), model, now_s)
        if isinstance(admitted, Tally):
            denial = self._deny_locally(admitted)
            assert denial.signal is not None
            raise BudgetExceeded(denial.signal)
        return admitted

    def _deny_locally(self, tally: Tally) -> GuardVerdict:
        """A deny by local accounting; its signal is the tally's, with the estimated spend."""
        self.stats.denied += 1
        self.stats.local_denied += 1
        spent, base = tally.projected(), tally.signal
        signal = base.model_copy(
            update={
                "action": "throttle",
                "spent": spent,
                "ratio": spent / base.limit if base.limit > 0 else math.inf,
                "reason": f"estimated locally since the signal of {base.issued_at.isoformat()}",
            }
        )
        return GuardVerdict("deny", signal=signal)

    def _verdict_by_signals(self, values: dict[str, str], model: str | None, now: datetime) -> GuardVerdict:
        worst: _Restriction | None = None
        for signal in self._signals_matching(values):
            if now >= signal.window_end:
                continue  # its window is over: the spend it counted no longer applies
            if now >= signal.expires_at:
                self.stats.stale_decisions += 1
                if self.fail_mode == "open":
                    continue
            if worst is None or signal.severity > worst.severity:
                worst = signal
            elif signal.action == worst.action == "downgrade" and self._downgrade_steps(
                model, signal
            ) > self._downgrade_steps(model, worst):
                worst = signal  # of two downgrades, the deeper one honours both
        return self._verdict_for(worst, model)

    def _downgrade_steps(self, model: str | None, signal: _Restriction) -> int:
        """How many ladder steps below `model` this downgrade signal sends the call (0: none)."""
        target = self.config.downgrade_model(model, signal.downgrade_to) if model else None
        steps, current = 0, model
        while target is not None and current != target:
            current = self.config.downgrade[current]
            steps += 1
        return steps

    def _verdict_for(self, held: _Restriction | None, model: str | None) -> GuardVerdict:
        if held is None or held.action in ("ok", "warn"):
            return ALLOW
        if held.action == "throttle":
            self.stats.denied += 1
            return GuardVerdict("deny", signal=held.signal)
        cheaper = self.config.downgrade_model(model, held.downgrade_to) if model else None
        if cheaper is None:
            return GuardVerdict("allow", model=model, signal=held.signal)
        self.stats.downgraded += 1
        return GuardVerdict("downgrade", model=cheaper, signal=held.signal)

    def enforce(self, model: str | None = None, attribution: dict[str, str] | None = None) -> str | None:
        """The model to call with, or raise `BudgetExceeded` before the call is made."""
        decision = self.check(model, attribution)
        if decision.action == "deny":
            assert decision.signal is not None
            raise BudgetExceeded(decision.signal)
        return decision.model or model

    def wait_for(self, predicate: Callable[[BudgetGuard], bool], timeout_s: float = 30.0) -> bool:
        """Poll until `predicate(self)` holds; for tests and the demo."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.05)
        return predicate(self)
