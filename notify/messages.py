"""What a state change says: the event id, the signed webhook payload and the Slack message.

The event id is derived from the signal record itself (its key, action and
issue time), so every retry, every restart and every destination sends the
same `webhook-id` for the same change, and receivers can deduplicate on it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from burnguard.contracts.signals import Signal

EVENT_TYPE = "burnguard.budget.state_changed"
_ICONS = {
    "ok": ":white_check_mark:",
    "warn": ":warning:",
    "downgrade": ":arrow_down:",
    "throttle": ":no_entry:",
}


def event_id(signal: Signal) -> str:
    """`evt_` + 32 hex digits of SHA-256 over the signal's key, action and issue time."""
    identity = f"{signal.kafka_key}|{signal.action}|{signal.issued_at.isoformat()}"
    return "evt_" + hashlib.sha256(identity.encode()).hexdigest()[:32]


def webhook_payload(signal: Signal, previous: str) -> str:
    """The JSON body of a Standard Webhooks message (`type`, `timestamp`, `data`), compact and stable."""
    data: dict[str, Any] = json.loads(signal.model_dump_json())
    data["previous_action"] = previous
    body = {"type": EVENT_TYPE, "timestamp": signal.issued_at.isoformat(), "data": data}
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def _amount(signal: Signal, value: float) -> str:
    return f"${value:,.2f}" if signal.metric == "cost_usd" else f"{value:,.0f} {signal.metric}"


def slack_text(signal: Signal, previous: str) -> str:
    """One readable Slack message: what changed, for whom, spent against limit, projection, reason."""
    head = (
        f"{_ICONS.get(signal.action, '')} *{signal.action}* (was {previous}): budget `{signal.budget}` "
        f"for {signal.scope} `{signal.key}`"
    )
    spent = f"spent {_amount(signal, signal.spent)} of {_amount(signal, signal.limit)} ({signal.ratio:.0%})"
    if signal.action == "downgrade" and signal.downgrade_to:
        spent += f", calls go to class `{signal.downgrade_to}`"
    window = f"window until {signal.window_end:%Y-%m-%d %H:%M} UTC"
    projection = (
        f"limit projected at {signal.projected_exhaustion:%Y-%m-%d %H:%M} UTC"
        f" (burn {_amount(signal, signal.burn_rate_per_hour)}/h)"
        if signal.projected_exhaustion
        else f"burn {_amount(signal, signal.burn_rate_per_hour)}/h, limit not in sight this window"
    )
    return f"{head}\n{spent}; {window}\n{projection}\n> {signal.reason}"


def slack_payload(signal: Signal, previous: str) -> str:
    return json.dumps({"text": slack_text(signal, previous)}, separators=(",", ":"))
