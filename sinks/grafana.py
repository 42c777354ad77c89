"""Grafana dashboards built from the views of `operational` (docs/ARCHITECTURE.md §11).

`python -m burnguard.sinks.grafana [DIR]` writes `burnguard-*.json` into DIR
(default `grafana/dashboards`), the files that `grafana/provisioning` loads.
The JSON is generated so that every panel query is exactly a view's SQL in
its Grafana form; `tests/test_dashboards.py` checks the committed files are
what this module builds, then runs every query on the engine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from burnguard.sinks.operational import DASHBOARDS, VARIABLES, View

PLUGIN = "grafana-clickhouse-datasource"
DATASOURCE_UID = "burnguard-clickhouse"
DATASOURCE = {"type": PLUGIN, "uid": DATASOURCE_UID}
#: The plugin's query formats (src/types): 0 time series, 1 table.
FORMAT_TIME_SERIES = 0
FORMAT_TABLE = 1
_PANEL_TYPES = {"timeseries": "timeseries", "table": "table", "stat": "stat", "bar": "barchart"}
#: Variable -> (label, the query that lists its values: rollup rows in the dashboard's range).
_VARIABLE_QUERIES = {
    name: (
        name.replace("_", " ").capitalize(),
        f"SELECT DISTINCT {name} FROM genai_usage_1m WHERE $__timeFilter(minute) ORDER BY {name}",
    )
    for name in VARIABLES
}


def variable(name: str) -> dict[str, Any]:
    label, query = _VARIABLE_QUERIES[name]
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": query,
        "definition": query,
        "refresh": 2,  # on time range change
        "multi": True,
        "includeAll": True,
        "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
    }


def panel(view: View, panel_id: int, grid: dict[str, int]) -> dict[str, Any]:
    time_series = view.kind == "timeseries"
    target = {
        "refId": "A",
        "datasource": DATASOURCE,
        "editorType": "sql",
        "queryType": "timeseries" if time_series else "table",
        "format": FORMAT_TIME_SERIES if time_series else FORMAT_TABLE,
        "rawSql": view.render_grafana(),
    }
    defaults: dict[str, Any] = {}
    if view.unit:
        defaults["unit"] = view.unit
    options: dict[str, Any] = {}
    if view.kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    elif view.kind == "bar":
        options = {"orientation": "horizontal", "xField": _first_column(view)}
    return {
        "id": panel_id,
        "type": _PANEL_TYPES[view.kind],
        "title": view.title,
        "description": view.description + (" Exact (genai_spans FINAL)." if view.exact else ""),
        "datasource": DATASOURCE,
        "gridPos": grid,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [target],
    }


def _first_column(view: View) -> str:
    select = view.render_grafana().split("SELECT", 1)[1]
    return select.split(",", 1)[0].strip().split()[-1]


def dashboard(uid: str) -> dict[str, Any]:
    title, views = DASHBOARDS[uid]
    panels = []
    for index, view in enumerate(views):
        width = 24 if view.kind == "timeseries" or view.name == "signals_summary" else 12
        grid = {"h": 8, "w": width, "x": 0, "y": 0}
        panels.append(panel(view, index + 1, grid))
    _lay_out(panels)
    return {
        "uid": uid,
        "title": title,
        "tags": ["burnguard", "llm-cost"],
        "timezone": "utc",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "1m",
        "time": {"from": "now-7d", "to": "now"},
        "annotations": {"list": []},
        "templating": {"list": [variable(name) for name in VARIABLES]},
        "panels": panels,
    }


def _lay_out(panels: list[dict[str, Any]]) -> None:
    x = y = 0
    for item in panels:
        grid = item["gridPos"]
        if x + grid["w"] > 24:
            x, y = 0, y + 8
        grid["x"], grid["y"] = x, y
        x += grid["w"]


def write_dashboards(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for uid in DASHBOARDS:
        path = directory / f"{uid}.json"
        path.write_text(render(uid), encoding="utf-8")
        written.append(path)
    return written


def render(uid: str) -> str:
    return json.dumps(dashboard(uid), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("grafana/dashboards")
    for written in write_dashboards(target):
        print(written)
