"""deploy/k8s: the Kustomize overlays render (real kustomize, from kubectl), every resource is valid for a current
Kubernetes (kubernetes-validate, strict) or against its vendored CRD schema, and the manifests agree with the app:
metric names, probe paths, settings, drain timeout, the image's user and the bench's sizing."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest

from tests.deploy.kube import CRDValidator, kubectl, render
from tests.deploy.test_deploy_config import promql_metric_names

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = {"example": K8S / "overlays" / "example", "example-keda": K8S / "overlays" / "example-keda"}
ADAPTER_VALUES = K8S / "autoscaling" / "prometheus-adapter-values.yaml"
BENCH = ROOT / "bench" / "results" / "latest.json"
DOCKERFILE = ROOT / "Dockerfile"
K8S_VERSION = "1.37"  # the newest kubernetes-validate 1.37 knows
NAMESPACED = {
    "ConfigMap",
    "Deployment",
    "Service",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "ServiceMonitor",
    "HorizontalPodAutoscaler",
    "ScaledObject",
    "PersistentVolumeClaim",
}

pytestmark = pytest.mark.skipif(kubectl() is None, reason="kubectl (kustomize) missing: install the dev extra")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(path) for name, path in OVERLAYS.items()}


@pytest.fixture(scope="module")
def crds() -> CRDValidator:
    return CRDValidator()


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} resources"
    return found[0]


def pod_spec(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def container(docs: list[dict]) -> dict:
    (c,) = pod_spec(docs)["containers"]
    return c


def quantity(q: str | int | float) -> float:
    """A Kubernetes quantity ('2', '500m', '768Mi', '1G') as a number (bytes or cores)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    assert m, f"bad quantity {q!r}"
    scale = {
        None: 1,
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }[m.group(2)]
    return float(m.group(1)) * scale


def label_selector_matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels", "matchExpressions"} and "matchExpressions" not in selector
    return selector["matchLabels"].items() <= labels.items()


@pytest.fixture(scope="module")
def app_routes() -> set[str]:
    from app.main import create_app
    from app.settings import Settings

    return set(create_app(Settings(), models={}).openapi()["paths"])  # every route the app serves


@pytest.fixture(scope="module")
def app_metric_names() -> set[str]:
    from app.metrics import metric_names

    return metric_names()


# ---- rendering and schema validation ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overlay", "autoscaler"), [("example", "HorizontalPodAutoscaler"), ("example-keda", "ScaledObject")]
)
def test_overlay_renders_one_stack_with_one_autoscaler(rendered: dict, overlay: str, autoscaler: str) -> None:
    docs = rendered[overlay]
    kinds = sorted(d["kind"] for d in docs)
    expected = {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "PersistentVolumeClaim",
        autoscaler,
    }
    assert kinds == sorted(expected), kinds  # one of each, and never both autoscalers on one Deployment
    ns = one(docs, "Namespace")["metadata"]["name"]
    for d in docs:
        if d["kind"] in NAMESPACED:
            assert d["metadata"].get("namespace") == ns, d["metadata"]
    kustomization = yaml.safe_load((OVERLAYS[overlay] / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    assert container(docs)["image"] == f"{image['newName']}:{image['newTag']}"
    assert (
        image["name"]
        == yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())["spec"]["template"]["spec"]["containers"][0][
            "image"
        ]
    )


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_every_resource_is_valid_for_current_kubernetes(rendered: dict, crds: CRDValidator, overlay: str) -> None:
    problems, custom = [], 0
    for doc in rendered[overlay]:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if crds.knows(doc):
            custom += 1
            problems += [f"{name}: {e}" for e in crds.errors(doc)]
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{name}: {'/'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{name}: {e.message} (a CRD kind needs its schema in tests/deploy/schemas/)")
    assert not problems, "\n".join(problems)
    # the ServiceMonitor (and the KEDA ScaledObject) went through the vendored CRDs
    assert custom == len([d for d in rendered[overlay] if d["kind"] in {"ServiceMonitor", "ScaledObject"}]) >= 1


def test_strict_validation_rejects_typos_and_bad_types(rendered: dict) -> None:
    deployment = one(rendered["example"], "Deployment")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe "] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)
    bad_type = copy.deepcopy(deployment)
    bad_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "sixty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad_type, K8S_VERSION, strict=True)


def test_vendored_crds_reject_invalid_custom_resources(rendered: dict, crds: CRDValidator) -> None:
    scaled = one(rendered["example-keda"], "ScaledObject")
    monitor = one(rendered["example"], "ServiceMonitor")
    assert crds.errors(scaled) == [] and crds.errors(monitor) == []

    def broken(doc: dict, edit) -> list[str]:
        doc = copy.deepcopy(doc)
        edit(doc["spec"])
        return crds.errors(doc)

    assert broken(scaled, lambda s: s.update(minReplicaCount="two"))
    assert broken(scaled, lambda s: s.update(maxReplicaCount=2**31))  # int32
    assert broken(scaled, lambda s: s.pop("triggers"))
    assert broken(scaled, lambda s: s.update(minReplicas=1))  # an HPA field, unknown here
    assert broken(scaled, lambda s: s["triggers"][0]["metadata"].update(threshold=2))  # metadata values are strings
    assert broken(monitor, lambda s: s["endpoints"][0].update(scheme="gopher"))
    assert broken(monitor, lambda s: s["endpoints"][0].update(interval="5 seconds"))
    assert broken(monitor, lambda s: s.pop("selector"))
    assert broken(monitor, lambda s: s["endpoints"][0].update(tlsConfig={"insecureSkipVerify": True}))  # not vendored


# ---- agreement with the app -------------------------------------------------------------------------------
def hpa_targets(docs: list[dict]) -> dict[str, float]:
    hpa = one(docs, "HorizontalPodAutoscaler")
    out = {}
    for m in hpa["spec"]["metrics"]:
        assert m["type"] == "Pods", "scale on per-pod load, not CPU"
        assert m["pods"]["target"]["type"] == "AverageValue"
        out[m["pods"]["metric"]["name"]] = quantity(m["pods"]["target"]["averageValue"])
    return out


def keda_targets(docs: list[dict]) -> dict[str, float]:
    out = {}
    for t in one(docs, "ScaledObject")["spec"]["triggers"]:
        assert t["type"] == "prometheus" and t.get("metricType") == "AverageValue"
        (name,) = promql_metric_names(t["metadata"]["query"])
        out[name] = float(t["metadata"]["threshold"])
    return out


def test_autoscalers_scale_on_queue_depth_and_running_rows(rendered: dict, app_metric_names: set[str]) -> None:
    hpa, keda = hpa_targets(rendered["example"]), keda_targets(rendered["example-keda"])
    assert set(hpa) == {"shortcut_requests_waiting", "shortcut_requests_running"}
    assert hpa == keda, "the HPA and the KEDA alternative should scale on the same targets"
    assert set(hpa) <= app_metric_names
    max_batch = int(one(rendered["example"], "ConfigMap")["data"]["SHORTCUT_MAX_BATCH_SIZE"])
    assert 0 < hpa["shortcut_requests_running"] < max_batch  # scale before the batch is full
    a = one(rendered["example"], "HorizontalPodAutoscaler")["spec"]
    k = one(rendered["example-keda"], "ScaledObject")["spec"]
    assert (a["minReplicas"], a["maxReplicas"]) == (k["minReplicaCount"], k["maxReplicaCount"])


def test_prometheus_adapter_exposes_what_the_hpa_reads(rendered: dict, app_metric_names: set[str]) -> None:
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    exposed = {}
    for rule in rules:
        series = promql_metric_names(rule["seriesQuery"])
        assert series and series <= app_metric_names, rule["seriesQuery"]
        assert re.search(r'namespace!=""', rule["seriesQuery"]) and re.search(r'pod!=""', rule["seriesQuery"])
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        (metric,) = series
        assert re.fullmatch(rule["name"]["matches"], metric)
        # one value per pod even when the series carry more labels (e.g. model=...): sum by the pod
        assert re.fullmatch(r"sum\(<<\.Series>>\{<<\.LabelMatchers>>\}\) by \(<<\.GroupBy>>\)", rule["metricsQuery"])
        exposed[rule["name"]["as"]] = metric
    assert set(hpa_targets(rendered["example"])) <= set(exposed)
    assert all(exposed[name] == name for name in hpa_targets(rendered["example"]))


def test_keda_queries_select_this_service_and_sum_over_its_pods(rendered: dict) -> None:
    docs = rendered["example-keda"]
    ns, service = one(docs, "Namespace")["metadata"]["name"], one(docs, "Service")["metadata"]["name"]
    for trigger in one(docs, "ScaledObject")["spec"]["triggers"]:
        query = trigger["metadata"]["query"]
        assert re.fullmatch(r"sum\(\w+\{[^}]*\}\)", query), query  # the total; AverageValue divides by the pods
        matchers = dict(re.findall(r'(\w+)="([^"]*)"', query))
        assert matchers == {"namespace": ns, "service": service}, query
        assert trigger["metadata"]["serverAddress"].startswith("http")


def test_service_monitor_scrapes_every_pod_on_the_metrics_route(rendered: dict, app_routes: set[str]) -> None:
    docs = rendered["example"]
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert label_selector_matches(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert "jobLabel" not in monitor["spec"]  # job = the Service name, which the KEDA queries select on
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] in app_routes and endpoint["path"] == "/metrics"


def test_probes_use_app_routes(rendered: dict, app_routes: set[str]) -> None:
    c = container(rendered["example"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    expected = {"startupProbe": "/health", "readinessProbe": "/ready", "livenessProbe": "/health"}
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path and path in app_routes
        assert get["port"] in ports
    from app.settings import Settings

    data = one(rendered["example"], "ConfigMap")["data"]
    assert ports["http"] == int(data.get("SHORTCUT_PORT", Settings.model_fields["port"].default))
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60  # model load + warm-up on a busy node


def effective_setting(docs: list[dict], name: str) -> float:
    """The pod's effective SHORTCUT_<NAME>: env, then the ConfigMap, then the app's default."""
    from app.settings import Settings

    env = {e["name"]: e.get("value") for e in container(docs).get("env", [])}
    data = one(docs, "ConfigMap")["data"]
    key = f"SHORTCUT_{name.upper()}"
    value = env.get(key) or data.get(key)
    return float(value) if value is not None else float(Settings.model_fields[name].default)


def drain_timeout(docs: list[dict]) -> float:
    return effective_setting(docs, "drain_timeout_s")


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_grace_period_covers_prestop_and_drain(rendered: dict, overlay: str) -> None:
    docs = rendered[overlay]
    spec, c = pod_spec(docs), container(docs)
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    delay = effective_setting(docs, "drain_delay_s")
    assert pre_stop >= 5  # endpoints and proxies need a few seconds to drop the pod
    assert delay <= pre_stop  # the sleep is the pre-drain period; the app's delay would only stack on it
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + delay + drain_timeout(docs) + 5, (
        "kubelet SIGKILLs after the grace period: it must cover the preStop sleep, the app's pre-drain delay "
        "and its drain timeout"
    )


def test_pod_is_restricted_and_runs_as_the_image_user(rendered: dict) -> None:
    docs = rendered["example"]
    spec, c = pod_spec(docs), container(docs)
    uid = int(re.search(r"useradd --uid (\d+)", DOCKERFILE.read_text()).group(1))
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == uid
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]} and not sc.get("privileged")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]  # the one writable path
    assert spec["automountServiceAccountToken"] is False
    labels = one(docs, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_settings_from_configmap_and_key_from_secret(rendered: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import Settings

    docs = rendered["example"]
    c, spec, cm = container(docs), pod_spec(docs), one(docs, "ConfigMap")
    assert c["envFrom"] == [{"configMapRef": {"name": cm["metadata"]["name"]}}]
    fields = {f"SHORTCUT_{name.upper()}" for name in Settings.model_fields}
    assert set(cm["data"]) <= fields, set(cm["data"]) - fields
    for key in [k for k in os.environ if k.startswith("SHORTCUT_")]:
        monkeypatch.delenv(key)
    for key, value in cm["data"].items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert (settings.host, settings.device) == ("0.0.0.0", "cpu")
    cpus = quantity(c["resources"]["limits"]["cpu"])
    assert 1 <= settings.threads <= cpus - 1  # 0 would count the node's CPUs, not the limit; one core for the loop

    env = {e["name"]: e for e in c["env"]}
    key = env["SHORTCUT_API_KEY"]
    assert "value" not in key and set(key["valueFrom"]) == {"secretKeyRef"}
    assert not key["valueFrom"]["secretKeyRef"].get("optional", False)  # no key, no pod: never serve open by mistake
    secret_like = [e for e in c["env"] if re.search(r"KEY|TOKEN|PASSWORD|SECRET", e["name"]) and "value" in e]
    assert not secret_like and not re.search(r"KEY|TOKEN|PASSWORD|SECRET", " ".join(cm["data"]))
    assert not [d for d in docs if d["kind"] == "Secret"]  # made outside git (deploy/README.md)
    # a Service named e.g. "shortcut" would inject SHORTCUT_PORT=tcp://...; service links are off
    assert spec["enableServiceLinks"] is False


def test_resources_are_guaranteed_and_sized_from_the_bench(rendered: dict) -> None:
    bench = json.loads(BENCH.read_text())
    c = container(rendered["example"])
    assert c["resources"]["requests"] == c["resources"]["limits"]  # Guaranteed QoS
    limits = c["resources"]["limits"]
    torch_threads = bench["machine"]["torch_threads"]
    assert quantity(limits["cpu"]) == torch_threads + 1, (
        "size the CPU as the bench ran: its torch threads + one core for the event loop"
    )
    peak_rss = bench["metrics"]["server_peak_rss_mb"] * 2**20
    assert 1.5 * peak_rss <= quantity(limits["memory"]) <= 3 * peak_rss, "memory: 1.5-3x the bench's peak RSS"


def test_selectors_ports_and_policies_line_up(rendered: dict) -> None:
    docs = rendered["example"]
    deployment, service = one(docs, "Deployment"), one(docs, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert label_selector_matches(deployment["spec"]["selector"], pod_labels)
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http" and port["targetPort"] == "http"
    assert "http" in {p["name"] for p in container(docs)["ports"]}
    pdb = one(docs, "PodDisruptionBudget")
    assert label_selector_matches(pdb["spec"]["selector"], pod_labels) and pdb["spec"]["maxUnavailable"] == 1
    policy = one(docs, "NetworkPolicy")["spec"]
    assert label_selector_matches(policy["podSelector"], pod_labels) and policy["policyTypes"] == ["Ingress"]
    assert [r["ports"] for r in policy["ingress"]] == [[{"port": "http", "protocol": "TCP"}]]  # the API port only
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["minReplicas"] >= 2  # with maxUnavailable 1, a node drain never takes the last pod
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it; apply would reset it otherwise
    so = one(rendered["example-keda"], "ScaledObject")["spec"]
    assert so["scaleTargetRef"]["name"] == deployment["metadata"]["name"] and so["minReplicaCount"] >= 2


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_every_pod_shares_one_steering_volume(rendered: dict, overlay: str) -> None:
    """Named steering vectors live in SHORTCUT_STEERING_DIR on a ReadWriteMany claim every pod mounts, so a vector
    made through one pod works through all of them (docs/steering.md)."""
    docs = rendered[overlay]
    c, spec, cm = container(docs), pod_spec(docs), one(docs, "ConfigMap")
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    path = cm["data"]["SHORTCUT_STEERING_DIR"]
    assert volumes[mounts[path]]["persistentVolumeClaim"] == {"claimName": pvc["metadata"]["name"]}
    uid = int(re.search(r"useradd --uid (\d+)", DOCKERFILE.read_text()).group(1))
    assert (
        f"-o shortcut -g shortcut -m 0750 {path}" in DOCKERFILE.read_text()
        and spec["securityContext"]["fsGroup"] == uid
    )
