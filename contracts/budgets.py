"""The budget model (docs/ARCHITECTURE.md §6): budgets, model classes, the downgrade ladder.

People write budgets in YAML; a mistake must point at the file, the line and
the field, so loading keeps the YAML node marks and maps every pydantic error
back to the line it came from. The stream job evaluates these models and the
app-side guard uses the model classes and the ladder to rewrite requests, so
both sides import this one module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from burnguard.contracts.budget_rules import KeyMatcher, compile_match, key_of_span, matched_key
from burnguard.contracts.budget_rules import metric_value as metric_value  # its home before budget_rules
from burnguard.contracts.model_base import StrictModel, check_id
from burnguard.contracts.notify import NotifyConfig
from burnguard.contracts.pricing import resolve_rates
from burnguard.contracts.routes import CompiledRoutes, ContextBudget, Route
from burnguard.contracts.usage import SpanUsage
from burnguard.contracts.windows import Window, check_timezone, check_window
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

Scope = Literal["tenant", "user", "workflow", "feature", "model_class", "session", "service"]
Metric = Literal["cost_usd", "tokens", "input_tokens", "tool_calls", "calls"]
ActionKind = Literal["warn", "downgrade", "throttle"]
#: Signal actions ordered by severity; `ok` lifts every restriction.
SEVERITY: dict[str, int] = {"ok": 0, "warn": 1, "downgrade": 2, "throttle": 3}


class Action(StrictModel):
    """One rung of a budget's ladder: from ratio `at` on, do `do`."""

    at: float = Field(gt=0, allow_inf_nan=False, description="fraction of the limit, e.g. 0.85")
    do: ActionKind
    to: str | None = Field(default=None, description="model class a downgrade goes to")


class Forecast(StrictModel):
    """Acting on the projection, not only on the spend so far."""

    downgrade: bool = Field(
        default=False, description="downgrade once the limit is projected to be hit before the window ends"
    )
    min_ratio: float = Field(
        default=0.25, ge=0, le=1, description="ignore projections until this fraction of the limit is spent"
    )


class Budget(StrictModel):
    id: str
    scope: tuple[Scope, ...]
    match: str = "*"
    window: str = "day"
    timezone: str = "UTC"
    metric: Metric = "cost_usd"
    limit: float = Field(gt=0, allow_inf_nan=False)  # a snapshot or signal cannot carry infinity
    actions: tuple[Action, ...] = (Action(at=1.0, do="throttle"),)
    forecast: Forecast = Forecast()
    description: str = ""

    @field_validator("id")
    @classmethod
    def _id_is_a_name(cls, value: str) -> str:
        return check_id(value)

    @field_validator("scope", mode="before")
    @classmethod
    def _scope_as_tuple(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split("+"))
        return value

    @field_validator("scope")
    @classmethod
    def _scope_is_one_or_two(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not 1 <= len(value) <= 2 or len(set(value)) != len(value):
            raise ValueError("scope is one dimension or a combination of two different ones")
        return value

    @field_validator("window")
    @classmethod
    def _window_is_known(cls, value: str) -> str:
        return check_window(value)

    @field_validator("timezone")
    @classmethod
    def _timezone_is_known(cls, value: str) -> str:
        return check_timezone(value)

    @field_validator("actions")
    @classmethod
    def _actions_ascend(cls, value: tuple[Action, ...]) -> tuple[Action, ...]:
        if not value:
            raise ValueError("at least one action is needed")
        thresholds = [action.at for action in value]
        if thresholds != sorted(thresholds) or len(set(thresholds)) != len(thresholds):
            raise ValueError("actions must be in ascending order of 'at', each threshold once")
        return value

    @model_validator(mode="after")
    def _session_window_needs_session_scope(self) -> Budget:
        if self.window == "session" and "session" not in self.scope:
            raise ValueError("window 'session' needs 'session' in the scope")
        return self

    @property
    def scope_name(self) -> str:
        """`tenant` or `tenant+feature`: the scope as written in signals."""
        return "+".join(self.scope)

    @cached_property
    def window_spec(self) -> Window:
        return Window(self.window, self.timezone)

    @cached_property
    def matcher(self) -> KeyMatcher | None:
        """The compiled `match` (None for `*`)."""
        return compile_match(self.match)

    def key_for(self, usage: SpanUsage) -> str | None:
        """The key this span counts under for this budget, or None if it does not match."""
        return matched_key(key_of_span(usage, self.scope), self.matcher)

    @property
    def downgrade_class(self) -> str | None:
        """The class the budget's downgrade rung goes to (None: one step down the ladder)."""
        return next((a.to for a in self.actions if a.do == "downgrade"), None)

    def action_for(self, ratio: float) -> Action | None:
        """The highest rung reached at `ratio`, or None below the first one."""
        reached = None
        for action in self.actions:
            if ratio >= action.at:
                reached = action
        return reached


def _located(at: tuple[Any, ...], message: str) -> PydanticCustomError:
    """An error raised by a whole-list or whole-file validator that still names the field it is about."""
    return PydanticCustomError("budget_config", "{message}", {"message": message, "at": at})


def _check_ids_unique(items: Iterable[Any], field: str, what: str) -> None:
    """Ids name signals, spans and topic records: one of each per file."""
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        if item.id in seen:
            raise _located(
                (field, index, "id"),
                f"{what} id {item.id!r} is used twice (first in {field}[{seen[item.id]}])",
            )
        seen[item.id] = index


class ContextGuard(StrictModel):
    """Long-context detection: warn when a session's prompts keep growing past a size.

    An agent that appends every tool result to its context pays for the whole
    history on every call; this catches it while it happens.
    """

    id: str
    max_input_tokens: int = Field(gt=0, description="warn once a call's input tokens exceed this ...")
    growth_calls: int = Field(
        default=3, ge=1, description="... after they grew over this many consecutive calls of the session"
    )

    @field_validator("id")
    @classmethod
    def _id_is_a_name(cls, value: str) -> str:
        return check_id(value)


#: What a call to a model without a known price costs when the budget file does not say:
#: USD per million tokens at the top of today's list prices (Claude Opus class), so an unknown
#: model is over-counted rather than free.
DEFAULT_UNPRICED_INPUT_MTOK = 15.0
DEFAULT_UNPRICED_OUTPUT_MTOK = 75.0


class Unpriced(StrictModel):
    """What a call to a model neither genai-prices nor `prices:` knows is charged.

    Either like another model (`charge_as`), or at per-token prices (USD per million tokens).
    """

    charge_as: str | None = Field(default=None, description="charge like this (priced) model")
    input_mtok: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    output_mtok: float | None = Field(default=None, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_way(self) -> Unpriced:
        prices = self.input_mtok is not None or self.output_mtok is not None
        if self.charge_as is None and not prices:
            raise ValueError("give 'charge_as: MODEL' or 'input_mtok'/'output_mtok'")
        if self.charge_as is not None and prices:
            raise ValueError("give 'charge_as' or per-token prices, not both")
        return self

    def price_override(self) -> dict[str, float]:
        """The per-token prices as a `prices:` entry (only when `charge_as` is not used)."""
        return {"input_mtok": self.input_mtok or 0.0, "output_mtok": self.output_mtok or 0.0}


DEFAULT_UNPRICED = Unpriced(input_mtok=DEFAULT_UNPRICED_INPUT_MTOK, output_mtok=DEFAULT_UNPRICED_OUTPUT_MTOK)


class BudgetConfig(StrictModel):
    """A whole budget file."""

    model_classes: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    downgrade: dict[str, str] = Field(default_factory=dict)
    prices: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="price overrides, USD per million tokens"
    )
    unpriced: Unpriced = Field(
        default=DEFAULT_UNPRICED, description="what a call to a model without a known price costs"
    )
    budgets: tuple[Budget, ...] = ()
    context_guards: tuple[ContextGuard, ...] = ()
    providers: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="per provider, the concrete model each class means: routing stays within a provider",
    )
    routes: tuple[Route, ...] = ()
    context_budgets: tuple[ContextBudget, ...] = ()
    notify: NotifyConfig = Field(default_factory=NotifyConfig, description="who hears about state changes")

    @field_validator("budgets")
    @classmethod
    def _ids_unique(cls, value: tuple[Budget, ...]) -> tuple[Budget, ...]:
        _check_ids_unique(value, "budgets", "budget")
        return value

    @field_validator("prices")
    @classmethod
    def _prices_are_amounts(cls, value: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for model, prices in value.items():
            for name, price in prices.items():
                if not 0 <= price < float("inf"):
                    raise _located(("prices", model, name), f"{price} is not a finite, non-negative price")
        return value

    @model_validator(mode="after")
    def _unpriced_charge_as_has_a_price(self) -> BudgetConfig:
        model = self.unpriced.charge_as
        if model is not None and model not in self.prices and resolve_rates(model) is None:
            raise _located(
                ("unpriced", "charge_as"),
                f"model {model!r} has no known price: name a priced model or give it one under 'prices:'",
            )
        return self

    @model_validator(mode="after")
    def _downgrade_targets_are_classes(self) -> BudgetConfig:
        for index, budget in enumerate(self.budgets):
            for rung, action in enumerate(budget.actions):
                if action.to is not None and action.to not in self.model_classes:
                    raise _located(
                        ("budgets", index, "actions", rung, "to"),
                        f"budget {budget.id!r}: downgrade target {action.to!r} is not a model class "
                        f"(known: {', '.join(self.model_classes) or 'none'})",
                    )
        return self

    @model_validator(mode="after")
    def _context_guard_ids_are_free(self) -> BudgetConfig:
        taken = {budget.id for budget in self.budgets}
        for index, guard in enumerate(self.context_guards):
            if guard.id in taken:
                raise _located(
                    ("context_guards", index, "id"), f"id {guard.id!r} is already used by a budget or guard"
                )
            taken.add(guard.id)
        return self

    @model_validator(mode="after")
    def _provider_models_are_in_their_class(self) -> BudgetConfig:
        for provider, by_class in self.providers.items():
            for class_name, model in by_class.items():
                if class_name not in self.model_classes:
                    raise _located(
                        ("providers", provider, class_name),
                        f"{class_name!r} is not a model class "
                        f"(known: {', '.join(self.model_classes) or 'none'})",
                    )
                if model not in self.model_classes[class_name]:
                    raise _located(
                        ("providers", provider, class_name),
                        f"model {model!r} is not listed in model_classes.{class_name}",
                    )
        return self

    @model_validator(mode="after")
    def _context_budget_ids_are_unique(self) -> BudgetConfig:
        _check_ids_unique(self.context_budgets, "context_budgets", "context budget")
        return self

    @model_validator(mode="after")
    def _routes_use_known_classes(self) -> BudgetConfig:
        _check_ids_unique(self.routes, "routes", "route")
        for index, route in enumerate(self.routes):
            if route.use not in self.model_classes:
                raise _located(
                    ("routes", index, "use"),
                    f"route {route.id!r}: {route.use!r} is not a model class "
                    f"(known: {', '.join(self.model_classes) or 'none'})",
                )
        if self.routes and not self.providers:
            raise _located(("routes",), "routes need 'providers:' to map each class to a model")
        return self

    @cached_property
    def compiled_routes(self) -> CompiledRoutes:
        return CompiledRoutes(self.routes)

    @cached_property
    def provider_of_model(self) -> dict[str, str]:
        """Which provider a model belongs to, as far as `providers:` says."""
        return {
            model: provider for provider, by_class in self.providers.items() for model in by_class.values()
        }

    def model_for(self, provider: str, class_name: str) -> str | None:
        """The concrete model of `class_name` at `provider`, None when the file names none."""
        return self.providers.get(provider, {}).get(class_name)

    @cached_property
    def class_rank(self) -> dict[str, int]:
        """Position of each class in `model_classes`: 0 is the most capable."""
        return {name: rank for rank, name in enumerate(self.model_classes)}

    def is_cheaper_class(self, class_name: str, than: str) -> bool:
        """True when `class_name` comes after `than` in `model_classes` (both known)."""
        rank = self.class_rank
        return class_name in rank and than in rank and rank[class_name] > rank[than]

    def class_above(self, class_name: str) -> str | None:
        """The next more capable class; `model_classes` lists classes from the most capable down."""
        names = list(self.model_classes)
        if class_name not in names:
            return None
        index = names.index(class_name)
        return names[index - 1] if index > 0 else None

    def context_budget_for(self, feature: str) -> ContextBudget | None:
        return next((b for b in self.context_budgets if b.applies_to(feature)), None)

    def context_guard(self, guard_id: str) -> ContextGuard | None:
        return next((g for g in self.context_guards if g.id == guard_id), None)

    @cached_property
    def class_of_model(self) -> dict[str, str]:
        return {model: name for name, models in self.model_classes.items() for model in models}

    def model_class(self, model: str) -> str:
        """The configured class of a concrete model, '' when it has none."""
        return self.class_of_model.get(model, "")

    def downgrade_model(self, model: str, target_class: str | None = None) -> str | None:
        """Walk the ladder from `model`: one step, or until a model of `target_class`.

        Returns None when the ladder has no cheaper model to offer.
        """
        current, seen = model, {model}
        while current in self.downgrade:
            current = self.downgrade[current]
            if current in seen:
                return None  # a cycle in the ladder: refuse rather than loop
            seen.add(current)
            if target_class is None or self.model_class(current) == target_class:
                return current
        return None

    def budget(self, budget_id: str) -> Budget | None:
        return next((b for b in self.budgets if b.id == budget_id), None)


class BudgetFileError(ValueError):
    """Every mistake found in a budget file, each as `file:line: field: message`."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _node_lines(node: yaml.Node, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[(*path, key)] = key_node.start_mark.line + 1
            _node_lines(value_node, (*path, key), lines)
            lines[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _node_lines(item, (*path, index), lines)


def _line_of(loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int:
    """The line of the deepest part of `loc` present in the file (a missing field: its parent)."""
    for depth in range(len(loc), -1, -1):
        if loc[:depth] in lines:
            return lines[loc[:depth]]
    return 1


def _field_path(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(file)"


def parse_budget_yaml(text: str, source: str = "<budgets>") -> BudgetConfig:
    """Validate a budget file; raise `BudgetFileError` naming file, line and field."""
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise BudgetFileError([f"{source}:{line}: (file): not valid YAML: {exc}"]) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BudgetFileError([f"{source}:1: (file): expected a mapping with 'budgets:'"])
    lines: dict[tuple[Any, ...], int] = {}
    if root is not None:
        _node_lines(root, (), lines)
    try:
        return BudgetConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            at = error.get("ctx", {}).get("at")
            loc = tuple(at) if at else tuple(part for part in error["loc"] if not _is_union_tag(part))
            problems.append(f"{source}:{_line_of(loc, lines)}: {_field_path(loc)}: {error['msg']}")
        raise BudgetFileError(problems) from exc


def _is_union_tag(part: Any) -> bool:
    """pydantic adds the union member (e.g. 'str') to the location; the user never wrote it."""
    return isinstance(part, str) and (part in {"str", "tuple[...]"} or part.startswith("literal["))


def load_budget_file(path: str | Path) -> BudgetConfig:
    path = Path(path)
    return parse_budget_yaml(path.read_text(encoding="utf-8"), source=str(path))


# --- the `burnguard.budgets` topic ------------------------------------------------
#: Key of the record that holds what all budgets share: model classes, ladder, prices.
#: Budget ids start with a letter or digit, so this key can never clash with one.
SHARED_RECORD_KEY = "_shared"


def to_records(config: BudgetConfig) -> dict[str, bytes]:
    """The topic records that describe `config`: one per budget, plus the shared record."""
    shared = {
        "model_classes": config.model_classes,
        "downgrade": config.downgrade,
        "prices": config.prices,
        "unpriced": config.unpriced.model_dump(exclude_none=True),
        "context_guards": [guard.model_dump() for guard in config.context_guards],
        "providers": config.providers,
        "routes": [route.model_dump() for route in config.routes],
        "context_budgets": [budget.model_dump() for budget in config.context_budgets],
    }
    # Not key-sorted: the order of `model_classes` means something (most capable first).
    records = {SHARED_RECORD_KEY: json.dumps(shared).encode()}
    for budget in config.budgets:
        records[budget.id] = budget.model_dump_json().encode()
    return records


def from_records(records: dict[str, bytes]) -> BudgetConfig:
    """Rebuild a config from the topic's current records (the latest value per key)."""
    shared = json.loads(records[SHARED_RECORD_KEY]) if SHARED_RECORD_KEY in records else {}
    budgets = [json.loads(value) for key, value in sorted(records.items()) if key != SHARED_RECORD_KEY]
    return BudgetConfig.model_validate({**shared, "budgets": budgets})
