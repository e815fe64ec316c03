"""deploy/compose.scale.yml and its HAProxy and Prometheus configs agree with each other and with the app: every
replica is a balanced server and a scrape target, the balancer uses least connections, health-checks /ready, streams
without buffering and retries refused requests; the replicas run like the Kubernetes pods (read-only, no privileges).
`make scale-smoke` runs the stack; these checks are the offline part."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.deploy.test_deploy_config import compose_defaults, mount_target, seconds

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCALE = DEPLOY / "compose.scale.yml"
HAPROXY = DEPLOY / "haproxy" / "haproxy.cfg"
PROM_SCALE = DEPLOY / "prometheus" / "prometheus.scale.yml"
MAKEFILE = ROOT / "Makefile"


@pytest.fixture(scope="module")
def scale() -> dict:
    return compose_defaults(yaml.safe_load(SCALE.read_text()))


@pytest.fixture(scope="module")
def replicas(scale: dict) -> dict[str, dict]:
    found = {name: svc for name, svc in scale["services"].items() if re.fullmatch(r"api\d+", name)}
    assert len(found) >= 3
    return found


@pytest.fixture(scope="module")
def haproxy() -> dict[str, list[str]]:
    """haproxy.cfg as {"section name": [its lines]} (comments and blank lines dropped)."""
    sections: dict[str, list[str]] = {}
    current = None
    for raw in HAPROXY.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not raw.startswith((" ", "\t")):
            current = line.strip()
            sections[current] = []
        else:
            sections[current].append(line.strip())
    return sections


def directive(lines: list[str], prefix: str) -> list[str]:
    return [ln for ln in lines if ln == prefix or ln.startswith(prefix + " ")]


def test_replicas_are_one_definition_run_like_the_k8s_pods(replicas: dict, scale: dict) -> None:
    first, *rest = replicas.values()
    assert all(r == first for r in rest)  # the YAML anchor: one definition, N replicas
    api = first
    assert "ports" not in api  # reachable only through the balancer
    assert api["read_only"] is True and api["tmpfs"] == ["/tmp"]
    assert api["cap_drop"] == ["ALL"] and "no-new-privileges:true" in api["security_opt"]
    main_api = compose_defaults(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))["services"]["api"]
    assert api["image"] == main_api["image"]


def test_replica_settings_are_valid(replicas: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import Settings

    env = next(iter(replicas.values()))["environment"]
    fields = {f"SHORTCUT_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields
    for key in [k for k in os.environ if k.startswith("SHORTCUT_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if value is not None:
            monkeypatch.setenv(key, str(value))
    settings = Settings()
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert settings.threads == 1  # replicas on one machine share its cores
    assert settings.api_key is None


def test_replica_stop_grace_outlasts_the_drain(replicas: dict) -> None:
    from app.settings import Settings

    api = next(iter(replicas.values()))
    default = Settings.model_fields["drain_timeout_s"].default
    drain = float(api["environment"].get("SHORTCUT_DRAIN_TIMEOUT_S") or default)
    assert api["stop_signal"] == "SIGTERM"
    assert seconds(api["stop_grace_period"]) >= replica_drain_delay(api) + drain + 5


def replica_drain_delay(api: dict) -> float:
    """A replica's effective SHORTCUT_DRAIN_DELAY_S (its environment, else the app's default)."""
    from app.settings import Settings

    value = api["environment"].get("SHORTCUT_DRAIN_DELAY_S")
    return float(value if value is not None else Settings.model_fields["drain_delay_s"].default)


def test_drain_delay_outlasts_the_balancers_checks(replicas: dict, haproxy: dict) -> None:
    """SIGTERM: /ready fails for SHORTCUT_DRAIN_DELAY_S before the drain refuses work; HAProxy must have taken the
    replica out by then (fall x inter, plus one check's timeout for a check answered late), or it passes 503s on."""
    (defaults,) = directive(haproxy["backend shortcut"], "default-server")
    inter = seconds(re.search(r"\binter (\S+)", defaults).group(1))
    fall = int(re.search(r"\bfall (\d+)", defaults).group(1))
    (check_timeout,) = directive(haproxy["defaults"], "timeout check")
    delay = replica_drain_delay(next(iter(replicas.values())))
    assert delay >= fall * inter + seconds(check_timeout.split()[-1])


def test_balancer_serves_every_replica_by_least_connections(haproxy: dict, replicas: dict, scale: dict) -> None:
    backend = haproxy["backend shortcut"]
    assert directive(backend, "balance") == ["balance leastconn"]
    servers = [ln.split()[1:3] for ln in directive(backend, "server")]
    assert servers == [[name, f"{name}:8000"] for name in replicas]
    frontend = haproxy["frontend api"]
    assert directive(frontend, "bind") == ["bind :8000"] and "default_backend shortcut" in frontend
    lb = scale["services"]["lb"]
    assert lb["image"].startswith("haproxy:")
    assert "8000:8000" in lb["ports"]
    assert mount_target(lb, "haproxy/haproxy.cfg") == "/usr/local/etc/haproxy/haproxy.cfg"


def test_health_checks_use_the_readiness_route(haproxy: dict) -> None:
    from app.main import create_app
    from app.settings import Settings

    routes = set(create_app(Settings(), models={}).openapi()["paths"])
    backend = haproxy["backend shortcut"]
    assert "option httpchk" in backend
    (send,) = directive(backend, "http-check send")
    path = re.search(r"uri (\S+)", send).group(1)
    assert path == "/ready" and path in routes and "meth GET" in send
    assert directive(backend, "http-check expect") == ["http-check expect status 200"]
    (defaults,) = directive(backend, "default-server")
    inter = seconds(re.search(r"\binter (\S+)", defaults).group(1))
    fall = int(re.search(r"\bfall (\d+)", defaults).group(1))
    assert " check " in f" {defaults} " and inter * fall <= 5  # a draining replica is out within seconds
    assert "observe layer4" in defaults and "on-error mark-down" in defaults


def test_streams_pass_unbuffered_and_refusals_are_retried(haproxy: dict) -> None:
    everything = [ln for lines in haproxy.values() for ln in lines]
    defaults = haproxy["defaults"]
    assert "option http-no-delay" in defaults  # without it the sse step saw tokens in ~200 ms bursts
    assert not [ln for ln in everything if ln.startswith(("compression", "filter compression"))]
    (retry_on,) = directive(defaults, "retry-on")
    assert {"conn-failure", "empty-response", "503"} <= set(retry_on.split()[1:])  # 503: draining, nothing ran
    # HAProxy retries (L7) only a request it had whole when it sent it; without this, a request whose body came in
    # a second write was forwarded on its headers and its 503 passed to the client (scale smoke, stop step)
    assert "option http-buffer-request" in defaults + haproxy["backend shortcut"]
    # writes of named steering vectors are not replayed after an empty response (they may have been done)
    (no_retry,) = directive(haproxy["backend shortcut"], "http-request disable-l7-retry")
    assert "path_beg /steering/vectors" in no_retry and "!METH_GET" in no_retry
    assert "429" not in retry_on.split()  # queue full: tell the client (Retry-After), do not hammer the others
    assert "option redispatch 1" in defaults
    timeout_server = seconds(directive(defaults, "timeout server")[0].split()[-1])
    assert timeout_server >= 120  # SHORTCUT_REQUEST_TIMEOUT_S plus the wait for a batch slot
    assert any("X-Shortcut-Replica" in ln for ln in haproxy["frontend api"])


def test_prometheus_scrapes_each_replica_and_the_balancer(scale: dict, replicas: dict, haproxy: dict) -> None:
    config = yaml.safe_load(PROM_SCALE.read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = [t for sc in jobs["shortcut-api"]["static_configs"] for t in sc["targets"]]
    assert targets == [f"{name}:8000" for name in replicas]  # each replica, not the balancer's address
    (lb_target,) = [t for sc in jobs["haproxy"]["static_configs"] for t in sc["targets"]]
    assert lb_target == "lb:8404" and "bind :8404" in haproxy["frontend stats"]
    assert any("prometheus-exporter" in ln and "/metrics" in ln for ln in haproxy["frontend stats"])
    prom = scale["services"]["prometheus"]
    assert mount_target(prom, "prometheus/prometheus.scale.yml") == "/etc/prometheus/prometheus.yml"
    assert mount_target(prom, "prometheus/rules.yml") in config["rule_files"]


def test_make_scale_smoke_runs_the_script() -> None:
    text = MAKEFILE.read_text()
    target = re.search(r"^scale-smoke:.*\n((?:\t.*\n)+)", text, re.M)
    assert target and "deploy/scale-smoke.sh" in target.group(1)
    assert re.search(r"^\.PHONY:.*\bscale-smoke\b", text, re.M)


def test_replicas_share_one_steering_volume(replicas: dict, scale: dict) -> None:
    """Every replica mounts the same named volume at SHORTCUT_STEERING_DIR: a vector made through one replica is
    used and deleted through all (`make scale-smoke`'s steering step)."""
    api = next(iter(replicas.values()))
    path = api["environment"]["SHORTCUT_STEERING_DIR"]
    (mount,) = [v for v in api["volumes"] if v.split(":")[1] == path]
    assert mount.split(":")[0] in scale["volumes"]  # a named volume, not a folder of one host
    assert ":ro" not in mount
