"""Peers built from our own checkpoint: CTranslate2 (float32 and int8) against our engine and our bare decode step,
by CPU time per token in one process with one intra-op thread each, and the machine's limit for this model.

CTranslate2 gets our exact model as a `TransformerDecoderModelSpec` (what its GPT-2 converter builds): pre-LayerNorm,
GELU (tanh), learned positions, the unembedding tied to the token embedding, a 256-entry byte vocabulary.
`ct2_spec` refuses a config it cannot express (the plain stack without residual connections).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.stats import median
from model.decode import FastDecoder, auto_decode_weights
from model.engine import Engine, FinishEvent, SamplingParams
from model.fast import FusedDecoder, auto_kv_dtype, make_decoder
from model.kv_cache import KVCache
from model.transformer import Transformer

VOCAB = [f"<0x{i:02X}>" for i in range(256)]  # CTranslate2 wants token strings; token id == byte value


def ct2_spec(model: Transformer) -> Any:
    """Our model as a CTranslate2 decoder spec (float32 numpy copies of the weights)."""
    from ctranslate2.specs import common_spec, transformer_spec

    cfg = model.config
    if not cfg.residual:
        raise ValueError("CTranslate2 has no plain (non-residual) stack")
    if cfg.vocab_size != len(VOCAB):
        raise ValueError(f"a byte vocabulary of {len(VOCAB)} is expected, not {cfg.vocab_size}")
    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        cfg.n_layer, cfg.n_head, pre_norm=True, activation=common_spec.Activation.GELUTanh
    )

    def arr(t: torch.Tensor | None, n: int = 0) -> Any:
        return (t.detach().float() if t is not None else torch.zeros(n)).contiguous().numpy().copy()

    def norm(s: Any, ln: torch.nn.LayerNorm) -> None:
        s.gamma, s.beta = arr(ln.weight), arr(ln.bias, ln.weight.shape[0])

    def linear(s: Any, lin: torch.nn.Linear) -> None:
        s.weight = arr(lin.weight)  # (out, in), as nn.Linear keeps it
        if lin.bias is not None:
            s.bias = arr(lin.bias)

    d = spec.decoder
    d.scale_embeddings = False
    d.embeddings.weight = arr(model.wte.weight)
    d.position_encodings.encodings = arr(model.wpe.weight)
    norm(d.layer_norm, model.ln_f)
    for s, b in zip(d.layer, model.blocks, strict=True):
        norm(s.self_attention.layer_norm, b.ln_1)
        linear(s.self_attention.linear[0], b.attn.c_attn)  # fused q, k, v: the same (3C, C) layout as ours
        linear(s.self_attention.linear[1], b.attn.c_proj)
        norm(s.ffn.layer_norm, b.ln_2)
        linear(s.ffn.linear_0, b.mlp.c_fc)
        linear(s.ffn.linear_1, b.mlp.c_proj)
    d.projection.weight = arr(model.wte.weight)  # tied unembedding, no bias
    spec.register_vocabulary(VOCAB)
    # no end token is ever used (generation passes end_token=[]), but the config wants the three names
    spec.config.bos_token = spec.config.eos_token = spec.config.unk_token = VOCAB[0]
    return spec


def convert_ct2(model: Transformer, out_dir: Path, quantization: str = "float32") -> Path:
    """Write our model as a CTranslate2 model directory with weights stored as `quantization` (float32, int8)."""
    spec = ct2_spec(model)
    spec.validate()
    spec.optimize(quantization=quantization)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec.save(str(out_dir))
    return out_dir


def ct2_generator(path: Path, compute_type: str, threads: int = 1) -> Any:
    """A CPU `ctranslate2.Generator` with `threads` intra-op threads and one worker."""
    import ctranslate2

    return ctranslate2.Generator(
        str(path), device="cpu", compute_type=compute_type, intra_threads=threads, inter_threads=1
    )


def ct2_greedy(gen: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt, exactly `max_new_tokens` tokens (no end token)."""
    res = gen.generate_batch(
        [[VOCAB[i] for i in p] for p in prompts],
        max_length=max_new_tokens,
        sampling_topk=1,
        include_prompt_in_result=False,
        end_token=[],
    )
    return [r.sequences_ids[0] for r in res]


def our_greedy(model: Transformer, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Reference greedy decoding: a full forward over the (window-cropped) sequence per token."""
    idx = torch.tensor([prompt])  # (1, T)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            nxt = int(model(idx[:, -model.config.block_size :]).logits[0, -1].argmax())
            out.append(nxt)
            idx = torch.cat([idx, torch.tensor([[nxt]])], dim=1)
    return out


def weight_bytes(model: Transformer, bytes_per_weight: float) -> float:
    """Bytes of weights read to decode one token at batch 1: every matrix once (the tied embedding as the
    unembedding), plus the float32 vectors (LayerNorms, biases) and the row of wpe; the embedding row is negligible."""
    cfg = model.config
    mats = cfg.n_layer * (4 * cfg.d_model * cfg.d_model + 2 * cfg.d_model * cfg.d_ff) + cfg.vocab_size * cfg.d_model
    vecs = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1) + cfg.d_model
    return mats * bytes_per_weight + 4 * vecs


def read_bandwidth(n_bytes: int, rounds: int = 7) -> dict[str, Any]:
    """Bytes per CPU second of `torch.sum` over a float32 buffer of `n_bytes` (one thread), median over rounds.

    A buffer the size of the weights stays in the same cache level as the weights (on a machine whose L3 holds
    them, L3); summing is a pure streaming read, the best any GEMV of those weights can do."""
    x = torch.rand(max(1, n_bytes // 4))
    reps = max(1, int(2e8 // max(n_bytes, 1)))
    x.sum()
    per_round = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(reps):
            x.sum()
        per_round.append((time.process_time() - t0) / reps)
    s = median(per_round)
    return {"buffer_bytes": x.numel() * 4, "gb_per_s": x.numel() * 4 / s / 1e9, "reps_s": per_round}


def step_loop(
    decoder: FastDecoder | FusedDecoder | Callable[..., Any],
    cfg: Any,
    batch: int,
    start: int,
    steps: int,
    cache: KVCache | None = None,
) -> float:
    """CPU seconds per step of `steps` greedy decode steps from position `start` (the argmax fed back), on a cache of
    the dtype the engine would give this step (`auto_kv_dtype`)."""
    cache = cache or KVCache(cfg, batch, dtype=auto_kv_dtype(decoder))
    tok, pos = torch.zeros(batch, dtype=torch.long), torch.full((batch,), start)
    with torch.inference_mode():
        t0 = time.process_time()
        for _ in range(steps):
            tok = decoder(tok, cache, pos).logits.argmax(-1)
            pos = pos + 1
        return (time.process_time() - t0) / steps


async def _engine_cpu(engine: Engine, prompts: list[list[int]], n: int) -> tuple[float, float, list[int]]:
    """(CPU s of the whole run, CPU s from the first token to the last, first row's tokens) through the engine."""
    c0 = time.process_time()
    handles = [engine.submit(p, SamplingParams(max_new_tokens=n, temperature=0.0)) for p in prompts]
    first: float | None = None
    tokens: list[int] = []
    for i, h in enumerate(handles):
        async for ev in h:
            if isinstance(ev, FinishEvent):
                if ev.reason != "length":
                    raise RuntimeError(f"engine request finished with {ev.reason}: {ev.error}")
            else:
                first = first if first is not None else time.process_time()
                if i == 0:
                    tokens.append(ev.token_id)
    end = time.process_time()
    return end - c0, end - (first if first is not None else c0), tokens


def compare(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    ct2_dirs: dict[str, Path],
    batches: tuple[int, ...] = (1, 32),
    rounds: int = 5,
) -> dict[str, Any]:
    """CPU ms per generated token: our engine, our bare decode step and each CTranslate2 model, at each batch size,
    interleaved in `rounds` rounds (medians). One torch thread and one CTranslate2 intra-op thread.

    `e2e`: a whole request (prefill of the prompt + `max_new_tokens`) per generated token; `decode`: the decode part
    only (engine: first to last token; CTranslate2: the same run minus a 1-token run of the same prompts, per
    further token). The bare step (`step`) runs the engine's decode step + argmax from the prompt's length, as the
    engine does; when that is the fused C step, the TorchScript step is timed too (`step_torchscript`).
    """
    cfg = model.config
    n = max_new_tokens
    gens = {name: ct2_generator(path, ct) for name, (path, ct) in _ct2_targets(ct2_dirs).items()}
    weights = auto_decode_weights()
    steps: dict[str, Any] = {"step": make_decoder(model, weights)}  # what the engine builds
    if isinstance(steps["step"], FusedDecoder):
        steps["step_torchscript"] = FastDecoder(model, weights=weights)
    start = len(prompts[0])
    out: dict[str, Any] = {
        "max_new_tokens": n,
        "prompt_tokens": start,
        "rounds": rounds,
        "batches": list(batches),
        "our_weights": weights,
        "threads": torch.get_num_threads(),
        "engine_decode_step": type(steps["step"]).__name__,
        "ct2_compute_types": {k: v[1] for k, v in _ct2_targets(ct2_dirs).items()},
    }
    times: dict[str, list[float]] = {}

    def add(key: str, seconds: float, tokens: int) -> None:
        times.setdefault(key, []).append(1e3 * seconds / tokens)

    async def main() -> None:
        engine = Engine(model, max_batch_size=max(batches))
        engine.warm_up()
        engine.start()
        try:
            for B in batches:
                await _engine_cpu(engine, prompts[:B], 8)  # warm-up
                for g in gens.values():
                    ct2_greedy(g, prompts[:B], 8)
                for dec in steps.values():
                    step_loop(dec, cfg, B, start, 3)
            for _ in range(rounds):
                for B in batches:
                    ps = prompts[:B]
                    e2e, dec, _ = await _engine_cpu(engine, ps, n)
                    add(f"engine_bs{B}_e2e", e2e, B * n)
                    add(f"engine_bs{B}_decode", dec, B * (n - 1))
                    for name, dec in steps.items():
                        add(f"{name}_bs{B}_decode", step_loop(dec, cfg, B, start, n - 1), B)
                    for name, g in gens.items():
                        c0 = time.process_time()
                        ct2_greedy(g, ps, n)
                        c1 = time.process_time()
                        ct2_greedy(g, ps, 1)
                        c2 = time.process_time()
                        add(f"{name}_bs{B}_e2e", c1 - c0, B * n)
                        add(f"{name}_bs{B}_decode", (c1 - c0) - (c2 - c1), B * (n - 1))
        finally:
            engine.stop()

    asyncio.run(main())
    for key, t in times.items():
        out[f"{key}_cpu_ms_per_token"] = median(t)
        out[f"{key}_reps_cpu_ms_per_token"] = t
    for B in batches:
        for name in gens:
            for ours in ("engine", *steps):
                for kind in ("e2e", "decode"):
                    mine = out.get(f"{ours}_bs{B}_{kind}_cpu_ms_per_token")
                    peer = out.get(f"{name}_bs{B}_{kind}_cpu_ms_per_token")
                    if mine and peer:  # > 1: we are faster
                        out[f"{ours}_vs_{name}_bs{B}_{kind}"] = peer / mine
    return out


def _ct2_targets(ct2_dirs: dict[str, Path]) -> dict[str, tuple[Path, str]]:
    """name -> (model dir, compute type): each stored model run in its own precision."""
    return {name: (path, "int8" if "int8" in name else "float32") for name, path in ct2_dirs.items()}


def tokens_match(model: Transformer, ct2_dir: Path, prompt: list[int], max_new_tokens: int) -> dict[str, Any]:
    """Whether CTranslate2 float32's greedy tokens equal our reference forward's on `prompt`."""
    ours = our_greedy(model, prompt, max_new_tokens)
    theirs = ct2_greedy(ct2_generator(ct2_dir, "float32"), [prompt], max_new_tokens)[0]
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    return {"equal": ours == theirs, "first_difference": first, "tokens": max_new_tokens}


def machine_limit(model: Transformer, our_weights: str, ours_ms: float | None) -> dict[str, Any]:
    """Weight bytes per batch-1 token / the measured read bandwidth over a buffer that size: tokens/s no batch-1
    decoder can beat on one core (attention's KV reads and all arithmetic come on top), and our fraction of it."""
    per = {"float32": 4.0, "float16": 2.0, "int8": 1.0}
    out: dict[str, Any] = {}
    for fmt, b in per.items():
        nb = weight_bytes(model, b)
        bw = read_bandwidth(int(nb))
        out[f"{fmt}_weight_bytes_per_token"] = nb
        out[f"{fmt}_read_gb_per_s"] = bw["gb_per_s"]
        out[f"{fmt}_limit_tok_s"] = bw["gb_per_s"] * 1e9 / nb
    out["our_weights"] = our_weights
    if ours_ms:
        out["ours_tok_per_cpu_s"] = 1e3 / ours_ms
        out["ours_fraction_of_limit"] = out["ours_tok_per_cpu_s"] / out[f"{our_weights}_limit_tok_s"]
    return out


def thread_check(
    ct2_dir: Path,
    compute_type: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    batches: tuple[int, ...],
    rounds: int = 3,
) -> dict[str, Any]:
    """Wall tokens/s of CTranslate2 with 1 and with 2 intra-op threads at each batch size (medians of `rounds`
    interleaved runs): whether the peer is faster with 2 threads, in which case a fair comparison gives it 2."""
    gens = {t: ct2_generator(ct2_dir, compute_type, threads=t) for t in (1, 2)}
    out: dict[str, Any] = {"compute_type": compute_type, "rounds": rounds}
    for B in batches:
        ps = prompts[:B]
        for g in gens.values():
            ct2_greedy(g, ps, 8)  # warm-up
        runs: dict[int, list[float]] = {t: [] for t in gens}
        for _ in range(rounds):
            for t, g in gens.items():
                t0 = time.perf_counter()
                ct2_greedy(g, ps, max_new_tokens)
                runs[t].append(B * max_new_tokens / (time.perf_counter() - t0))
        for t, v in runs.items():
            out[f"bs{B}_threads{t}_tok_s"] = median(v)
        out[f"bs{B}_faster_with_2"] = out[f"bs{B}_threads2_tok_s"] > out[f"bs{B}_threads1_tok_s"]
    return out
