"""burnguard: LLM spend as a runtime signal.

The top-level names are the app-facing API, re-exported from
`burnguard.instrumentation` (which never imports Faust or ClickHouse).
"""

from burnguard.instrumentation import (
    BudgetExceeded,
    BudgetGuard,
    attribute,
    configure,
    llm_call,
    record_llm_call,
    record_tool_call,
    tool,
    tool_call,
    user_action,
    workflow,
)

__version__ = "0.1.0"

__all__ = [
    "BudgetExceeded",
    "BudgetGuard",
    "__version__",
    "attribute",
    "configure",
    "llm_call",
    "record_llm_call",
    "record_tool_call",
    "tool",
    "tool_call",
    "user_action",
    "workflow",
]
