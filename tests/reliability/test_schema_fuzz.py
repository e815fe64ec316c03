"""Schema fuzzing: every operation of the app's own OpenAPI schema, driven by schemathesis in-process (ASGI).

Positive (schema-valid) and negative (schema-violating) inputs; every answer must be non-5xx, carry a documented
status and content type, and match its documented schema (errors included). Examples are derandomized, so a run is
reproducible and bounded (about EXAMPLES per mode and operation).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from app.main import create_app
from app.settings import Settings
from tests.conftest import app_settings
from tests.helpers import ERROR_FIELDS

EXAMPLES = 12
MAX_BODY = 65_536  # small enough that over-size negative bodies reach the 413 path

# Limits that depend on the served model or on settings (context window, stop strings, logprobs), an unknown model
# name, a full queue and a steering vector name that is taken (409) are refusals of schema-valid input; each of these
# statuses is documented with ErrorResponse (and the codes a 400 or 404 may carry then: POSITIVE_CODES).
KEY = "fuzz-key-0123456789"  # the app is served with a key, so schemathesis also checks that bad auth is refused
CONFIG = schemathesis.Config.from_dict(
    {
        "auth": {"openapi": {"apiKey": {"bearer": KEY}}},
        "checks": {
            "positive_data_acceptance": {"expected-statuses": ["2XX", 400, 404, 409, 413, 429]},
            "negative_data_rejection": {"expected-statuses": [400, 401, 404, 413, 422, 429]},  # 401: auth left out
        },
    }
)

# README's error table: the 400s a schema-valid body can get (a value the engine cannot serve, a /v1 field not served),
# and the 404 of an unknown model name. Any other 400 or 404 code for schema-valid input is a bug.
POSITIVE_CODES = {
    400: {
        "context_length_exceeded",
        "invalid_value",
        "unsupported_parameter",
        "too_many_prompts",  # /hidden_states: more than SHORTCUT_MAX_PROMPTS
        "patching_grid_too_large",  # /patching: more cells than SHORTCUT_PATCHING_MAX_GRID
    },
    404: {"model_not_found", "steering_vector_not_found"},
}

_SPEC = create_app(Settings(extra_checkpoints_dir=None, api_key=KEY)).openapi()  # building the app loads nothing
OPERATIONS = [(method.upper(), path) for path, ops in _SPEC["paths"].items() for method in ops]


def _has_inputs(method: str, path: str) -> bool:
    op = _SPEC["paths"][path][method.lower()]
    return bool(op.get("parameters") or op.get("requestBody"))


# positive mode for every operation; negative mode only where there are parameters or a body to break
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if _has_inputs(m, p)
]


@pytest.fixture(scope="module")
def api_schema(app_checkpoint: Path) -> Iterator[schemathesis.BaseSchema]:
    """The schema as served by a live in-process app (schemathesis runs its lifespan)."""
    app = create_app(app_settings(app_checkpoint, max_body_bytes=MAX_BODY, api_key=KEY))
    yield schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)
    from schemathesis.python import asgi  # stop the engines of the lifespans schemathesis started

    asgi.shutdown_lifespans()


def test_every_route_is_fuzzed() -> None:
    """The parametrization below covers the API (a route added later is fuzzed automatically)."""
    assert {
        ("POST", "/generate"),
        ("POST", "/v1/completions"),
        ("GET", "/diagnostics"),
        ("POST", "/diagnostics"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
        ("GET", "/v1/models"),
        ("GET", "/health"),
        ("GET", "/ready"),
        ("GET", "/info"),
        ("GET", "/metrics"),
    } <= set(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p}-{mode.value}" for m, p, mode in CASES])
def test_operation(api_schema: schemathesis.BaseSchema, method: str, path: str, mode: GenerationMode) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        response = case.call()
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            body = json.loads(response.content)
            assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
            if mode == GenerationMode.POSITIVE and response.status_code in POSITIVE_CODES:
                assert body["error"]["code"] in POSITIVE_CODES[response.status_code], body
        case.validate_response(response)  # status, content type, headers and body match the documentation

    check()
