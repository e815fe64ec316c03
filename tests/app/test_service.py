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
