"""What Grafana and the grafana-clickhouse-datasource plugin do to a panel's rawSql.

An independent re-implementation (not the code under test) of the three steps
a query goes through, in order:

1. the plugin's frontend, `applyConditionalAll` (src/data/CHDatasource.ts):
   from the last `$__conditionalAll(` backwards, the two arguments are split at
   commas of bracket depth 1; when the variable named by the second one has the
   value `$__all` (or ''), the macro becomes `1=1`, else its first argument;
2. Grafana's template service `replace(rawSql, scopedVars, format)` with the
   plugin's default format function (an array becomes `'a','b'`, a single
   value is inserted as is); `${var:format}` uses Grafana's named formats;
   unknown names (the backend macros) are left alone;
3. the backend, `sqlutil.Interpolate` (grafana-plugin-sdk-go) with the
   plugin's macros (pkg/macros/macros.go): a macro is `$__name` at a word
   boundary; its arguments run from the first `(` after it to the matching
   `)` — found by scanning on from the name, so a macro written without
   parentheses would swallow the next parenthesised text (we check that every
   macro is written with them) — and are split at every comma and trimmed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

ALL = "$__all"

# --- 1. frontend: $__conditionalAll ------------------------------------------------


def _macro_args(query: str, args_index: int) -> list[str]:
    """getMacroArgs: `args_index` points at the `(`; arguments at bracket depth 1."""
    args: list[str] = []
    depth = 0
    last = 1
    sub = query[args_index:]
    for match in re.finditer(r"[(),]", sub):
        token = match.group()
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
        end = match.end()
        if token == "," and depth == 1:
            args.append(sub[last : end - 1])
            last = end
        if depth == 0:
            args.append(sub[last : end - 1])
            return args
    return []


def apply_conditional_all(query: str, values: Mapping[str, str | Sequence[str]]) -> str:
    macro = "$__conditionalAll("
    index = query.rfind(macro)
    while index != -1:
        params = _macro_args(query, index + len(macro) - 1)
        if len(params) != 2:
            return query
        name = params[1].strip()[1:]
        value = values.get(name)
        text = ",".join(value) if isinstance(value, list | tuple) else ("" if value is None else value)
        phrase = "1=1" if text in ("", ALL) else params[0]
        query = query.replace(f"{macro}{params[0]},{params[1]})", phrase, 1)
        index = query.rfind(macro)
    return query


# --- 2. Grafana's template service --------------------------------------------------

_VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}")


def _format(value: str | list[str], fmt: str | None) -> str:
    values = value if isinstance(value, list) else [value]
    if fmt is None:  # the plugin's format function
        return "'" + "','".join(values) + "'" if isinstance(value, list) else value
    if fmt == "singlequote":
        return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)
    if fmt == "doublequote":
        return ",".join('"' + v.replace('"', '\\"') + '"' for v in values)
    if fmt == "sqlstring":
        return ",".join("'" + v.replace("'", "''") + "'" for v in values)
    if fmt == "csv":
        return ",".join(values)
    if fmt == "pipe":
        return "|".join(values)
    if fmt in ("raw", "text"):
        return ",".join(values)
    raise ValueError(f"format {fmt!r} not implemented in the test support")


@dataclass
class Variable:
    """A dashboard variable's current selection and the options it offers (for All)."""

    name: str
    value: list[str] = field(default_factory=lambda: [ALL])
    options: list[str] = field(default_factory=list)

    def resolved(self) -> list[str]:
        return list(self.options) if ALL in self.value else list(self.value)


def replace_variables(query: str, variables: Mapping[str, Variable], builtins: Mapping[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(4)
        fmt = match.group(3) or match.group(6)
        if name in builtins:
            return builtins[name]
        variable = variables.get(name)
        if variable is None:
            return match.group(0)
        return _format(variable.resolved(), fmt)

    return _VARIABLE.sub(substitute, query)


# --- 3. backend: the plugin's macros -------------------------------------------------


@dataclass(frozen=True)
class TimeRange:
    start: datetime
    end: datetime
    interval_ms: int


def _seconds(at: datetime) -> int:
    return int(at.timestamp())


def _date(at: datetime) -> str:
    return f"toDate('{at.astimezone(UTC):%Y-%m-%d}')"


def _args(args: list[str], count: int, name: str) -> list[str]:
    if len(args) != count:
        raise ValueError(f"$__{name}: expected {count} argument(s), received {len(args)}")
    return args


def _macros(tr: TimeRange) -> dict[str, object]:
    f, t = _seconds(tr.start), _seconds(tr.end)
    fm, tm = int(tr.start.timestamp() * 1000), int(tr.end.timestamp() * 1000)
    interval_s = max(math.floor(tr.interval_ms / 1000), 1)
    interval_ms = max(tr.interval_ms, 1)

    def time_filter(args: list[str]) -> str:
        (col,) = _args(args, 1, "timeFilter")
        return f"{col} >= toDateTime({f}) AND {col} <= toDateTime({t})"

    def time_filter_ms(args: list[str]) -> str:
        (col,) = _args(args, 1, "timeFilter_ms")
        return f"{col} >= fromUnixTimestamp64Milli({fm}) AND {col} <= fromUnixTimestamp64Milli({tm})"

    def date_filter(args: list[str]) -> str:
        (col,) = _args(args, 1, "dateFilter")
        return f"{col} >= {_date(tr.start)} AND {col} <= {_date(tr.end)}"

    def date_time_filter(args: list[str]) -> str:
        date_col, time_col = _args(args, 2, "dateTimeFilter")
        return (
            f"({date_col} >= {_date(tr.start)} AND {date_col} <= {_date(tr.end)}) AND "
            f"({time_col} >= toDateTime({f}) AND {time_col} <= toDateTime({t}))"
        )

    def time_interval(args: list[str]) -> str:
        (col,) = _args(args, 1, "timeInterval")
        return f"toStartOfInterval(toDateTime({col}), INTERVAL {interval_s} second)"

    def time_interval_ms(args: list[str]) -> str:
        (col,) = _args(args, 1, "timeInterval_ms")
        return f"toStartOfInterval(toDateTime64({col}, 3), INTERVAL {interval_ms} millisecond)"

    return {
        "fromTime": lambda _: f"toDateTime({f})",
        "toTime": lambda _: f"toDateTime({t})",
        "fromTime_ms": lambda _: f"fromUnixTimestamp64Milli({fm})",
        "toTime_ms": lambda _: f"fromUnixTimestamp64Milli({tm})",
        "timeFilter": time_filter,
        "timeFilter_ms": time_filter_ms,
        "dateFilter": date_filter,
        "dateTimeFilter": date_time_filter,
        "dt": date_time_filter,
        "timeInterval": time_interval,
        "timeInterval_ms": time_interval_ms,
        "interval_s": lambda _: str(interval_s),
    }


def _macro_matches(sql: str, name: str) -> list[tuple[str, str]]:
    """getMacroMatches: (the macro text, its argument text) for each use of `$__name`."""
    found = []
    for match in re.finditer(r"\$__" + re.escape(name) + r"\b", sql):
        rest = sql[match.start() :]
        depth, arg_start, end, force_break = 0, 0, 0, False
        for index, char in enumerate(rest):
            if (depth == 0 and end > 0) or force_break:
                break
            if char == "(":
                depth += 1
                if arg_start == 0:
                    arg_start = index + 1
            elif char == ")":
                if depth == 0:
                    end, force_break = 0, True
                    continue
                depth -= 1
                end = index + 1
        if end == 0:
            end = match.end() - match.start()
        text = rest[:end]
        found.append((text, rest[arg_start : end - 1] if arg_start > 0 else ""))
    return found


def interpolate_macros(sql: str, time_range: TimeRange) -> str:
    for name, macro in sorted(_macros(time_range).items()):
        for text, args in _macro_matches(sql, name):
            sql = sql.replace(text, macro([arg.strip() for arg in args.split(",")]))
    return sql


_BARE_MACRO = re.compile(r"\$__(\w+)\b(?!\()")


def macros_without_parentheses(sql: str) -> list[str]:
    """Backend macros written without `(`: the SDK would take the next parentheses as theirs."""
    return [m.group(0) for m in _BARE_MACRO.finditer(sql)]


# --- all three ----------------------------------------------------------------------


def expand(sql: str, variables: Mapping[str, Variable], time_range: TimeRange) -> str:
    """rawSql -> the SQL ClickHouse receives."""
    values = {name: variable.value for name, variable in variables.items()}
    sql = apply_conditional_all(sql, values)
    builtins = {
        "__from": str(int(time_range.start.timestamp() * 1000)),
        "__to": str(int(time_range.end.timestamp() * 1000)),
        "__interval_ms": str(time_range.interval_ms),
        "__range_s": str(_seconds(time_range.end) - _seconds(time_range.start)),
    }
    sql = replace_variables(sql, variables, builtins)
    return interpolate_macros(sql, time_range)
