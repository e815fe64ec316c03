"""`python -m app`: load the checkpoint(s), then serve with uvicorn; SIGTERM drains before exiting."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from types import FrameType

import uvicorn

from app import service
from app.connection import LoopErrorLog, guarded_protocol
from app.main import create_app
from app.metrics import Metrics
from app.middleware import setup_logging
from app.settings import Settings
from model.checkpoint import CheckpointError

log = logging.getLogger("app")
ABORT_GRACE_S = 2.0  # past the drain deadline: time for the aborted requests' 503s / error events to go out
SHUTDOWN_GRACE_S = 3  # then uvicorn's own graceful shutdown (connections closing), not another drain timeout


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: /ready turns 503, new work gets 503, running requests finish, then exit.

    SIGTERM (an orchestrator's stop) first waits `drain_delay_s` with /ready at 503 and requests still served, so a
    load balancer's health checks take the server out before it refuses anything; SIGINT (Ctrl-C) drains at once.
    """

    def __init__(self, config: uvicorn.Config, app, drain_timeout_s: float, drain_delay_s: float = 0.0) -> None:
        super().__init__(config)
        self.fastapi_app, self.drain_timeout_s, self.drain_delay_s = app, drain_timeout_s, drain_delay_s
        self._draining = False

    async def startup(self, sockets: list | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(LoopErrorLog(60.0))  # e.g. accept() failing on EMFILE
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or not self.started:
            super().handle_exit(sig, frame)  # second signal, or not serving yet: stop now
            return
        self._draining = True
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain(signal.Signals(sig).name)))

    async def _drain(self, name: str) -> None:
        state = self.fastapi_app.state
        if name == "SIGTERM" and self.drain_delay_s > 0:
            state.leaving = True
            log.info(
                "%s received: /ready answers 503 for %.1f s (SHORTCUT_DRAIN_DELAY_S) while requests are still "
                "served, so load balancers stop sending; then the drain",
                name,
                self.drain_delay_s,
            )
            await asyncio.sleep(self.drain_delay_s)
        state.draining = True
        engines = [m.engine for m in state.models.values()]
        log.info(
            "%s received: draining %d running / %d waiting requests and %d diagnostics jobs (timeout %.0f s)",
            name,
            sum(e.n_running for e in engines),
            sum(e.n_waiting for e in engines),
            sum(e.n_jobs for e in engines),
            self.drain_timeout_s,
        )
        for e in engines:
            e.begin_drain()
        deadline = asyncio.get_running_loop().time() + self.drain_timeout_s
        ok = all([await e.wait_idle(max(0.0, deadline - asyncio.get_running_loop().time())) for e in engines])
        if ok:
            log.info("drain complete; shutting down")
        else:
            log.warning(
                "drain timed out: ending %d running / %d waiting requests and %d diagnostics jobs with 503",
                sum(e.n_running for e in engines),
                sum(e.n_waiting for e in engines),
                sum(e.n_jobs for e in engines),
            )
            for e in engines:
                e.abort_all()
            for e in engines:
                await e.wait_idle(ABORT_GRACE_S)
        await asyncio.sleep(0.05)  # let the last responses flush
        self.should_exit = True


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, preload the models (failing fast with one clear line), serve."""
    settings = Settings()
    p = argparse.ArgumentParser(description="Serve a Shortcut checkpoint over HTTP.")
    p.add_argument("--host", default=settings.host)
    p.add_argument("--port", type=int, default=settings.port)
    a = p.parse_args(argv)
    settings = settings.model_copy(update={"host": a.host, "port": a.port})  # the Host check knows the bind address
    setup_logging(settings.log_level, settings.log_json)
    metrics = Metrics(resid_norms=settings.resid_norm_metrics)
    try:
        service.configure_threads(settings.threads)
        models = service.load_models(settings, metrics, service.select_device(settings.device))
    except (CheckpointError, RuntimeError, OSError, ValueError) as e:  # ValueError: settings the engine refuses
        log.error("cannot start: %s", e)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - load_models names the file in a CheckpointError; this is the last net
        log.error("cannot start: %s: %s", type(e).__name__, e)
        sys.exit(2)
    app = create_app(settings, models=models, metrics=metrics)
    protocol = guarded_protocol(
        settings.header_timeout_s,
        settings.body_timeout_s,
        settings.max_connections,
        write_timeout_s=settings.write_timeout_s,
        max_per_address=settings.max_connections_per_address,
        api_key=settings.api_key,
    )
    config = uvicorn.Config(
        app,
        host=a.host,
        port=a.port,
        access_log=False,
        log_config=None,
        http=protocol,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    # What is loaded now (modules, weights, the app) lives as long as the process: out of the collector's sight, a full
    # collection set off by a body of many small JSON arrays walks only the new objects (a 1 MB body of `[]`s: ~1.2 s
    # of event loop before, ~0.1 s after).
    gc.collect()
    gc.freeze()
    server = DrainingServer(config, app, settings.drain_timeout_s, settings.drain_delay_s)
    server.run()


if __name__ == "__main__":
    main()
