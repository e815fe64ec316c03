"""Liveness, readiness, info and metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.errors import error_response
from app.schemas import ErrorResponse
from model.checkpoint import code_version

router = APIRouter(tags=["operations"])


@router.get("/health")
@router.head("/health", include_in_schema=False)  # load balancers probe with HEAD
async def health() -> dict[str, str]:
    """Liveness: 200 while the process runs."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"model": ErrorResponse, "description": "not loaded yet, or draining"}})
@router.head("/ready", include_in_schema=False)
async def ready(request: Request) -> Response:
    """Readiness: 200 once the model is loaded and warmed up; 503 before that, and from SIGTERM on (through the
    pre-drain period, SHORTCUT_DRAIN_DELAY_S, in which requests are still served, and the drain)."""
    state = request.app.state
    if state.draining:
        return error_response(503, "server is draining", code="draining")
    if state.leaving:
        return error_response(
            503, "server is shutting down: stop sending it requests (it serves them until it drains)", code="draining"
        )
    if not state.ready:
        return error_response(503, "model is not loaded yet", code="not_ready")
    return Response('{"status":"ready"}', media_type="application/json")


VAL_LOSS_NOTE = (
    "training's own estimate when the checkpoint was kept: mean loss over train_config.eval_batches batches of "
    "random validation windows, every byte of a window scored (its first bytes with little context); the "
    "validation loss the README states (every byte scored once with >= 128 bytes of context) is "
    "`python -m training.evaluate`'s"
)


def checkpoint_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's training metadata as /info shows it: without the optimizer state, and the training-time
    `val_loss` under a name that says what it measured (it is not the README's validation loss)."""
    shown = {k: v for k, v in metadata.items() if k not in ("train_state", "val_loss")}
    if metadata.get("val_loss") is not None:
        shown["val_loss_training_estimate"] = {"nats_per_byte": metadata["val_loss"], "measured": VAL_LOSS_NOTE}
    return shown


@router.get("/info")
async def info(request: Request) -> dict:
    """Served models: config, parameter count, checkpoint path and sha256, device, dtype, version."""
    state = request.app.state
    models = {}
    for name, m in state.models.items():
        ck = m.checkpoint
        models[name] = {
            "config": ck.config.to_dict(),
            "parameters": ck.model.num_params(),
            "checkpoint_path": str(ck.path),
            "checkpoint_sha256": ck.sha256,
            "checkpoint_metadata": checkpoint_metadata(ck.metadata),
            "dtype": str(next(ck.model.parameters()).dtype).removeprefix("torch."),
        }
    return {
        "version": code_version(),
        "default_model": state.settings.model_name,
        "device": str(getattr(state, "device", "unknown")),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "ready": state.ready,
        "models": models,
    }


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition format",
        }
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus exposition of every service metric."""
    # built in a worker thread: a large exposition must never hold up the event loop (and so the token streams)
    body = await asyncio.to_thread(generate_latest, request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
