"""The Prometheus alert rules and the Grafana dashboard in deploy/monitoring/: every query
parses, selects only metrics the server exports (cvgen/monitor/metric_names.py) with labels they
carry, and the rules pass Prometheus' own checks and unit tests (promtool, where installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cvgen.monitor.metric_names import SERVER_METRICS, known_series, labels_of
from cvgen.monitor.rolling import ALERT_THRESHOLD

promql = pytest.importorskip("promql_parser")

# labels Prometheus adds to every scraped series
TARGET_LABELS = frozenset({"job", "instance"})
# Grafana's variables, as a value the parser accepts
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$instance": ".*"}


@pytest.fixture(scope="module")
def monitoring(repo_root: Path) -> Path:
    return repo_root / "deploy" / "monitoring"


@pytest.fixture(scope="module")
def rules(monitoring: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load((monitoring / "alerts.yml").read_text())
    assert isinstance(doc, dict) and list(doc) == ["groups"]
    out = []
    for group in doc["groups"]:
        assert set(group) == {"name", "rules"} and group["rules"]
        out.extend(group["rules"])
    return out


def _selectors(expr: str) -> list[Any]:
    """The vector selectors of a PromQL expression (ValueError if it does not parse)."""
    found: list[Any] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql.VectorSelector):
            found.append(node)
        elif isinstance(node, promql.MatrixSelector):
            found.append(node.vector_selector)
        return True

    promql.walk(promql.parse(expr), visit)
    return found


def _check_query(expr: str, where: str) -> set[str]:
    """Problems of one query: unknown metrics, labels a metric does not carry (empty: none)."""
    problems = set()
    known = known_series()
    for sel in _selectors(expr):
        name = sel.name
        if name not in known:
            problems.add(f"{where}: unknown metric {name!r}")
            continue
        allowed = labels_of(name) | TARGET_LABELS
        for m in sel.matchers.matchers:
            if m.name not in allowed:
                problems.add(f"{where}: {name} has no label {m.name!r} (has {sorted(allowed)})")
    return problems


def _names(expr: str) -> set[str]:
    return {sel.name for sel in _selectors(expr)}


def test_rules_are_well_formed(rules: list[dict[str, Any]]) -> None:
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for r in rules:
        assert set(r) == {"alert", "expr", "for", "labels", "annotations"}, r["alert"]
        assert re.fullmatch(r"Cvgen[A-Z][A-Za-z0-9]+", r["alert"])
        assert re.fullmatch(r"\d+[smh]", r["for"])
        assert r["labels"]["severity"] in ("warning", "critical")
        assert set(r["annotations"]) == {"summary", "description"}


def test_rule_queries_use_only_exported_metrics(rules: list[dict[str, Any]]) -> None:
    problems: set[str] = set()
    for r in rules:
        problems |= _check_query(r["expr"], r["alert"])
    assert not problems, "\n".join(sorted(problems))


def test_the_four_required_alerts_watch_the_right_metrics(rules: list[dict[str, Any]]) -> None:
    by_name = {r["alert"]: r["expr"] for r in rules}
    assert "cvgen_http_request_duration_seconds_bucket" in _names(
        by_name["CvgenPredictLatencyHigh"]
    )
    assert "0.95" in by_name["CvgenPredictLatencyHigh"]
    assert _names(by_name["CvgenHigh5xxRate"]) == {"cvgen_http_requests_total"}
    assert 'status=~"5.."' in by_name["CvgenHigh5xxRate"]
    assert _names(by_name["CvgenWorkerDown"]) == {"cvgen_worker_up"}
    assert _names(by_name["CvgenDataDrift"]) == {"cvgen_drift_score"}
    # the drift alert's threshold is RollingDrift's documented one
    tree = promql.parse(by_name["CvgenDataDrift"])
    assert isinstance(tree, promql.BinaryExpr) and str(tree.op) == ">"
    assert isinstance(tree.rhs, promql.NumberLiteral) and tree.rhs.val == ALERT_THRESHOLD


def test_a_bad_query_is_caught() -> None:
    """The checks above can fail: an unknown name, a label the metric lacks, bad syntax."""
    assert _check_query("rate(cvgen_http_requests[5m])", "x") == {
        "x: unknown metric 'cvgen_http_requests'"
    }
    assert _check_query('cvgen_worker_up{path="/"}', "x")
    assert not _check_query('cvgen_worker_up{instance="a"}', "x")
    with pytest.raises(ValueError, match="unclosed left parenthesis"):
        promql.parse("sum(rate(cvgen_images_total[5m])")


def _dashboard_queries(monitoring: Path) -> list[tuple[str, str]]:
    dash = json.loads((monitoring / "grafana" / "cvgen-serving.json").read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    out = []
    for p in dash["panels"]:
        assert {"id", "type", "title", "gridPos"} <= p.keys()
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        for t in p["targets"]:
            expr = t["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, (p["title"], expr)
            out.append((f"panel {p['title']!r}", expr))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":  # label_values(METRIC, LABEL): Grafana's, not PromQL
            m = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["query"]["query"])
            assert m, var
            out.append((f"variable {var['name']!r}", m.group(1)))
            assert m.group(2) in labels_of(m.group(1)) | TARGET_LABELS
    return out


def test_dashboard_queries_use_only_exported_metrics(monitoring: Path) -> None:
    queries = _dashboard_queries(monitoring)
    problems: set[str] = set()
    for where, expr in queries:
        problems |= _check_query(expr, where)
    assert not problems, "\n".join(sorted(problems))
    # and the dashboard shows every cvgen metric the server exports
    used = set().union(*(_names(e) for _, e in queries))
    missing = [
        m.name for m in SERVER_METRICS if m.name.startswith("cvgen_") and not set(m.series()) & used
    ]
    assert not missing, missing


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian: apt-get install prometheus); the parser-based "
    "checks above still ran",
)


def _promtool(*args: str, cwd: Path) -> str:
    assert PROMTOOL is not None
    res = subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout + res.stderr


@needs_promtool
def test_promtool_checks_and_unit_tests_the_rules(monitoring: Path) -> None:
    assert "SUCCESS: 7 rules found" in _promtool("check", "rules", "alerts.yml", cwd=monitoring)
    assert "SUCCESS" in _promtool("test", "rules", "alerts.test.yml", cwd=monitoring)


@needs_promtool
def test_promtool_accepts_the_config_and_the_dashboard_queries(
    monitoring: Path, tmp_path: Path
) -> None:
    # the example config, with its API-key file made real, loads the rules
    cfg = yaml.safe_load((monitoring / "prometheus.yml").read_text())
    key = tmp_path / "key"
    key.write_text("change-me\n")
    for job in cfg["scrape_configs"]:
        job["authorization"]["credentials_file"] = str(key)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    shutil.copy(monitoring / "alerts.yml", tmp_path / "alerts.yml")
    assert "SUCCESS" in _promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    # Prometheus' own parser on every dashboard query, as recording rules
    queries = [e for where, e in _dashboard_queries(monitoring) if where.startswith("panel")]
    recording = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"cvgen:dashboard:q{i}", "expr": e} for i, e in enumerate(queries)
                ],
            }
        ]
    }
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(recording))
    out = _promtool("check", "rules", "dashboard.yml", cwd=tmp_path)
    assert f"SUCCESS: {len(queries)} rules found" in out
