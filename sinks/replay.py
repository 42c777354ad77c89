"""The stored spans read back as `SpanUsage`, in event-time order, for replaying history.

`burnguard budgets simulate` feeds these to the stream's own accounting and
policy code. Rows are read with FINAL (a re-delivered span counts once, as in
the worker, which recognises replays) and streamed in blocks, so a month of
spans is never held in memory at once. The event time is the span's end,
as in the worker (`end_ns or start_ns`).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from burnguard.contracts.span_checks import COUNT_FIELDS
from burnguard.contracts.usage import SpanUsage
from burnguard.sinks.clickhouse import SPAN_STR_FIELDS
from clickhouse_connect.driver.client import Client

#: SpanUsage fields read from the column of the same name: the ones the writer stores so.
_SAME_NAME = (*SPAN_STR_FIELDS, *COUNT_FIELDS)
_SQL = f"""
SELECT {", ".join(f"`{name}`" for name in _SAME_NAME)},
    toUnixTimestamp64Nano(start_time), toUnixTimestamp64Nano(end_time),
    if(priced = 1, cost_usd, NULL), fallback = 1, status_error = 1
FROM genai_spans FINAL
WHERE end_time >= {{start:DateTime64(9, 'UTC')}} AND end_time < {{end:DateTime64(9, 'UTC')}}
ORDER BY end_time, start_time, trace_id, span_id
"""


def read_spans(client: Client, start: datetime, end: datetime) -> Iterator[SpanUsage]:
    """The spans that ended in [start, end), oldest first."""
    count = len(_SAME_NAME)
    with client.query_rows_stream(_SQL, parameters={"start": start, "end": end}) as rows:
        for row in rows:
            usage = SpanUsage(**dict(zip(_SAME_NAME, row[:count], strict=True)), start_ns=0, end_ns=0)
            usage.start_ns, usage.end_ns, usage.cost_usd, usage.fallback, usage.status_error = row[count:]
            yield usage
