"""`burnguard report`: one self-contained HTML page with the dashboards' views.

For people without Grafana. The page runs the same views as the dashboards
(`operational`, same SQL) and draws them as inline SVG: no script, style sheet
or font is fetched from anywhere, so the file can be mailed or archived. A few
lines of inline script only mark, after layout, how many marks each chart drew
(`data-drawn`), which the tests read from a headless browser.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from burnguard.sinks import operational as op
from clickhouse_connect.driver.client import Client

PALETTE = ("#3b82f6", "#ef4444", "#10b981", "#f59e0b", "#8b5cf6", "#ec4899", "#14b8a6", "#64748b")
_W, _H = 640, 240
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 64, 16, 16, 40


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.4f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exponent = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exponent:
            return step * exponent
    return 10 * exponent


def line_chart(title: str, series: dict[str, list[tuple[datetime, float]]], unit: str = "") -> str:
    """Lines over time, one per series; empty series draw a note instead."""
    points = [(t, v) for values in series.values() for t, v in values if v is not None]
    if not points:
        return _empty(title)
    t0 = min(t for t, _ in points).timestamp()
    t1 = max(t for t, _ in points).timestamp()
    span = max(t1 - t0, 1.0)
    top = _nice_max(max(v for _, v in points))
    inner_w, inner_h = _W - _PAD_L - _PAD_R, _H - _PAD_T - _PAD_B

    def xy(t: datetime, v: float) -> tuple[float, float]:
        x = _PAD_L + (t.timestamp() - t0) / span * inner_w
        return x, _PAD_T + inner_h - (v / top) * inner_h

    marks = []
    for index, (_name, values) in enumerate(sorted(series.items())):
        color = PALETTE[index % len(PALETTE)]
        coords = [xy(t, v) for t, v in values if v is not None]
        if len(coords) == 1:
            x, y = coords[0]
            marks.append(f'<circle class="mark" cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
        else:
            path = " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(coords))
            marks.append(f'<path class="mark" d="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
    legend = "".join(
        f'<span class="key"><i style="background:{PALETTE[i % len(PALETTE)]}"></i>'
        f"{_esc(name or '(none)')}</span>"
        for i, name in enumerate(sorted(series))
    )
    start = datetime.fromtimestamp(t0, UTC).strftime("%m-%d %H:%M")
    end = datetime.fromtimestamp(t1, UTC).strftime("%m-%d %H:%M")
    axes = _axes(top, unit) + (
        f'<text x="{_PAD_L}" y="{_H - 12}" class="tick">{start}</text>'
        f'<text x="{_W - _PAD_R}" y="{_H - 12}" class="tick" text-anchor="end">{end}</text>'
    )
    return _figure(title, axes + "".join(marks), legend)


def bar_chart(title: str, bars: Sequence[tuple[str, float]], unit: str = "") -> str:
    """Horizontal bars, largest first as given."""
    bars = [(label, value) for label, value in bars if value is not None]
    if not bars:
        return _empty(title)
    top = _nice_max(max(abs(value) for _, value in bars))
    row = 22
    height = _PAD_T + row * len(bars) + 24
    inner_w = _W - 160 - 96  # room for the value after the longest bar
    marks = []
    for index, (label, value) in enumerate(bars):
        y = _PAD_T + index * row
        width = max(abs(value) / top * inner_w, 1.0)
        color = PALETTE[index % len(PALETTE)]
        marks.append(
            f'<text x="152" y="{y + 15}" class="label" text-anchor="end">{_esc(label or "(none)")}</text>'
            f'<rect class="mark" x="160" y="{y + 3}" width="{width:.1f}" height="{row - 6}" fill="{color}"/>'
            f'<text x="{160 + width + 4:.1f}" y="{y + 15}" class="tick">{_esc(_fmt(value))} {unit}</text>'
        )
    return _figure(title, "".join(marks), "", height=height)


def _axes(top: float, unit: str) -> str:
    inner_h = _H - _PAD_T - _PAD_B
    parts = []
    for step in range(5):
        value = top * step / 4
        y = _PAD_T + inner_h - inner_h * step / 4
        parts.append(
            f'<line x1="{_PAD_L}" x2="{_W - _PAD_R}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{_PAD_L - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">'
            f"{_esc(_fmt(value))}</text>"
        )
    if unit:
        parts.append(f'<text x="4" y="{_PAD_T + 4}" class="tick">{_esc(unit)}</text>')
    return "".join(parts)


def _figure(title: str, body: str, legend: str, height: int = _H) -> str:
    return (
        f"<figure><figcaption>{_esc(title)}</figcaption>"
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {height}" '
        f'width="{_W}" height="{height}" role="img" aria-label="{_esc(title)}">{body}</svg>'
        f'<div class="legend">{legend}</div></figure>'
    )


def _empty(title: str) -> str:
    return (
        f'<figure><figcaption>{_esc(title)}</figcaption><p class="empty">No data in this range.</p></figure>'
    )


def table(title: str, rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return _empty(title)
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_esc(_fmt(row.get(c)))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f"<figure><figcaption>{_esc(title)}</figcaption><table><tr>{head}</tr>{body}</table></figure>"


def _series(
    rows: list[dict[str, Any]], key: str | None, value: str
) -> dict[str, list[tuple[datetime, float]]]:
    series: dict[str, list[tuple[datetime, float]]] = {}
    for row in rows:
        name = str(row[key]) if key else value
        when = row["time"] if row["time"].tzinfo else row["time"].replace(tzinfo=UTC)
        series.setdefault(name, []).append((when, row[value]))
    return series


def _stat(label: str, value: Any, unit: str = "") -> str:
    return f'<div class="stat"><b>{_esc(_fmt(value))}{_esc(unit)}</b><span>{_esc(label)}</span></div>'


def render(
    client: Client,
    filters: op.Filters,
    title: str = "burnguard — LLM spend report",
    what_if: list[dict[str, Any]] | None = None,
) -> str:
    """The report for `filters` as one HTML document; `what_if`: rows of `burnguard budgets simulate`."""
    r = {name: op.run(client, view, filters) for name, view in op.ALL_VIEWS.items()}
    summary = r["signals_summary"][0] if r["signals_summary"] else {}
    spend = r["spend_total"][0]["spend_usd"] if r["spend_total"] else 0.0
    stats = "".join(
        [
            _stat("spend (USD)", spend),
            _stat("cost per successful workflow (USD)", summary.get("cost_per_successful_workflow")),
            _stat("tokens per user action", summary.get("tokens_per_action")),
            _stat("tool calls per session", summary.get("tool_calls_per_session")),
            _stat("fallbacks to cheaper models", summary.get("fallback_pct"), " %"),
            _stat(
                "workflow runs (succeeded)",
                f"{summary.get('workflow_runs', 0)} ({summary.get('succeeded_workflows', 0)})",
            ),
        ]
    )

    def bars(name: str, label: str, value: str = "spend_usd") -> list[tuple[str, float]]:
        return [(str(row[label]), row[value]) for row in r[name]]

    sections = [
        (
            "Spend",
            [
                line_chart(
                    "Spend over time by tenant",
                    _series(r["spend_over_time_by_tenant"], "tenant", "spend_usd"),
                    "USD",
                ),
                line_chart(
                    "Spend over time by model class",
                    _series(r["spend_over_time_by_model_class"], "model_class", "spend_usd"),
                    "USD",
                ),
                bar_chart("Spend by tenant (exact)", bars("spend_by_tenant", "tenant"), "USD"),
                bar_chart("Spend by workflow", bars("spend_by_workflow", "workflow"), "USD"),
                bar_chart("Spend by feature", bars("spend_by_feature", "feature"), "USD"),
                bar_chart("Spend by model class", bars("spend_by_model_class", "model_class"), "USD"),
                bar_chart("Spend by model", bars("spend_by_model", "model"), "USD"),
                table("Top spenders (users)", r["top_spenders"]),
            ],
        ),
        (
            "Budgets and signals",
            [
                table("Spend against each budget", r["budget_status"]),
                line_chart("Budget usage ratio", _series(r["budget_ratio"], "budget_key", "ratio")),
                line_chart("Budget remaining", _series(r["budget_burndown"], "budget_key", "remaining")),
                table("Signals timeline (changes of action)", r["signal_timeline"]),
            ],
        ),
        (
            "Operational signals and agent behaviour",
            [
                bar_chart(
                    "Cost per successful workflow",
                    bars("cost_per_successful_workflow", "workflow", "cost_per_success_usd"),
                    "USD",
                ),
                table("Workflow runs", r["cost_per_successful_workflow"]),
                line_chart(
                    "Fallbacks to cheaper models (%)",
                    _series(r["signals_over_time"], None, "fallback_pct"),
                    "%",
                ),
                line_chart(
                    "Tokens per user action",
                    _series(r["signals_over_time"], None, "tokens_per_action"),
                    "tokens",
                ),
                line_chart(
                    "Tool calls per session",
                    _series(r["signals_over_time"], None, "tool_calls_per_session"),
                    "calls",
                ),
                bar_chart(
                    "Input tokens by call number in a session (average)",
                    [
                        (f"call {row['call_no']}", row["avg_input_tokens"])
                        for row in r["context_by_call_index"]
                    ],
                    "tokens",
                ),
                table("Context growth by session", r["context_growth"]),
                table("Tool calls per session (top sessions)", r["tool_calls_by_session"]),
                table("Fallbacks by model class", r["fallbacks_by_model_class"]),
            ],
        ),
    ]
    if what_if is not None:
        sections.append(
            (
                "Budget what-if (simulated on this range)",
                [table("What the budget file would have done", what_if)],
            )
        )
    body = "".join(
        f"<section><h2>{_esc(name)}</h2><div class='grid'>{''.join(parts)}</div></section>"
        for name, parts in sections
    )
    scope = ", ".join(
        f"{variable}: {', '.join(getattr(filters, field))}"
        for variable, field in op.VARIABLES.items()
        if getattr(filters, field)
    )
    subtitle = f"{_fmt(filters.start)} to {_fmt(filters.end)} UTC" + (f" · {scope}" if scope else "")
    return _PAGE.format(
        title=_esc(title),
        subtitle=_esc(subtitle),
        generated=_esc(_fmt(datetime.now(UTC))),
        stats=stats,
        body=body,
    )


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #0f172a; background: #fff; }}
h1 {{ margin: 0 0 4px; font-size: 22px; }} h2 {{ margin: 28px 0 8px; font-size: 18px; }}
.sub {{ color: #475569; }}
.stats {{ display: flex; flex-wrap: wrap; gap: 12px; margin-top: 16px; }}
.stat {{ border: 1px solid #e2e8f0; border-radius: 8px; padding: 10px 14px; min-width: 150px; }}
.stat b {{ display: block; font-size: 20px; }} .stat span {{ color: #475569; font-size: 12px; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 16px; }}
figure {{ margin: 0; border: 1px solid #e2e8f0; border-radius: 8px; padding: 10px; max-width: 660px; }}
figcaption {{ font-weight: 600; margin-bottom: 6px; }}
table {{ border-collapse: collapse; font-size: 12px; }}
td, th {{ border-bottom: 1px solid #e2e8f0; padding: 3px 8px; text-align: left; }}
.tick, .label {{ font-size: 11px; fill: #475569; }} .grid line, line.grid {{ stroke: #e2e8f0; }}
.legend .key {{ margin-right: 12px; font-size: 12px; }}
.legend i {{ display: inline-block; width: 10px; height: 10px; margin-right: 4px; }}
.empty {{ color: #94a3b8; }}
</style></head>
<body data-charts="0" data-charts-drawn="0">
<h1>{title}</h1><div class="sub">{subtitle} · generated {generated}</div>
<div class="stats">{stats}</div>
{body}
<script>
// After layout: count the marks of each chart that have a size, for headless checks.
window.addEventListener("load", function () {{
  var charts = document.querySelectorAll("svg.chart"), drawn = 0;
  charts.forEach(function (svg) {{
    var n = 0;
    svg.querySelectorAll(".mark").forEach(function (m) {{
      var b = m.getBBox();
      if (b.width > 0 || b.height > 0) n++;
    }});
    svg.setAttribute("data-drawn", n);
    if (n > 0) drawn++;
  }});
  document.body.setAttribute("data-charts", charts.length);
  document.body.setAttribute("data-charts-drawn", drawn);
}});
</script>
</body></html>
"""
