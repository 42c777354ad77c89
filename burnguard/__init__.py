"""burnguard: LLM spend as a runtime signal.

The top-level names are the app-facing API, re-exported from
`burnguard.instrumentation` (which never imports Faust or ClickHouse).
"""

from burnguard.instrumentation import (
    BudgetExceeded,
    BudgetGuard,
    CallRefused,
    ContextBudgetExceeded,
    StepCapExceeded,
    attribute,
    configure,
    escalate_on,
    llm_call,
    record_llm_call,
    record_tool_call,
    session,
    stakes,
    tool,
    tool_call,
    user_action,
    workflow,
)

__version__ = "0.1.0"

__all__ = [
    "BudgetExceeded",
    "BudgetGuard",
    "CallRefused",
    "ContextBudgetExceeded",
    "StepCapExceeded",
    "__version__",
    "attribute",
    "configure",
    "escalate_on",
    "llm_call",
    "record_llm_call",
    "record_tool_call",
    "session",
    "stakes",
    "tool",
    "tool_call",
    "user_action",
    "workflow",
]
