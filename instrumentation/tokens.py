"""Token estimates made before a call: for per-call context budgets and for streams without usage.

Only the provider knows the real count, and only after the call. A context
budget has to decide before it, so the prompt is counted here: with tiktoken
for OpenAI models when its encoding can be loaded, otherwise with the
documented approximation of one token per four characters of text plus four
per message (the chat format's framing). Images, audio and files are not
counted: providers count them by rules of their own. The estimate and how it was made go
on the span next to the provider's count, so the estimator's error is visible.

tiktoken downloads its vocabularies on first use, so they are loaded in the
background and the first calls are approximated; offline hosts can load one
from a file with `tiktoken.load.load_tiktoken_bpe` and `register_encoding` it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
REPLY_PRIMING_TOKENS = 3
APPROXIMATION = "approx:chars/4"
#: Request fields that hold prompt text, across the OpenAI and Anthropic APIs.
PROMPT_FIELDS = ("system", "instructions", "messages", "input", "tools")
#: Keys whose values are not prompt text: tags and ids, and media (images, audio, files as URLs or
#: base64), which providers count by their own rules; a base64 image read as text would be
#: taken for ~100k tokens.
_NOT_TEXT_KEYS = frozenset(
    {
        "type",
        "role",
        "id",
        "cache_control",
        "image_url",
        "input_audio",
        "source",
        "file",
        "file_data",
        "file_id",
    }
)
#: Providers whose models tiktoken knows.
TIKTOKEN_PROVIDERS = frozenset({"openai", "azure.ai.openai"})

_encodings: dict[str, Any] = {}  # model -> tiktoken Encoding, or None when it cannot be had
_loading: set[str] = set()  # models whose encoding a background thread is loading
_encodings_lock = threading.Lock()


def estimate_tokens(chars: int) -> int:
    """A rough token count for `chars` characters of text (about four characters a token)."""
    return (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN if chars > 0 else 0


def iter_texts(value: Any) -> Iterator[str]:
    """The text in a message, content part list, or anything JSON-like (not its type tags or ids)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if key not in _NOT_TEXT_KEYS:
                yield from iter_texts(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from iter_texts(item)


def text_chars(value: Any) -> int:
    """Characters of text in a message, content part list, or anything JSON-like."""
    return sum(len(text) for text in iter_texts(value))


def message_count(kwargs: Mapping[str, Any]) -> int:
    messages = kwargs.get("messages")
    try:
        return len(messages) if messages is not None else 0
    except TypeError:
        return 0


def register_encoding(model: str, encoding: Any) -> None:
    """Count `model`'s prompts with this tiktoken `Encoding` (e.g. one loaded from a local file)."""
    with _encodings_lock:
        _encodings[model] = encoding


def _load_encoding(model: str) -> Any:
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        return tiktoken.encoding_for_model(model)
    except Exception as exc:  # unknown model, or the vocabulary cannot be downloaded
        logger.info("burnguard: no tiktoken encoding for %s (%s); approximating", model, exc)
        return None


def encoding_for(model: str, provider: str) -> Any:
    """The tiktoken encoding for an OpenAI model, or None (for now) when it is not loaded yet.

    The first use starts loading it in the background: tiktoken may download its
    vocabulary, with no timeout, and no call should wait on that. Until it is
    there, prompts are approximated (and the span says so).
    """
    if provider not in TIKTOKEN_PROVIDERS:
        return None
    try:
        return _encodings[model]
    except KeyError:
        pass
    with _encodings_lock:
        if model in _encodings or model in _loading:
            return _encodings.get(model)
        _loading.add(model)
    threading.Thread(
        target=_load_in_background, args=(model,), name="burnguard-tiktoken", daemon=True
    ).start()
    return None


def _load_in_background(model: str) -> None:
    encoding = _load_encoding(model)
    with _encodings_lock:
        _encodings.setdefault(model, encoding)
        _loading.discard(model)


def wait_for_encoding(model: str, timeout_s: float = 30.0) -> Any:
    """Block until `model`'s encoding has been tried (for scripts and tests that need it at once)."""
    deadline = time.monotonic() + timeout_s
    while model in _loading and time.monotonic() < deadline:
        time.sleep(0.01)
    return _encodings.get(model)


def count_prompt_tokens(model: str, provider: str, kwargs: Mapping[str, Any]) -> tuple[int, str]:
    """The prompt's estimated input tokens and the estimator used (`tiktoken:<name>` or the approximation)."""
    texts = [text for name in PROMPT_FIELDS for text in iter_texts(kwargs.get(name))]
    framing = TOKENS_PER_MESSAGE * message_count(kwargs) + REPLY_PRIMING_TOKENS
    encoding = encoding_for(model, provider)
    if encoding is not None:
        counted = sum(len(encoding.encode_ordinary(text)) for text in texts)
        return counted + framing, f"tiktoken:{encoding.name}"
    return estimate_tokens(sum(len(text) for text in texts)) + framing, APPROXIMATION
