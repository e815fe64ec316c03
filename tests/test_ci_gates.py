"""The CI gates (tests/conftest.py): with TEST_REQUIRE_BENCH or TEST_REQUIRE_FUSED set to 1, a skip for a missing
peer or fused step is a failure; without them, or for other reasons, a skip stays a skip."""

from __future__ import annotations

import pytest

from tests.conftest import required_skip

BENCH = "could not import 'ctranslate2': No module named 'ctranslate2'"
FUSED = "the fused step is not built here (make builds it)"


def test_skips_stay_skips_without_a_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_REQUIRE_BENCH", raising=False)
    monkeypatch.delenv("TEST_REQUIRE_FUSED", raising=False)
    assert required_skip(BENCH) is None and required_skip(FUSED) is None


def test_a_gate_turns_its_own_skips_into_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_REQUIRE_BENCH", "1")
    monkeypatch.setenv("TEST_REQUIRE_FUSED", "0")
    assert required_skip(BENCH) == "TEST_REQUIRE_BENCH"
    assert required_skip("could not import 'transformers': No module named 'transformers'") == "TEST_REQUIRE_BENCH"
    assert required_skip(FUSED) is None
    monkeypatch.setenv("TEST_REQUIRE_FUSED", "1")
    assert required_skip(FUSED) == "TEST_REQUIRE_FUSED"
    assert required_skip("this CPU cannot run the avx2 build") == "TEST_REQUIRE_FUSED"
    # an AVX-512 build on an AVX2 CPU, or a missing FBGEMM, are not what the gates require
    assert required_skip("this CPU cannot run the avx512 build") is None
    assert required_skip("no FBGEMM") is None
