"""An ordinary app that calls OpenAI at a steady pace and keeps going when a call is refused.

Run it as `opentelemetry-instrument python paced_app.py CALLS PER_SECOND`: it asks for `gpt-4.1`
each time (until CALLS calls, or 10 refusals in a row), with the usage the local server should
report in `x-fake-input` / `x-fake-output` (PACED_INPUT_TOKENS, PACED_OUTPUT_TOKENS), and prints
one line per call: `called <model>` with the model the request went out with, or `refused <message>`
when burnguard refused it before the request. With PACED_START_FILE set it starts up (the
instrumentation, burnguard's guard and exporter) and then waits for that file before its first
call: a test starts the app beside its worker and lets the calls begin once the worker is ready.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import openai

REFUSALS_TO_STOP = 10
START_WAIT_S = 300
QUESTION = [{"role": "user", "content": "Summarize the ticket in one line."}]


def wait_for_start() -> None:
    """Wait for PACED_START_FILE, if set: the pace is kept from the first call, not from start-up."""
    gate = os.environ.get("PACED_START_FILE")
    deadline = time.monotonic() + START_WAIT_S
    while gate and not Path(gate).exists():
        if time.monotonic() > deadline:
            sys.exit(f"{gate} did not appear within {START_WAIT_S}s")
        time.sleep(0.05)


def main(calls: int, per_second: float) -> None:
    client = openai.OpenAI(max_retries=0)
    wait_for_start()
    headers = {
        "x-fake-input": os.environ.get("PACED_INPUT_TOKENS", "120"),
        "x-fake-output": os.environ.get("PACED_OUTPUT_TOKENS", "30"),
    }
    started, refused = time.monotonic(), 0
    for n in range(calls):
        if refused >= REFUSALS_TO_STOP:
            break
        time.sleep(max(0.0, started + n / per_second - time.monotonic()))
        try:
            reply = client.chat.completions.create(model="gpt-4.1", messages=QUESTION, extra_headers=headers)
        except Exception as exc:  # burnguard's BudgetExceeded (the app does not import burnguard)
            print("refused", type(exc).__name__, str(exc).replace("\n", " "), flush=True)
            refused += 1
            continue
        refused = 0
        print("called", reply.model, flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
