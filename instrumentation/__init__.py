"""burnguard instrumentation: what goes into user apps (no Faust, no ClickHouse)."""

from burnguard.instrumentation.attribution import attribute, current_attribution
from burnguard.instrumentation.calls import llm_call, record_llm_call, record_tool_call, tool_call
from burnguard.instrumentation.guard import BudgetExceeded, BudgetGuard, Decision
from burnguard.instrumentation.kafka_exporter import KafkaSpanExporter
from burnguard.instrumentation.runtime import Runtime, Settings, configure, current_runtime
from burnguard.instrumentation.workflow import tool, user_action, workflow

__all__ = [
    "BudgetExceeded",
    "BudgetGuard",
    "Decision",
    "KafkaSpanExporter",
    "Runtime",
    "Settings",
    "attribute",
    "configure",
    "current_attribution",
    "current_runtime",
    "llm_call",
    "record_llm_call",
    "record_tool_call",
    "tool",
    "tool_call",
    "user_action",
    "workflow",
]
