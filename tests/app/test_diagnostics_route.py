"""GET/POST /diagnostics through the app: same numbers as the library call, both formats, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from model import tokenizer
from model.checkpoint import load_checkpoint
from model.diagnostics import DiagnosticsOptions, run_diagnostics
from tests.helpers import assert_error

PROMPT = "To be, or not to be"


def test_json_matches_the_library_computation(client: TestClient, app_checkpoint: Path) -> None:
    r = client.get(
        "/diagnostics",
        params={"prompt": PROMPT, "logit_lens": 3, "gradients": "true", "ablation": "true", "per_token": "true"},
    )
    assert r.status_code == 200
    got = r.json()
    ck = load_checkpoint(app_checkpoint)
    opts = DiagnosticsOptions(per_token=True, logit_lens=3, gradients=True, ablation=True)
    want = run_diagnostics(ck.model, tokenizer.encode(PROMPT), opts)
    assert got["model"] == {
        "name": "tiny",
        "n_layer": ck.config.n_layer,
        "d_model": ck.config.d_model,
        "residual": True,
        "checkpoint_sha256": ck.sha256,
    }
    assert got["tokens"] == want["tokens"]
    for key in ("loss", "layers", "summary"):
        _assert_close(got[key], want[key], key)


def _assert_close(got: object, want: object, path: str) -> None:
    """Equal structure and strings; numbers equal to float32 rounding (reductions may be ordered differently)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for k in want:
            _assert_close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), path
    else:
        assert got == want, path


def test_post_equals_get(client: TestClient) -> None:
    get = client.get("/diagnostics", params={"prompt": PROMPT, "logit_lens": 2}).json()
    post = client.post("/diagnostics", json={"prompt": PROMPT, "logit_lens": 2}).json()
    assert get == post


def test_text_report_by_format_or_accept_header(client: TestClient) -> None:
    by_param = client.get("/diagnostics", params={"prompt": PROMPT, "format": "text", "ablation": "true"})
    by_accept = client.get(
        "/diagnostics", params={"prompt": PROMPT, "ablation": "true"}, headers={"Accept": "text/plain"}
    )
    for r in (by_param, by_accept):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        assert all(len(line) <= 80 for line in r.text.splitlines())
        assert r.text.startswith("diagnostics:")
    assert by_param.text == by_accept.text


def test_errors_have_the_standard_shape(client: TestClient) -> None:
    assert_error(client.get("/diagnostics", params={"prompt": ""}), 422)
    over = client.get("/diagnostics", params={"prompt": "x" * 65})
    assert_error(over, 400)
    assert "65 tokens" in over.json()["error"]["message"] and "64 tokens" in over.json()["error"]["message"]
    assert_error(client.get("/diagnostics", params={"prompt": PROMPT, "model": "nope"}), 404)
    assert_error(client.get("/diagnostics", params={"prompt": PROMPT, "logit_lens": -1}), 422)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"per_token": True, "logit_lens": 3, "gradients": True, "ablation": True},
        {
            "ablation": True,
            "intervention": {
                "skip": [{"layer": 1, "part": "attn"}],
                "scale": [{"layer": 0, "part": "mlp", "factor": 2.0}],
            },
        },
    ],
)
def test_json_follows_the_documented_schema(client: TestClient, options: dict) -> None:
    """Every key the route returns is in DiagnosticsResponse (extra keys are refused), so /openapi.json is true."""
    from app.schemas import DiagnosticsResponse

    r = client.post("/diagnostics", json={"prompt": PROMPT, **options})
    assert r.status_code == 200, r.text
    parsed = DiagnosticsResponse.model_validate(r.json())
    assert parsed.model_dump(exclude_unset=True) == r.json()
    one = client.post("/diagnostics", json={"prompt": "x", "ablation": True}).json()  # notes, loss None
    assert DiagnosticsResponse.model_validate(one).loss is None and one["notes"]
    ref = client.get("/openapi.json").json()["paths"]["/diagnostics"]["post"]["responses"]["200"]["content"]
    assert ref["application/json"]["schema"] == {"$ref": "#/components/schemas/DiagnosticsResponse"}
