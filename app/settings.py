"""Service settings from environment variables (prefix SHORTCUT_)."""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

import model

CHECKPOINTS_DIR = Path(model.__file__).resolve().parent / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINTS_DIR / "shakespeare.safetensors"
ALIAS_NAME = re.compile(r"[A-Za-z0-9._:/-]{1,64}")
MAX_ALIASES = 64


class Settings(BaseSettings):
    """Every knob of the server; each field is read from SHORTCUT_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="SHORTCUT_", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    checkpoint: Path = DEFAULT_CHECKPOINT
    model_name: str = Field("shakespeare", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    model_aliases: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="other names clients may send as `model`, each for a served model, like vLLM's "
        "--served-model-name: 'alias=served,alias2=served' (e.g. gpt-3.5-turbo=shakespeare); default none (404)",
    )
    extra_checkpoints_dir: Path | None = Field(
        CHECKPOINTS_DIR, description="also serve every *.safetensors in this folder, named by file stem ('' = none)"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = all cores but one")
    api_key: SecretStr | None = None
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_queue: int = Field(256, ge=0)
    decode_weights: Literal["auto", "float32", "float16", "int8"] = Field(
        "auto",
        description="weights of the decode step; auto = float16 where FBGEMM runs it (x86 CPU); int8 (a scale per "
        "output, activations quantized per row per step) needs the fused step",
    )
    decode_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="threads of the fused decode step (the numbers do not depend on them); 0 = the CPUs this "
        "process may use (affinity and cgroup CPU quota)",
    )
    decode_backend: Literal["auto", "fused", "torchscript"] = Field(
        "auto",
        description="decode step: the fused C step (built at install when a compiler is present) or "
        "TorchScript; auto = fused where it is built and runs",
    )
    kv_cache_dtype: Literal["auto", "float32", "float16"] = Field(
        "auto",
        description="keys/values cached for decoding; auto = float16 with the fused step and float16 weights "
        "(half the memory and the bytes attention reads), else float32; float16 needs the fused step",
    )
    max_prefill_tokens: int = Field(
        512, ge=1, description="padded prompt tokens prefilled together in one forward (longer prompts go alone)"
    )
    prefill_chunk: int = Field(
        32,
        ge=0,
        description="while sequences decode, prompt tokens prefilled per step: a longer prompt is prefilled in chunks "
        "of this many tokens between decode steps (streams wait at most one chunk); 0 = off (whole prompts)",
    )
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_stop_strings: int = Field(16, ge=0)
    max_stop_length: int = Field(64, ge=1)
    max_logprobs: int = Field(20, ge=0, le=256)
    default_max_new_tokens: int = Field(64, ge=1)
    chat_template: str = Field("{name}:\n{content}\n\n", description="one chat turn; see README, OpenAI section")
    max_n: int = Field(8, ge=1, le=1024, description="most choices per prompt on /v1 (`n`)")
    max_prompts: int = Field(16, ge=1, le=1024, description="most prompts in one /v1/completions request")
    request_timeout_s: float = Field(120.0, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    drain_delay_s: float = Field(
        5.0,
        ge=0,
        le=300,
        description="on SIGTERM, /ready answers 503 for this long while requests are still served, so a load "
        "balancer's health checks take the server out before the drain refuses work (0 = drain at once)",
    )
    header_timeout_s: float = Field(10.0, gt=0, description="a request's headers must arrive within this time")
    body_timeout_s: float = Field(30.0, gt=0, description="a request's body must arrive within this time")
    max_connections: int = Field(512, ge=1, description="open connections; a request on one more gets 503")
    max_connections_per_address: int = Field(
        128, ge=0, description="open connections from one client address (0 = no limit); one more is closed with 503"
    )
    write_timeout_s: float = Field(
        30.0, gt=0, description="a client that reads nothing of its answer for this long is disconnected (499)"
    )
    max_pending_events: int = Field(
        64, ge=1, le=100_000, description="events of one sequence waiting for a client to read them; past it, 499"
    )
    max_answer_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="estimated size of one answer (JSON or the whole stream); over it, 413"
    )
    allowed_hosts: Annotated[tuple[str, ...] | None, NoDecode] = Field(
        None,
        description="Host header values served (comma-separated, '*' = any); default: localhost names and "
        "the bind address (any when bound to 0.0.0.0 or ::)",
    )
    diagnostics_share: float = Field(
        0.5, gt=0, le=1, description="most of the worker's time /diagnostics jobs may take while sequences decode"
    )
    steering_dir: Path | None = Field(
        None,
        description="folder of named steering vectors, one safetensors file each (shared by replicas on a shared "
        "volume); unset = in memory only",
    )
    steering_max_vectors: int = Field(256, ge=0, le=100_000, description="most named steering vectors stored")
    steering_max_prompts: int = Field(64, ge=1, le=1024, description="most prompts per set making a steering vector")
    steering_max_prompt_bytes: int = Field(
        4096, ge=1, le=1_000_000, description="most UTF-8 bytes of one prompt making a steering vector"
    )
    steering_max_vector_floats: int = Field(
        16384, ge=1, le=65536, description="most floats in an uploaded steering vector (it must also be d_model long)"
    )
    hidden_states_max_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        le=2**31,
        description="most bytes of the hidden-state array one answer carries (POST /hidden_states, /generate's "
        "return_hidden_states): floats x 4 (float32) or x 2 (float16), before base64 or JSON",
    )
    patching_max_grid: int = Field(
        4096, ge=1, le=1_000_000, description="most patched runs (sites x layers x positions) in one POST /patching"
    )
    warmup: bool = True
    resid_norm_metrics: bool = Field(True, description="observe per-layer residual norms of served prefills")
    log_json: bool = False
    log_level: str = "INFO"

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(h.strip().lower() for h in value.split(",") if h.strip()) or None
        return value

    @field_validator("model_aliases", mode="before")
    @classmethod
    def _alias_pairs(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        pairs: dict[str, str] = {}
        for item in (p.strip() for p in value.split(",")):
            if not item:
                continue
            alias, sep, target = (x.strip() for x in item.partition("="))
            if not sep or not alias or not target:
                raise ValueError(f"SHORTCUT_MODEL_ALIASES: {item!r} is not alias=served_model")
            if alias in pairs:
                raise ValueError(f"SHORTCUT_MODEL_ALIASES: {alias!r} is given twice")
            pairs[alias] = target
        return pairs

    @field_validator("model_aliases")
    @classmethod
    def _alias_names(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_ALIASES:
            raise ValueError(f"SHORTCUT_MODEL_ALIASES: at most {MAX_ALIASES} aliases")
        for alias, target in value.items():
            for name in (alias, target):
                if not ALIAS_NAME.fullmatch(name):
                    raise ValueError(
                        f"SHORTCUT_MODEL_ALIASES: {name!r} is not a model name (1-64 of A-Z a-z 0-9 . _ - : /)"
                    )
        return value

    @field_validator("extra_checkpoints_dir", "api_key", "steering_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("chat_template")
    @classmethod
    def _turn_template(cls, value: str) -> str:
        try:
            parts = list(string.Formatter().parse(value))
        except ValueError as e:
            raise ValueError(f"SHORTCUT_CHAT_TEMPLATE: {e}") from None
        fields = [(f, spec, conv) for _, f, spec, conv in parts if f is not None]
        if fields != [("name", "", None), ("content", "", None)] or not parts[-1][0] or parts[-1][1] is not None:
            raise ValueError(
                "SHORTCUT_CHAT_TEMPLATE needs {name}, then {content}, each once, then the text that "
                "ends a turn (the stop string), e.g. '{name}:\\n{content}\\n\\n'"
            )
        return value

    @field_validator("api_key")
    @classmethod
    def _printable_ascii_key(cls, value: SecretStr | None) -> SecretStr | None:
        # HTTP header values arrive as Latin-1; a key outside printable ASCII could never match
        if value is not None and not all(33 <= ord(c) < 127 for c in value.get_secret_value()):
            raise ValueError("SHORTCUT_API_KEY must be printable ASCII without spaces")
        return value
