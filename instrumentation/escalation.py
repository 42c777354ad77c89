"""Escalation: a routine call routed to a cheap model gets one retry on the next class up.

Routing sends extraction and classification to economy models; now and then
one of them answers with invalid JSON or a refusal. Inside
`escalate_on(check)`, an instrumented call whose response fails the caller's
check is made once more on the next more capable class of the same
provider. Both attempts are recorded, the second with
`burnguard.escalated_from`, so what escalations cost is visible.

Only complete (non-streamed) responses are checked: a stream has been handed
to the app before its content is known.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from burnguard.contracts.budgets import BudgetConfig

logger = logging.getLogger(__name__)

ResponseCheck = Callable[[Any], Any]
_active_check: ContextVar[ResponseCheck | None] = ContextVar("burnguard_escalation_check", default=None)


@contextmanager
def escalate_on(check: ResponseCheck) -> Iterator[None]:
    """Retry calls inside the block once on the next class up when `check(response)` fails.

    `check` fails when it returns a falsy value or raises (e.g. `json.loads`
    on the content); the retry's response is returned as it is.
    """
    token = _active_check.set(check)
    try:
        yield
    finally:
        _active_check.reset(token)


def active_check() -> ResponseCheck | None:
    return _active_check.get()


def response_passes(check: ResponseCheck, response: Any) -> bool:
    try:
        return bool(check(response))
    except Exception as exc:  # the check's own way of saying no, e.g. invalid JSON
        logger.debug("burnguard: escalation check raised %r", exc)
        return False


def escalation_model(model: str, provider: str, config: BudgetConfig) -> str | None:
    """The model one class above `model` at the same provider, None when there is none."""
    above = config.class_above(config.model_class(model))
    if above is None:
        return None
    target = config.model_for(provider, above)
    return target if target != model else None
