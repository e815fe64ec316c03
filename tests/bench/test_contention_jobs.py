"""bench.contention's jobs are requests the server runs (a job the server refused would time nothing)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from bench.contention import JOBS, job_payload


@pytest.mark.parametrize("job", sorted(JOBS))
def test_each_job_is_a_request_the_server_answers(make_client: Callable[..., TestClient], job: str) -> None:
    client = make_client()
    path, payload = job_payload(job, "ROMEO: But soft")
    resp = client.post(path, json=payload)
    assert resp.status_code == 200, resp.text
    if job == "export":  # every site of every layer at every position, as the bench says
        body = resp.json()
        assert body["sites"] == ["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"]
        assert body["shape"][1] == len(body["layers"]) and body["shape"][3] == len("ROMEO: But soft")
