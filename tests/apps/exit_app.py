"""An app that records model calls, waits until they are exported, records more, then exits.

It never calls `shutdown()`: the test checks every call's span still reaches Kafka.
`EXIT_APP_SETUP=configure` calls `burnguard.configure()` and records the calls with the
manual API; `zero-code` (run under `opentelemetry-instrument`) only calls OpenAI.
`EXIT_APP_END` is `return` (a normal exit), `sys.exit`, or `wait` (sleep until signalled).
"""

from __future__ import annotations

import os
import sys
import time

CALLS = 10
QUESTION = [{"role": "user", "content": "Summarize the ticket in one line."}]


def main() -> None:
    if os.environ["EXIT_APP_SETUP"] == "configure":
        import burnguard

        burnguard.configure(service_name="exit-app")

        def call() -> None:
            burnguard.record_llm_call("gpt-4.1", "openai", 120, 30)
    else:
        import openai

        client = openai.OpenAI(max_retries=0)

        def call() -> None:
            client.chat.completions.create(model="gpt-4.1", messages=QUESTION)

    for _ in range(CALLS):
        call()
    print(f"recorded {CALLS}", flush=True)
    sys.stdin.readline()  # the test sees these spans on the topic first: the producer exists
    for _ in range(CALLS):
        call()
    print(f"recorded {2 * CALLS}", flush=True)
    end = os.environ.get("EXIT_APP_END", "return")
    if end == "sys.exit":
        sys.exit(0)
    if end == "wait":
        time.sleep(120)


if __name__ == "__main__":
    main()
