"""Service helpers: the intra-op thread policy, giving freed memory back, engine limits from the settings."""

from __future__ import annotations

import os
import platform

import pytest
import torch

from app import service


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_zero_threads_leaves_one_core_to_the_event_loop(restore_threads, monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert service.configure_threads(0) == 3 and torch.get_num_threads() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert service.configure_threads(0) == 1 and torch.get_num_threads() == 1


def test_explicit_threads_are_used_as_given(restore_threads) -> None:
    assert service.configure_threads(2) == 2 and torch.get_num_threads() == 2


def test_release_free_memory_uses_malloc_trim_where_glibc_has_it() -> None:
    assert service.release_free_memory() is (platform.libc_ver()[0] == "glibc")


def test_engine_limits_come_from_settings(make_client) -> None:
    client = make_client(max_batch_size=3, max_queue=5, max_prefill_tokens=40, prefill_chunk=7)
    engine = client.app.state.models["tiny"].engine
    assert (engine.max_batch_size, engine.max_queue, engine.prefill_tokens) == (3, 5, 40)
    assert engine.prefill_chunk == 7
    assert client.post("/generate", json={"prompt": "abc", "max_new_tokens": 2}).status_code == 200


def test_extra_checkpoints_whose_names_are_not_model_names_are_skipped(tmp_path, caplog) -> None:
    """A file stem becomes a model name (in URLs, JSON, logs, the page): one that is not letters, digits and `._-`
    (1..64) is skipped with a warning naming the file, never served under that name."""
    from pathlib import Path

    from app.settings import Settings

    main = tmp_path / "main.safetensors"
    main.write_bytes(b"")  # checkpoint_paths only lists files
    extra = tmp_path / "extra"
    extra.mkdir()
    good = ["second", "v1.2_b-3", "x" * 64]
    bad = ['<img src=x onerror="alert(1)">', "two words", "quo'te", "new\nline", "x" * 65, "ünïcode"]
    for stem in good + bad:
        (extra / f"{stem}.safetensors").write_bytes(b"")
    settings = Settings(checkpoint=main, model_name="main", extra_checkpoints_dir=extra)
    with caplog.at_level("WARNING", logger="app.service"):
        paths = service.checkpoint_paths(settings)
    assert set(paths) == {"main", *good}
    for stem in bad:
        assert any(ascii(stem) in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records), stem
    assert all(isinstance(p, Path) for p in paths.values())
