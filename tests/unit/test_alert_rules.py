"""The alert rules and the dashboard: promtool accepts and tests the rules,
and every metric a rule or a panel reads is one the code exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from issuance.shared import metrics
from issuance.workers import exporter, instruments

DEPLOY = Path(__file__).parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
# Series Prometheus makes itself, not the code.
PROMETHEUS_OWN = {"up"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, check=False)


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        rest = expr[match.end() :].lstrip()
        if rest.startswith("(") or match.group() in KEYWORDS:
            continue  # a function or an operator
        names.add(match.group())
    return names


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def panel_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "issuance.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(re.sub(r"label_values\((\w+),.*\)", r"\1", variable["query"]["query"]))
    return exprs


def exported() -> set[str]:
    return metrics.exported_names() | instruments.exported_names() | exporter.exported_names()


def test_promtool_accepts_the_rules_and_the_scrape_configuration():
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = sum(len(group["rules"]) for group in yaml.safe_load(RULES.read_text())["groups"])
    assert rules >= 14
    assert f"{rules} rules found" in checked.stdout
    config = promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_rule_tests_pass():
    tested = promtool("test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_test_that_makes_it_fire():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"]}
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())["tests"]
    fired = {
        case["alertname"] for test in tests for case in test["alert_rule_test"] if case.get("exp_alerts")
    }
    assert alerts == fired


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_read_is_one_the_code_exports(source):
    exprs = rule_exprs() if source == "rules" else panel_exprs()
    used = set().union(*(metric_names(e) for e in exprs))
    assert used, "no expression parsed"
    assert used - exported() - PROMETHEUS_OWN == set()


def test_the_name_parser_finds_names_and_skips_functions_and_labels():
    expr = 'sum by (queue, le) (rate(issuance_x_bucket{queue=~"a|b"}[5m])) / on (job) up > 6 * 3600'
    assert metric_names(expr) == {"issuance_x_bucket", "up"}


def test_exported_names_follow_the_conventions():
    for name in exported():
        assert name.startswith("issuance_")
        assert not re.search(r"(member|phone|code)_id", name)
    counters = [n for n in exported() if n.endswith("_total")]
    assert "issuance_promise_breaches_total" in counters
    assert "issuance_claim_to_credit_seconds_bucket" in exported()


def test_every_panel_parses_and_reads_the_chosen_cells(tmp_path):
    """Each panel expression is valid PromQL (promtool parses it as a rule,
    the dashboard's variables given values), and selects ``cell=~"$cell"``:
    summed over the chosen cells, or broken down by them."""
    exprs = [
        t["expr"]
        for p in json.loads((DEPLOY / "grafana" / "issuance.json").read_text())["panels"]
        for t in p.get("targets", [])
    ]
    assert all('cell=~"$cell"' in e for e in exprs), [e for e in exprs if 'cell=~"$cell"' not in e]
    rules = [
        {"record": f"panel:expr_{n}", "expr": e.replace("$cell", ".*").replace("$activity", ".*")}
        for n, e in enumerate(exprs)
    ]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    dashboard = json.loads((DEPLOY / "grafana" / "issuance.json").read_text())
    cell = next(v for v in dashboard["templating"]["list"] if v["name"] == "cell")
    # "All" must match series without a cell label (no cell map) too.
    assert cell["allValue"] == ".*" and cell["includeAll"]
    by_cell = {
        p["title"] for p in dashboard["panels"] if any("by (cell" in t["expr"] for t in p.get("targets", []))
    }
    assert {"Claims decided per second, by cell", "Dead letters per second, by cell"} <= by_cell
