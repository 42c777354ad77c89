"""Sending one message to one destination, and what to do with the answer.

2xx is delivered. A destination that is down (connection error, timeout) or
answers 408, 429 or 5xx is worth another try later. Any other answer (a
4xx such as 400, 403, 404, 410, or an unexpected 3xx) will not change by
trying again: the event goes to the dead-letter topic with the status and the
reason, and later events go on.

URLs of Slack webhooks and signing secrets are credentials: they are read from
the environment when the notifier starts and never logged; log lines and
dead-letter reasons name the destination by its id.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import httpx
from burnguard.contracts.notify import Destination
from standardwebhooks import Webhook

RETRYABLE_STATUS = frozenset({408, 425, 429})
_REASON_CHARS = 200


class DestinationConfigError(ValueError):
    """A destination's URL or secret is missing or unusable; the message names the variable, not its value."""


@dataclass(frozen=True)
class Target:
    """A destination with its URL and signer resolved from the environment."""

    id: str
    type: str
    url: str = field(repr=False)
    signer: Webhook | None = field(default=None, repr=False)

    @classmethod
    def resolve(cls, destination: Destination, env: os._Environ[str] | dict[str, str] = os.environ) -> Target:
        url = destination.url or env.get(destination.url_env or "", "")
        if not url:
            raise DestinationConfigError(
                f"destination {destination.id}: environment variable {destination.url_env} is not set"
            )
        if not url.startswith(("http://", "https://")):
            raise DestinationConfigError(
                f"destination {destination.id}: {destination.url_env} does not hold an http(s) URL"
            )
        signer = None
        if destination.type == "webhook":
            secret = env.get(destination.secret_env or "", "")
            if not secret:
                raise DestinationConfigError(
                    f"destination {destination.id}: environment variable {destination.secret_env} is not set"
                )
            if not _is_webhook_secret(secret):
                raise DestinationConfigError(
                    f"destination {destination.id}: {destination.secret_env} is not a whsec_ secret "
                    "(base64 of 24 to 64 random bytes)"
                )
            signer = Webhook(secret)
        return cls(destination.id, destination.type, url, signer)


def _is_webhook_secret(secret: str) -> bool:
    """Standard Webhooks secrets: `whsec_` (optional) + base64 of 24 to 64 bytes."""
    raw = secret.removeprefix("whsec_")
    try:
        decoded = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except binascii.Error:
        return False
    return 24 <= len(decoded) <= 64


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer to one attempt."""

    result: Literal["delivered", "retry", "dead"]
    status: int | None  # None: no HTTP answer (connection error, timeout)
    reason: str
    retry_after_s: float | None = None


def send(client: httpx.Client, target: Target, message_id: str, body: str) -> Outcome:
    """One attempt. Webhooks are signed per attempt (a fresh `webhook-timestamp`, the same `webhook-id`)."""
    headers = {"content-type": "application/json", "user-agent": "burnguard-notify"}
    if target.signer is not None:
        now = datetime.now(UTC)
        headers |= {
            "webhook-id": message_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": target.signer.sign(message_id, now, body),
        }
    try:
        response = client.post(target.url, content=body.encode(), headers=headers)
    except httpx.HTTPError as exc:
        return Outcome("retry", None, f"{target.id} unreachable: {type(exc).__name__}")
    return classify(target.id, response)


def classify(destination_id: str, response: httpx.Response) -> Outcome:
    status = response.status_code
    text = " ".join(response.text.split())[:_REASON_CHARS]
    reason = f"{destination_id} answered {status} {response.reason_phrase}" + (f": {text}" if text else "")
    if 200 <= status < 300:
        return Outcome("delivered", status, reason)
    if status >= 500 or status in RETRYABLE_STATUS:
        return Outcome("retry", status, reason, _retry_after(response))
    return Outcome("dead", status, reason)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds < 3600 else None
