"""Local HTTP servers that speak the OpenAI and Anthropic APIs, for tests with the real SDK clients.

Each server runs in a thread on 127.0.0.1, records every request it receives
(path, model, body, headers) and answers like the real API: JSON bodies, SSE
streams with the real event sequences, and errors with the real error body
shapes. A test steers one request with `x-fake-*` headers (the SDKs pass
`extra_headers` through unchanged):

- `x-fake-status: 429` answers with that HTTP error and the provider's error body;
- `x-fake-tool-calls: 2` makes the model request two tool calls;
- `x-fake-input`, `x-fake-output`, `x-fake-cached`, `x-fake-reasoning`,
  `x-fake-cache-creation` set the usage numbers reported;
- `x-fake-chunks: 50` makes a stream send that many text deltas.
"""

from tests.fakes.anthropic_api import FakeAnthropic
from tests.fakes.base import FakeServer, Recorded
from tests.fakes.openai_api import FakeOpenAI

__all__ = ["FakeAnthropic", "FakeOpenAI", "FakeServer", "Recorded"]
