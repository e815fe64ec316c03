"""The registry of bench sections: each section is a function that registers itself with `@section`.

A section takes the run's `Context` (options, model, prompts, and what the sections before it measured) and returns
its `Part` of the results: entries for `details` and for `metrics`, merged by `bench.run.run` in registration
order. One function may serve several names (`also=`) when they share a costly setup, e.g. one server for `http`
and `resid`; it then runs once, and asks `ctx.selected(name)` which of its names were asked for.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.config import ModelConfig
from model.transformer import Transformer


@dataclass
class Context:
    """What every section may read. `metrics` and `details` hold what the sections before it returned."""

    a: argparse.Namespace
    model: Transformer
    ckpt: Path
    prompts: list[str]
    ids0: list[int]
    tmp: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg(self) -> ModelConfig:
        return self.model.config

    @property
    def batch(self) -> int:
        return self.a.batch

    def selected(self, name: str) -> bool:
        return name in self.a.sections


@dataclass
class Part:
    """A section's share of the results: keys of `details` and of `metrics`, in the order they are printed."""

    details: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


SectionFn = Callable[[Context], Part]


@dataclass(frozen=True)
class Section:
    name: str
    help: str
    fn: SectionFn


SECTIONS: dict[str, Section] = {}  # name -> section, in the order they run


def section(name: str, help: str, *, also: dict[str, str] | None = None) -> Callable[[SectionFn], SectionFn]:
    """Register the decorated function as section `name` (and as each name of `also`, name -> help, which run
    with it); sections run in the order they are registered."""

    def register(fn: SectionFn) -> SectionFn:
        for n, h in {name: help, **(also or {})}.items():
            if n in SECTIONS:
                raise ValueError(f"bench section {n!r} registered twice")
            SECTIONS[n] = Section(n, h, fn)
        return fn

    return register


def run_sections(ctx: Context) -> None:
    """Run every selected section once, in registration order, merging each one's part into `ctx`."""
    done: set[SectionFn] = set()
    for sec in SECTIONS.values():
        if not ctx.selected(sec.name) or sec.fn in done:
            continue
        done.add(sec.fn)
        part = sec.fn(ctx)
        ctx.details.update(part.details)
        ctx.metrics.update(part.metrics)


def timed(label: str, fn: Callable[[], Any]) -> Any:
    """Run `fn`, printing its label before and its wall time after."""
    t0 = time.perf_counter()
    print(f"... {label}", flush=True)
    out = fn()
    print(f"    done in {time.perf_counter() - t0:.1f} s", flush=True)
    return out
