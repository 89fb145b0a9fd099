"""Alert rules and dashboard queries: promtool checks and unit-tests the rules, parses every
PromQL expression, and every metric they name is one RaftMetrics exports."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.promql import (
    RULES,
    all_queries,
    exported_families,
    exported_names,
    rule_queries,
    used_names,
    variable_queries,
)
from tests.promtool import promtool

REQUIRED_ALERTS = {
    "RaftStreamNoNewAdapter",
    "RaftStreamRewardFalling",
    "RaftStreamDiversityCollapse",
    "RaftStreamConsumerLagGrowing",
    "RaftStreamDeadLetterSpike",
    "RaftStreamNotReady",
    "RaftStreamRewardFailing",
}


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(RULES.with_name("rules_test.yaml")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_required_alert_exists_and_is_unit_tested() -> None:
    assert set(rule_queries()) >= REQUIRED_ALERTS
    tests = yaml.safe_load(RULES.with_name("rules_test.yaml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t["alert_rule_test"]}
    assert tested == set(rule_queries())


def test_every_promql_expression_parses(tmp_path: Path) -> None:
    queries = all_queries()
    rules = {
        "groups": [
            {
                "name": "parse-check",
                "rules": [
                    {"record": f"check:query_{i}", "expr": expr}
                    for i, expr in enumerate(queries.values())
                ],
            }
        ]
    }
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_every_metric_named_is_exported_by_raft_metrics() -> None:
    exported = exported_names()
    unknown = {
        where: sorted(used_names(expr) - exported)
        for where, expr in {
            **all_queries(),
            **{f"variable {i}": q for i, q in enumerate(variable_queries())},
        }.items()
        if used_names(expr) - exported
    }
    assert unknown == {}


def test_every_exported_metric_family_is_on_the_dashboard_or_in_a_rule() -> None:
    used = set().union(*(used_names(e) for e in all_queries().values()))
    used |= set().union(*(used_names(q) for q in variable_queries()))
    unused = {f for f in exported_families() if not any(u.startswith(f) for u in used)}
    assert unused == set()
