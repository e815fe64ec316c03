"""The fused step on several threads (a pool in C): bitwise the numbers of one thread, for rows split across threads
(batch >= 2), columns and heads split (batch 1, the prefill), with edits and traced rows, every weight format; the
pool's life; and the CPU count its default comes from, against crafted cgroup files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.edits import Intervention, StreamEdits
from model.fast import FusedDecoder, build, cpu_supported, decode_threads, make_decoder
from model.fast.cpus import available_cpus, cgroup_cpu_limit
from model.kv_cache import KVCache
from tests.conftest import TINY, build_model

# head width 8 (heads split two at a time), 16 and 32 (one at a time); widths that leave a third thread no columns
CONFIGS = {
    "tiny": ModelConfig(**TINY),
    "wide": ModelConfig(**{**TINY, "d_model": 64, "d_ff": 192, "n_head": 4}),
    "one_head": dataclasses.replace(ModelConfig(**TINY), n_head=1, residual=False),
}


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not cpu_supported("avx2"):
        pytest.skip("this CPU cannot run the avx2 build")
    out = build(tmp_path_factory.mktemp("threads") / "fused.so")
    if out is None:
        pytest.skip("no C compiler")
    return out


def _edits(cfg: ModelConfig, B: int, gen: torch.Generator) -> StreamEdits:
    """Per-row gates (some rows skipping parts) and added vectors at prompt and generated positions."""
    gates = torch.rand(B, cfg.n_layer, 2, generator=gen)
    gates[::3] = Intervention(skip=((1, "mlp"),), scale=((0, "attn", 0.5),)).compile(cfg.n_layer).gates[0]
    add = torch.randn(B, cfg.n_layer, 2, cfg.d_model, generator=gen) * 0.1
    return StreamEdits(gates, add=add, n_prompt=torch.randint(0, cfg.block_size, (B,), generator=gen))


def _run_steps(dec: FusedDecoder, B: int, kv: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Three steps of B rows at scattered positions from a random cache, edited, every other row traced: the
    logits, the stream and the cache, each step."""
    cfg = dec.config
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache(cfg, B, dtype=kv)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    edits = _edits(cfg, B, gen)
    pos = torch.randint(0, cfg.block_size - 3, (B,), generator=gen)
    traced = torch.arange(0, B, 2)
    outs = []
    for _ in range(3):
        tokens = torch.randint(0, cfg.vocab_size, (B,), generator=gen)
        out = dec(tokens, cache, pos, edits, traced)
        assert out.stream is not None
        outs += [out.logits, out.stream]
        pos = pos + 1
    return [*outs, cache.k.float(), cache.v.float()]


@pytest.mark.parametrize("weights", ["float32", "float16", "int8"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_threads_give_bitwise_the_numbers_of_one_thread(library: Path, config: str, weights: str) -> None:
    model = build_model(CONFIGS[config], seed=7)
    decs = {t: FusedDecoder(model, weights=weights, library=library, threads=t) for t in (1, 2, 3)}
    assert [d.threads for d in decs.values()] == [1, 2, 3]
    for B in (1, 2, 7, 32):
        for kv in (torch.float32, torch.float16):
            one = _run_steps(decs[1], B, kv, seed=B)
            for t in (2, 3):
                for a, b in zip(one, _run_steps(decs[t], B, kv, seed=B), strict=True):
                    assert torch.equal(a, b), (config, weights, B, kv, t)


@pytest.mark.parametrize("weights", ["float16", "int8"])
def test_a_prefill_on_threads_is_bitwise_the_one_thread_prefill(library: Path, weights: str) -> None:
    """The prefill (rows sharing one cache row, in causal order) splits heads and columns: the same logits at every
    position, the same trace and the same cache."""
    model = build_model(CONFIGS["wide"], seed=3)
    cfg = model.config
    seq = torch.randint(0, 256, (cfg.block_size,), generator=torch.Generator().manual_seed(2))
    edits = _edits(cfg, 1, torch.Generator().manual_seed(5))
    outs = {}
    for t in (1, 2, 3):
        dec = FusedDecoder(model, weights=weights, library=library, threads=t)
        cache = KVCache(cfg, 1, dtype=torch.float16)
        out = dec.prefill(seq, cache, edits, trace=True, all_logits=True)
        outs[t] = (out.logits, out.stream, cache.k, cache.v)
    for t in (2, 3):
        for a, b in zip(outs[1], outs[t], strict=True):
            assert torch.equal(a, b), t


def test_the_engine_on_two_threads_generates_what_it_does_on_one(library: Path) -> None:
    """Greedy and seeded tokens, logprobs and traces through the engine: bitwise the same on 1 and 2 threads."""
    import asyncio

    from model import tokenizer
    from model.engine import Engine, SamplingParams

    model = build_model(seed=0)

    def run(threads: int) -> list:
        async def main() -> list:
            engine = Engine(model, decode_weights="float32", decode_backend="torchscript")
            engine.runner.decode_step = FusedDecoder(model, weights="float16", library=library, threads=threads)
            engine.start()
            try:
                params = [
                    SamplingParams(max_new_tokens=12, temperature=0, logprobs=2),
                    SamplingParams(max_new_tokens=12, temperature=0, intervention=Intervention(skip=((1, "mlp"),))),
                    SamplingParams(max_new_tokens=12, temperature=0.9, seed=3, trace=True),
                ]
                hs = [engine.submit(tokenizer.encode(t), p) for t, p in zip(("Sh", "ab", "Res"), params, strict=True)]
                return [await asyncio.wait_for(h.result(), 20) for h in hs]
            finally:
                engine.stop()

        return asyncio.run(main())

    one, two = run(1), run(2)
    for (a, _), (b, _) in zip(one, two, strict=True):
        assert [(t.token_id, t.logprob, t.trace) for t in a] == [(t.token_id, t.logprob, t.trace) for t in b]


def test_the_pool_stops_and_later_steps_run_on_one_thread(library: Path) -> None:
    model = build_model(seed=1)
    dec = FusedDecoder(model, weights="float16", library=library, threads=3)
    tokens, pos = torch.tensor([1, 2]), torch.tensor([0, 1])
    before = dec(tokens, KVCache(model.config, 2), pos).logits
    dec.close()
    dec.close()  # twice: fine
    assert dec.threads == 1
    assert torch.equal(dec(tokens, KVCache(model.config, 2), pos).logits, before)
    with pytest.raises(ValueError, match="threads"):
        FusedDecoder(model, library=library, threads=0)
    assert make_decoder(model, "float16", "fused", library=library, threads=2).threads == 2  # type: ignore[union-attr]


def _cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (tmp_path / "proc_cgroup").write_text(proc)
    return root, tmp_path / "proc_cgroup"


@pytest.mark.parametrize(
    ("proc", "files", "limit"),
    [
        ("0::/\n", {"cpu.max": "200000 100000\n"}, 2.0),  # a pod limited to 2 CPUs (cgroup namespace: at the root)
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),  # no limit
        ("0::/kubepods/pod1/c1\n", {"kubepods/pod1/cpu.max": "150000 100000", "kubepods/pod1/c1/cpu.max": "max"}, 1.5),
        ("0::/a/b\n", {"a/cpu.max": "300000 100000", "a/b/cpu.max": "500000 100000"}, 3.0),  # the tightest above
        (
            "4:cpu,cpuacct:/docker/abc\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "400000", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            4.0,
        ),
        (
            "4:cpu,cpuacct:/x\n",
            {"cpu,cpuacct/x/cpu.cfs_quota_us": "-1", "cpu,cpuacct/x/cpu.cfs_period_us": "100000"},
            None,
        ),
        ("0::/\n", {}, None),  # no controller files at all
        ("", {}, None),  # no /proc/self/cgroup
    ],
)
def test_the_cgroup_cpu_quota_is_read_from_v2_and_v1_files(
    tmp_path: Path, proc: str, files: dict[str, str], limit: float | None
) -> None:
    root, proc_file = _cgroup(tmp_path, proc, files)
    assert cgroup_cpu_limit(root, proc_file) == limit
    want = min(8, int(limit)) if limit is not None else 8  # whole CPUs, rounded down, within the affinity mask
    assert available_cpus(root, proc_file, affinity=8) == want


def test_available_cpus_is_at_least_one_and_within_the_affinity_mask(tmp_path: Path) -> None:
    root, proc_file = _cgroup(tmp_path, "0::/\n", {"cpu.max": "50000 100000"})  # half a CPU
    assert available_cpus(root, proc_file, affinity=4) == 1
    root, proc_file = _cgroup(tmp_path, "0::/\n", {"cpu.max": "1600000 100000"})  # 16 CPUs' quota, 2 cores allowed
    assert available_cpus(root, proc_file, affinity=2) == 2
    assert 1 <= available_cpus() <= len(__import__("os").sched_getaffinity(0))
    assert decode_threads(3) == 3 and decode_threads(0) == available_cpus()
    with pytest.raises(ValueError, match="threads"):
        decode_threads(-1)


def test_a_forked_child_steps_on_one_thread(library: Path) -> None:
    """The pool's threads stay in the parent across fork(): a child that steps with the parent's decoder must run on
    one thread (a pooled step would wait for workers that do not exist) and give the same logits."""
    import os
    import select

    cfg = CONFIGS["tiny"]
    dec = FusedDecoder(build_model(cfg, seed=3).eval(), weights="float32", library=library, threads=2)
    assert dec.threads == 2
    want = _run_steps(dec, 4, torch.float32, seed=9)[0]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its thread count and whether its step matched, then leave at once
        try:
            got = _run_steps(dec, 4, torch.float32, seed=9)[0]
            os.write(write, f"{dec.threads} {int(torch.equal(got, want))}".encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 60)
        answer = os.read(read, 64).decode() if ready else "hung"
    finally:
        os.close(read)
        if not ready:
            os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert answer == "1 1", answer
    assert dec.threads == 2  # the parent keeps its pool
