"""Who hears about a budget's state change: the `notify:` section of the budget file.

Destinations are Standard Webhooks endpoints (signed) or Slack incoming
webhooks; routes send a change to destinations by scope, budget and action.
Secrets never appear in the file: a webhook's signing secret and a Slack URL
(which is itself a credential) are named by environment variable, and read
only by `burnguard notify` when it starts.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

from burnguard.contracts.model_base import StrictModel, check_id
from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

NotifyAction = Literal["ok", "warn", "downgrade", "throttle"]
_ENV_NAME = r"^[A-Z_][A-Z0-9_]*$"


class Destination(StrictModel):
    """Where messages go: `webhook` (Standard Webhooks, signed) or `slack` (incoming webhook)."""

    id: str
    type: Literal["webhook", "slack"]
    url: str | None = Field(default=None, description="endpoint URL (webhooks only; a Slack URL is a secret)")
    url_env: str | None = Field(default=None, pattern=_ENV_NAME, description="variable holding the URL")
    secret_env: str | None = Field(
        default=None,
        pattern=_ENV_NAME,
        description="variable holding the whsec_... signing secret (webhooks)",
    )

    @field_validator("id")
    @classmethod
    def _id_is_a_name(cls, value: str) -> str:
        return check_id(value)

    @field_validator("url")
    @classmethod
    def _url_is_http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @model_validator(mode="after")
    def _has_what_its_type_needs(self) -> Destination:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of 'url' and 'url_env'")
        if self.type == "slack" and self.url is not None:
            raise ValueError("a Slack webhook URL is a credential: name its variable with 'url_env'")
        if self.type == "webhook" and self.secret_env is None:
            raise ValueError("a webhook needs 'secret_env', the variable holding its signing secret")
        if self.type == "slack" and self.secret_env is not None:
            raise ValueError("'secret_env' is for webhooks; Slack webhooks are not signed")
        return self


class NotifyRoute(StrictModel):
    """Send the changes that match to `to`. Omitted fields match everything; globs allowed."""

    to: tuple[str, ...] = Field(min_length=1)
    scope: tuple[str, ...] = ()
    budget: tuple[str, ...] = ()
    actions: tuple[NotifyAction, ...] = ()

    @field_validator("to", "scope", "budget", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    def matches(self, scope: str, budget: str, action: str) -> bool:
        return (
            _any_glob(self.scope, scope)
            and _any_glob(self.budget, budget)
            and (not self.actions or action in self.actions)
        )


def _any_glob(patterns: tuple[str, ...], value: str) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


class NotifyConfig(StrictModel):
    """The `notify:` section: destinations and the routes to them."""

    destinations: tuple[Destination, ...] = ()
    routes: tuple[NotifyRoute, ...] = ()

    @model_validator(mode="after")
    def _routes_name_known_destinations(self) -> NotifyConfig:
        seen: dict[str, int] = {}
        for index, destination in enumerate(self.destinations):
            if destination.id in seen:
                raise _at(
                    ("notify", "destinations", index, "id"),
                    f"destination id {destination.id!r} is used twice",
                )
            seen[destination.id] = index
        for index, route in enumerate(self.routes):
            for name in route.to:
                if name not in seen:
                    known = ", ".join(sorted(seen)) or "none"
                    raise _at(("notify", "routes", index, "to"), f"no destination {name!r} (known: {known})")
        return self

    def destinations_for(self, scope: str, budget: str, action: str) -> list[Destination]:
        """Every destination of every matching route, each once, in the order they are declared."""
        wanted = {name for route in self.routes if route.matches(scope, budget, action) for name in route.to}
        return [destination for destination in self.destinations if destination.id in wanted]


def _at(loc: tuple[object, ...], message: str) -> PydanticCustomError:
    """An error that names its field from the file's root (see `budgets.parse_budget_yaml`)."""
    return PydanticCustomError("budget_config", "{message}", {"message": message, "at": loc})
