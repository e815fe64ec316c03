"""Every Prometheus metric the service exports, defined in one place (units in names, explicit buckets)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from model.edits import KINDS
from model.engine import EngineObserver

# sub-millisecond to tens of seconds: suits a CPU model
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
TOKEN_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)
NORM_BUCKETS = (0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
FINISH_REASONS = ("length", "stop", "abort", "timeout", "error")
READOUT_KINDS = ("hidden_states", "generate_hidden_states", "patching")  # what read the stream out
HTTP_METHODS = ("GET", "POST", "HEAD", "OPTIONS")  # any other method is labelled "other"


def method_label(method: str) -> str:
    """A fixed label for a client-chosen HTTP method: one of HTTP_METHODS, else "other"."""
    return method if method in HTTP_METHODS else "other"


class Metrics:
    """The service's metrics on their own registry; `observer(model)` gives each engine its observer."""

    def __init__(self, registry: CollectorRegistry | None = None, resid_norms: bool = True) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.wants_resid_norms = resid_norms
        m = ["model"]  # engine metrics: one series set per served model (a fixed set known at start)
        self.http_duration = Histogram(
            "shortcut_http_request_duration_seconds",
            "HTTP request duration by route template, method and status.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "shortcut_e2e_request_latency_seconds",
            "Generation request latency, submit to finish.",
            m,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "shortcut_time_to_first_token_seconds",
            "Time from submit to the first token.",
            m,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "shortcut_inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
            m,
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "shortcut_request_queue_time_seconds",
            "Time a request waited for a batch slot.",
            m,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("shortcut_prompt_tokens", "Prompt tokens prefilled.", m, registry=r)
        self.generation_tokens = Counter("shortcut_generation_tokens", "Tokens generated.", m, registry=r)
        self.success = Counter(
            "shortcut_request_success",
            "Finished generation requests by finish reason.",
            ["model", "finished_reason"],
            registry=r,
        )
        self.running = Gauge("shortcut_requests_running", "Sequences in the running batch.", m, registry=r)
        self.waiting = Gauge("shortcut_requests_waiting", "Requests waiting for a batch slot.", m, registry=r)
        self.batch_size = Histogram(
            "shortcut_batch_size", "Sequences per batched decode step.", m, buckets=BATCH_BUCKETS, registry=r
        )
        self.model_info = Gauge(
            "shortcut_model_info",
            "The served model (value is always 1).",
            ["model", "checkpoint_sha256", "n_layer", "d_model", "device"],
            registry=r,
        )
        self.interventions = Counter(
            "shortcut_interventions", "Requests served with an intervention, by part.", ["model", "part"], registry=r
        )
        self.steering_vectors = Gauge(
            "shortcut_steering_vectors",
            "Named steering vectors stored, by the served model they were made for (as this replica last read them).",
            m,
            registry=r,
        )
        self.readout = Counter(
            "shortcut_readout_requests",
            "Answered requests that read the residual stream out: POST /hidden_states, /generate with "
            "return_hidden_states, POST /patching.",
            ["model", "kind"],
            registry=r,
        )
        self.hidden_state_bytes = Counter(
            "shortcut_hidden_state_bytes",
            "Bytes of hidden-state arrays answered (before base64 or JSON).",
            m,
            registry=r,
        )
        self.resid_norm = Histogram(
            "shortcut_resid_post_norm",
            "L2 norm of the last-position residual stream after each layer, observed on served prefills.",
            ["model", "layer"],
            buckets=NORM_BUCKETS,
            registry=r,
        )

    def count_readout(self, model: str, kind: str, array_bytes: int = 0) -> None:
        """One answered readout request of `kind` (READOUT_KINDS) and the bytes of the array it carried."""
        if kind in READOUT_KINDS:
            self.readout.labels(model, kind).inc()
        if array_bytes:
            self.hidden_state_bytes.labels(model).inc(array_bytes)

    def observer(self, model: str) -> ModelObserver:
        """The engine observer of the served model `model`; its series exist (at 0) from now on."""
        return ModelObserver(self, model)


class ModelObserver(EngineObserver):
    """Feeds one model's engine measurements into the `model`-labelled metrics (runs on the engine's worker)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.metrics, self.model = metrics, model
        self.wants_resid_norms = metrics.wants_resid_norms
        self.e2e = metrics.e2e.labels(model)
        self.ttft = metrics.ttft.labels(model)
        self.itl = metrics.itl.labels(model)
        self.queue_time = metrics.queue_time.labels(model)
        self.prompt_tokens = metrics.prompt_tokens.labels(model)
        self.generation_tokens = metrics.generation_tokens.labels(model)
        self.running = metrics.running.labels(model)
        self.waiting = metrics.waiting.labels(model)
        self.batch_size = metrics.batch_size.labels(model)
        self.success = {reason: metrics.success.labels(model, reason) for reason in FINISH_REASONS}
        self.interventions: dict[str, Counter] = {part: metrics.interventions.labels(model, part) for part in KINDS}

    def on_prefill(self, prompt_tokens: int, queue_time_s: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.queue_time.observe(queue_time_s)

    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)
        self.generation_tokens.inc()

    def on_tokens(self, inter_token_s: list[float]) -> None:
        for gap in inter_token_s:
            self.itl.observe(gap)

    def on_step(self, batch_size: int) -> None:
        self.batch_size.observe(batch_size)
        self.generation_tokens.inc(batch_size)

    def on_finish(self, reason: str, e2e_s: float, completion_tokens: int) -> None:
        self.success[reason].inc()
        self.e2e.observe(e2e_s)

    def on_queue_change(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def on_intervention(self, parts: set[str]) -> None:
        for part in parts & self.interventions.keys():  # the engine validated them; the label values stay fixed
            self.interventions[part].inc()

    def on_resid_norms(self, norms: list[float]) -> None:
        for layer, value in enumerate(norms):
            self.metrics.resid_norm.labels(self.model, str(layer)).observe(value)


def metric_names() -> set[str]:
    """Every sample name the service can expose (histogram _bucket/_sum/_count, counter _total, ...)."""
    names: set[str] = set()
    suffixes = {
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "counter": ("_total", "_created"),
        "gauge": ("",),
    }
    for family in Metrics().registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names
