"""An ordinary app that calls OpenAI and Anthropic: it never imports burnguard or OpenTelemetry.

Run it as `opentelemetry-instrument python example_app.py` with burnguard installed and it is
instrumented, priced, attributed (to its service) and — with BURNGUARD_ENFORCE=true — enforced.
The clients read OPENAI_BASE_URL / ANTHROPIC_BASE_URL, so the tests point them at local servers.
"""

from __future__ import annotations

import anthropic
import openai

QUESTION = [{"role": "user", "content": "Summarize the ticket in one line."}]


def main() -> None:
    client = openai.OpenAI(max_retries=0)
    reply = client.chat.completions.create(model="gpt-4.1", messages=QUESTION)
    print("openai:", reply.choices[0].message.content)
    stream = client.chat.completions.create(
        model="gpt-4.1", messages=QUESTION, stream=True, stream_options={"include_usage": True}
    )
    print("openai stream:", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    claude = anthropic.Anthropic(max_retries=0)
    message = claude.messages.create(model="claude-sonnet-4-5", max_tokens=200, messages=QUESTION)
    print("anthropic:", message.content[0].text)


if __name__ == "__main__":
    main()
