"""Routing rules and per-call context budgets: deciding the model before any spend.

Budgets react to spend after it happened; these rules act on the value of the
task instead. A rule matches a call by who and what it is for (tenant,
workflow, feature, operation, stakes) and names the model *class* to use; the
concrete model comes from the call's own provider (`providers:` in the budget
file), so a call is never sent to another provider's API. Both the app side
(which applies them) and the stream side (which reads the routed spans) import
this module through `burnguard.contracts.budgets`.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Literal, get_args

from burnguard.contracts.model_base import StrictModel, check_id
from pydantic import Field, field_validator, model_validator

Stakes = Literal["low", "normal", "high"]
STAKES_LEVELS: tuple[str, ...] = get_args(Stakes)
#: The call fields a routing rule can match on.
ROUTE_FIELDS = ("tenant", "workflow", "feature", "operation", "stakes")


def _patterns(value: Any) -> Any:
    """`feature: extract` and `feature: [extract, classify]` both mean a tuple of patterns."""
    if isinstance(value, str):
        return (value,)
    return value


class _Patterns:
    """One field's patterns, split so the common exact match is a set lookup, not fnmatch."""

    __slots__ = ("exact", "globs")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        is_glob = [any(c in p for c in "*?[") for p in patterns]
        self.exact = frozenset(p for p, glob in zip(patterns, is_glob, strict=True) if not glob)
        self.globs = tuple(p for p, glob in zip(patterns, is_glob, strict=True) if glob)

    def matches(self, value: str) -> bool:
        if value in self.exact:
            return True
        return bool(value) and any(fnmatch.fnmatchcase(value, glob) for glob in self.globs)


class RouteMatch(StrictModel):
    """What a call must be for; every field given must match (a list means any of its patterns)."""

    tenant: tuple[str, ...] = ()
    workflow: tuple[str, ...] = ()
    feature: tuple[str, ...] = ()
    operation: tuple[str, ...] = ()
    stakes: tuple[Stakes, ...] = ()

    @field_validator(*ROUTE_FIELDS, mode="before")
    @classmethod
    def _as_tuples(cls, value: Any) -> Any:
        return _patterns(value)

    @model_validator(mode="after")
    def _not_empty(self) -> RouteMatch:
        if not any(getattr(self, name) for name in ROUTE_FIELDS):
            raise ValueError(f"match needs at least one of: {', '.join(ROUTE_FIELDS)}")
        return self

    def compiled(self) -> tuple[tuple[int, _Patterns], ...]:
        """(index in ROUTE_FIELDS, patterns) of each field the rule constrains."""
        return tuple(
            (index, _Patterns(getattr(self, name)))
            for index, name in enumerate(ROUTE_FIELDS)
            if getattr(self, name)
        )


class Route(StrictModel):
    """One routing rule: calls that match `match` use a model of class `use`."""

    id: str
    match: RouteMatch
    use: str = Field(description="the model class for these calls, e.g. economy")
    description: str = ""

    @field_validator("id")
    @classmethod
    def _id_is_a_name(cls, value: str) -> str:
        return check_id(value)


class ContextBudget(StrictModel):
    """The largest prompt a feature may send in one call, checked before the call is made."""

    id: str
    feature: str = Field(description="feature id or glob")
    max_input_tokens: int = Field(gt=0)
    on_exceed: Literal["warn", "refuse"] = "refuse"

    @field_validator("id")
    @classmethod
    def _id_is_a_name(cls, value: str) -> str:
        return check_id(value)

    def applies_to(self, feature: str) -> bool:
        return feature == self.feature or (bool(feature) and fnmatch.fnmatchcase(feature, self.feature))


class CompiledRoutes:
    """The routing rules of one config, matched in order; the first match wins.

    Matching runs before every model call, so results are remembered per distinct
    (tenant, workflow, feature, operation, stakes): an app has few of those, and
    the config, hence the answer, never changes under a compiled set.
    """

    MEMO_SIZE = 4096

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self._rules = tuple((route, route.match.compiled()) for route in routes)
        self._memo: dict[tuple[str, ...], Route | None] = {}

    def __bool__(self) -> bool:
        return bool(self._rules)

    def first_match(self, values: tuple[str, ...]) -> Route | None:
        """The first rule whose every field matches the call's `values`, in ROUTE_FIELDS order."""
        try:
            return self._memo[values]
        except KeyError:
            pass
        found = next(
            (
                route
                for route, fields in self._rules
                if all(patterns.matches(values[index]) for index, patterns in fields)
            ),
            None,
        )
        if len(self._memo) >= self.MEMO_SIZE:
            self._memo.clear()  # many distinct tenants: start over rather than grow
        self._memo[values] = found
        return found


def check_stakes(value: str) -> str:
    if value not in STAKES_LEVELS:
        raise ValueError(f"stakes must be one of {', '.join(STAKES_LEVELS)}, not {value!r}")
    return value
