"""A local server speaking the OpenAI API: chat completions, Responses, embeddings, legacy completions.

Point the real client at it: `OpenAI(base_url=server.url + "/v1", api_key="test", max_retries=0)`.
Streams follow the real wire format: chat completion chunks end with `data: [DONE]` and carry a
usage chunk (empty `choices`) only when the request asked for `stream_options.include_usage`;
Responses streams send the typed `response.*` events ending in `response.completed` with usage.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from typing import Any, ClassVar

from tests.fakes.base import FakeHandler, FakeServer, Recorded

TEXT = "Hello from the fake model, streaming in small pieces."
DIMENSIONS = 8

_ERRORS = {
    400: ("invalid_request_error", "invalid_value", "Invalid value for 'temperature': must be <= 2."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again in 1s."),
    500: ("server_error", None, "The server had an error while processing your request."),
}


def _pieces(headers_chunks: int) -> list[str]:
    if headers_chunks:
        return [f"tok{i} " for i in range(headers_chunks)]
    words = TEXT.split(" ")
    return [word + (" " if i < len(words) - 1 else "") for i, word in enumerate(words)]


class _OpenAIHandler(FakeHandler):
    routes: ClassVar[dict[str, str]] = {
        "/v1/chat/completions": "chat",
        "/v1/responses": "responses_api",
        "/v1/embeddings": "embeddings",
        "/v1/completions": "completions",
    }

    def do_POST(self) -> None:
        status = self.headers.get("x-fake-status")
        if status is not None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            headers = {k.lower(): v for k, v in self.headers.items()}
            self.server.record(Recorded("POST", self.path, body, headers))
            kind, code, message = _ERRORS.get(int(status), ("server_error", None, "error"))
            param = "temperature" if int(status) == 400 else None
            self.send_json(
                int(status),
                {"error": {"message": message, "type": kind, "param": param, "code": code}},
                {"x-request-id": "req_fake_error"},
            )
            return
        super().do_POST()

    # --- usage ---------------------------------------------------------------------
    def _usage_numbers(self, headers: dict[str, str]) -> dict[str, int]:
        return {
            "input": self.option(headers, "input", 120),
            "output": self.option(headers, "output", 30),
            "cached": self.option(headers, "cached", 0),
            "reasoning": self.option(headers, "reasoning", 0),
        }

    def _chat_usage(self, u: dict[str, int]) -> dict[str, Any]:
        return {
            "prompt_tokens": u["input"],
            "completion_tokens": u["output"],
            "total_tokens": u["input"] + u["output"],
            "prompt_tokens_details": {"cached_tokens": u["cached"], "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": u["reasoning"],
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    # --- chat completions ----------------------------------------------------------------
    def chat(self, body: dict[str, Any], headers: dict[str, str]) -> None:
        model = body["model"]
        usage = self._usage_numbers(headers)
        tool_calls = self.option(headers, "tool-calls")
        created = int(time.time())
        cid = f"chatcmpl-fake{len(self.server.requests)}"
        if not body.get("stream"):
            content = self.server.replies.get(model, TEXT)
            message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
            if tool_calls:
                message["content"] = None
                message["tool_calls"] = [
                    {
                        "id": f"call_{i}",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": json.dumps({"city": f"city-{i}"})},
                    }
                    for i in range(tool_calls)
                ]
            self.send_json(
                200,
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": message,
                            "logprobs": None,
                            "finish_reason": "tool_calls" if tool_calls else "stop",
                        }
                    ],
                    "usage": self._chat_usage(usage),
                    "service_tier": "default",
                    "system_fingerprint": "fp_fake",
                },
                {"x-request-id": f"req_{cid}"},
            )
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.start_sse()

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            data: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                data["usage"] = None
            return data

        events: list[dict[str, Any]] = [chunk({"role": "assistant", "content": "", "refusal": None})]
        if tool_calls:
            for i in range(tool_calls):
                events.append(
                    chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": i,
                                    "id": f"call_{i}",
                                    "type": "function",
                                    "function": {"name": "get_weather", "arguments": ""},
                                }
                            ]
                        }
                    )
                )
                args = json.dumps({"city": f"city-{i}"})
                for part in (args[: len(args) // 2], args[len(args) // 2 :]):
                    events.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": part}}]}))
            events.append(chunk({}, "tool_calls"))
        else:
            for piece in _pieces(self.option(headers, "chunks")):
                events.append(chunk({"content": piece}))
            events.append(chunk({}, "stop"))
        if include_usage:
            events.append(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": "fp_fake",
                    "choices": [],
                    "usage": self._chat_usage(usage),
                }
            )
        for event in events:
            if not self.send_event(event):
                return
        self.send_event("[DONE]")

    # --- legacy completions -------------------------------------------------------------
    def completions(self, body: dict[str, Any], headers: dict[str, str]) -> None:
        u = self._usage_numbers(headers)
        self.send_json(
            200,
            {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "text": TEXT, "logprobs": None, "finish_reason": "stop"}],
                "usage": {
                    "prompt_tokens": u["input"],
                    "completion_tokens": u["output"],
                    "total_tokens": u["input"] + u["output"],
                },
            },
        )

    # --- embeddings -----------------------------------------------------------------------
    def embeddings(self, body: dict[str, Any], headers: dict[str, str]) -> None:
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for i, _ in enumerate(inputs):
            vector = [float(i + j) / 10 for j in range(DIMENSIONS)]
            encoded: Any = (
                base64.b64encode(struct.pack(f"<{DIMENSIONS}f", *vector)).decode() if as_base64 else vector
            )
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        tokens = self.option(headers, "input", 8 * len(inputs))
        self.send_json(
            200,
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    # --- Responses API ------------------------------------------------------------------------
    def _response_usage(self, u: dict[str, int]) -> dict[str, Any]:
        return {
            "input_tokens": u["input"],
            "input_tokens_details": {"cached_tokens": u["cached"]},
            "output_tokens": u["output"],
            "output_tokens_details": {"reasoning_tokens": u["reasoning"]},
            "total_tokens": u["input"] + u["output"],
        }

    def responses_api(self, body: dict[str, Any], headers: dict[str, str]) -> None:
        model = body["model"]
        usage = self._usage_numbers(headers)
        tool_calls = self.option(headers, "tool-calls")
        rid = f"resp_fake{len(self.server.requests)}"
        pieces = _pieces(self.option(headers, "chunks"))
        text = "".join(pieces)
        message_item = {
            "type": "message",
            "id": f"msg_{rid}",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }
        call_items = [
            {
                "type": "function_call",
                "id": f"fc_{i}",
                "call_id": f"call_{i}",
                "name": "get_weather",
                "arguments": json.dumps({"city": f"city-{i}"}),
                "status": "completed",
            }
            for i in range(tool_calls)
        ]
        output = call_items if tool_calls else [message_item]

        def response(status: str, with_output: bool) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "response",
                "created_at": int(time.time()),
                "status": status,
                "model": model,
                "output": output if with_output else [],
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": body.get("tools") or [],
                "usage": self._response_usage(usage) if with_output else None,
                "error": None,
                "incomplete_details": None,
                "instructions": None,
                "metadata": {},
                "temperature": 1.0,
                "top_p": 1.0,
                "text": {"format": {"type": "text"}},
            }

        if not body.get("stream"):
            self.send_json(200, response("completed", True))
            return
        self.start_sse()
        seq = iter(range(10_000))
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": response("in_progress", False)},
            {"type": "response.in_progress", "response": response("in_progress", False)},
        ]
        if tool_calls:
            for i, item in enumerate(call_items):
                events.append(
                    {
                        "type": "response.output_item.added",
                        "output_index": i,
                        "item": {**item, "arguments": "", "status": "in_progress"},
                    }
                )
                events.append(
                    {
                        "type": "response.function_call_arguments.delta",
                        "item_id": item["id"],
                        "output_index": i,
                        "delta": item["arguments"],
                    }
                )
                events.append(
                    {
                        "type": "response.function_call_arguments.done",
                        "item_id": item["id"],
                        "output_index": i,
                        "arguments": item["arguments"],
                    }
                )
                events.append({"type": "response.output_item.done", "output_index": i, "item": item})
        else:
            item_id = message_item["id"]
            events.append(
                {
                    "type": "response.output_item.added",
                    "output_index": 0,
                    "item": {**message_item, "status": "in_progress", "content": []},
                }
            )
            events.append(
                {
                    "type": "response.content_part.added",
                    "item_id": item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
                }
            )
            for piece in pieces:
                events.append(
                    {
                        "type": "response.output_text.delta",
                        "item_id": item_id,
                        "output_index": 0,
                        "content_index": 0,
                        "delta": piece,
                        "logprobs": [],
                    }
                )
            events.append(
                {
                    "type": "response.output_text.done",
                    "item_id": item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "text": text,
                    "logprobs": [],
                }
            )
            events.append(
                {
                    "type": "response.content_part.done",
                    "item_id": item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "part": {"type": "output_text", "text": text, "annotations": [], "logprobs": []},
                }
            )
            events.append({"type": "response.output_item.done", "output_index": 0, "item": message_item})
        events.append({"type": "response.completed", "response": response("completed", True)})
        for event in events:
            event["sequence_number"] = next(seq)
            if not self.send_event(event, event=event["type"]):
                return


class FakeOpenAI(FakeServer):
    handler_class = _OpenAIHandler

    @property
    def base_url(self) -> str:
        return self.url + "/v1"
