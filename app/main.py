"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute

from app import service
from app.auth import require_api_key
from app.errors import install_error_handlers
from app.metrics import Metrics
from app.middleware import ServiceMiddleware, default_allowed_hosts
from app.routes import diagnostics, generate, health, openai, page, readout, steering
from app.service import ServedModel
from app.settings import Settings
from app.steering import SteeringStore

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None, models: dict[str, ServedModel] | None = None, metrics: Metrics | None = None
) -> FastAPI:
    """Build the app. Models load in the lifespan unless preloaded ones (and their metrics) are passed."""
    settings = settings or Settings()
    metrics = metrics or Metrics(resid_norms=settings.resid_norm_metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threads = service.configure_threads(settings.threads)
        device = service.select_device(settings.device)
        served = models if models is not None else service.load_models(settings, metrics, device)
        service.check_aliases(settings.model_aliases, served)
        app.state.models = served
        app.state.device = device
        app.state.steering.open(served)  # a bad vector file is logged with its name and skipped
        log.info(
            "serving %s on %s with %d threads, %s decode weights, %s decode step, %s KV cache",
            ", ".join(served),
            device,
            threads,
            "/".join(sorted({m.engine.decode_weights for m in served.values()})),
            "/".join(sorted({m.engine.decode_backend for m in served.values()})),
            "/".join(sorted({str(m.engine.kv_cache_dtype).removeprefix("torch.") for m in served.values()})),
        )
        for m in served.values():
            if settings.warmup:
                log.info("warm-up of %s took %.3f s", m.name, service.warm_up(m))
            m.engine.start()
        service.release_free_memory()
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            for m in served.values():
                m.engine.stop()

    app = FastAPI(
        title="Shortcut",
        version="0.1.0",
        summary="Serve a deep residual Transformer and see inside its residual stream.",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc come from app.routes.page, with their assets served locally
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.models = {}
    app.state.ready = False
    app.state.draining = False
    app.state.leaving = False  # SIGTERM's pre-drain period: /ready answers 503, requests are still served
    # named steering vectors (`lookup(model, checkpoint_sha256, name, field)` resolves intervention.add names)
    app.state.steering = SteeringStore(settings.steering_dir, settings.steering_max_vectors, metrics)
    install_error_handlers(app)
    app.include_router(health.router)  # probes, /info and /metrics stay open
    app.include_router(page.router)  # the page at /, /docs and /redoc: open, like the schema
    app.mount("/static", page.static_files(), name="static")
    protected = [Depends(require_api_key(settings.api_key))] if settings.api_key is not None else []
    protected_routers = (generate.router, openai.router, diagnostics.router, steering.router, readout.router)
    for router in protected_routers:
        app.include_router(router, dependencies=protected)
    hosts = settings.allowed_hosts if settings.allowed_hosts is not None else default_allowed_hosts(settings.host)
    app.add_middleware(
        ServiceMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        routes=app.routes,
        api_key=settings.api_key,
        protected={r.path for rt in protected_routers for r in rt.routes if isinstance(r, APIRoute)},
        allowed_hosts=hosts,
    )
    return app
