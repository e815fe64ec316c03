"""`python -m app`: load the checkpoint(s), then serve with uvicorn; SIGTERM drains before exiting."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from types import FrameType

import uvicorn

from app import service
from app.main import create_app
from app.metrics import Metrics
from app.middleware import setup_logging
from app.settings import Settings
from model.checkpoint import CheckpointError

log = logging.getLogger("app")


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: /ready turns 503, new work gets 503, running requests finish, then exit."""

    def __init__(self, config: uvicorn.Config, app, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.fastapi_app, self.drain_timeout_s = app, drain_timeout_s
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or not self.started:
            super().handle_exit(sig, frame)  # second signal, or not serving yet: stop now
            return
        self._draining = True
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain(signal.Signals(sig).name)))

    async def _drain(self, name: str) -> None:
        state = self.fastapi_app.state
        state.draining = True
        engines = [m.engine for m in state.models.values()]
        log.info("%s received: draining %d running / %d waiting requests (timeout %.0f s)", name,
                 sum(e.n_running for e in engines), sum(e.n_waiting for e in engines), self.drain_timeout_s)
        for e in engines:
            e.begin_drain()
        ok = all([await e.wait_idle(self.drain_timeout_s) for e in engines])
        log.info("drain %s; shutting down", "complete" if ok else "timed out")
        await asyncio.sleep(0.05)  # let the last responses flush
        self.should_exit = True


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, preload the models (failing fast with one clear line), serve."""
    settings = Settings()
    p = argparse.ArgumentParser(description="Serve a Shortcut checkpoint over HTTP.")
    p.add_argument("--host", default=settings.host)
    p.add_argument("--port", type=int, default=settings.port)
    a = p.parse_args(argv)
    setup_logging(settings.log_level, settings.log_json)
    metrics = Metrics(resid_norms=settings.resid_norm_metrics)
    try:
        service.configure_threads(settings.threads)
        models = service.load_models(settings, metrics, service.select_device(settings.device))
    except (CheckpointError, RuntimeError, OSError) as e:
        log.error("cannot start: %s", e)
        sys.exit(2)
    app = create_app(settings, models=models, metrics=metrics)
    config = uvicorn.Config(app, host=a.host, port=a.port, access_log=False, log_config=None,
                            timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)))
    server = DrainingServer(config, app, settings.drain_timeout_s)
    server.run()


if __name__ == "__main__":
    main()
