"""Budget files (docs/ARCHITECTURE.md §6): parsing, errors as file:line: field, and the budget model."""

from __future__ import annotations

import pytest
from burnguard.contracts.budgets import (
    Action,
    Budget,
    BudgetConfig,
    BudgetFileError,
    from_records,
    load_budget_file,
    metric_value,
    parse_budget_yaml,
    to_records,
)
from burnguard.contracts.usage import SpanUsage

# The original design's budget file example (docs/ARCHITECTURE.md §6, §17), verbatim (comments included).
DESIGN_EXAMPLE = """\
model_classes:              # which concrete models belong to which class
  premium:  [gpt-4.1, o3, claude-opus-4-1]
  standard: [gpt-4.1-mini, claude-sonnet-4-5]
  economy:  [gpt-4.1-nano, claude-haiku-4-5]
downgrade:                  # the ladder a downgrade walks, model by model
  gpt-4.1: gpt-4.1-mini
  gpt-4.1-mini: gpt-4.1-nano
  o3: gpt-4.1-mini
  claude-opus-4-1: claude-sonnet-4-5
  claude-sonnet-4-5: claude-haiku-4-5
budgets:
  - id: tenant-daily
    scope: tenant           # or [tenant, feature] for a combination
    match: "*"              # each tenant separately; or "acme", or "team-*"
    window: day             # 1h | 24h | 30d | day | week | month | session
    timezone: UTC
    metric: cost_usd        # tokens | input_tokens | tool_calls | calls
    limit: 50
    actions:
      - {at: 0.7,  do: warn}
      - {at: 0.85, do: downgrade}
      - {at: 1.0,  do: throttle}
"""

# A file whose line numbers the error tests below rely on (line numbers in the comments).
BASE = """\
model_classes:
  premium:  [gpt-4.1, o3, claude-opus-4-1]
  standard: [gpt-4.1-mini, claude-sonnet-4-5]
  economy:  [gpt-4.1-nano, claude-haiku-4-5]
budgets:
  - id: tenant-daily
    scope: tenant
    match: "*"
    window: day
    timezone: UTC
    metric: cost_usd
    limit: 50
    actions:
      - {at: 0.7,  do: warn}
      - {at: 0.85, do: downgrade, to: standard}
      - {at: 1.0,  do: throttle}
"""
#  1 model_classes            9 window           15 actions[1] (to: standard)
#  5 budgets:                10 timezone         16 actions[2]
#  6 - id: tenant-daily      11 metric
#  7 scope                   12 limit
#  8 match                   13 actions:  14 actions[0]


def problems(text: str, source: str = "budgets.yaml") -> list[str]:
    with pytest.raises(BudgetFileError) as caught:
        parse_budget_yaml(text, source=source)
    assert caught.value.problems, "a BudgetFileError must name at least one problem"
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def edited(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def usage(**fields) -> SpanUsage:
    base = dict(
        trace_id="t", span_id="s", parent_span_id="", name="chat", start_ns=1, end_ns=2, operation="chat"
    )
    base.update(fields)
    return SpanUsage(**base)


# --- valid files ------------------------------------------------------------------------------


def test_design_example_parses() -> None:
    config = parse_budget_yaml(DESIGN_EXAMPLE)
    assert config.model_classes == {
        "premium": ("gpt-4.1", "o3", "claude-opus-4-1"),
        "standard": ("gpt-4.1-mini", "claude-sonnet-4-5"),
        "economy": ("gpt-4.1-nano", "claude-haiku-4-5"),
    }
    assert config.downgrade["claude-opus-4-1"] == "claude-sonnet-4-5"
    assert len(config.downgrade) == 5
    (budget,) = config.budgets
    assert budget.id == "tenant-daily"
    assert budget.scope == ("tenant",)
    assert budget.scope_name == "tenant"
    assert budget.match == "*"
    assert (budget.window, budget.timezone, budget.metric) == ("day", "UTC", "cost_usd")
    assert budget.limit == 50.0
    assert [(a.at, a.do, a.to) for a in budget.actions] == [
        (0.7, "warn", None),
        (0.85, "downgrade", None),
        (1.0, "throttle", None),
    ]
    assert config.model_class("o3") == "premium"
    assert config.model_class("claude-haiku-4-5") == "economy"
    assert config.model_class("llama-3") == ""
    assert config.budget("tenant-daily") is budget
    assert config.budget("nope") is None


@pytest.mark.parametrize("scope", ["[tenant, feature]", "tenant+feature", '"tenant + feature"'])
def test_combined_scope_as_list_or_plus_string(scope: str) -> None:
    config = parse_budget_yaml(edited("scope: tenant", f"scope: {scope}"))
    budget = config.budgets[0]
    assert budget.scope == ("tenant", "feature")
    assert budget.scope_name == "tenant+feature"


def test_defaults_when_fields_are_omitted() -> None:
    config = parse_budget_yaml("budgets:\n  - {id: small, scope: user, limit: 2}\n")
    budget = config.budgets[0]
    assert (budget.match, budget.window, budget.timezone, budget.metric) == ("*", "day", "UTC", "cost_usd")
    assert budget.actions == (Action(at=1.0, do="throttle"),)


def test_empty_file_is_an_empty_config() -> None:
    assert parse_budget_yaml("") == BudgetConfig()


def test_load_budget_file_reports_the_path(tmp_path) -> None:
    path = tmp_path / "team.yaml"
    path.write_text(edited("limit: 50", "limit: -1"), encoding="utf-8")
    with pytest.raises(BudgetFileError) as caught:
        load_budget_file(path)
    assert caught.value.problems[0].startswith(f"{path}:12: budgets[0].limit: ")
    path.write_text(BASE, encoding="utf-8")
    assert load_budget_file(path).budgets[0].limit == 50


# --- error reporting: file:line: field.path: message -------------------------------------------


def test_bad_limit() -> None:
    (problem,) = problems(edited("limit: 50", "limit: -5"))
    assert problem.startswith("budgets.yaml:12: budgets[0].limit: ")
    assert "greater than 0" in problem
    (problem,) = problems(edited("limit: 50", "limit: lots"))
    assert problem.startswith("budgets.yaml:12: budgets[0].limit: ")


@pytest.mark.parametrize("value", [".inf", ".nan", "1e400"])
def test_a_limit_that_is_not_finite_is_refused(value: str) -> None:
    """An infinite limit passed `gt=0`: every snapshot of its budget then said `"limit":null`,
    which `BudgetUsage.from_json` refuses, and no signal can carry it."""
    (problem,) = problems(edited("limit: 50", f"limit: {value}"))
    assert problem.startswith("budgets.yaml:12: budgets[0].limit: ")


@pytest.mark.parametrize("value", [".inf", "1e400"])
def test_an_action_threshold_that_is_not_finite_is_refused(value: str) -> None:
    """`at: .inf` passed `gt=0`: a rung that can never fire, accepted without a word."""
    (problem,) = problems(edited("at: 0.7,", f"at: {value},"))
    assert problem.startswith("budgets.yaml:14: budgets[0].actions[0].at: ")


def test_unknown_action() -> None:
    (problem,) = problems(edited("do: warn", "do: shout"))
    assert problem.startswith("budgets.yaml:14: budgets[0].actions[0].do: ")
    assert "'throttle'" in problem


def test_typo_in_a_field_name() -> None:
    (problem,) = problems(edited("metric: cost_usd", "metrik: cost_usd"))
    assert problem.startswith("budgets.yaml:11: budgets[0].metrik: ")
    assert "Extra inputs are not permitted" in problem


def test_typo_at_top_level() -> None:
    (problem,) = problems(edited("budgets:", "budget:"))
    assert problem.startswith("budgets.yaml:5: budget: ")


def test_missing_limit_points_at_its_budget() -> None:
    (problem,) = problems(edited("    limit: 50\n", ""))
    assert problem.startswith("budgets.yaml:6: budgets[0].limit: ")
    assert "Field required" in problem


def test_unknown_time_zone() -> None:
    (problem,) = problems(edited("timezone: UTC", "timezone: Mars/Olympus_Mons"))
    assert problem.startswith("budgets.yaml:10: budgets[0].timezone: ")
    assert "unknown time zone 'Mars/Olympus_Mons'" in problem


@pytest.mark.parametrize("window", ["fortnight", "0h", "1y", "-1h", "24"])
def test_bad_window(window: str) -> None:
    (problem,) = problems(edited("window: day", f"window: '{window}'"))
    assert problem.startswith("budgets.yaml:9: budgets[0].window: ")
    assert repr(window) in problem


def test_unknown_scope_dimension() -> None:
    (problem,) = problems(edited("scope: tenant", "scope: [tenant, region]"))
    assert problem.startswith("budgets.yaml:7: budgets[0].scope[1]: ")


def test_session_window_needs_session_scope() -> None:
    (problem,) = problems(edited("window: day", "window: session"))
    assert problem.startswith("budgets.yaml:6: budgets[0]: ")
    assert "session" in problem


def test_actions_out_of_order() -> None:
    (problem,) = problems(edited("at: 0.7,", "at: 0.9,"))
    assert problem.startswith("budgets.yaml:13: budgets[0].actions: ")
    assert "ascending" in problem


def test_every_mistake_is_reported() -> None:
    found = problems(edited("limit: 50", "limit: 0").replace("do: warn", "do: shout"))
    assert [p.split(": ")[0] for p in found] == ["budgets.yaml:12", "budgets.yaml:14"]


def test_duplicate_ids_point_at_the_second_one() -> None:
    text = BASE + "  - id: tenant-daily\n    scope: [tenant, feature]\n    limit: 10\n"
    #              line 17                  line 18                      line 19
    (problem,) = problems(text)
    assert "'tenant-daily' is used twice" in problem
    # The duplicate is the `id:` of the second budget (line 17), not the `budgets:` key.
    assert problem.startswith("budgets.yaml:17: budgets[1].id: "), problem


def test_downgrade_to_an_unknown_class_points_at_to() -> None:
    (problem,) = problems(edited("to: standard", "to: budget"))
    assert "'budget'" in problem
    assert "not a model class" in problem
    # The mistake is the `to:` of the second action, on line 15 — not "line 1, (file)".
    assert problem.startswith("budgets.yaml:15: budgets[0].actions[1].to: "), problem


def test_invalid_yaml_reports_the_line() -> None:
    (problem,) = problems(edited("window: day", "window: day: again"))
    assert problem.startswith("budgets.yaml:9: (file): not valid YAML")
    (problem,) = problems(edited("    timezone: UTC", "\ttimezone: UTC"))
    assert problem.startswith("budgets.yaml:10: (file): not valid YAML")


def test_a_list_is_not_a_budget_file() -> None:
    (problem,) = problems("- a\n- b\n")
    assert problem.startswith("budgets.yaml:1: (file): ")


# --- Budget.key_for / action_for ----------------------------------------------------------------


def budget(**fields) -> Budget:
    base = dict(id="b", scope="tenant", limit=10)
    base.update(fields)
    return Budget(**base)


def test_key_for_star_counts_each_key_separately() -> None:
    b = budget(match="*")
    assert b.key_for(usage(tenant="acme")) == "acme"
    assert b.key_for(usage(tenant="globex")) == "globex"


def test_key_for_exact_match() -> None:
    b = budget(match="acme")
    assert b.key_for(usage(tenant="acme")) == "acme"
    assert b.key_for(usage(tenant="acme-2")) is None
    assert b.key_for(usage(tenant="ACME")) is None


def test_key_for_glob() -> None:
    b = budget(match="team-*")
    assert b.key_for(usage(tenant="team-red")) == "team-red"
    assert b.key_for(usage(tenant="team-")) == "team-"
    assert b.key_for(usage(tenant="red-team")) is None
    assert budget(match="team-?").key_for(usage(tenant="team-ab")) is None


def test_key_for_combined_scope_joins_with_slash() -> None:
    b = budget(scope=["tenant", "feature"])
    assert b.key_for(usage(tenant="acme", feature="summarize")) == "acme/summarize"
    assert budget(scope="feature+tenant").key_for(usage(tenant="acme", feature="s")) == "s/acme"
    glob = budget(scope=["tenant", "feature"], match="acme/sum*")
    assert glob.key_for(usage(tenant="acme", feature="summarize")) == "acme/summarize"
    assert glob.key_for(usage(tenant="acme", feature="translate")) is None
    assert glob.key_for(usage(tenant="globex", feature="summarize")) is None


def test_key_for_missing_dimension_is_none() -> None:
    assert budget().key_for(usage(user="u1")) is None
    combined = budget(scope=["tenant", "feature"])
    assert combined.key_for(usage(tenant="acme")) is None
    assert combined.key_for(usage(feature="summarize")) is None


def test_key_for_service_and_model_class() -> None:
    assert budget(scope="service").key_for(usage(service="api")) == "api"
    assert budget(scope="model_class", match="premium").key_for(usage(model_class="premium")) == "premium"
    assert budget(scope="model_class", match="premium").key_for(usage(model_class="standard")) is None


def test_action_for_picks_the_highest_rung_reached() -> None:
    b = budget(
        actions=[
            {"at": 0.7, "do": "warn"},
            {"at": 0.85, "do": "downgrade", "to": "standard"},
            {"at": 1.0, "do": "throttle"},
        ]
    )
    assert b.action_for(0.0) is None
    assert b.action_for(0.6999) is None
    assert b.action_for(0.7).do == "warn"
    assert b.action_for(0.849).do == "warn"
    rung = b.action_for(0.85)
    assert (rung.do, rung.to) == ("downgrade", "standard")
    assert b.action_for(1.0).do == "throttle"
    assert b.action_for(7.5).do == "throttle"


# --- the downgrade ladder ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def design_config() -> BudgetConfig:
    return parse_budget_yaml(DESIGN_EXAMPLE)


def test_downgrade_one_step(design_config: BudgetConfig) -> None:
    assert design_config.downgrade_model("gpt-4.1") == "gpt-4.1-mini"
    assert design_config.downgrade_model("gpt-4.1-mini") == "gpt-4.1-nano"
    assert design_config.downgrade_model("claude-opus-4-1") == "claude-sonnet-4-5"


def test_downgrade_walks_to_the_target_class(design_config: BudgetConfig) -> None:
    assert design_config.downgrade_model("gpt-4.1", "standard") == "gpt-4.1-mini"
    assert design_config.downgrade_model("gpt-4.1", "economy") == "gpt-4.1-nano"
    assert design_config.downgrade_model("o3", "economy") == "gpt-4.1-nano"
    assert design_config.downgrade_model("claude-opus-4-1", "economy") == "claude-haiku-4-5"
    # Already at or below the target class: nothing cheaper of that class on the ladder.
    assert design_config.downgrade_model("gpt-4.1-mini", "standard") is None
    assert design_config.downgrade_model("gpt-4.1-nano", "premium") is None


def test_downgrade_without_a_ladder_entry(design_config: BudgetConfig) -> None:
    assert design_config.downgrade_model("gpt-4.1-nano") is None
    assert design_config.downgrade_model("llama-3-70b") is None
    assert BudgetConfig().downgrade_model("gpt-4.1") is None


def test_downgrade_cycle_is_refused() -> None:
    config = BudgetConfig(
        model_classes={"premium": ("a",), "standard": ("b",), "economy": ("z",)},
        downgrade={"a": "b", "b": "a"},
    )
    assert config.downgrade_model("a") == "b"  # one step is still fine
    assert config.downgrade_model("a", "economy") is None  # walking for a class must not loop forever
    self_loop = BudgetConfig(downgrade={"x": "x"})
    assert self_loop.downgrade_model("x") is None


# --- metric_value -------------------------------------------------------------------------------


def test_metric_value_for_each_metric() -> None:
    chat = usage(operation="chat", input_tokens=1200, output_tokens=300, cost_usd=0.25, tool_calls=2)
    assert metric_value("cost_usd", chat) == 0.25
    assert metric_value("tokens", chat) == 1500.0
    assert metric_value("input_tokens", chat) == 1200.0
    assert metric_value("tool_calls", chat) == 2.0
    assert metric_value("calls", chat) == 1.0

    tool = usage(operation="execute_tool", tool_name="search")
    assert metric_value("tool_calls", tool) == 1.0
    assert metric_value("calls", tool) == 0.0
    assert metric_value("tokens", tool) == 0.0

    unpriced = usage(operation="embeddings", input_tokens=50, cost_usd=None)
    assert metric_value("cost_usd", unpriced) == 0.0
    assert metric_value("calls", unpriced) == 1.0
    assert metric_value("tool_calls", unpriced) == 0.0


def test_the_class_order_survives_the_budgets_topic() -> None:
    config = parse_budget_yaml(
        "model_classes: {premium: [gpt-4.1], standard: [gpt-4.1-mini], economy: [gpt-4.1-nano]}\n"
        "providers: {openai: {premium: gpt-4.1, standard: gpt-4.1-mini, economy: gpt-4.1-nano}}\n"
        "routes: [{id: r, match: {feature: x}, use: economy}]\n"
    )
    again = from_records(to_records(config))
    assert list(again.model_classes) == ["premium", "standard", "economy"]
    assert again.class_above("economy") == "standard"
    assert again.is_cheaper_class("economy", "premium")
    assert again.routes == config.routes and again.providers == config.providers
