"""The Hugging Face baseline: a GPT2LMHeadModel carrying our weights, checked to compute our exact function."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from model.config import ModelConfig
from model.transformer import Transformer

LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which model/transformer.py uses


def gpt2_config(config: ModelConfig):
    """The GPT2Config of the same architecture (gelu tanh, no dropout, no special tokens in the byte vocabulary)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.d_model,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.d_ff,
        activation_function="gelu_new",
        layer_norm_epsilon=LN_EPS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        tie_word_embeddings=True,
        use_cache=True,
    )


def _ln(dst, src: torch.nn.LayerNorm) -> None:
    dst.weight.copy_(src.weight)
    if src.bias is not None:
        dst.bias.copy_(src.bias)
    else:
        dst.bias.zero_()  # a LayerNorm without bias is one with a zero bias


def _linear_to_conv1d(dst, src: torch.nn.Linear) -> None:
    dst.weight.copy_(src.weight.T)  # Conv1D weight is (in, out); nn.Linear's is (out, in)
    if src.bias is not None:
        dst.bias.copy_(src.bias)
    else:
        dst.bias.zero_()


def to_hf(model: Transformer):
    """A GPT2LMHeadModel (eval, float32) holding a copy of `model`'s weights.

    Raises ValueError for a plain stack (`residual=False`): GPT-2 always adds the shortcut.
    """
    from transformers import GPT2LMHeadModel

    cfg = model.config
    if not cfg.residual:
        raise ValueError("GPT-2 has no plain-stack variant: only residual models can be copied")
    hf = GPT2LMHeadModel(gpt2_config(cfg)).eval()
    tr = hf.transformer
    with torch.no_grad():
        tr.wte.weight.copy_(model.wte.weight)
        tr.wpe.weight.copy_(model.wpe.weight)
        for ours, theirs in zip(model.blocks, tr.h, strict=True):
            _ln(theirs.ln_1, ours.ln_1)
            _ln(theirs.ln_2, ours.ln_2)
            _linear_to_conv1d(theirs.attn.c_attn, ours.attn.c_attn)
            _linear_to_conv1d(theirs.attn.c_proj, ours.attn.c_proj)
            _linear_to_conv1d(theirs.mlp.c_fc, ours.mlp.c_fc)
            _linear_to_conv1d(theirs.mlp.c_proj, ours.mlp.c_proj)
        _ln(tr.ln_f, model.ln_f)
    if hf.lm_head.weight.data_ptr() != tr.wte.weight.data_ptr():
        with torch.no_grad():
            hf.lm_head.weight.copy_(model.wte.weight)  # untied in this transformers version: copy explicitly
    return hf


@dataclass
class Equivalence:
    """How closely the HF copy matches our model on one random input."""

    max_abs_diff: float
    allclose: bool
    shape: tuple[int, int]
    atol: float
    rtol: float


def check_equivalence(
    model: Transformer,
    hf,
    batch: int = 2,
    seq: int | None = None,
    seed: int = 0,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> Equivalence:
    """Compare the logits of both models on a random (batch, seq) input (default seq: the whole window)."""
    T = seq or model.config.block_size
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (batch, T), generator=gen)  # (B, T)
    with torch.inference_mode():
        ours = model(idx).logits  # (B, T, V)
        theirs = hf(input_ids=idx, attention_mask=torch.ones_like(idx), use_cache=False).logits  # (B, T, V)
    diff = (ours - theirs).abs().max().item()
    return Equivalence(
        max_abs_diff=diff,
        allclose=bool(torch.allclose(ours, theirs, atol=atol, rtol=rtol)),
        shape=(batch, T),
        atol=atol,
        rtol=rtol,
    )


def hf_generate(hf, prompts: list[list[int]], max_new_tokens: int) -> tuple[torch.Tensor, float, float]:
    """Greedy `generate` of all prompts (equal lengths) as one batch; (new tokens (B, N), seconds, CPU seconds)."""
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("prompts must all have the same length (no padding in this benchmark)")
    idx = torch.tensor(prompts, dtype=torch.long)  # (B, T)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = hf.generate(
            input_ids=idx,
            attention_mask=torch.ones_like(idx),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            num_beams=1,
        )  # (B, T + N)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    new = out[:, idx.shape[1] :]  # (B, N)
    if new.shape[1] != max_new_tokens:
        raise RuntimeError(f"generate stopped after {new.shape[1]} of {max_new_tokens} tokens")
    return new, seconds, cpu
