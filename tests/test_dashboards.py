"""The Grafana dashboard and the Prometheus alerts (``deploy/``) against /metrics.

Neither file runs here (no Grafana, no Prometheus server), so the tests check
what goes stale: every series they query is one ``GET /metrics`` exports
(gateway.observe.metrics.FAMILIES, with the ``_total``, ``_bucket``, ``_sum``
and ``_count`` suffixes of the exposition), every label they group or filter
by is one of those series' labels (or a label Prometheus adds), the dashboard
is importable as it is (a data-source variable rather than a fixed one, unique
panel ids, panels inside the 24-column grid), and every rule names its
severity and a summary.  Where ``promtool`` is installed the rules go through
``promtool check rules``, and so does every dashboard query (as a recording
rule, Grafana's variables replaced), which checks their PromQL syntax.  A real
scrape of a running gateway closes the loop: every family the files use that
a default gateway exports is in its answer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from typing import Dict, Iterator, List, Set, Tuple

import pytest
import yaml

from gateway.observe.metrics import COUNTER, FAMILIES, HISTOGRAM
from tests.support import gateway as _support
from tests.support.gateway import RawConnection, get_request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "sluice.json")
ALERTS = os.path.join(ROOT, "deploy", "prometheus", "alerts.yml")
PROMTOOL = shutil.which("promtool")
#: Labels Prometheus itself attaches (target labels) or histograms carry.
OUTER_LABELS = frozenset(("instance", "job", "le"))
#: Stand-ins for Grafana's variables when a query is checked by promtool.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$instance": ".*"}

_NAME = re.compile(r"\bsluice_[a-z0-9_]+")
_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"(sluice_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")

start_gateway = _support.start_gateway
gateway_process = _support.gateway_process


def exported_series() -> Dict[str, Tuple[str, ...]]:
    """Every series name /metrics can carry, with its family's labels."""
    series: Dict[str, Tuple[str, ...]] = {}
    for family in FAMILIES:
        if family.kind == COUNTER:
            series[family.name + "_total"] = family.labels
        elif family.kind == HISTOGRAM:
            for suffix in ("_bucket", "_sum", "_count"):
                series[family.name + suffix] = family.labels
        else:
            series[family.name] = family.labels
    return series


def dashboard() -> dict:
    with open(DASHBOARD, encoding="utf-8") as f:
        return json.load(f)


def alert_rules() -> List[dict]:
    with open(ALERTS, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_queries() -> Iterator[Tuple[str, str]]:
    """``(panel title, PromQL)`` of every query of the dashboard."""
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def all_queries() -> List[Tuple[str, str]]:
    return list(dashboard_queries()) + [(rule["alert"], rule["expr"]) for rule in alert_rules()]


def test_every_series_queried_is_one_metrics_exports():
    series = exported_series()
    used: Set[str] = set()
    for where, expr in all_queries():
        names = _NAME.findall(expr)
        assert names, "%s: queries no sluice series: %s" % (where, expr)
        for name in names:
            assert name in series, "%s: %s is not exported by /metrics" % (where, name)
            used.add(name)
    # Together they cover every family (a series in neither file is one an
    # operator never sees).
    for family in FAMILIES:
        assert any(n in used for n in series if n == family.exposed or n.startswith(family.name + "_")), \
            "%s is in neither file" % family.name


def test_every_label_queried_belongs_to_the_series():
    series = exported_series()
    every_label = set(OUTER_LABELS).union(*series.values())
    for where, expr in all_queries():
        for name, matchers in _SELECTOR.findall(expr):
            for label in _MATCHER.findall(matchers):
                assert label in series[name] or label in OUTER_LABELS, \
                    "%s: %s has no label %r" % (where, name, label)
        for group in _BY.findall(expr):
            for label in (item.strip() for item in group.split(",")):
                assert label in every_label, "%s: no series has a label %r" % (where, label)


def test_dashboard_imports_as_it_is():
    doc = dashboard()
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            # The data source is chosen at import, never a fixed uid of someone's Grafana.
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
    titles = " ".join(panel["title"].lower() for panel in doc["panels"])
    for topic in ("request rate", "status", "latency", "ring occupancy", "batch", "retries", "lag",
                  "redis", "gc pause", "resident memory", "workers"):
        assert topic in titles, topic


def test_alert_rules_name_severity_and_summary():
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    text = " ".join(rule["expr"] for rule in rules)
    # What operators are told about: sink failing, ring near full, Redis down,
    # sustained 5xx, spool growing, GC pauses over budget.
    for series in ("sluice_sink_records_given_up_total", "sluice_sink_calls_total", "sluice_ring_used_bytes",
                   "sluice_redis_up", 'status=~"5.."', "sluice_spool_used_bytes", "sluice_gc_pause_seconds"):
        assert series in text, series


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) is not installed")
def test_promtool_checks_the_rules_and_the_dashboard_queries(tmp_path):
    result = subprocess.run([PROMTOOL, "check", "rules", ALERTS], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    records = []
    for n, (_, expr) in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        records.append({"record": "sluice:dashboard_query_%d" % n, "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_running_gateway_exports_the_series_the_files_use(gateway_process):
    with RawConnection(gateway_process.address) as conn:
        # The second scrape counts the first (answers are counted once sent).
        conn.send(get_request("/metrics") + get_request("/metrics", close=True))
        conn.read_response()
        text = conn.read_response().body.decode()
    scraped = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
    used = {name for _, expr in all_queries() for name in _NAME.findall(expr)}
    # A default gateway (file sink, no --redis, no spool) leaves the other parts' series out
    # (the ring's per-tenant series need access control).
    optional = ("sluice_redis_", "sluice_access_", "sluice_spool_", "sluice_sink_batch_",
                "sluice_sink_call", "sluice_sink_retries", "sluice_sink_throttles", "sluice_sink_kinesis_",
                "sluice_sink_put_payload_units", "sluice_sink_records_per_kinesis_record",
                "sluice_sink_sent_bytes", "sluice_ring_tenant_", "sluice_ring_share_")
    expected = {name for name in used if not name.startswith(optional)}
    assert expected <= scraped, sorted(expected - scraped)

