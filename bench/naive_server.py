"""The server a user would write without Shortcut: FastAPI + Hugging Face `generate`, one request at a time.

A plain `def` endpoint (FastAPI runs it in its threadpool), no batching, no streaming, the same GPT-2 model
with our weights copied in (see bench/hf.py). Run: `python -m bench.naive_server --checkpoint PATH --port N`.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
from fastapi import FastAPI
from pydantic import BaseModel, Field

from bench.hf import to_hf
from model.checkpoint import load_checkpoint


class GenerateRequest(BaseModel):
    prompt: str = Field(..., min_length=1)
    max_new_tokens: int = Field(64, ge=1)


class GenerateResponse(BaseModel):
    text: str
    completion_tokens: int


def create_app(checkpoint: str) -> FastAPI:
    """The naive app serving `checkpoint` through a GPT2LMHeadModel copy."""
    hf = to_hf(load_checkpoint(checkpoint).model)
    app = FastAPI(title="naive baseline")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/generate", response_model=GenerateResponse)
    def generate(body: GenerateRequest) -> GenerateResponse:
        ids = torch.tensor([list(body.prompt.encode("utf-8"))])  # (1, T)
        with torch.inference_mode():
            out = hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=body.max_new_tokens,
                min_new_tokens=body.max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )  # (1, T + N)
        new = out[0, ids.shape[1] :].tolist()
        return GenerateResponse(text=bytes(new).decode("utf-8", errors="replace"), completion_tokens=len(new))

    return app


def main() -> None:
    """Parse arguments and serve with uvicorn."""
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = all cores")
    a = p.parse_args()
    torch.set_num_threads(a.threads or len(os.sched_getaffinity(0)))  # as the Shortcut server does
    logging.basicConfig(level=logging.WARNING)
    uvicorn.run(create_app(a.checkpoint), host=a.host, port=a.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
