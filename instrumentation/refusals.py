"""The errors a call is refused with before it is made, one per reason.

All derive from `CallRefused`, so an app that wants to handle every refusal the
same way (fall back to a cached answer, tell the user) catches one class; each
carries the `reason` that is also written on the refused call's span.
"""

from __future__ import annotations

from burnguard.contracts import attributes as attr


class CallRefused(RuntimeError):
    """A model or tool call was refused before it was made."""

    reason: str = ""


class StepCapExceeded(CallRefused):
    """The session already took as many steps of this kind as it declared."""

    reason = attr.REFUSED_STEP_CAP

    def __init__(self, session: str, kind: str, cap: int) -> None:
        self.session = session
        self.kind = kind
        self.cap = cap
        super().__init__(
            f"session {session!r} reached its cap of {cap} {kind.replace('_', ' ')}: "
            "the next step is refused (raise the cap with burnguard.session(..., max_...))"
        )


class ContextBudgetExceeded(CallRefused):
    """The prompt is larger than the feature's per-call context budget."""

    reason = attr.REFUSED_CONTEXT

    def __init__(self, budget_id: str, feature: str, estimated: int, limit: int, estimator: str) -> None:
        self.budget = budget_id
        self.feature = feature
        self.estimated_tokens = estimated
        self.limit = limit
        super().__init__(
            f"prompt of about {estimated:,} input tokens ({estimator}) exceeds the context budget "
            f"{budget_id!r} of feature {feature!r}: at most {limit:,} input tokens per call"
        )
