"""A local server speaking the Anthropic Messages API, JSON and SSE streaming.

Point the real client at it: `Anthropic(base_url=server.url, api_key="test", max_retries=0)`.
Usage follows the API: `input_tokens` excludes the cache tokens, which come as
`cache_read_input_tokens` and `cache_creation_input_tokens`; a stream reports
the input side in `message_start` and the cumulative output in `message_delta`.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from tests.fakes.base import FakeHandler, FakeServer, Recorded

TEXT = "Hello from the fake Claude, streaming in small pieces."

_ERRORS = {
    400: ("invalid_request_error", "max_tokens: Field required"),
    401: ("authentication_error", "invalid x-api-key"),
    404: ("not_found_error", "model: not found"),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


class _AnthropicHandler(FakeHandler):
    routes: ClassVar[dict[str, str]] = {"/v1/messages": "messages"}

    def do_POST(self) -> None:
        status = self.headers.get("x-fake-status")
        if status is not None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            self.server.record(
                Recorded("POST", self.path, body, {k.lower(): v for k, v in self.headers.items()})
            )
            kind, message = _ERRORS.get(int(status), ("api_error", "error"))
            self.send_json(
                int(status),
                {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_fake"},
                {"request-id": "req_fake"},
            )
            return
        super().do_POST()

    def messages(self, body: dict[str, Any], headers: dict[str, str]) -> None:
        model = body["model"]
        n = len(self.server.requests)
        usage = {
            "input_tokens": self.option(headers, "input", 100),
            "cache_creation_input_tokens": self.option(headers, "cache-creation", 0),
            "cache_read_input_tokens": self.option(headers, "cached", 0),
            "output_tokens": self.option(headers, "output", 25),
            "service_tier": "standard",
        }
        tool_calls = self.option(headers, "tool-calls")
        chunks = self.option(headers, "chunks")
        pieces = [f"tok{i} " for i in range(chunks)] if chunks else [w + " " for w in TEXT.split(" ")]
        text = self.server.replies.get(model, "".join(pieces))
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        for i in range(tool_calls):
            content.append(
                {
                    "type": "tool_use",
                    "id": f"toolu_{i}",
                    "name": "get_weather",
                    "input": {"city": f"city-{i}"},
                }
            )
        message = {
            "id": f"msg_fake{n}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": "tool_use" if tool_calls else "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        if not body.get("stream"):
            self.send_json(200, message, {"request-id": f"req_{n}"})
            return
        self.start_sse()
        start_usage = {**usage, "output_tokens": 1}
        events: list[tuple[str, dict[str, Any]]] = [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {**message, "content": [], "stop_reason": None, "usage": start_usage},
                },
            ),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            ("ping", {"type": "ping"}),
        ]
        for piece in pieces:
            events.append(
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": piece},
                    },
                )
            )
        events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
        for i in range(tool_calls):
            index = i + 1
            block = {"type": "tool_use", "id": f"toolu_{i}", "name": "get_weather", "input": {}}
            events.append(
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": block},
                )
            )
            args = json.dumps({"city": f"city-{i}"})
            for part in (args[: len(args) // 2], args[len(args) // 2 :]):
                events.append(
                    (
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": part},
                        },
                    )
                )
            events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        events.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                    "usage": {"output_tokens": usage["output_tokens"]},
                },
            )
        )
        events.append(("message_stop", {"type": "message_stop"}))
        for name, data in events:
            if not self.send_event(data, event=name):
                return


class FakeAnthropic(FakeServer):
    handler_class = _AnthropicHandler

    @property
    def base_url(self) -> str:
        return self.url
