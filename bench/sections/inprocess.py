"""Sections that run the engine or the model in this process: engine, profile, gil, step_threads, hf, diagnostics,
tuned_lens."""

from __future__ import annotations

import logging
from typing import Any

import torch

from bench import inproc
from bench.prompts import make_prompts
from bench.sections.registry import Context, Part, section, timed
from bench.stats import median
from model.checkpoint import sha256_file
from model.lens import TunedLens, find_lens

log = logging.getLogger("bench")


@section("engine", "the engine in-process at batch 1: tok/s, decode-only tok/s, CPU ms per token")
def engine(ctx: Context) -> Part:
    a = ctx.a
    eng = timed("engine, batch 1", lambda: inproc.engine_bs1(ctx.model, ctx.ids0, a.max_new_tokens, a.reps))
    return Part(
        details={"engine_bs1": eng},
        metrics={
            "decode_bs1_tok_s": eng["tok_s"],
            "decode_bs1_decode_only_tok_s": eng["decode_only_tok_s"],
            "decode_bs1_cpu_ms_per_token": eng["cpu_ms_per_token"],
        },
    )


@section("profile", "torch profile of a batch-1 and a batch-B TorchScript decode step, by kind of op")
def profile(ctx: Context) -> Part:
    a, B = ctx.a, ctx.batch
    d: dict[str, Any] = {}
    d["profile_decode_bs1"] = timed(
        "profile of a batch-1 decode step", lambda: inproc.profile_decode(ctx.model, ctx.ids0, a.profile_steps)
    )
    d[f"profile_decode_bs{B}"] = timed(
        f"profile of a batch-{B} decode step", lambda: inproc.profile_decode(ctx.model, ctx.ids0, a.profile_steps, B)
    )
    return Part(details=d)


@section("gil", "eager, TorchScript and fused decode steps alone and next to a busy Python thread")
def gil(ctx: Context) -> Part:
    out = timed(
        "decode step next to a busy Python thread",
        lambda: inproc.gil_contention(ctx.model, ctx.ids0, ctx.a.profile_steps, (1, ctx.batch)),
    )
    return Part(details={"gil": out})


@section("step_threads", "the fused step on 1 and 2 threads (float16 and int8 weights), wall and CPU ms per step")
def step_threads(ctx: Context) -> Part:
    from bench.fused import step_threads as run
    from model.fast import fused_available

    if not fused_available():
        log.warning("step_threads: the fused step is not built here; skipped")
        return Part(details={"step_threads": None})
    out = timed(
        "the fused step on 1 and 2 threads",
        lambda: run(ctx.model, (1, 2), (1, ctx.batch), ("float16", "int8"), rounds=max(3, ctx.a.reps)),
    )
    B = ctx.batch
    return Part(
        details={"step_threads": out},
        metrics={
            f"step_bs{B}_threads2_wall_speedup": out[f"float16_bs{B}"]["threads2"]["wall_speedup"],
            "step_bs1_threads2_wall_speedup": out["float16_bs1"]["threads2"]["wall_speedup"],
            f"step_bs{B}_int8_over_float16_wall": round(
                out[f"float16_bs{B}"]["threads1"]["wall_ms"] / out[f"int8_bs{B}"]["threads1"]["wall_ms"], 3
            ),
        },
    )


@section("hf", "Hugging Face GPT2LMHeadModel.generate with our weights copied in (needs transformers)")
def hf(ctx: Context) -> Part:
    out = timed("transformers GPT2LMHeadModel.generate", lambda: hf_section(ctx))
    B = ctx.batch
    return Part(
        details={"hf": out},
        metrics={
            "hf_generate_bs1_tok_s": out["bs1_tok_s"],
            "hf_generate_bs1_cpu_ms_per_token": out["bs1_cpu_ms_per_token"],
            f"hf_generate_bs{B}_tok_s": out[f"bs{B}_tok_s"],
        },
    )


def hf_section(ctx: Context) -> dict[str, Any]:
    """Weight copy + equivalence check + generate at batch 1 and batch `a.batch`."""
    from bench import hf as hfb

    a, ids0 = ctx.a, ctx.ids0
    hf = hfb.to_hf(ctx.model)
    eq = hfb.check_equivalence(ctx.model, hf)
    out: dict[str, Any] = {
        "equivalence": {
            "max_abs_diff": eq.max_abs_diff,
            "allclose": eq.allclose,
            "input_shape": list(eq.shape),
            "atol": eq.atol,
            "rtol": eq.rtol,
        }
    }
    if not eq.allclose:
        log.warning(
            "HF copy does NOT match our model (max abs diff %.3g): the baseline computes another function",
            eq.max_abs_diff,
        )
    hfb.hf_generate(hf, [ids0], min(8, a.max_new_tokens))  # warm-up
    n = a.max_new_tokens
    bs1, bs1_cpu, new = [], [], None
    for _ in range(a.reps):
        new, s, cpu = hfb.hf_generate(hf, [ids0], n)
        bs1.append(n / s)
        bs1_cpu.append(1e3 * cpu / n)
    batch = [list(p.encode()) for p in ctx.prompts[: a.batch]]
    bsb = []
    for _ in range(a.reps):
        _, s, _ = hfb.hf_generate(hf, batch, n)
        bsb.append(a.batch * n / s)
    out.update(
        {
            "bs1_tok_s": median(bs1),
            "bs1_cpu_ms_per_token": median(bs1_cpu),
            f"bs{a.batch}_tok_s": median(bsb),
            "reps_bs1_tok_s": bs1,
            f"reps_bs{a.batch}_tok_s": bsb,
        }
    )
    engine_tokens = ctx.details.get("engine_bs1", {}).get("tokens")
    if engine_tokens is not None and new is not None:
        out["greedy_tokens_match_engine"] = engine_tokens == new[0].tolist()
    return out


@section("diagnostics", "/diagnostics' norms pass against a plain forward over the whole window, in-process")
def diagnostics(ctx: Context) -> Part:
    diag_ids = list(make_prompts(1, min(256, ctx.cfg.block_size))[0].encode())
    dg = timed("diagnostics vs forward", lambda: inproc.diagnostics_vs_forward(ctx.model, diag_ids, ctx.a.diag_reps))
    return Part(
        details={"diagnostics": dg},
        metrics={
            "diagnostics_norms_ms": dg["diagnostics_norms_ms"],
            "forward_ms": dg["forward_ms"],
            "diagnostics_norms_cpu_ms": dg["diagnostics_norms_cpu_ms"],
            "forward_cpu_ms": dg["forward_cpu_ms"],
        },
    )


@section("tuned_lens", "/diagnostics with tuned_lens=5 against logit_lens=5 on a 256-byte prompt, in-process")
def tuned_lens(ctx: Context) -> Part:
    lens, trained = checkpoint_lens(ctx)
    diag_ids = list(make_prompts(1, min(256, ctx.cfg.block_size))[0].encode())
    out = timed("tuned vs logit lens", lambda: inproc.lens_cost(ctx.model, lens, diag_ids, ctx.a.diag_reps))
    out["lens"] = "trained, beside the checkpoint" if trained else "none beside the checkpoint: zero translators"
    return Part(
        details={"tuned_lens": out},
        metrics={
            "diagnostics_logit_lens_ms": out["diagnostics_logit_lens_ms"],
            "diagnostics_tuned_lens_ms": out["diagnostics_tuned_lens_ms"],
            "tuned_over_logit_lens": out["tuned_over_logit"],
        },
    )


def checkpoint_lens(ctx: Context) -> tuple[TunedLens, bool]:
    """The tuned lens beside the bench's checkpoint, or (its cost is the same) zero translators; and which."""
    found = find_lens(ctx.ckpt, ctx.cfg, sha256_file(ctx.ckpt))
    if found is not None:
        return found, True
    L, C = ctx.cfg.n_layer, ctx.cfg.d_model
    return TunedLens(torch.zeros(L - 1, C, C), torch.zeros(L - 1, C)), False
