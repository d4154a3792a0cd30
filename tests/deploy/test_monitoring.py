"""deploy/monitoring: the Prometheus alert rules and the Grafana dashboard name only metrics,
labels and label values that a running normserve exports.

Every expression is parsed as PromQL (promql-parser, the parser GreptimeDB uses), and every
selector, matcher and grouping label in it is checked against the /metrics exposition of a real
app after a few requests, so renaming a metric or a label breaks this test, not an on-call's
dashboard.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser as promql
import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from normserve.service import errors
from normserve.service.app import create_app
from normserve.service.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
MONITORING = REPO_ROOT / "deploy" / "monitoring"
SCRAPE_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
SCRAPE_METRICS = {"up": SCRAPE_LABELS}  # series Prometheus makes itself
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": "normserve", "$instance": ".*"}


@pytest.fixture(scope="module")
def app(committed_model_repository: Path) -> Iterator[TestClient]:
    settings = Settings(_env_file=None, model_repository=committed_model_repository)  # type: ignore[call-arg]
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="module")
def exported(app: TestClient) -> dict[str, set[str]]:
    """Sample name -> label names, from /metrics after a success, a 4xx and a metrics scrape."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="PNG")
    assert app.post("/classify", content=buf.getvalue(), headers={"content-type": "image/png"}).status_code == 200
    assert app.post("/classify", content=b"not an image", headers={"content-type": "image/png"}).status_code == 400
    app.get("/metrics")
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(app.get("/metrics").text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


@pytest.fixture(scope="module")
def routes(app: TestClient) -> set[str]:
    """Route templates, as the `endpoint` label holds them: the OpenAPI paths, and /metrics."""
    return set(app.get("/openapi.json").json()["paths"]) | {"/metrics"}


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    return dict(json.loads((MONITORING / "grafana-dashboard.json").read_text()))


def _expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every alert rule and dashboard target, Grafana variables filled in."""
    found = [(f"alert {r['alert']}", r["expr"]) for r in _rules()]
    found += [(f"panel {p['title']!r}", t["expr"]) for p in _dashboard()["panels"] for t in p["targets"]]
    filled = []
    for where, expr in found:
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        filled.append((where, expr))
    return filled


def _walk(node: Any) -> Iterator[Any]:
    yield node
    for attr in ("lhs", "rhs", "expr", "vector_selector"):
        child = getattr(node, attr, None)
        if child is not None:
            yield from _walk(child)
    for child in getattr(node, "args", None) or []:
        yield from _walk(child)


def _selector_labels(node: Any, exported: dict[str, set[str]]) -> set[str]:
    """The labels the series selected under `node` carry."""
    labels = set(SCRAPE_LABELS)
    for sub in _walk(node):
        if type(sub).__name__ == "VectorSelector":
            labels |= exported.get(sub.name, SCRAPE_METRICS.get(sub.name, set()))
    return labels


REASONS = {
    cls.__name__ for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.NormserveError)
}


@pytest.mark.parametrize(("where", "expr"), _expressions())
def test_expression_names_real_metrics_labels_and_values(
    where: str, expr: str, exported: dict[str, set[str]], routes: set[str]
) -> None:
    tree = promql.parse(expr)  # raises on invalid PromQL
    for node in _walk(tree):
        kind = type(node).__name__
        if kind == "VectorSelector":
            known = exported.get(node.name, SCRAPE_METRICS.get(node.name))
            assert known is not None, f"{where}: {node.name} is not exported (have {sorted(exported)})"
            for m in node.matchers.matchers:
                assert m.name in known | SCRAPE_LABELS, f"{where}: {node.name} has no label {m.name!r}"
                exact = str(m.op) in ("MatchOp.Equal", "MatchOp.NotEqual")
                if m.name == "endpoint" and exact:
                    assert m.value in routes, f"{where}: no route {m.value!r}"
                if m.name == "reason" and exact:
                    assert m.value in REASONS or re.fullmatch(r"http_\d{3}", m.value), f"{where}: reason {m.value!r}"
        elif kind == "AggregateExpr" and node.modifier is not None:
            missing = set(node.modifier.labels) - _selector_labels(node.expr, exported)
            assert not missing, f"{where}: grouping by {sorted(missing)}, which the series do not carry"


def test_alert_rules_are_complete() -> None:
    rules = _rules()
    assert len({r["alert"] for r in rules}) == len(rules), "alert names must be unique"
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def test_dashboard_is_importable(exported: dict[str, set[str]]) -> None:
    dash = _dashboard()
    assert dash["uid"] == "normserve" and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(set(ids)) == len(ids), "panel ids must be unique"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dash["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert [t["refId"] for t in panel["targets"]] == [chr(65 + i) for i in range(len(panel["targets"]))]
    # label_values(metric{...}, label) queries of the variables name an exported metric and label.
    for name in ("job", "instance"):
        query = variables[name]["query"]["query"]
        metric, label = re.fullmatch(r"label_values\((\w+)(?:\{.*\})?, (\w+)\)", query).groups()  # type: ignore[union-attr]
        assert metric in exported and label in SCRAPE_LABELS | exported[metric], query
