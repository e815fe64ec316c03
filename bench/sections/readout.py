"""The readout section: hidden-state export and activation patching, in-process (bench/readout.py)."""

from __future__ import annotations

from bench import readout
from bench.prompts import make_prompts
from bench.sections.registry import Context, Part, section, timed


@section("readout", "hidden-state export bytes/s and a patching grid batched vs one patch per forward, in-process")
def readout_section(ctx: Context) -> Part:
    ids = list(make_prompts(1, min(256, ctx.cfg.block_size))[0].encode())
    exp = timed("hidden-state export", lambda: readout.export(ctx.model, ids))
    clean = list(b"ROMEO: I love thee, Juli")
    corrupt = list(b"ROMEO: I love thee, Romi")
    grid = timed("patching grid", lambda: readout.patching_grid(ctx.model, clean, corrupt, ("resid_pre",)))
    return Part(
        details={"readout": {"export": exp, "patching": grid}},
        metrics={
            "export_bytes_per_s": exp["bytes_per_s"],
            "patching_cells_per_s_batched": grid["batched"]["cells_per_s"],
            "patching_cells_per_s_naive": grid["naive"]["cells_per_s"],
        },
    )
