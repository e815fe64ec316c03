"""The AOTInductor peer: our decode step exported with a dynamic batch dimension, compiled ahead of time by
`torch._inductor.aoti_compile_and_package` (a C++ compiler at build time) and run through `aoti_load_package`.

The exported step is the reference maths in float32 written for export: no data-dependent shapes, so attention runs
over the whole window with a mask (cached keys at or after each row's position get -inf) plus the new token's own
key, and the package returns the new keys/values, which `AotiDecoder` writes into the cache with one `index_copy_`
each (a graph that mutates the cache in place makes the package copy the whole cache every layer). Not used by the
server.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.kv_cache import KVCache
from model.transformer import Transformer


class ExportStep(nn.Module):
    """One decode step: (tokens (B,), pos (B,), k_cache, v_cache (L, B, nh, S, hd)) -> (logits (B, V), new keys,
    new values (L, B, nh, hd)). Residual pre-LayerNorm blocks only."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        cfg = model.config
        if not cfg.residual:
            raise ValueError("the exported step covers the residual stack only")
        self.nh, self.C, self.L = cfg.n_head, cfg.d_model, cfg.n_layer
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

        def buf(name: str, t: torch.Tensor | None, n: int = 0) -> None:
            self.register_buffer(name, (t.detach().float() if t is not None else torch.zeros(n)).clone())

        buf("wte", model.wte.weight)
        buf("wpe", model.wpe.weight)
        buf("ln_f_w", model.ln_f.weight)
        buf("ln_f_b", model.ln_f.bias, cfg.d_model)
        for i, b in enumerate(model.blocks):
            for name, lin in (("qkv", b.attn.c_attn), ("o", b.attn.c_proj), ("fc", b.mlp.c_fc), ("p", b.mlp.c_proj)):
                buf(f"w_{name}{i}", lin.weight.t().contiguous())  # (in, out)
                buf(f"b_{name}{i}", lin.bias, lin.weight.shape[0])
            buf(f"ln1_w{i}", b.ln_1.weight)
            buf(f"ln1_b{i}", b.ln_1.bias, cfg.d_model)
            buf(f"ln2_w{i}", b.ln_2.weight)
            buf(f"ln2_b{i}", b.ln_2.bias, cfg.d_model)

    def forward(
        self, tokens: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (B, V), the new keys and values (L, B, nh, hd)); the caches are only read (positions < pos)."""
        B, C, nh = tokens.shape[0], self.C, self.nh
        hd, S = C // nh, k_cache.shape[3]
        x = self.wte[tokens] + self.wpe[pos]  # (B, C)
        cached = torch.arange(S, device=pos.device)[None, :] < pos[:, None]  # (B, S): keys already in the cache
        bias = torch.zeros(B, S).masked_fill(~cached, float("-inf"))[:, None, None, :]  # (B, 1, 1, S)
        new_k, new_v = [], []
        for i in range(self.L):
            g = {
                n: getattr(self, f"{n}{i}")
                for n in (
                    "ln1_w",
                    "ln1_b",
                    "w_qkv",
                    "b_qkv",
                    "w_o",
                    "b_o",
                    "ln2_w",
                    "ln2_b",
                    "w_fc",
                    "b_fc",
                    "w_p",
                    "b_p",
                )
            }
            h = F.layer_norm(x, [C], g["ln1_w"], g["ln1_b"])
            qkv = torch.addmm(g["b_qkv"], h, g["w_qkv"]).view(B, 3, nh, hd)
            q, k, v = qkv[:, 0, :, None, :], qkv[:, 1, :, None, :], qkv[:, 2, :, None, :]  # (B, nh, 1, hd)
            s_cache = (q @ k_cache[i].transpose(-1, -2)) * self.scale + bias  # (B, nh, 1, S)
            s_new = (q * k).sum(-1, keepdim=True) * self.scale  # (B, nh, 1, 1): the new token's own key
            att = torch.cat([s_cache, s_new], dim=-1).softmax(-1)
            y = (att[..., :S] @ v_cache[i] + att[..., S:] * v).reshape(B, C)
            x = x + torch.addmm(g["b_o"], y, g["w_o"])
            h = F.layer_norm(x, [C], g["ln2_w"], g["ln2_b"])
            h = F.gelu(torch.addmm(g["b_fc"], h, g["w_fc"]), approximate="tanh")
            x = x + torch.addmm(g["b_p"], h, g["w_p"])
            new_k.append(k[:, :, 0])
            new_v.append(v[:, :, 0])
        logits = F.layer_norm(x, [C], self.ln_f_w, self.ln_f_b) @ self.wte.t()
        return logits, torch.stack(new_k), torch.stack(new_v)


def compile_step(model: Transformer, out: Path, max_batch: int = 64) -> tuple[Path, float]:
    """Export the step with a dynamic batch dimension and compile it to a .pt2 package; (path, seconds)."""
    cfg = model.config
    step = ExportStep(model).eval()
    B = 2
    cache = KVCache(cfg, B)
    args = (torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long), cache.k, cache.v)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    shapes = {"tokens": {0: batch}, "pos": {0: batch}, "k_cache": {1: batch}, "v_cache": {1: batch}}
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(step, args, dynamic_shapes=shapes)
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(out))
    return Path(path), time.perf_counter() - t0


class AotiDecoder:
    """The compiled package as a decode step: `(tokens, cache, pos)` -> an object with `.logits` (B, V)."""

    def __init__(self, path: Path) -> None:
        self.runner = torch._inductor.aoti_load_package(str(path))

    def __call__(self, tokens: torch.Tensor, cache: KVCache, pos: torch.Tensor) -> Any:
        logits, k, v = self.runner(tokens, pos, cache.k, cache.v)
        L, B, nh, hd = k.shape
        S = cache.k.shape[3]
        slot = ((torch.arange(B)[:, None] * nh + torch.arange(nh)) * S + pos[:, None]).view(-1)  # (B*nh,)
        cache.k.view(L, -1, hd).index_copy_(1, slot, k.reshape(L, B * nh, hd))  # cache[l, b, h, pos[b]] = k[l, b, h]
        cache.v.view(L, -1, hd).index_copy_(1, slot, v.reshape(L, B * nh, hd))
        return _Out(logits)


class _Out:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


def compare_steps(
    model: Transformer, tmp: Path, start: int, steps: int, batches: tuple[int, ...] = (1, 32), rounds: int = 5
) -> dict[str, Any]:
    """Compile the package, check its greedy steps against ours (float32), then CPU ms per token of the AOTInductor
    step, our fused C step (where built) and the TorchScript step, interleaved in rounds (medians), one thread.
    Every step runs from position `start` for `steps` steps with its argmax fed back."""
    from bench.peers import step_loop
    from bench.stats import median
    from model.decode import FastDecoder, auto_decode_weights
    from model.fast import FusedDecoder, fused_available, supports

    cfg = model.config
    path, seconds = compile_step(model, tmp / "decode_step.pt2")
    decs: dict[str, Any] = {"aoti_float32": AotiDecoder(path)}
    weights = auto_decode_weights()
    if fused_available() and supports(cfg):
        decs["fused"] = FusedDecoder(model, weights=weights)
    decs["torchscript"] = FastDecoder(model, weights=weights)
    out: dict[str, Any] = {
        "compile_s": seconds,
        "package_bytes": path.stat().st_size,
        "our_weights": weights,
        "rounds": rounds,
        "steps": steps,
        "start": start,
        "batches": list(batches),
    }
    tok = torch.tensor([ord("T")])
    a, b = KVCache(cfg, 1), KVCache(cfg, 1)
    f32 = FastDecoder(model, weights="float32")
    same = True
    with torch.inference_mode():
        pa = pb = tok
        for p in range(min(steps, cfg.block_size)):  # greedy from one token: the package's tokens vs ours
            pos = torch.tensor([p])
            pa = decs["aoti_float32"](pa, a, pos).logits.argmax(-1)
            pb = f32(pb, b, pos).logits.argmax(-1)
            same = same and bool(torch.equal(pa, pb))
    out["greedy_tokens_match_ours_float32"] = same
    times: dict[str, list[float]] = {}
    for B in batches:
        for d in decs.values():
            step_loop(d, cfg, B, start, 3)
    for _ in range(rounds):
        for B in batches:
            for name, d in decs.items():
                times.setdefault(f"{name}_bs{B}", []).append(1e3 * step_loop(d, cfg, B, start, steps) / B)
    for k, t in times.items():
        out[f"{k}_cpu_ms_per_token"] = median(t)
        out[f"{k}_reps_cpu_ms_per_token"] = t
    for B in batches:
        for name in decs:
            if name != "aoti_float32":
                out[f"{name}_vs_aoti_bs{B}"] = (
                    out[f"aoti_float32_bs{B}_cpu_ms_per_token"] / out[f"{name}_bs{B}_cpu_ms_per_token"]
                )
    return out
