"""The operations files in config/ops/: the alert rules pass promtool, the dashboard parses,
and every metric either of them queries is one the switch exports (scraped from a running
switch in tests/test_health_process.py, from the registry here)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from switch import metrics

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "config" / "ops" / "alerts.yml"
DASHBOARD = REPO / "config" / "ops" / "grafana-dashboard.json"
#: Names a query may use that the switch exports (recording rules use ``cardswitch:``).
_METRIC = re.compile(r"\b((?:cardswitch|process|python)_[a-z0-9_]+)")


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return exprs


def alert_queries() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def queried_metrics(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in _METRIC.findall(e)}


def exported_series_names(text: str) -> set[str]:
    """Every series name a scrape of ``text`` can hold, from its families and their types."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("_count", "_sum", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        names |= {s.name for s in family.samples}
    return names


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install the Debian package prometheus (bootstrap.sh)")
    done = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_dashboard_parses_and_covers_the_golden_signals() -> None:
    dash: dict[str, Any] = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in dash["panels"]]
    assert len(set(p["id"] for p in dash["panels"])) == len(titles)
    queried = queried_metrics(dashboard_queries())
    golden = {
        "cardswitch_requests_total",  # approval rate, codes
        "cardswitch_decisions_total",  # decline mix by reason
        "cardswitch_request_seconds_bucket",  # p99
        "cardswitch_pipeline_budget_seconds",  # against the budget
        "cardswitch_stand_in_total",  # stand-in rate by cause
        "cardswitch_tls_certificate_expiry_seconds",
        "cardswitch_answers_undelivered_total",
        "cardswitch_protocol_errors_total",
    }
    assert golden <= queried


def test_every_queried_metric_is_registered() -> None:
    exported = exported_series_names(metrics.exposition().decode())
    for source, exprs in (("dashboard", dashboard_queries()), ("alerts", alert_queries())):
        missing = queried_metrics(exprs) - exported
        assert not missing, f"{source} queries metrics the switch does not export: {missing}"
