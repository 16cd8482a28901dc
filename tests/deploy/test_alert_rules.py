"""deploy/prometheus/segserve-rules.yml: valid for Prometheus (`promtool check rules`), its alerts fire where they
should and nowhere else (`promtool test rules` on segserve-rules.test.yml), and every metric it names is one a
real server exports on /metrics, so a renamed metric cannot leave an alert silently watching nothing."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from client import SegmentClient
from tests.helpers.servers import ServerThread

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = RULES_DIR / "segserve-rules.yml"
RULE_TESTS = RULES_DIR / "segserve-rules.test.yml"

# PromQL words that are not series names, once function calls, label matchers, grouping lists, strings and
# ranges are taken out of an expression.
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def rules() -> list[dict[str, object]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def series_names(expr: str) -> set[str]:
    """The series an expression selects (metrics and recorded series), not its functions, labels or keywords."""
    text = GROUPING.sub(" ", expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", text)  # strings (label values)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b\d[\d.e+]*(?:ms|[smhdwy])?\b", " ", text)  # numbers, durations (offset 10m)
    names = set()
    for match in IDENTIFIER.finditer(text):
        followed_by = text[match.end() :].lstrip()[:1]
        if followed_by != "(" and match.group() not in PROMQL_WORDS:
            names.add(match.group())
    return names


def exported_names(port: int) -> set[str]:
    """Every sample name on a server's /metrics (histograms as _bucket, _sum, _count; counters with _total)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_each_alert_fires_where_it_should_and_nowhere_else() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Every alert of the rules file is tested firing (an expected alert with labels) somewhere.
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    alerts = {str(rule["alert"]) for rule in rules() if "alert" in rule}
    assert alerts - fired == set(), "alerts never shown firing"
    assert len(alerts) == 8


def test_series_names_reads_metrics_not_functions_or_labels() -> None:
    expr = (
        'sum without (method, code) (increase(segserve_requests_total{code=~"INTERNAL|UNKNOWN"}[10m])) '
        "and ignoring (limit) max_over_time(segserve:limit_used:ratio[5m] offset 1h) > 0.8 "
        "and (time() - process_start_time_seconds) > 1800"
    )
    assert series_names(expr) == {"segserve_requests_total", "segserve:limit_used:ratio", "process_start_time_seconds"}


def test_every_metric_in_the_rules_is_one_the_server_exports(server: ServerThread, jpeg_bytes: bytes) -> None:
    # Labelled counters have no series before their first call: one image answered, one refused.
    with SegmentClient(server.target, timeout=60) as client:
        client.segment(jpeg_bytes)
        with pytest.raises(Exception, match="INVALID_ARGUMENT"):
            client.segment(b"not an image")
    assert server.app.metrics_port
    exported = exported_names(server.app.metrics_port)
    recorded = {str(rule["record"]) for rule in rules() if "record" in rule}
    used = set().union(*(series_names(str(rule["expr"])) for rule in rules()))
    assert {"segserve_images_total", "segserve_model_info", "process_resident_memory_bytes"} <= used
    assert used - recorded - exported == set(), "named in the rules, exported by no server"
    assert recorded - used == set(), "recorded, used by no rule"
