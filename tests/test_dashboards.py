"""The Grafana dashboards: well-formed for provisioning, and every panel query right.

Every panel query is expanded the way Grafana and the ClickHouse plugin expand it
(`tests/support/dashboard_macros.py`) and run on the real chDB engine against the scenario
of `tests/support/dashboard_scenario.py`, whose answers are worked out by hand.

chDB hosts one directory per process: this module opens its own directory once,
and closes it when the module is done, so other tests can open theirs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from burnguard.sinks import grafana
from burnguard.sinks.clickhouse import ClickHouseWriter, connect
from burnguard.sinks.schema import migrate, rebuild_rollups
from clickhouse_connect.driver.client import Client

from tests.support import dashboard_scenario as sc
from tests.support.dashboard_macros import ALL, TimeRange, Variable, expand, macros_without_parentheses

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
DATASOURCES = sorted((ROOT / "grafana" / "provisioning" / "datasources").glob("*.yaml"))
RANGE = TimeRange(sc.START, sc.END, sc.INTERVAL_S * 1000)
_VARIABLE_USE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::\w+)?\]\]|\$\{(\w+)(?:\.[^:^\}]+)?(?::[^\}]+)?\}")


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def _provisioned_datasources() -> dict[str, str]:
    found = {}
    for path in DATASOURCES:
        for source in yaml.safe_load(path.read_text(encoding="utf-8"))["datasources"]:
            found[source["uid"]] = source["type"]
    return found


# --- structure ---------------------------------------------------------------------


def test_dashboard_files_are_the_generated_ones() -> None:
    assert [path.stem for path in DASHBOARDS] == sorted(grafana.DASHBOARDS)
    for path in DASHBOARDS:
        assert path.read_text(encoding="utf-8") == grafana.render(path.stem), (
            f"{path.name} differs from burnguard.sinks.grafana: run `python -m burnguard.sinks.grafana`"
        )


def test_dashboard_datasource_provisioning() -> None:
    sources = _provisioned_datasources()
    assert sources == {grafana.DATASOURCE_UID: grafana.PLUGIN}
    text = DATASOURCES[0].read_text(encoding="utf-8")
    assert "password: ${BURNGUARD_CLICKHOUSE_PASSWORD}" in text  # from the environment, never inline
    providers = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/burnguard.yaml").read_text())
    provider = providers["providers"][0]
    assert provider["type"] == "file"
    # deploy/compose.yaml mounts the dashboards where the provider looks, and sets what the datasource reads
    grafana_service = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())["services"]["grafana"]
    assert f"../grafana/dashboards:{provider['options']['path']}:ro" in grafana_service["volumes"]
    assert "grafana-clickhouse-datasource" in grafana_service["environment"]["GF_INSTALL_PLUGINS"]
    for name in set(re.findall(r"\$\{(\w+)\}", text)):
        assert name in grafana_service["environment"], name


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_well_formed_for_provisioning(path: Path) -> None:
    dashboard = _load(path)
    sources = _provisioned_datasources()
    assert dashboard["uid"] == path.stem and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) >= {"tenant", "workflow", "feature", "model_class"}
    references = [panel["datasource"] for panel in dashboard["panels"]]
    references += [target["datasource"] for _, target in _targets(dashboard)]
    references += [v["datasource"] for v in variables.values()]
    for reference in references:
        assert sources.get(reference["uid"]) == reference["type"], f"unresolved datasource {reference}"
    queries = [target["rawSql"] for _, target in _targets(dashboard)]
    queries += [v["query"] for v in variables.values()]
    for sql in queries:
        used = {m.group(1) or m.group(2) or m.group(3) for m in _VARIABLE_USE.finditer(sql)}
        unknown = {name for name in used if not name.startswith("__") and name not in variables}
        assert not unknown, f"{path.name}: undefined template variables {unknown}"
        assert not macros_without_parentheses(sql), sql
        assert "$__timeFilter(" in sql or "$__fromTime(" in sql or "$__toTime(" in sql, sql
    for panel, target in _targets(dashboard):
        assert target["editorType"] == "sql" and target["refId"]
        assert target["format"] == (0 if panel["type"] == "timeseries" else 1)


# --- the scenario ----------------------------------------------------------------------


def _variables(client: Client, dashboard: dict[str, Any], **selected: list[str]) -> dict[str, Variable]:
    """The dashboard's variables with their options listed by their own queries, like Grafana."""
    variables = {}
    for definition in dashboard["templating"]["list"]:
        name = definition["name"]
        bare = {n: Variable(n) for n in grafana.VARIABLES}
        options = [row[0] for row in client.query(expand(definition["query"], bare, RANGE)).result_rows]
        variables[name] = Variable(name, selected.get(name, [ALL]), options)
    return variables


def _run_panels(client: Client, **selected: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every panel of every dashboard, expanded and run: panel title -> rows."""
    results: dict[str, list[dict[str, Any]]] = {}
    for path in DASHBOARDS:
        dashboard = _load(path)
        variables = _variables(client, dashboard, **selected)
        for panel, target in _targets(dashboard):
            sql = expand(target["rawSql"], variables, RANGE)
            assert "$" not in sql, sql
            results[panel["title"]] = list(client.query(sql).named_results())
    return results


@pytest.fixture(scope="module")
def panels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    client = connect(f"chdb://{tmp_path_factory.mktemp('dashboards') / 'clickhouse'}")
    try:
        migrate(client)
        writer = ClickHouseWriter(client)
        spans = sc.scenario_spans()
        writer.insert_spans(spans)
        writer.insert_signals(sc.scenario_signals())
        writer.insert_spans(sc.redelivered(spans))  # the sink re-inserts a batch it could not commit
        writer.insert_signals(sc.scenario_signals()[:2])
        before = _run_panels(client)
        rebuild_rollups(client)
        yield {"before": before, "after": _run_panels(client), "acme": _run_panels(client, tenant=["acme"])}
    finally:
        client.close()


def _by(rows: list[dict[str, Any]], key: str, value: str) -> dict[str, Any]:
    return {row[key]: row[value] for row in rows}


def test_dashboard_spend_overview(panels: dict[str, Any]) -> None:
    after = panels["after"]
    expected = sc.EXPECTED
    assert after["Spend (USD)"][0]["spend_usd"] == pytest.approx(expected["spend_total"])
    assert _by(after["Spend by tenant (exact)"], "tenant", "spend_usd") == pytest.approx(
        expected["spend_by_tenant"]
    )
    for dimension in ("workflow", "feature", "model_class", "model"):
        title = f"Spend by {dimension.replace('_', ' ')}"
        assert _by(after[title], dimension, "spend_usd") == pytest.approx(expected[f"spend_by_{dimension}"])
    spenders = [(row["user"], row["spend_usd"]) for row in after["Top spenders (users)"]]
    assert [user for user, _ in spenders] == [user for user, _ in expected["top_spenders"]]
    assert [spend for _, spend in spenders] == pytest.approx([spend for _, spend in expected["top_spenders"]])
    series = after["Spend over time by tenant"]
    assert sum(row["spend_usd"] for row in series) == pytest.approx(expected["spend_total"])
    buckets = {row["time"].replace(tzinfo=None) for row in series}
    assert all(bucket.minute % 10 == 0 and bucket.second == 0 for bucket in buckets)  # $__timeInterval: 600 s
    by_class = {}
    for row in after["Spend over time by model class"]:
        by_class[row["model_class"]] = by_class.get(row["model_class"], 0.0) + row["spend_usd"]
    assert by_class == pytest.approx(expected["spend_by_model_class"])


def test_dashboard_operational_signals(panels: dict[str, Any]) -> None:
    after, expected = panels["after"], sc.EXPECTED
    (summary,) = after["Operational signals"]
    assert summary["workflow_runs"] == expected["workflow_runs"]
    assert summary["succeeded_workflows"] == expected["succeeded_workflows"]
    for name in (
        "cost_per_successful_workflow",
        "cost_per_success_all_in",
        "tokens_per_action",
        "tool_calls_per_session",
        "fallback_pct",
    ):
        assert summary[name] == pytest.approx(expected[name], abs=1e-3), name
    by_workflow = {
        row["workflow"]: (row["runs"], row["succeeded_runs"], row["cost_per_success_usd"])
        for row in after["Cost per successful workflow, by workflow"]
    }
    assert by_workflow == {k: pytest.approx(v) for k, v in expected["cost_per_success_by_workflow"].items()}
    fallbacks = {
        row["model_class"]: (row["calls"], row["fallback"])
        for row in after["Fallbacks to cheaper models by model class"]
    }
    assert fallbacks == expected["fallbacks_by_model_class"]
    over_time = after["Tokens per action, tool calls per session, fallback % over time"]
    assert over_time and all(0 <= row["fallback_pct"] <= 100 for row in over_time if row["fallback_pct"])


def test_dashboard_agent_behaviour(panels: dict[str, Any]) -> None:
    after, expected = panels["after"], sc.EXPECTED
    tools = {
        row["session"]: (row["tool_calls"], row["requested_tool_calls"], row["model_calls"])
        for row in after["Tool calls per session (top sessions)"]
    }
    assert tools == expected["tool_calls_by_session"]
    growth = {
        row["session"]: (
            row["model_calls"],
            row["first_input"],
            row["last_input"],
            row["max_input"],
            row["growth_per_call"],
        )
        for row in after["Context growth by session"]
    }
    assert growth == expected["context_growth"]
    by_call = _by(after["Input tokens by call number in a session"], "call_no", "avg_input_tokens")
    assert by_call == expected["context_by_call_index"]


def test_dashboard_budgets_and_signals(panels: dict[str, Any]) -> None:
    after, expected = panels["after"], sc.EXPECTED
    status = {
        row["key"]: (row["action"], row["spent"], row["limit"], row["ratio"])
        for row in after["Spend against each budget"]
    }
    assert status == {k: pytest.approx(v) for k, v in expected["budget_status"].items()}
    timeline = [(row["key"], row["action"]) for row in after["Signals timeline"]]
    assert timeline == expected["signal_timeline"]
    remaining = {}
    for row in after["Budget burn-down (remaining)"]:
        remaining[row["budget_key"]] = row["remaining"]  # rows are in time order: the last one wins
    assert remaining == pytest.approx({"tenant-daily acme": 0.0, "tenant-daily globex": 14.0})
    peak = {}
    for row in after["Budget usage ratio"]:
        peak[row["budget_key"]] = max(peak.get(row["budget_key"], 0.0), row["ratio"])
    assert peak == pytest.approx({"tenant-daily acme": 1.02, "tenant-daily globex": 0.72})


def test_dashboard_variables_filter_every_signal(panels: dict[str, Any]) -> None:
    acme, expected = panels["acme"], sc.EXPECTED["acme"]
    assert acme["Spend (USD)"][0]["spend_usd"] == pytest.approx(expected["spend_total"])
    assert _by(acme["Spend by tenant (exact)"], "tenant", "spend_usd") == pytest.approx({"acme": 0.85})
    (summary,) = acme["Operational signals"]
    for name in (
        "cost_per_successful_workflow",
        "tokens_per_action",
        "tool_calls_per_session",
        "fallback_pct",
    ):
        assert summary[name] == pytest.approx(expected[name], abs=1e-3), name
    assert {row["session"] for row in acme["Context growth by session"]} == {"s1"}


def test_dashboard_redelivery_trade_off(panels: dict[str, Any]) -> None:
    """A re-delivered batch: exact panels (FINAL) are right at once, rollup sums after a rebuild."""
    before, after = panels["before"], panels["after"]
    for title in ("Spend by tenant (exact)", "Signals timeline", "Spend against each budget"):
        assert before[title] == after[title], title
    assert before["Spend (USD)"][0]["spend_usd"] == pytest.approx(sc.EXPECTED["spend_total"] + 0.30)
    triage_before = _by(before["Spend by workflow"], "workflow", "spend_usd")["triage"]
    assert triage_before == pytest.approx(0.85 + 0.30)  # A1 counted twice by the materialized view
    assert _by(after["Spend by workflow"], "workflow", "spend_usd")["triage"] == pytest.approx(0.85)
    (summary,) = before["Operational signals"]
    assert summary["tokens_per_action"] != pytest.approx(sc.EXPECTED["tokens_per_action"])  # sums doubled
