"""The normalized view of one GenAI span that the stream and the sinks account.

Spans arrive from many instrumentations with different spellings (our own,
the official OpenTelemetry GenAI ones, OpenLLMetry, OpenLIT); decoding turns
each into one `SpanUsage` so nothing downstream has to know who wrote the span.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from burnguard.contracts import attributes as attr


@dataclass(slots=True)
class SpanUsage:
    """One GenAI span: what it was, who it was for, what it used and cost."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    start_ns: int
    end_ns: int
    operation: str
    provider: str = ""
    request_model: str = ""
    response_model: str = ""
    service: str = ""
    tenant: str = ""
    user: str = ""
    workflow: str = ""
    feature: str = ""
    session: str = ""
    action: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    tool_calls: int = 0
    tool_name: str = ""
    agent_name: str = ""
    conversation_id: str = ""
    cost_usd: float | None = None
    model_class: str = ""
    downgraded_from: str = ""
    routed_from: str = ""
    route: str = ""
    escalated_from: str = ""
    refused: str = ""  # why the call was refused before it was made; such a span used nothing
    fallback: bool = False  # ran on a cheaper class than requested (routed down or downgraded)
    stakes: str = ""
    error_type: str = ""
    status_error: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def model(self) -> str:
        """The billed model: the response model when known, else the requested one."""
        return self.response_model or self.request_model

    @property
    def is_model_call(self) -> bool:
        """A call that reached a model; a refused call is recorded but never made."""
        return self.operation in attr.MODEL_CALL_OPERATIONS and not self.refused

    @property
    def is_refused_call(self) -> bool:
        """A model call refused before it was made (budget, step cap, context budget)."""
        return bool(self.refused) and self.operation in attr.MODEL_CALL_OPERATIONS

    @property
    def is_tool_call(self) -> bool:
        """A tool that ran; one refused by a step cap is recorded but never ran."""
        return self.operation == attr.OP_EXECUTE_TOOL and not self.refused

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def priced(self) -> bool:
        return self.cost_usd is not None

    def dimension(self, name: str) -> str:
        """The value of an attribution dimension (tenant, user, ..., service, model_class)."""
        return getattr(self, name)
