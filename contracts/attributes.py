"""Span attribute names: the input contract of burnguard (docs/ARCHITECTURE.md §3).

Both the instrumentation (which writes these attributes) and the stream and
sinks (which read them) import the names from here, so a rename is one edit.
Names follow the OpenTelemetry GenAI semantic conventions where they exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

# --- OpenTelemetry GenAI semantic conventions -------------------------------
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_SYSTEM: Final = "gen_ai.system"  # deprecated spelling of the provider
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_RESPONSE_ID: Final = "gen_ai.response.id"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: Final = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS: Final = "gen_ai.usage.cache_creation.input_tokens"
#: The spelling the Anthropic SDK's own spans use for cache creation; accepted on input.
GEN_AI_USAGE_CACHE_WRITE_INPUT_TOKENS: Final = "gen_ai.usage.cache_write.input_tokens"
GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: Final = "gen_ai.usage.reasoning.output_tokens"
GEN_AI_USAGE_PROMPT_TOKENS: Final = "gen_ai.usage.prompt_tokens"  # deprecated
GEN_AI_USAGE_COMPLETION_TOKENS: Final = "gen_ai.usage.completion_tokens"  # deprecated
GEN_AI_TOOL_NAME: Final = "gen_ai.tool.name"
GEN_AI_TOOL_CALL_ID: Final = "gen_ai.tool.call.id"
GEN_AI_CONVERSATION_ID: Final = "gen_ai.conversation.id"
GEN_AI_AGENT_NAME: Final = "gen_ai.agent.name"
ERROR_TYPE: Final = "error.type"
SESSION_ID: Final = "session.id"
USER_ID: Final = "user.id"
SERVICE_NAME: Final = "service.name"  # a resource attribute

# --- burnguard's own attributes ---------------------------------------------
TENANT: Final = "burnguard.tenant"
WORKFLOW: Final = "burnguard.workflow"
FEATURE: Final = "burnguard.feature"
ACTION: Final = "burnguard.action"
COST_USD: Final = "burnguard.cost.usd"
UNPRICED: Final = "burnguard.cost.unpriced"  # true when no price is known for the model
MODEL_CLASS: Final = "burnguard.model_class"
DOWNGRADED_FROM: Final = "burnguard.downgraded_from"
TOOL_CALLS: Final = "burnguard.tool_calls"  # tool calls the model requested in one LLM call

# OpenLLMetry carries attribution under this prefix (e.g. ...association.properties.tenant).
TRACELOOP_ASSOCIATION_PREFIX: Final = "traceloop.association.properties."

# --- operations ---------------------------------------------------------------
OP_CHAT: Final = "chat"
OP_TEXT_COMPLETION: Final = "text_completion"
OP_EMBEDDINGS: Final = "embeddings"
OP_GENERATE_CONTENT: Final = "generate_content"
OP_EXECUTE_TOOL: Final = "execute_tool"
OP_INVOKE_AGENT: Final = "invoke_agent"
OP_CREATE_AGENT: Final = "create_agent"
OP_WORKFLOW: Final = "workflow"  # burnguard's workflow root spans

#: Operations that call a model and so cost money and tokens.
MODEL_CALL_OPERATIONS: Final = frozenset({OP_CHAT, OP_TEXT_COMPLETION, OP_EMBEDDINGS, OP_GENERATE_CONTENT})

# --- attribution ----------------------------------------------------------------
#: The dimensions a call is attributed to, and the span attribute / baggage key
#: that carries each. Baggage keys equal the attribute names, so a value set in
#: one service arrives on the spans of the next one unchanged.
ATTRIBUTION_KEYS: Final[dict[str, str]] = {
    "tenant": TENANT,
    "user": USER_ID,
    "workflow": WORKFLOW,
    "feature": FEATURE,
    "session": SESSION_ID,
    "action": ACTION,
}
#: Reverse lookup: attribute name -> dimension.
ATTRIBUTION_BY_ATTRIBUTE: Final[dict[str, str]] = {v: k for k, v in ATTRIBUTION_KEYS.items()}
#: The deprecated OpenTelemetry spelling of `user.id`, still set by older SDKs and on resources.
ENDUSER_ID: Final = "enduser.id"
#: Deprecated spellings accepted on input: attribute -> dimension (fill an empty field only).
DEPRECATED_ATTRIBUTION: Final[dict[str, str]] = {ENDUSER_ID: "user"}
#: OpenLLMetry spellings accepted on input: traceloop...properties.<name> -> dimension.
TRACELOOP_ATTRIBUTION: Final[dict[str, str]] = {
    TRACELOOP_ASSOCIATION_PREFIX + name: dimension
    for dimension, names in {
        "tenant": ("tenant", "tenant_id"),
        "user": ("user", "user_id"),
        "workflow": ("workflow", "workflow_name"),
        "feature": ("feature",),
        "session": ("session", "session_id"),
        "action": ("action", "action_id"),
    }.items()
    for name in names
}

# --- added for the SDK auto-instrumentation -------------------------------------
#: True when the token counts on the span are an estimate (a stream that carried no usage,
#: or one abandoned before its usage arrived), never a silent zero.
USAGE_ESTIMATED: Final = "burnguard.usage.estimated"
#: Set on a GenAI span that another instrumentation made for a call burnguard already
#: records (the span id, hex, of burnguard's span): the call is counted once, on ours.
DUPLICATE_OF: Final = "burnguard.duplicate_of"
#: Opt-in message content (OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true), JSON.
GEN_AI_INPUT_MESSAGES: Final = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES: Final = "gen_ai.output.messages"
GEN_AI_SYSTEM_INSTRUCTIONS: Final = "gen_ai.system_instructions"
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
#: The root span of a workflow run (`burnguard.workflow(name)`); its status says if the run succeeded.
WORKFLOW_SUCCESS: Final = "burnguard.workflow.success"

# --- routing, escalation, context budgets and step caps (docs/ARCHITECTURE.md §12) -----
#: How much is riding on the task (`low` / `normal` / `high`), declared in code with
#: `burnguard.stakes(...)` and carried as baggage like the attribution.
STAKES: Final = "burnguard.stakes"
DEFAULT_STAKES: Final = "normal"
#: The model the caller asked for, when a routing rule sent the call to another class.
ROUTED_FROM: Final = "burnguard.routed_from"
#: The id of the routing rule that matched the call (set whether or not the model changed).
ROUTE: Final = "burnguard.route"
#: True when the call runs on a cheaper model class than the caller asked for (routed down or
#: downgraded): what the "fell back to cheaper models" percentage counts.
FALLBACK: Final = "burnguard.fallback"
#: Set on the second attempt of an escalated call: the model of the attempt that failed the check.
ESCALATED_FROM: Final = "burnguard.escalated_from"
#: Why a call was refused before it was made: `budget`, `step_cap` or `context`.
REFUSED: Final = "burnguard.refused"
REFUSED_BUDGET: Final = "budget"
REFUSED_STEP_CAP: Final = "step_cap"
REFUSED_CONTEXT: Final = "context"
#: The pre-call estimate of the prompt's tokens, next to the provider's real count.
CONTEXT_ESTIMATED_INPUT_TOKENS: Final = "burnguard.context.estimated_input_tokens"
#: How the estimate was made: `tiktoken:<encoding>` or `approx:chars/4`.
CONTEXT_ESTIMATOR: Final = "burnguard.context.estimator"
#: The feature's per-call input limit, set when a context budget applied to the call.
CONTEXT_LIMIT: Final = "burnguard.context.max_input_tokens"
#: True when the estimate exceeded the limit and the budget only warns.
CONTEXT_EXCEEDED: Final = "burnguard.context.exceeded"

# --- precedence: which spelling of a field wins ------------------------------------------------
#: For each field more than one attribute can carry, the attributes in precedence order: the first
#: one with a value (not empty, not zero) wins, the current semantic conventions before deprecated
#: and foreign spellings. Decoding in the stream and sink (`contracts.otlp`) and pricing in the app
#: (`instrumentation.cost`) both read a span through this table.
FIELD_SPELLINGS: Final[dict[str, tuple[str, ...]]] = {
    "provider": (GEN_AI_PROVIDER_NAME, GEN_AI_SYSTEM),
    "input_tokens": (GEN_AI_USAGE_INPUT_TOKENS, GEN_AI_USAGE_PROMPT_TOKENS),
    "output_tokens": (GEN_AI_USAGE_OUTPUT_TOKENS, GEN_AI_USAGE_COMPLETION_TOKENS),
    "cache_creation_tokens": (
        GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
        GEN_AI_USAGE_CACHE_WRITE_INPUT_TOKENS,
    ),
}
#: The same for the attribution dimensions: ours, then OpenLLMetry's, then the deprecated ones.
ATTRIBUTION_SPELLINGS: Final[dict[str, tuple[str, ...]]] = {
    dimension: (
        canonical,
        *(name for name, of in TRACELOOP_ATTRIBUTION.items() if of == dimension),
        *(name for name, of in DEPRECATED_ATTRIBUTION.items() if of == dimension),
    )
    for dimension, canonical in ATTRIBUTION_KEYS.items()
}


def first_value(attributes: Mapping[str, Any], spellings: tuple[str, ...]) -> Any:
    """The value of a field by the precedence of its `spellings`; None when none has a value."""
    for name in spellings:
        value = attributes.get(name)
        if value:
            return value
    return None


def attribution_of(attributes: Mapping[str, Any]) -> dict[str, str]:
    """The attribution plain attribute values carry (e.g. a resource's), by dimension."""
    found: dict[str, str] = {}
    for dimension, spellings in ATTRIBUTION_SPELLINGS.items():
        for name in spellings:  # a value is text (a number too, as decoding reads it); empty: next
            value = attributes.get(name)
            if value is not None and (text := str(value)):
                found[dimension] = text
                break
    return found


def inherit_attribution(own: Mapping[str, str], inherited: Mapping[str, str]) -> dict[str, str]:
    """A call's attribution: its own values (span, baggage) win; `inherited` (its resource's) fills
    the dimensions it left empty. The stream applies the same rule to decoded spans."""
    merged = {dimension: value for dimension, value in inherited.items() if value}
    merged.update((dimension, value) for dimension, value in own.items() if value)
    return merged
