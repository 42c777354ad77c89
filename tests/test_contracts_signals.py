"""The signal contract (docs/ARCHITECTURE.md §8): JSON round trip and the shipped JSON Schema."""

from __future__ import annotations

import copy
import json
import math
import pickle
from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from typing import Any

import pytest
from burnguard.contracts.signals import SCHEMA_PATH, Signal, json_schema, signal_key
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from tests import factories

NOW = datetime(2025, 5, 14, 13, 0, tzinfo=UTC)


#: A downgrade signal with every field set, so a round trip covers them all.
make_signal = partial(
    factories.make_signal,
    action="downgrade",
    scope="tenant+feature",
    key="acme/summarize",
    budget="tenant-feature-daily",
    downgrade_to="standard",
    metric="cost_usd",
    spent=41.7,
    ratio=0.834,
    burn_rate_per_hour=6.1,
    projected_exhaustion=NOW + timedelta(hours=1, minutes=21),
    issued_at=NOW,
    reason="budget tenant-feature-daily: 83% spent",
)


def test_json_round_trip() -> None:
    signal = make_signal()
    payload = signal.to_json()
    assert isinstance(payload, bytes)
    back = Signal.from_json(payload)
    assert back == signal
    assert Signal.from_json(payload.decode()) == signal
    document = json.loads(payload)
    assert document["v"] == 1
    assert document["action"] == "downgrade"
    assert document["downgrade_to"] == "standard"
    assert datetime.fromisoformat(document["window_end"]) == datetime(2025, 5, 15, tzinfo=UTC)


def test_round_trip_keeps_nulls_explicit() -> None:
    signal = make_signal(action="ok", downgrade_to=None, projected_exhaustion=None)
    document = json.loads(signal.to_json())
    assert document["downgrade_to"] is None
    assert document["projected_exhaustion"] is None
    assert Signal.from_json(signal.to_json()) == signal


def test_reads_the_design_example_and_ignores_unknown_fields() -> None:
    payload = {
        "v": 1,
        "scope": "tenant",
        "key": "acme",
        "budget": "tenant-daily",
        "action": "throttle",
        "metric": "cost_usd",
        "spent": 50.2,
        "limit": 50.0,
        "ratio": 1.004,
        "window_start": "2025-05-14T00:00:00Z",
        "window_end": "2025-05-15T00:00:00Z",
        "issued_at": "2025-05-14T13:00:00Z",
        "expires_at": "2025-05-14T13:05:00Z",
        "added_in_a_later_version": True,
    }
    signal = Signal.from_json(json.dumps(payload))
    assert signal.action == "throttle"
    assert signal.window_end == datetime(2025, 5, 15, tzinfo=UTC)
    assert signal.downgrade_to is None
    assert signal.severity == 3


@pytest.mark.parametrize(
    ("field", "value"), [("action", "panic"), ("v", 2), ("spent", "a lot"), ("window_end", "tomorrow")]
)
def test_invalid_signals_are_rejected(field: str, value: Any) -> None:
    document = json.loads(make_signal().to_json())
    document[field] = value
    with pytest.raises(ValidationError):
        Signal.from_json(json.dumps(document))


def test_kafka_key_names_scope_key_and_budget() -> None:
    signal = make_signal()
    assert signal.kafka_key == "tenant+feature:acme/summarize@tenant-feature-daily"
    assert signal_key("tenant", "acme", "tenant-daily") == "tenant:acme@tenant-daily"


def test_severity_orders_actions() -> None:
    severities = [make_signal(action=a).severity for a in ("ok", "warn", "downgrade", "throttle")]
    assert severities == sorted(severities)
    assert len(set(severities)) == 4


def test_is_stale() -> None:
    signal = make_signal()
    assert not signal.is_stale(NOW)
    assert not signal.is_stale(NOW + timedelta(minutes=4, seconds=59))
    assert signal.is_stale(NOW + timedelta(minutes=5))
    assert signal.is_stale(NOW + timedelta(days=1))


# --- the shipped schema ------------------------------------------------------------------------


def test_shipped_schema_equals_the_model() -> None:
    shipped = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert shipped == json_schema(), "contracts/signal.schema.json is out of date: run write_schema()"


def test_shipped_schema_is_formatted_as_write_schema_writes_it() -> None:
    # So regenerating the file produces no diff.
    text = SCHEMA_PATH.read_text(encoding="utf-8")
    assert text == json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def test_schema_names_the_contract() -> None:
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["action"]["enum"] == ["ok", "warn", "downgrade", "throttle"]
    assert set(schema["required"]) == {
        "scope",
        "key",
        "budget",
        "action",
        "spent",
        "limit",
        "ratio",
        "window_start",
        "window_end",
        "issued_at",
        "expires_at",
    }


def schema_errors(instance: Any, schema: dict[str, Any]) -> list[str]:
    """What a subscriber in any language would see: the shipped schema, applied by a real validator."""
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    return [f"{'.'.join(map(str, e.path)) or '$'}: {e.message}" for e in validator.iter_errors(instance)]


def test_produced_signals_validate_against_the_shipped_schema() -> None:
    shipped = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(shipped)
    for signal in (
        make_signal(),
        make_signal(action="ok", downgrade_to=None, projected_exhaustion=None),
        make_signal(action="throttle", downgrade_to=None, spent=52, ratio=1.04),
    ):
        assert schema_errors(json.loads(signal.to_json()), shipped) == []


def test_the_schema_rejects_bad_documents() -> None:
    shipped = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    good = json.loads(make_signal().to_json())
    for field, value in [("action", "panic"), ("v", 2), ("spent", "1"), ("issued_at", "yesterday")]:
        bad = dict(good, **{field: value})
        assert schema_errors(bad, shipped), field
    missing = {k: v for k, v in good.items() if k != "expires_at"}
    assert any("expires_at" in e for e in schema_errors(missing, shipped))


# --- the JSON the worker writes: msgspec's, equal to pydantic's ----------------------------------

_texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # no lone surrogates
_numbers = st.floats(min_value=0, allow_nan=False, allow_infinity=False) | st.integers(0, 10**20)
_zones = st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5, minutes=-30))])
_times = st.datetimes(timezones=_zones) | st.datetimes()  # aware in any zone, or naive


@st.composite
def signals(draw: st.DrawFn) -> Signal:
    """Any valid signal: every field drawn, numbers from 0 to past the exponent form, any text."""
    return Signal(
        scope=draw(_texts),
        key=draw(_texts),
        budget=draw(_texts),
        action=draw(st.sampled_from(["ok", "warn", "downgrade", "throttle"])),
        downgrade_to=draw(st.none() | _texts),
        metric=draw(_texts),
        spent=draw(_numbers),
        limit=draw(_numbers),
        ratio=draw(_numbers),
        window_start=draw(_times),
        window_end=draw(_times),
        burn_rate_per_hour=draw(_numbers),
        projected_exhaustion=draw(st.none() | _times),
        issued_at=draw(_times),
        expires_at=draw(_times),
        reason=draw(_texts),
    )


@settings(max_examples=600, deadline=None)
@given(signals())
def test_to_json_writes_what_pydantic_writes_byte_for_byte(signal: Signal) -> None:
    payload = signal.to_json()
    assert payload == signal.model_dump_json().encode()
    assert Signal.from_json(payload) == signal


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"key": 'tenant-ü/日本 \u2028"q"\\', "reason": "\x00\t\n\x7f"},
        {"spent": 1e16, "ratio": 2.5e300},  # pydantic writes `1e+16`, msgspec `1e16`: pydantic's
        {"spent": 5e-324, "burn_rate_per_hour": 1e-7, "limit": 0.1 + 0.2},
        {"downgrade_to": None, "projected_exhaustion": None},
        {"issued_at": datetime(2025, 5, 14, 13, 0, 0, 1, tzinfo=timezone(timedelta(hours=5, minutes=45)))},
    ],
)
def test_to_json_is_pydantic_s_json_at_the_edges(changes: dict[str, Any]) -> None:
    signal = make_signal(**changes)
    assert signal.to_json() == signal.model_dump_json().encode()
    assert Signal.from_json(signal.to_json()) == signal


def test_a_signal_built_without_validation_is_written_as_pydantic_writes_it() -> None:
    """`model_construct` checks nothing: a NaN, or fields in another order, take pydantic's path."""
    fields = make_signal().model_dump()
    for changes in ({"spent": math.nan}, {"ratio": math.inf}, {}):
        built = Signal.model_construct(**dict(reversed(list({**fields, **changes}.items()))))
        assert built.to_json() == built.model_dump_json().encode()


def test_a_plain_signal_skips_pydantic_s_serializer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of the change: the worker's signals (finite numbers below 1e16) are written by msgspec."""
    expected = make_signal().model_dump_json().encode()

    def refused(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("model_dump_json called")

    monkeypatch.setattr(Signal, "model_dump_json", refused)
    assert make_signal().to_json() == expected


# --- `Signal.of_fields`: the worker's signals without pydantic's validation ----------------------

#: What a sum or a record may hand `of_fields`: plain floats, and what validation refuses or changes
#: (negatives, NaN, infinities, ints, bools, text, floats past 1e16).
_any_numbers = (
    st.floats(min_value=0, max_value=1e17)
    | st.floats()
    | st.integers(-5, 10**20)
    | st.sampled_from([True, -0.0, -1e-300, 1e16, math.nextafter(1e16, 0), math.inf, math.nan, "1.5"])
)


@st.composite
def field_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """Every field in field order, `v` first: the values `of_fields`' caller vouches for drawn as it
    makes them, the key and the numbers anything."""
    return {
        "v": 1,
        "scope": draw(_texts),
        "key": draw(_texts | st.integers() | st.none()),
        "budget": draw(_texts),
        "action": draw(st.sampled_from(["ok", "warn", "downgrade", "throttle"])),
        "downgrade_to": draw(st.none() | _texts),
        "metric": draw(_texts),
        "spent": draw(_any_numbers),
        "limit": draw(_any_numbers),
        "ratio": draw(_any_numbers),
        "window_start": draw(_times),
        "window_end": draw(_times),
        "burn_rate_per_hour": draw(_any_numbers),
        "projected_exhaustion": draw(st.none() | _times),
        "issued_at": draw(_times),
        "expires_at": draw(_times),
        "reason": draw(_texts),
    }


def _built(build: Any, fields: dict[str, Any]) -> Signal | type[ValidationError]:
    try:
        return build(fields)
    except ValidationError:
        return ValidationError


@settings(max_examples=800, deadline=None)
@given(field_dicts())
def test_of_fields_makes_the_signal_validation_makes(fields: dict[str, Any]) -> None:
    """Differential: `of_fields` refuses what `Signal(...)` refuses and otherwise gives its signal:
    equal, with the same fields set, the field dict in the same order and the same JSON bytes."""
    _assert_of_fields_is_validations(fields)


def _assert_of_fields_is_validations(fields: dict[str, Any]) -> None:
    """`of_fields(fields)` refuses what `Signal(...)` refuses, or is its signal in every respect."""
    expected = _built(lambda f: Signal(**{k: v for k, v in f.items() if k != "v"}), fields)
    built = _built(Signal.of_fields, dict(fields))
    if expected is ValidationError:
        assert built is ValidationError
        return
    assert isinstance(built, Signal) and built == expected
    assert built.model_fields_set == expected.model_fields_set
    assert list(built.__dict__.items()) == list(expected.__dict__.items())
    assert built.to_json() == expected.to_json() == expected.model_dump_json().encode()
    assert Signal.from_json(built.to_json()) == built


def test_of_fields_validates_what_it_cannot_vouch_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain signal is built without validation; an int, a NaN or a huge number is validated."""
    fields = {"v": 1, **make_signal().model_dump(exclude={"v"})}
    plain, huge = make_signal().to_json(), make_signal(spent=1e16).to_json()
    validated: list[dict[str, Any]] = []
    original = Signal.__init__

    def counting(self: Signal, **data: Any) -> None:
        validated.append(data)
        original(self, **data)

    monkeypatch.setattr(Signal, "__init__", counting)
    assert Signal.of_fields(dict(fields)).to_json() == plain
    assert validated == []
    assert Signal.of_fields({**fields, "spent": 52}).spent == 52.0  # validation turns an int into a float
    with pytest.raises(ValidationError):
        Signal.of_fields({**fields, "ratio": math.nan})
    assert Signal.of_fields({**fields, "spent": 1e16}).to_json() == huge
    assert len(validated) == 3


@pytest.mark.parametrize("field", ["spent", "limit", "ratio", "burn_rate_per_hour", "key"])
@pytest.mark.parametrize("value", [math.inf, math.nan, -1e-300, -0.0, 5, True, 1e16, 1e300, None, "1.5"])
def test_of_fields_at_each_checked_field_s_edges(field: str, value: Any) -> None:
    """Each value `of_fields` checks, alone off the plain: what `Signal(...)` makes of it, or refuses."""
    _assert_of_fields_is_validations({"v": 1, **make_signal().model_dump(exclude={"v"}), field: value})


@pytest.mark.parametrize(
    "copied",
    [
        lambda s: s.model_copy(update={"spent": 1e16}),
        lambda s: s.model_copy(update={"ratio": math.inf}, deep=True),
        lambda s: copy.copy(s).model_copy(update={"limit": 1e300}),
        lambda s: pickle.loads(pickle.dumps(s)).model_copy(update={"burn_rate_per_hour": 2e16}),
        lambda s: copy.deepcopy(s).model_copy(update={"spent": math.nan}),
    ],
)
def test_a_copy_of_a_vouched_signal_is_checked_again(copied: Any) -> None:
    """`to_json` skips its checks for the signal `of_fields` built unvalidated (its fields set says so),
    and for no copy of it: a copy with a number msgspec writes otherwise is written by pydantic."""
    signal = Signal.of_fields({"v": 1, **make_signal().model_dump(exclude={"v"})})
    assert signal.to_json() == signal.model_dump_json().encode()
    assert signal.model_fields_set == make_signal().model_fields_set
    other = copied(signal)
    assert type(other.model_fields_set) is set
    assert other.to_json() == other.model_dump_json().encode()
