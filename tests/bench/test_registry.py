"""The bench's section registry: every section is registered once, in the order it runs, and --sections refuses
names it does not know."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import run
from bench.sections import SECTIONS, Context, Part, run_sections, section
from tests.conftest import build_model

ALL = (  # every section, in the order `run()` has always run them (metrics and the report keep this order)
    "engine",
    "profile",
    "gil",
    "step_threads",
    "hf",
    "diagnostics",
    "tuned_lens",
    "readout",
    "chunked",
    "fairness",
    "http",
    "resid",
    "contention",
    "naive",
    "interventions",
    "peers",
    "aoti",
    "memory",
)


def test_registry_lists_every_section_in_run_order() -> None:
    assert tuple(SECTIONS) == ALL
    assert all(sec.help and sec.name == name for name, sec in SECTIONS.items())
    assert SECTIONS["http"].fn is SECTIONS["resid"].fn  # one server for both
    assert run.parse_args([]).sections == list(ALL)
    help_text = subprocess.run(
        [sys.executable, "-m", "bench.run", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    for name, sec in SECTIONS.items():
        assert f"  {name}" in help_text and sec.help[:40] in " ".join(help_text.split())


def test_unknown_section_is_refused_with_the_known_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        run.parse_args(["--sections", "engine,nope,peer"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown sections: nope, peer" in err
    assert "known: " + ", ".join(ALL) in err
    assert run.parse_args(["--sections", " engine , gil,"]).sections == ["engine", "gil"]


def test_a_section_registered_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="'engine' registered twice"):
        section("engine", "again")(lambda ctx: Part())
    assert SECTIONS["engine"].fn.__module__ == "bench.sections.inprocess"


def test_run_sections_merges_parts_in_order_and_runs_a_shared_function_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[str] = []

    def first(ctx: Context) -> Part:
        calls.append("first")
        return Part(details={"a": 1}, metrics={"x": 1.0})

    def shared(ctx: Context) -> Part:
        calls.append(f"shared http={ctx.selected('http')} resid={ctx.selected('resid')}")
        return Part(metrics={"y": ctx.metrics["x"] + 1})  # reads what an earlier section measured

    monkeypatch.setattr("bench.sections.registry.SECTIONS", {})
    section("first", "one")(first)
    section("http", "two", also={"resid": "three"})(shared)
    section("unused", "four")(lambda ctx: pytest.fail("not selected"))
    a = run.parse_args(["--sections", "engine"])  # parsed against the real registry
    a.sections = ["resid", "http", "first"]  # the order asked for does not matter
    ctx = Context(a, build_model(), tmp_path / "c.safetensors", ["ab"], [97, 98], tmp_path)
    run_sections(ctx)
    assert calls == ["first", "shared http=True resid=True"]
    assert ctx.details == {"a": 1} and ctx.metrics == {"x": 1.0, "y": 2.0}
