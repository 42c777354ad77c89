"""burnguard instrumentation: what goes into user apps (no Faust, no ClickHouse)."""

from burnguard.instrumentation.attribution import attribute, current_attribution, stakes
from burnguard.instrumentation.calls import llm_call, record_llm_call, record_tool_call, tool_call
from burnguard.instrumentation.decisions import CallDecision, CallRequest, decide_call
from burnguard.instrumentation.escalation import escalate_on
from burnguard.instrumentation.guard import BudgetExceeded, BudgetGuard, GuardVerdict
from burnguard.instrumentation.kafka_exporter import KafkaSpanExporter
from burnguard.instrumentation.refusals import CallRefused, ContextBudgetExceeded, StepCapExceeded
from burnguard.instrumentation.runtime import Runtime, Settings, ShutdownReport, configure, current_runtime
from burnguard.instrumentation.steps import session
from burnguard.instrumentation.workflow import tool, user_action, workflow

__all__ = [
    "BudgetExceeded",
    "BudgetGuard",
    "CallDecision",
    "CallRefused",
    "CallRequest",
    "ContextBudgetExceeded",
    "GuardVerdict",
    "KafkaSpanExporter",
    "Runtime",
    "Settings",
    "ShutdownReport",
    "StepCapExceeded",
    "attribute",
    "configure",
    "current_attribution",
    "current_runtime",
    "decide_call",
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
