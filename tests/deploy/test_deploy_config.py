"""Deployment config agrees with the app: compose services, ports and settings, and every metric name used by
the Prometheus rules and the Grafana dashboard is one the app really exports."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROM_RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
GRAFANA_DS = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDERS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "shortcut.json"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "atan2",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (not functions, label names, keywords, durations or numbers)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery windows
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w:.$])[A-Za-z_:][\w:]*", s):
        if re.match(r"\s*\(", s[m.end() :]) or m.group().lower() in PROMQL_KEYWORDS:
            continue  # function or aggregation call, or keyword
        names.add(m.group())
    return names


def compose_defaults(value: Any) -> Any:
    """Resolve ${VAR:-default} / ${VAR-default} / ${VAR} to the default (empty if none), ignoring the environment."""
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [compose_defaults(v) for v in value]
    if isinstance(value, dict):
        return {k: compose_defaults(v) for k, v in value.items()}
    return value


def seconds(duration: str | int | float) -> float:
    """'1m30s' / '45s' / '500ms' / 30 -> seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_defaults(yaml.safe_load(COMPOSE.read_text()))


@pytest.fixture(scope="module")
def rules() -> dict:
    return yaml.safe_load(PROM_RULES.read_text())


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def app_metric_names() -> set[str]:
    from app.metrics import metric_names

    names = metric_names()
    assert "shortcut_e2e_request_latency_seconds_bucket" in names  # the contract's suffixed sample names
    return names


def record_names(rules: dict) -> set[str]:
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def dashboard_exprs(dashboard: dict) -> list[str]:
    """Every PromQL expression in the dashboard, rows' nested panels and template variables included."""
    panels = list(dashboard["panels"])
    panels += [p for row in dashboard["panels"] for p in row.get("panels", [])]
    exprs = [t["expr"] for p in panels for t in p.get("targets", []) if t.get("expr")]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query" and isinstance(query, str | dict):
            exprs.append(query if isinstance(query, str) else query.get("query", ""))
    return exprs


def mount_target(service: dict, source_suffix: str) -> str:
    """Container path of the bind mount whose host path ends with `source_suffix`."""
    for vol in service.get("volumes", []):
        src, dst = vol.split(":")[:2]
        if src.rstrip("/").endswith(source_suffix):
            return dst
    raise AssertionError(f"no volume mounts {source_suffix}")


# ---- the PromQL name extractor itself -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("up", {"up"}),
        ('up{job="shortcut-api"} == 1', {"up"}),
        ("histogram_quantile(0.95, sum by (le, layer) (rate(a_bucket[5m])))", {"a_bucket"}),
        (
            "sum(rate(a_sum[$__rate_interval])) / sum without (instance) (rate(a_count[1m:10s] offset 5m))",
            {"a_sum", "a_count"},
        ),
        ('x{status=~"5.."} / on(job) group_left(model) job:y:rate5m and bool 1e3', {"x", "job:y:rate5m"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
        ("sum(rate(a_total[5m])) > 0.5 unless max(b)", {"a_total", "b"}),
    ],
)
def test_promql_metric_names(expr: str, expected: set[str]) -> None:
    assert promql_metric_names(expr) == expected


# ---- docker-compose.yml --------------------------------------------------------------------------------------
def test_compose_names_the_three_services(compose: dict) -> None:
    assert {"api", "prometheus", "grafana"} <= set(compose["services"])
    assert compose["services"]["api"]["build"]["context"] == "."
    assert compose["services"]["prometheus"]["image"].startswith("prom/prometheus")
    assert compose["services"]["grafana"]["image"].startswith("grafana/grafana")


def test_api_port_and_healthcheck_match_the_app(compose: dict) -> None:
    from app.settings import Settings

    api = compose["services"]["api"]
    port = Settings.model_fields["port"].default
    assert port == 8000
    assert f"8000:{port}" in api["ports"]
    assert api["environment"]["SHORTCUT_PORT"] == str(port)
    assert api["environment"]["SHORTCUT_HOST"] == "0.0.0.0"
    test = api["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and f"127.0.0.1:{port}/health" in " ".join(test)
    assert "curl" not in " ".join(test) and "wget" not in " ".join(test)  # not in python:3.11-slim
    assert api["restart"] == "unless-stopped"


def test_api_environment_is_valid_settings(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import Settings

    env = compose["services"]["api"]["environment"]
    fields = {f"SHORTCUT_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, f"unknown settings: {set(env) - fields}"
    for key in [k for k in os.environ if k.startswith("SHORTCUT_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if value is not None:  # a bare key is passed through from the host environment, unset by default
            monkeypatch.setenv(key, str(value))
    settings = Settings()
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert settings.device in ("cpu", "auto")
    assert settings.checkpoint == Settings.model_fields["checkpoint"].default  # the packaged one
    assert settings.api_key is None  # no auth unless the operator sets a key


def test_stop_grace_outlasts_the_drain(compose: dict) -> None:
    api = compose["services"]["api"]
    from app.settings import Settings

    drain = float(api["environment"]["SHORTCUT_DRAIN_TIMEOUT_S"])
    delay = float(api["environment"].get("SHORTCUT_DRAIN_DELAY_S") or Settings.model_fields["drain_delay_s"].default)
    assert api.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert seconds(api["stop_grace_period"]) >= delay + drain + 5  # SIGTERM: the pre-drain delay, then the drain


def test_api_has_resource_limits(compose: dict) -> None:
    limits = compose["services"]["api"]["deploy"]["resources"]["limits"]
    assert float(limits["cpus"]) > 0
    assert re.fullmatch(r"\d+(\.\d+)?[kmgKMG]?[bB]?", str(limits["memory"]))


def test_prometheus_loads_config_and_rules_from_deploy(compose: dict) -> None:
    prom = compose["services"]["prometheus"]
    config_path = mount_target(prom, "deploy/prometheus/prometheus.yml")
    assert f"--config.file={config_path}" in prom["command"]
    config = yaml.safe_load(PROM_CONFIG.read_text())
    assert mount_target(prom, "deploy/prometheus/rules.yml") in config["rule_files"]
    assert "9090:9090" in prom["ports"]


def test_prometheus_scrapes_the_api_service(compose: dict) -> None:
    config = yaml.safe_load(PROM_CONFIG.read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    job = jobs["shortcut-api"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    container_port = compose["services"]["api"]["ports"][0].split(":")[-1]
    assert targets == [f"api:{container_port}"]


def test_grafana_provisioning_matches_mounts_and_dashboard(compose: dict, dashboard: dict) -> None:
    grafana = compose["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert mount_target(grafana, "deploy/grafana/provisioning") == "/etc/grafana/provisioning"
    dash_dir = mount_target(grafana, "deploy/grafana/dashboards")
    providers = yaml.safe_load(GRAFANA_PROVIDERS.read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == [dash_dir]
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{dash_dir}/{DASHBOARD.name}"

    (ds,) = yaml.safe_load(GRAFANA_DS.read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", []) if "datasource" in t}
    assert uids == {ds["uid"]}


def test_dashboard_panels(dashboard: dict) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in dashboard["panels"]}
    for needed in (
        "Request rate",
        "Time to first token",
        "Inter-token latency",
        "End-to-end latency",
        "Tokens per second",
        "Running / waiting requests",
        "Batch size per decode step",
        "Error rate by status",
    ):
        assert needed in titles
    exprs = dashboard_exprs(dashboard)
    for metric in ("shortcut_time_to_first_token_seconds_bucket", "shortcut_inter_token_latency_seconds_bucket"):
        quantiles = {q for e in exprs if metric in e for q in re.findall(r"histogram_quantile\(([\d.]+)", e)}
        assert {"0.50", "0.95", "0.99"} <= quantiles, metric
    resid = [e for e in exprs if "shortcut_resid_post_norm_bucket" in e]
    assert resid and all(re.search(r"by \((?=[^)]*\ble\b)(?=[^)]*\blayer\b)[^)]*\)", e) for e in resid)


# ---- metric names: rules and dashboard only use what the app exports ------------------------------------------
def test_rule_expressions_use_only_app_metrics(rules: dict, app_metric_names: set[str]) -> None:
    records = record_names(rules)
    assert records and all(r.count(":") == 2 for r in records)  # level:metric:operations
    for group in rules["groups"]:
        for rule in group["rules"]:
            used = promql_metric_names(rule["expr"])
            assert used, rule
            assert used - records <= app_metric_names, f"{rule.get('record')}: {used - records - app_metric_names}"


def test_rules_record_latency_quantiles(rules: dict) -> None:
    records = record_names(rules)
    for metric in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        for q in ("p50", "p95", "p99"):
            assert f"job:shortcut_{metric}:{q}_5m" in records


def test_dashboard_uses_only_app_metrics(dashboard: dict, rules: dict, app_metric_names: set[str]) -> None:
    known = app_metric_names | record_names(rules)
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 10
    for expr in exprs:
        used = promql_metric_names(expr)
        assert used, expr
        assert used <= known, f"{expr}: unknown {used - known}"


# ---- Dockerfile ----------------------------------------------------------------------------------------------
def test_dockerfile_contract() -> None:
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\w+))?", text, re.M | re.I)
    assert len(froms) >= 2, "multi-stage build"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert re.search(r'^ARG PIP_FIND_LINKS=""$', text, re.M)
    final = text[text.rindex("\nFROM ") :]
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    assert not re.search(r"apt-get|gcc|build-essential", final)
    assert re.search(r'^CMD \["python", "-m", "app"\]$', final, re.M)
    assert "SHORTCUT_HOST=0.0.0.0" in final and re.search(r"^EXPOSE 8000$", final, re.M)
    user = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    health = re.search(r"^HEALTHCHECK .*\n(?:.*\n)*?\s*CMD (\[.*\])$", final, re.M)
    assert health and "/health" in health.group(1) and json.loads(health.group(1))[0] == "python"
    assert re.search(r"pip install \.(?:\s|$)", text) and "pip install -e" not in text
    copied = re.findall(r"^COPY (?!--from)(.*)$", text, re.M)
    assert not any("training" in c for c in copied), "training/ is not serving code"


def test_dockerignore_keeps_local_state_out() -> None:
    lines = {ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    for needed in (".git", ".venv", "tests", "training", "bench/results", "**/*.resume.safetensors", "**/__pycache__"):
        assert needed in lines
    assert not {"model", "app", "pyproject.toml", "model/checkpoints"} & lines
