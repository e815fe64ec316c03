"""OpenAI-compatible /v1: completions, chat completions and models (the serving is in app.openai)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from app.errors import ERRORS
from app.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from app.openai.serving import find_model, model_cards
from app.openai.serving_chat import create_chat_completion
from app.openai.serving_completion import create_completion

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERRORS)
JSON_OR_SSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}
}


@router.post("/completions", response_model=CompletionResponse, responses=JSON_OR_SSE)
async def completions(body: CompletionRequest, request: Request) -> CompletionResponse | StreamingResponse:
    """Text completions, compatible with the `openai` client: `n` choices per prompt, lists of prompts, echo."""
    return await create_completion(body, request)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=JSON_OR_SSE)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletionResponse | StreamingResponse:
    """Chat, rendered as a play script (SHORTCUT_CHAT_TEMPLATE); the reply ends at the next turn marker."""
    return await create_chat_completion(body, request)


@router.get("/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    """The served models."""
    state = request.app.state
    return ModelList(data=model_cards(state.models, state.settings.model_aliases))


@router.get("/models/{model_id}", response_model=ModelCard)
async def model(model_id: str, request: Request) -> ModelCard:
    """One served model, or a 404."""
    state = request.app.state
    return find_model(state.models, state.settings.model_aliases, model_id)
