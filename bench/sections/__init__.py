"""Bench sections (`python -m bench.run --sections ...`), registered by `@section` in the modules below.

The modules are imported in the order their sections run (`MODULES`); within a module, in the order they are
defined. To add a section: write `@section("name", "what it measures")` over a function `Context -> Part` in one of
them (or a new module named in `MODULES`), and document its keys in bench/README.md.
"""

from __future__ import annotations

import importlib

from bench.sections.registry import SECTIONS, Context, Part, Section, run_sections, section, timed

MODULES = ("inprocess", "readout", "prefill", "served", "compare")  # in the order their sections run
for _module in MODULES:
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["SECTIONS", "Context", "Part", "Section", "run_sections", "section", "timed", "MODULES"]
