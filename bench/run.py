"""`python -m bench.run`: benchmark the engine and the server against Hugging Face baselines.

Prints a table, writes bench/results/latest.json and bench/results/concurrency.png. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from app.settings import Settings
from bench import contention, inproc, interventions, load, memsplit, peers, servers
from bench.stats import median, meets, ratio
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.decode import auto_decode_weights
from model.fast import auto_kv_dtype, make_decoder
from model.transformer import Transformer

log = logging.getLogger("bench")

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MAX_BATCH: int = Settings.model_fields["max_batch_size"].default
SHIPPED = Path(__file__).resolve().parent.parent / "model" / "checkpoints" / "shakespeare.safetensors"
SHIPPED_CONFIG = ModelConfig(n_layer=16, n_head=4, d_model=128, d_ff=512, block_size=256)
SECTIONS = (
    "engine",
    "profile",
    "gil",
    "hf",
    "diagnostics",
    "http",
    "resid",
    "naive",
    "interventions",
    "contention",
    "peers",
    "aoti",
    "memory",
)
TEXT = (  # public-domain source of the prompts (ASCII: one byte per character)
    "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer the slings and arrows "
    "of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. To die, to sleep; "
    "no more; and by a sleep to say we end the heart-ache and the thousand natural shocks that flesh is heir to: "
    "'tis a consummation devoutly to be wish'd. Now is the winter of our discontent made glorious summer by this "
    "sun of York; and all the clouds that lour'd upon our house in the deep bosom of the ocean buried. Friends, "
    "Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. "
)


def make_prompts(n: int, n_bytes: int) -> list[str]:
    """`n` ASCII prompts of exactly `n_bytes` bytes, cut from TEXT at offsets 37 bytes apart (cycling)."""
    text = TEXT * (2 + n_bytes // len(TEXT))
    return [text[(i * 37) % len(TEXT) :][:n_bytes] for i in range(n)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --quick swaps in tiny sizes for any option left at its default."""
    p = argparse.ArgumentParser(description="Benchmark Shortcut against Hugging Face generate baselines.")
    p.add_argument("--quick", action="store_true", help="tiny sizes for development (about a minute)")
    p.add_argument("--threads", type=int, default=0, help="torch threads here and in the servers; 0 = all cores")
    p.add_argument("--reps", type=int, help="repetitions of the cheap in-process measurements (default 3; quick 1)")
    p.add_argument("--http-reps", type=int, help="repetitions of each HTTP load level (default 1)")
    p.add_argument("--requests-per-client", type=int, help="requests each HTTP client sends in turn (default 2)")
    p.add_argument("--prompt-bytes", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, help="tokens generated per request (default 192; quick 16)")
    p.add_argument("--concurrency", help="HTTP sweep levels (default 1,2,4,8,16,32,64; quick 1,2,4)")
    p.add_argument("--batch", type=int, help="the large batch / concurrency of the headline numbers (32; quick 4)")
    p.add_argument("--mid", type=int, help="the middle concurrency, also used for the resid-norm check (8; quick 2)")
    p.add_argument("--diag-reps", type=int, help="repetitions of the diagnostics timing (default 7; quick 3)")
    p.add_argument("--profile-steps", type=int, help="decode steps profiled (default 64; quick 16)")
    p.add_argument(
        "--server-max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help=f"SHORTCUT_MAX_BATCH_SIZE of the server (default {DEFAULT_MAX_BATCH}, the service default)",
    )
    p.add_argument("--checkpoint", type=Path, default=SHIPPED)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list out of {','.join(SECTIONS)}")
    p.add_argument("--out", type=Path, help="JSON path (default results/latest.json; quick: results/quick.json)")
    p.add_argument("--plot", type=Path, help="PNG path (default results/concurrency.png; quick: results/quick.png)")
    a = p.parse_args(argv)
    q = a.quick
    defaults = dict(
        reps=(1, 3),
        http_reps=(1, 1),
        requests_per_client=(1, 2),
        max_new_tokens=(16, 192),
        concurrency=("1,2,4", "1,2,4,8,16,32,64"),
        batch=(4, 32),
        mid=(2, 8),
        diag_reps=(3, 7),
        profile_steps=(16, 64),
    )
    for name, (quick_value, full_value) in defaults.items():
        if getattr(a, name) is None:
            setattr(a, name, quick_value if q else full_value)
    a.out = a.out or RESULTS / ("quick.json" if q else "latest.json")
    a.plot = a.plot or RESULTS / ("quick.png" if q else "concurrency.png")
    a.concurrency = sorted({int(c) for c in str(a.concurrency).split(",")} | {1, a.mid, a.batch})
    a.sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = set(a.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections: {sorted(unknown)}")
    a.threads = a.threads or len(os.sched_getaffinity(0))
    return a


def machine_info(threads: int) -> dict[str, Any]:
    """What the numbers were measured on."""
    import psutil

    names = [line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or "unknown"
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "torch_threads": threads,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "loadavg_start": list(os.getloadavg()),
        "nice": os.nice(0),
    }


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def load_model(path: Path, tmp: Path) -> tuple[Transformer, Path, dict[str, Any]]:
    """The checkpoint's model, or (file missing) a random-weight model of the shipped config, saved to `tmp`."""
    if path.exists():
        ck = load_checkpoint(path)
        info = {
            "source": "checkpoint",
            "path": str(path),
            "sha256": ck.sha256,
            "config": ck.config.to_dict(),
            "metadata": {k: v for k, v in ck.metadata.items() if isinstance(v, str | int | float | bool)},
        }
        return ck.model.eval(), path, info
    torch.manual_seed(0)
    model = Transformer(SHIPPED_CONFIG).eval()
    rnd = tmp / "random.safetensors"
    sha = save_checkpoint(model, rnd, metadata={"note": "bench: random weights, shipped config"})
    info = {
        "source": "random",
        "path": str(rnd),
        "sha256": sha,
        "config": SHIPPED_CONFIG.to_dict(),
        "note": f"{path} is missing: random weights (seed 0) with the shipped config",
    }
    return model, rnd, info


def _timed(label: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    print(f"... {label}", flush=True)
    out = fn()
    print(f"    done in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def cpu_figures(
    tokens: int, wall_s: float, server_cpu_s: float, main_thread_cpu_s: float, client_cpu_s: float
) -> dict[str, Any]:
    """The server's CPU use during one load run: tokens per server CPU second, cores it kept busy, the event loop's
    share (its main thread), and this process's CPU (the load client)."""
    return {
        "server_cpu_s": server_cpu_s,
        "server_main_thread_cpu_s": main_thread_cpu_s,
        "server_other_threads_cpu_s": server_cpu_s - main_thread_cpu_s,
        "server_main_thread_share": ratio(main_thread_cpu_s, server_cpu_s),
        "server_cores_busy": ratio(server_cpu_s, wall_s),
        "tok_per_server_cpu_s": ratio(tokens, server_cpu_s),
        "client_cpu_s": client_cpu_s,
    }


def measured_load(
    base_url: str,
    prompts: list[str],
    a: argparse.Namespace,
    c: int,
    stream: bool = True,
    server: servers.Server | None = None,
) -> dict[str, Any]:
    """One load run (`load.run_load`); with `server`, also its process's CPU seconds during the run."""
    s0, c0 = (server.cpu() if server else None), time.process_time()
    r = load.run_load(base_url, prompts, a.max_new_tokens, c, a.requests_per_client, stream=stream)
    client_s = time.process_time() - c0
    if s0 is not None and server is not None:
        s1 = server.cpu()
        r.update(
            cpu_figures(
                r["completion_tokens"],
                r["wall_s"],
                s1["total_s"] - s0["total_s"],
                s1["main_thread_s"] - s0["main_thread_s"],
                client_s,
            )
        )
    return r


CPU_KEYS = (
    "tok_per_server_cpu_s",
    "server_cpu_s",
    "server_main_thread_cpu_s",
    "server_main_thread_share",
    "server_cores_busy",
    "client_cpu_s",
)


def http_level(
    base_url: str,
    prompts: list[str],
    a: argparse.Namespace,
    c: int,
    stream: bool = True,
    reps: int | None = None,
    server: servers.Server | None = None,
) -> dict[str, Any]:
    """Median over reps of one concurrency level (each rep: c clients x requests_per_client requests); with
    `server`, the server process's CPU time too (`cpu_figures`)."""
    runs = [measured_load(base_url, prompts, a, c, stream, server) for _ in range(reps or a.http_reps)]
    errors = sum(r["errors"] for r in runs)
    if errors:
        log.warning(
            "c=%d: %d failed requests, first: %s", c, errors, next(r["first_error"] for r in runs if r["first_error"])
        )
    keys = ("tok_s", "e2e_p50_ms", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
    out: dict[str, Any] = {"concurrency": c, "errors": errors}
    for k in keys + (CPU_KEYS if server else ()):
        vals = [r[k] for r in runs if r.get(k) is not None]
        out[k] = median(vals)
    out["reps"] = runs
    return out


def run(a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Run the selected sections (a random checkpoint, if needed, goes to `tmp`); the results written to JSON."""
    torch.set_num_threads(a.threads)
    model, ckpt_path, model_info = load_model(a.checkpoint, tmp)
    model_info["params"] = model.num_params()
    cfg = model.config
    if a.prompt_bytes + a.max_new_tokens > cfg.block_size:
        raise SystemExit(
            f"prompt {a.prompt_bytes} + max_new_tokens {a.max_new_tokens} exceeds the context window "
            f"of {cfg.block_size} tokens"
        )
    prompts = make_prompts(max(a.batch, max(a.concurrency)) * a.requests_per_client, a.prompt_bytes)
    ids0 = list(prompts[0].encode())
    B = a.batch
    res: dict[str, Any] = {
        "schema": 1,
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": a.quick,
        "machine": machine_info(a.threads),
        "model": model_info,
        "settings": {
            "prompt_bytes": a.prompt_bytes,
            "max_new_tokens": a.max_new_tokens,
            "decoding": "greedy",
            "reps": a.reps,
            "http_reps": a.http_reps,
            "requests_per_client": a.requests_per_client,
            "concurrency": a.concurrency,
            "batch": B,
            "mid": a.mid,
            "threads": a.threads,
            "sections": a.sections,
            "server_max_batch_size": a.server_max_batch,
        },
        "metrics": {},
        "details": {},
    }
    m, d = res["metrics"], res["details"]
    print(
        f"model: {model_info['source']} ({model_info['path']}), {model_info['params']:,} params, "
        f"n_layer={cfg.n_layer} d_model={cfg.d_model} block_size={cfg.block_size}"
    )
    if model_info["source"] == "random":
        print(f"NOTE: {model_info['note']}")
    print(
        f"torch {torch.__version__}, {a.threads} threads; prompt {a.prompt_bytes} bytes + {a.max_new_tokens} new "
        f"tokens (greedy), context window {cfg.block_size}"
    )

    if "engine" in a.sections:
        eng = _timed("engine, batch 1", lambda: inproc.engine_bs1(model, ids0, a.max_new_tokens, a.reps))
        d["engine_bs1"] = eng
        m["decode_bs1_tok_s"] = eng["tok_s"]
        m["decode_bs1_decode_only_tok_s"] = eng["decode_only_tok_s"]
        m["decode_bs1_cpu_ms_per_token"] = eng["cpu_ms_per_token"]
    if "profile" in a.sections:
        d["profile_decode_bs1"] = _timed(
            "profile of a batch-1 decode step", lambda: inproc.profile_decode(model, ids0, a.profile_steps)
        )
        d[f"profile_decode_bs{B}"] = _timed(
            f"profile of a batch-{B} decode step", lambda: inproc.profile_decode(model, ids0, a.profile_steps, B)
        )
    if "gil" in a.sections:
        d["gil"] = _timed(
            "decode step next to a busy Python thread",
            lambda: inproc.gil_contention(model, ids0, a.profile_steps, (1, B)),
        )
    if "hf" in a.sections:
        d["hf"] = _timed("transformers GPT2LMHeadModel.generate", lambda: hf_section(model, prompts, ids0, a, d))
        m["hf_generate_bs1_tok_s"] = d["hf"]["bs1_tok_s"]
        m["hf_generate_bs1_cpu_ms_per_token"] = d["hf"]["bs1_cpu_ms_per_token"]
        m[f"hf_generate_bs{B}_tok_s"] = d["hf"][f"bs{B}_tok_s"]
    if "diagnostics" in a.sections:
        diag_ids = list(make_prompts(1, min(256, cfg.block_size))[0].encode())
        dg = _timed("diagnostics vs forward", lambda: inproc.diagnostics_vs_forward(model, diag_ids, a.diag_reps))
        d["diagnostics"] = dg
        m["diagnostics_norms_ms"], m["forward_ms"] = dg["diagnostics_norms_ms"], dg["forward_ms"]
        m["diagnostics_norms_cpu_ms"], m["forward_cpu_ms"] = dg["diagnostics_norms_cpu_ms"], dg["forward_cpu_ms"]
    if "http" in a.sections or "resid" in a.sections:
        http_sections(ckpt_path, cfg, prompts, a, m, d)
    if "contention" in a.sections:
        d["contention"] = _timed(
            "8 streams next to 16 heavy diagnostics requests",
            lambda: contention_section(model, ckpt_path, prompts, a, m),
        )
        busy = d["contention"]["with_diagnostics"]
        m["contention_itl_p50_ms"], m["contention_itl_p99_ms"] = busy["itl_p50_ms"], busy["itl_p99_ms"]
        m["contention_itl_max_ms"] = busy["itl_max_ms"]
        m["contention_diagnostics_p50_ms"] = d["contention"]["diagnostics_p50_ms"]
    if "naive" in a.sections:
        d["naive"] = _timed(f"naive FastAPI + HF server, {B} clients", lambda: naive_section(ckpt_path, prompts, a))
        m[f"naive_http_c{B}_tok_s"] = d["naive"]["tok_s"]
    if "interventions" in a.sections:
        iv = d["interventions"] = {}
        iv["step"] = _timed(
            "decode step with gates / trace on and off",
            lambda: interventions.step_costs(model, len(ids0), a.profile_steps, (1, B)),
        )
        iv["engine"] = _timed(
            f"engine, {B} rows, trace / intervention on every row",
            lambda: interventions.engine_throughput(
                model, [list(p.encode()) for p in prompts[:B]], a.max_new_tokens, max(a.reps, 5)
            ),
        )
        m["step_no_intervention_vs_before_bs1"] = iv["step"]["bs1_none_throughput_vs_baseline"]
        m[f"step_no_intervention_vs_before_bs{B}"] = iv["step"][f"bs{B}_none_throughput_vs_baseline"]
        m[f"engine_bs{B}_trace_vs_plain"] = iv["engine"]["trace_vs_plain"]
        m[f"engine_bs{B}_intervention_vs_plain"] = iv["engine"]["intervention_vs_plain"]
    if "peers" in a.sections:
        d["peers"] = _timed(
            "peers: CTranslate2 float32 / int8 from our checkpoint, and the machine's limit",
            lambda: peers_section(model, prompts, a, tmp),
        )
        p = d["peers"]["cpu"]
        if (p["prompt_tokens"], p["max_new_tokens"]) != (a.prompt_bytes, a.max_new_tokens):
            log.warning(
                "peers ran %d-token prompts + %d new tokens, the HTTP load %d + %d: the HTTP / peer ratios mislead",
                p["prompt_tokens"],
                p["max_new_tokens"],
                a.prompt_bytes,
                a.max_new_tokens,
            )
        for b in p["batches"]:
            m[f"engine_bs{b}_cpu_ms_per_token"] = p[f"engine_bs{b}_e2e_cpu_ms_per_token"]
            m[f"step_bs{b}_cpu_ms_per_token"] = p[f"step_bs{b}_decode_cpu_ms_per_token"]
            for name in ("ct2_float32", "ct2_int8"):
                m[f"{name}_bs{b}_cpu_ms_per_token"] = p[f"{name}_bs{b}_e2e_cpu_ms_per_token"]
                m[f"{name}_bs{b}_decode_cpu_ms_per_token"] = p[f"{name}_bs{b}_decode_cpu_ms_per_token"]
        m["machine_limit_bs1_tok_s"] = d["peers"]["limit"][f"{d['peers']['limit']['our_weights']}_limit_tok_s"]
        m["step_bs1_fraction_of_limit"] = d["peers"]["limit"].get("ours_fraction_of_limit")
    if "aoti" in a.sections:
        from bench import aoti

        d["aoti"] = _timed(
            "AOTInductor-compiled decode step (compile, then interleaved with ours)",
            lambda: aoti.compare_steps(
                model, tmp, len(ids0), a.max_new_tokens - 1, tuple(sorted({1, B})), rounds=max(a.reps, 3)
            ),
        )
        for b in sorted({1, B}):
            m[f"aoti_step_bs{b}_cpu_ms_per_token"] = d["aoti"][f"aoti_float32_bs{b}_cpu_ms_per_token"]
    if "memory" in a.sections:
        d["memory"] = _timed("server memory split", lambda: memory_section(ckpt_path, a, m.get("server_peak_rss_mb")))
        m["server_rss_rest_mb"] = d["memory"].get("rest_mb")
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["ratios"] = ratios(m, a)
    return res


def hf_section(
    model: Transformer, prompts: list[str], ids0: list[int], a: argparse.Namespace, d: dict[str, Any]
) -> dict[str, Any]:
    """Weight copy + equivalence check + generate at batch 1 and batch `a.batch`."""
    from bench import hf as hfb

    hf = hfb.to_hf(model)
    eq = hfb.check_equivalence(model, hf)
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
    batch = [list(p.encode()) for p in prompts[: a.batch]]
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
    engine_tokens = d.get("engine_bs1", {}).get("tokens")
    if engine_tokens is not None and new is not None:
        out["greedy_tokens_match_engine"] = engine_tokens == new[0].tolist()
    return out


def peer_batches(a: argparse.Namespace) -> tuple[int, ...]:
    """Batch sizes of the peers comparison: 1 and `a.batch`, and `a.mid` too when the http section runs (the peer at
    batch c is the yardstick of HTTP at c clients; `http_vs_peers`)."""
    return tuple(sorted({1, a.batch} | ({a.mid} if "http" in a.sections else set())))


def peers_section(model: Transformer, prompts: list[str], a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """CTranslate2 float32 and int8 built from our checkpoint: greedy tokens checked against ours (float32), then CPU
    time per token against our engine and bare step at the `peer_batches`, interleaved; the machine's limit."""
    dirs = {q: peers.convert_ct2(model, tmp / f"ct2-{q}", q) for q in ("float32", "int8")}
    batches = peer_batches(a)
    ids = [list(p.encode()) for p in prompts[: max(batches)]]
    match = peers.tokens_match(model, dirs["float32"], ids[0], a.max_new_tokens)
    if not match["equal"]:
        log.warning("CTranslate2 float32's greedy tokens differ from ours from token %s", match["first_difference"])
    cpu = peers.compare(
        model,
        ids,
        a.max_new_tokens,
        {f"ct2_{q}": path for q, path in dirs.items()},
        batches,
        rounds=max(a.reps, 5),
    )
    limit = peers.machine_limit(model, cpu["our_weights"], cpu.get("step_bs1_decode_cpu_ms_per_token"))
    threads = peers.thread_check(dirs["int8"], "int8", ids, a.max_new_tokens, tuple(sorted({1, a.batch})))
    return {
        "greedy_tokens_match_ours_float32": match,
        "cpu": cpu,
        "limit": limit,
        "ct2_int8_threads": threads,
        "model_bytes": {q: (path / "model.bin").stat().st_size for q, path in dirs.items()},
    }


def memory_section(ckpt: Path, a: argparse.Namespace, server_peak_mb: float | None) -> dict[str, Any]:
    """RSS after each stage of a fresh process loading what the server loads (`bench.memsplit`), and the rest of the
    server's peak RSS (when the http section ran in this run) beyond those parts."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "bench.memsplit", str(ckpt), str(a.server_max_batch)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return memsplit.split(json.loads(proc.stdout.strip().splitlines()[-1]), server_peak_mb)


def kv_cache_mb(cfg: ModelConfig, rows: int, bytes_per_value: int | None = None) -> float:
    """Size of the engine's preallocated KV cache (keys and values) for `rows` sequences; by default in the dtype a
    server here gives it (float16 with the fused float16 step, else float32)."""
    if bytes_per_value is None:  # the engine's own rule, on the step it would build for this config
        bytes_per_value = auto_kv_dtype(make_decoder(Transformer(cfg), auto_decode_weights())).itemsize
    return 2 * cfg.n_layer * rows * cfg.block_size * cfg.d_model * bytes_per_value / 2**20


def http_sections(
    ckpt: Path, cfg: ModelConfig, prompts: list[str], a: argparse.Namespace, m: dict[str, Any], d: dict[str, Any]
) -> None:
    """The Shortcut server: concurrency sweep, peak RSS, and resid-norm metrics on vs off."""
    with servers.shortcut_server(ckpt, a.threads, a.server_max_batch, resid_norm_metrics=True) as srv:
        print(f"    shortcut server ready in {srv.started_s:.1f} s at {srv.base_url}")
        load.run_load(srv.base_url, prompts, min(4, a.max_new_tokens), 1)  # warm-up
        if "http" in a.sections:
            sweep = []
            for c in a.concurrency:
                lvl = _timed(
                    f"HTTP streaming, {c} clients", lambda c=c: http_level(srv.base_url, prompts, a, c, server=srv)
                )
                print(
                    f"    {lvl['tok_s']:.1f} tok/s, {lvl['tok_per_server_cpu_s'] or float('nan'):.1f} tok per server "
                    f"CPU s, TTFT p50 {lvl['ttft_p50_ms']:.1f} ms, ITL p99 {lvl['itl_p99_ms'] or float('nan'):.1f} ms"
                )
                sweep.append(lvl)
            d["http_sweep"] = sweep
            d["http_cpu"] = {
                "server_threads": a.threads,
                "note": f"server CPU: the `python -m app` process, all threads: {a.threads} torch thread(s) decoding "
                "in the engine's worker thread, and the main thread running the event loop (uvicorn, FastAPI, SSE: "
                "`server_main_thread_cpu_s`), read from its CPU clock before and after each load run; "
                "`server_cores_busy` = server CPU s / wall s; `client_cpu_s`: this process (the httpx load client, "
                "on the same machine)",
            }
            by_c = {lvl["concurrency"]: lvl for lvl in sweep}
            for c in sorted({1, a.mid, a.batch}):
                m[f"http_c{c}_tok_s"] = by_c[c]["tok_s"]
                m[f"http_c{c}_tok_per_server_cpu_s"] = by_c[c]["tok_per_server_cpu_s"]
            for c in sorted({1, a.mid, a.batch}):
                for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
                    m[f"http_c{c}_{k}"] = by_c[c][k]
        if "resid" in a.sections:
            with servers.shortcut_server(
                ckpt, a.threads, a.server_max_batch, resid_norm_metrics=False, name="shortcut-no-norms"
            ) as off:
                load.run_load(off.base_url, prompts, min(4, a.max_new_tokens), 1)  # warm-up
                on_runs, off_runs = [], []
                for _ in range(max(2, a.http_reps)):  # interleaved so that drift hits both alike
                    on_runs.append(http_level(srv.base_url, prompts, a, a.mid, reps=1)["tok_s"])
                    off_runs.append(http_level(off.base_url, prompts, a, a.mid, reps=1)["tok_s"])
            d["resid_norm_metrics"] = {
                "concurrency": a.mid,
                "on_tok_s": on_runs,
                "off_tok_s": off_runs,
                "on_median": median(on_runs),
                "off_median": median(off_runs),
            }
            m[f"resid_norm_on_c{a.mid}_tok_s"] = median(on_runs)
            m[f"resid_norm_off_c{a.mid}_tok_s"] = median(off_runs)
        peak = srv.rss.peak_bytes if srv.rss else 0
        uss = srv.rss.peak_uss_bytes if srv.rss else 0
        m["server_peak_rss_mb"] = peak / 2**20 if peak else None
        m["server_peak_uss_mb"] = uss / 2**20 if uss else None
        d["server_rss"] = {
            "peak_mb": m["server_peak_rss_mb"],
            "peak_uss_mb": m["server_peak_uss_mb"],
            "samples": srv.rss.samples if srv.rss else 0,
            "max_batch_size": a.server_max_batch,
            "kv_cache_mb": kv_cache_mb(cfg, a.server_max_batch),
            "note": "resident set of the `python -m app` process, sampled every 50 ms (USS every"
            " 0.5 s) from its start to the end of its load; the KV cache's pages"
            " become resident as sequences fill them",
        }


def contention_section(
    model: Transformer, ckpt: Path, prompts: list[str], a: argparse.Namespace, m: dict[str, Any]
) -> dict[str, Any]:
    """8 streams alone, then next to 16 heavy /diagnostics requests (bench/contention.py), on a fresh server."""
    diag_prompt = make_prompts(1, min(256, model.config.block_size))[0]
    forward_ms = m.get("forward_ms")
    if forward_ms is None:
        forward_ms = inproc.diagnostics_vs_forward(model, list(diag_prompt.encode()), 3)["forward_ms"]
    with servers.shortcut_server(ckpt, a.threads, a.server_max_batch, name="shortcut-contention") as srv:
        load.run_load(srv.base_url, prompts, min(4, a.max_new_tokens), 1)  # warm-up
        out = contention.run(
            srv.base_url, prompts, diag_prompt, a.max_new_tokens, forward_ms, streams=a.mid, diags=2 * a.mid
        )
    print(
        f"    streams alone: ITL p50/p99/max {out['alone']['itl_p50_ms']:.1f}/{out['alone']['itl_p99_ms']:.1f}/"
        f"{out['alone']['itl_max_ms']:.1f} ms; with diagnostics: {out['with_diagnostics']['itl_p50_ms']:.1f}/"
        f"{out['with_diagnostics']['itl_p99_ms']:.1f}/{out['with_diagnostics']['itl_max_ms']:.1f} ms "
        f"(bound 2 x p50 + forward = {out['gap_bound_ms'] or float('nan'):.1f} ms); diagnostics p50 "
        f"{out['diagnostics_p50_ms'] or float('nan'):.0f} ms"
    )
    return out


def naive_section(ckpt: Path, prompts: list[str], a: argparse.Namespace) -> dict[str, Any]:
    """The naive server under `a.batch` non-streaming clients (one request each)."""
    with servers.naive_server(ckpt, a.threads) as srv:
        print(f"    naive server ready in {srv.started_s:.1f} s at {srv.base_url}")
        load.run_load(srv.base_url, prompts, min(4, a.max_new_tokens), 1, stream=False)  # warm-up
        runs = [
            load.run_load(srv.base_url, prompts, a.max_new_tokens, a.batch, 1, stream=False) for _ in range(a.http_reps)
        ]
        peak = srv.rss.peak_bytes if srv.rss else 0
    return {
        "concurrency": a.batch,
        "requests_per_client": 1,
        "tok_s": median([r["tok_s"] for r in runs]),
        "e2e_p50_ms": median([r["e2e_p50_ms"] for r in runs]),
        "errors": sum(r["errors"] for r in runs),
        "peak_rss_mb": peak / 2**20 if peak else None,
        "reps": runs,
    }


def ratios(m: dict[str, Any], a: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The headline ratios with their targets (a ratio is None when a section did not run)."""
    B, M = a.batch, a.mid
    spec = [  # name, numerator, denominator, target, higher is better
        ("decode_bs1/hf_bs1", "decode_bs1_tok_s", "hf_generate_bs1_tok_s", 5.0, True),
        ("same, by CPU time per token", "hf_generate_bs1_cpu_ms_per_token", "decode_bs1_cpu_ms_per_token", 5.0, True),
        (f"http_c{B}/hf_bs{B}", f"http_c{B}_tok_s", f"hf_generate_bs{B}_tok_s", 2.0, True),
        (f"http_c{B}/naive_http_c{B}", f"http_c{B}_tok_s", f"naive_http_c{B}_tok_s", 10.0, True),
        ("http_c1/decode_bs1", "http_c1_tok_s", "decode_bs1_tok_s", 0.85, True),
        ("diagnostics_norms_ms/forward_ms", "diagnostics_norms_ms", "forward_ms", 1.5, False),
        ("same, by CPU time", "diagnostics_norms_cpu_ms", "forward_cpu_ms", 1.5, False),
        (f"resid_norm_on/off_c{M}", f"resid_norm_on_c{M}_tok_s", f"resid_norm_off_c{M}_tok_s", 0.95, True),
        ("step, no intervention/before, bs1", "step_no_intervention_vs_before_bs1", None, 0.97, True),
        (f"step, no intervention/before, bs{B}", f"step_no_intervention_vs_before_bs{B}", None, 0.97, True),
        (f"engine bs{B}, trace/plain", f"engine_bs{B}_trace_vs_plain", None, 0.90, True),
    ]
    out = {}
    for name, num, den, target, up in spec:
        r = m.get(num) if den is None else ratio(m.get(num), m.get(den))  # den None: already a ratio
        out[name] = {"value": r, "target": target, "higher_is_better": up, "ok": meets(r, target, up)}
    for b in sorted({1, B}):  # against the best peer of the run (CPU ms per token: lower is better)
        target = 1.0 if b == 1 else 1.2
        for ours, kind in (("engine", ""), ("step", "decode_")):  # engine: whole requests; step: decode only
            best = min(
                (
                    m[k]
                    for k in (f"ct2_float32_bs{b}_{kind}cpu_ms_per_token", f"ct2_int8_bs{b}_{kind}cpu_ms_per_token")
                    if m.get(k)
                ),
                default=None,
            )
            r = ratio(best, m.get(f"{ours}_bs{b}_cpu_ms_per_token"))
            out[f"{ours} bs{b} / best peer (CPU)"] = {
                "value": r,
                "target": target,
                "higher_is_better": True,
                "ok": meets(r, target, True),
            }
    out.update(http_vs_peers(m, a))
    rest = m.get("server_rss_rest_mb")
    out["server RSS rest (MB)"] = {
        "value": rest,
        "target": 60.0,
        "higher_is_better": False,
        "ok": meets(rest, 60.0, False),
    }
    rss = m.get("server_peak_rss_mb")
    out["server_peak_rss_mb"] = {"value": rss, "target": 400.0, "higher_is_better": False, "ok": meets(rss, 400, False)}
    return out


PEERS = ("ct2_float32", "ct2_int8")


def best_peer(m: dict[str, Any], b: int) -> tuple[str, float] | None:
    """(name, CPU ms per token) of the peer with the fewest e2e CPU ms per token at batch `b`; None if none ran."""
    have = [(name, m[f"{name}_bs{b}_cpu_ms_per_token"]) for name in PEERS if m.get(f"{name}_bs{b}_cpu_ms_per_token")]
    return min(have, key=lambda x: x[1]) if have else None


def http_vs_peers(m: dict[str, Any], a: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The server over HTTP at c clients against the best peer in-process at batch c (#17), for c = 1, `a.mid`,
    `a.batch`: by tokens per wall second and by tokens per server CPU second, each over the peer's tokens per CPU
    second (1000 / its e2e CPU ms per token: prefill included, one thread). Targets: 1.0 at c = 1, 1.2 at `a.batch`,
    none at `a.mid` (reported only). No peer has an HTTP server with continuous batching: its in-process figure is
    the best a server built on it could do."""
    workload = f"{a.prompt_bytes}-token prompts + {a.max_new_tokens} new tokens (greedy) on both sides"
    out: dict[str, dict[str, Any]] = {}
    for c in sorted({1, a.mid, a.batch}):
        target = 1.0 if c == 1 else 1.2 if c == a.batch else None
        best = best_peer(m, c)
        peer_tok_s = 1e3 / best[1] if best else None
        peer = (
            f"the best peer at batch {c} in-process ({best[0] if best else 'none ran'}): 1000 / its e2e CPU ms per "
            f"token (`{best[0] if best else 'ct2_*'}_bs{c}_cpu_ms_per_token`, prefill included, one thread)"
        )
        ours = {
            "": (
                f"http_c{c}_tok_s",
                f"tokens per wall second of {c} streaming HTTP client(s) together (`http_c{c}_tok_s`)",
            ),
            " (server CPU)": (
                f"http_c{c}_tok_per_server_cpu_s",
                f"tokens per CPU second of the server process, all threads: engine + event loop "
                f"(`http_c{c}_tok_per_server_cpu_s`)",
            ),
        }
        for suffix, (key, what) in ours.items():
            r = ratio(m.get(key), peer_tok_s)
            out[f"HTTP c{c} / best peer bs{c}{suffix}"] = {
                "value": r,
                "target": target,
                "higher_is_better": True,
                "ok": meets(r, target, True) if target is not None else None,
                "compares": f"{what} / {peer}; {workload}",
                "numerator": m.get(key),
                "denominator": peer_tok_s,
                "best_peer": best[0] if best else None,
            }
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def render(res: dict[str, Any]) -> str:
    """The printed table: metrics, then ratios against their targets."""
    lines = [f"{'metric':<34} {'value':>12}", "-" * 47]
    lines += [f"{k:<34} {_fmt(v):>12}" for k, v in res["metrics"].items()]
    hf = res["details"].get("hf")
    if hf:
        eq = hf["equivalence"]
        lines.append(
            f"HF weight copy: logits allclose={eq['allclose']}, max abs diff {eq['max_abs_diff']:.3g}"
            + (
                f"; greedy tokens equal the engine's: {hf['greedy_tokens_match_engine']}"
                if "greedy_tokens_match_engine" in hf
                else ""
            )
        )
    lines += ["", f"{'ratio':<40} {'value':>12} {'target':>10}  ok", "-" * 68]
    for name, r in res["ratios"].items():
        sign = ">=" if r["higher_is_better"] else "<="
        ok = {True: "yes", False: "NO", None: "-"}[r["ok"]]
        target = "-" if r["target"] is None else f"{sign} {_fmt(r['target'])}"
        lines.append(f"{name:<40} {_fmt(r['value']):>12} {target:>10}  {ok}")
    lines += render_http(res)
    profiles = [v for k, v in res["details"].items() if k.startswith("profile_decode_bs")]
    for prof in profiles:
        b = prof["batch"]
        fused = prof.get("fused_step_cpu_ms")
        lines += [
            "",
            f"batch-{b} decode step (TorchScript FastDecoder + argmax): "
            f"{prof['forward_step_ms']:.2f} ms wall, {prof['forward_step_cpu_ms']:.2f} ms CPU, "
            f"{prof['aten_calls_per_step']:.0f} aten calls "
            f"(generic forward: {prof['generic_forward_step_ms']:.2f} ms wall"
            + (f"; fused C step: {fused:.2f} ms CPU" if fused is not None else "")
            + "); self CPU time by kind (ms/step):",
        ]
        lines += [
            f"  {k:<24} {v:8.3f}  {v / prof['profiled_step_ms']:6.1%}"
            for k, v in prof["categories_ms_per_step"].items()
        ]
    eng, prof = res["details"].get("engine_bs1"), res["details"].get("profile_decode_bs1")
    if eng and prof and eng.get("cpu_ms_per_token_decode"):
        bare = prof.get("fused_step_cpu_ms") if eng.get("decode_step") == "fused" else prof["forward_step_cpu_ms"]
        lines.append(
            f"engine decode per token (batch 1, {eng.get('decode_step')} step): "
            f"{eng['ms_per_token_decode']:.2f} ms wall, {eng['cpu_ms_per_token_decode']:.2f} ms CPU "
            "(engine overhead over the bare step: "
            f"{eng['cpu_ms_per_token_decode'] - (bare or 0):+.2f} ms CPU)"
        )
    gil = res["details"].get("gil")
    if gil:
        lines += [
            "",
            f"decode step, ms (alone -> next to a Python thread busy {gil['busy_ms']} ms of every "
            f"{gil['busy_ms'] + gil['idle_ms']} ms):",
        ]
        kinds = [
            (k, label)
            for k, label in (("eager", "eager"), ("scripted", "TorchScript"), ("fused", "fused C"))
            if any(key.startswith(k + "_bs") for key in gil)
        ]
        for b in sorted({int(k.split("_bs")[1].split("_")[0]) for k in gil if "_bs" in k}):
            lines.append(
                f"  batch {b:<3}"
                + "   ".join(
                    f" {label} {gil[f'{k}_bs{b}_alone_ms']:7.2f} -> {gil[f'{k}_bs{b}_with_python_thread_ms']:7.2f}"
                    for k, label in kinds
                )
            )
    lines += render_peers(res["details"])
    mach = res["machine"]
    if max(mach["loadavg_start"][0], mach["loadavg_end"][0]) > 0.5 * mach["cpus_available"]:
        lines += [
            "",
            f"WARNING: the machine was busy (load average {mach['loadavg_start'][0]:.1f} at start, "
            f"{mach['loadavg_end'][0]:.1f} at end, {mach['cpus_available']} CPUs): wall-clock numbers "
            "are unreliable; compare CPU-time figures",
        ]
    return "\n".join(lines)


def render_http(res: dict[str, Any]) -> list[str]:
    """The HTTP sweep with the server's CPU time, then HTTP against the best peer (empty when http did not run)."""
    sweep = res["details"].get("http_sweep")
    if not sweep:
        return []
    threads = res["settings"]["threads"]
    lines = [
        "",
        f"HTTP streaming sweep: server = `python -m app`, {threads} torch thread(s) decoding in the engine's worker "
        "thread plus the event-loop thread (uvicorn, FastAPI, SSE); server CPU counts both, 'loop' is the "
        "event-loop thread's share of it; client = this process (httpx), on the same cores",
        f"  {'clients':>7} {'tok/s wall':>11} {'server CPU s':>13} {'tok/server CPU s':>17} {'cores busy':>11} "
        f"{'loop':>6} {'client CPU s':>13}",
    ]
    for lvl in sweep:
        share = lvl.get("server_main_thread_share")
        lines.append(
            f"  {lvl['concurrency']:>7} {_fmt(lvl['tok_s']):>11} {_fmt(lvl.get('server_cpu_s')):>13} "
            f"{_fmt(lvl.get('tok_per_server_cpu_s')):>17} {_fmt(lvl.get('server_cores_busy')):>11} "
            f"{'-' if share is None else f'{share:.0%}':>6} {_fmt(lvl.get('client_cpu_s')):>13}"
        )
    vs = [(k, r) for k, r in res.get("ratios", {}).items() if k.startswith("HTTP c") and "best_peer" in r]
    if any(r["value"] is not None for _, r in vs):
        st = res["settings"]
        lines += [
            "",
            f"HTTP at c clients against the best peer in-process at batch c ({st['prompt_bytes']}-token prompts + "
            f"{st['max_new_tokens']} new tokens on both sides; peer: tokens per CPU second, one thread, prefill "
            "included; it pays no HTTP, JSON or event loop):",
        ]
        for k, r in vs:
            if r["value"] is None:
                continue
            by = "server CPU" if k.endswith("(server CPU)") else "wall"
            c = k.split()[1]
            target = "" if r["target"] is None else f" (target {_fmt(r['target'])}: {'yes' if r['ok'] else 'NO'})"
            lines.append(
                f"  {c:<4} by {by:<10} {_fmt(r['numerator']):>9} tok/s / {r['best_peer']} "
                f"{_fmt(r['denominator']):>9} tok/s = {_fmt(r['value'])}{target}"
            )
    return lines


def render_ct2_threads(th: dict[str, Any]) -> str:
    """The peer's 1- vs 2-thread check (`peers.thread_check`) as one printed line."""
    per_b = sorted({int(k[2:].split("_")[0]) for k in th if k.startswith("bs") and k.endswith("_tok_s")})
    faster = [b for b in per_b if th[f"bs{b}_faster_with_2"]]
    verdict = (
        f" (faster with 2 at {', '.join(f'bs{b}' for b in faster)}: compare with its 2-thread figure there)"
        if faster
        else " (one thread is its best)"
    )
    return (
        f"CTranslate2 {th.get('compute_type', 'int8')} with 1 / 2 intra-op threads, wall tok/s: "
        + "; ".join(f"bs{b} {th[f'bs{b}_threads1_tok_s']:,.0f} / {th[f'bs{b}_threads2_tok_s']:,.0f}" for b in per_b)
        + verdict
    )


def render_peers(d: dict[str, Any]) -> list[str]:
    """The peers and memory sections as printed lines (empty when neither ran)."""
    lines: list[str] = []
    peer = d.get("peers")
    if peer:
        c, lim, match = peer["cpu"], peer["limit"], peer["greedy_tokens_match_ours_float32"]
        lines += [
            "",
            f"CPU ms per generated token, {c['threads']} thread(s), medians of {c['rounds']} interleaved "
            f"rounds ({c['prompt_tokens']}-token prompts, {c['max_new_tokens']} new tokens; e2e = prefill "
            "included, decode = decode only; ratio = peer / ours, > 1: we are faster)",
            f"CTranslate2 float32 greedy tokens equal ours: {match['equal']}"
            + ("" if match["equal"] else f" (first difference at token {match['first_difference']})"),
        ]
        names = ("engine", "step", "step_torchscript", "ct2_float32", "ct2_int8")
        names = tuple(k for k in names if any(key.startswith(k + "_bs") for key in c))
        peer_names = [n for n in names if n.startswith("ct2_")]
        lines.append(f"engine's decode step: {c['engine_decode_step']} ({c['our_weights']} weights)")
        lines.append(
            f"  {'':<14}" + "".join(f"{n:>17}" for n in names) + "".join(f"{'engine/' + n[4:]:>15}" for n in peer_names)
        )
        for b in c["batches"]:
            for kind in ("e2e", "decode"):
                vals = [c.get(f"{n}_bs{b}_{kind}_cpu_ms_per_token") for n in names]
                rats = [c.get(f"engine_vs_{n}_bs{b}_{kind}") for n in peer_names]
                lines.append(
                    f"  bs{b:<3} {kind:<8}"
                    + "".join(f"{_fmt(v):>17}" for v in vals)
                    + "".join(f"{_fmt(r):>15}" for r in rats)
                )
        fmt = lim["our_weights"]
        lines.append(
            f"machine limit at batch 1 ({fmt} weights, {lim[f'{fmt}_weight_bytes_per_token'] / 1e6:.1f} MB "
            f"per token / {lim[f'{fmt}_read_gb_per_s']:.1f} GB/s read): "
            f"{lim[f'{fmt}_limit_tok_s']:,.0f} tok/s; our bare step: "
            f"{_fmt(lim.get('ours_tok_per_cpu_s'))} tok/s = {_fmt(lim.get('ours_fraction_of_limit'))} of it "
            f"(float32 {lim['float32_limit_tok_s']:,.0f}, int8 {lim['int8_limit_tok_s']:,.0f} tok/s)"
        )
    th = (peer or {}).get("ct2_int8_threads")
    if th:
        lines.append(render_ct2_threads(th))
    ao = d.get("aoti")
    if ao:
        names = [n for n in ("aoti_float32", "fused", "torchscript") if f"{n}_bs1_cpu_ms_per_token" in ao]
        lines += [
            "",
            f"AOTInductor step (compiled in {ao['compile_s']:.0f} s, {ao['package_bytes'] / 1e6:.1f} MB; "
            f"greedy tokens equal ours: {ao['greedy_tokens_match_ours_float32']}), bare steps, CPU ms per "
            f"token, medians of {ao['rounds']} interleaved rounds:",
        ]
        for b in ao["batches"]:
            lines.append(
                f"  bs{b:<3}"
                + "   ".join(f"{n} {_fmt(ao[f'{n}_bs{b}_cpu_ms_per_token'])}" for n in names)
                + "   ("
                + ", ".join(f"{n}/aoti {_fmt(ao.get(f'{n}_vs_aoti_bs{b}'))}x" for n in names[1:])
                + " faster)"
            )
    mem = d.get("memory")
    if mem:
        parts = (
            "python_and_torch_import_mb",
            "app_import_mb",
            "weights_mb",
            "kv_cache_mb",
            "warm_up_and_compiled_steps_mb",
            "rest_mb",
        )
        lines += [
            "",
            "server RSS split (MB): "
            + ", ".join(f"{k[:-3]} {_fmt(mem.get(k))}" for k in parts)
            + (
                f" = peak {_fmt(mem['server_peak_mb'])}"
                if mem.get("server_peak_mb")
                else " (no server peak: run the http section for the rest)"
            ),
        ]
    return lines


def plot(res: dict[str, Any], path: Path) -> bool:
    """Aggregate tokens/s and p99 inter-token latency vs concurrency; False when there is no sweep."""
    sweep = res["details"].get("http_sweep")
    if not sweep:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [s["concurrency"] for s in sweep]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(cs, [s["tok_s"] for s in sweep], "o-", label="Shortcut server (streaming)")
    hf, B = res["details"].get("hf"), res["settings"]["batch"]
    if hf:
        ax1.plot([1, B], [hf["bs1_tok_s"], hf[f"bs{B}_tok_s"]], "s", label=f"HF generate in-process, batch 1 and {B}")
    naive = res["details"].get("naive")
    if naive:
        ax1.plot([B], [naive["tok_s"]], "x", markersize=10, label="naive FastAPI + HF server")
    ax1.set(xlabel="concurrent clients", ylabel="aggregate tokens/s", title="Throughput")
    ax2.plot(cs, [s["itl_p99_ms"] for s in sweep], "o-", color="C3", label="p99")
    ax2.plot(cs, [s["itl_p50_ms"] for s in sweep], "o:", color="C3", alpha=0.6, label="p50")
    ax2.set(xlabel="concurrent clients", ylabel="ms", title="Inter-token latency (client side)")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    mi, st = res["model"], res["settings"]
    fig.suptitle(
        f"{mi['source']} weights, {st['prompt_bytes']}+{st['max_new_tokens']} tokens, "
        f"{st['threads']} threads, {res['machine']['cpu_model']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_json(res: dict[str, Any], path: Path) -> None:
    """Write atomically (the .tmp name is git-ignored)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    a = parse_args(argv)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="shortcut-bench-"))
    try:
        res = run(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["elapsed_s"] = time.perf_counter() - t0
    for eng in (res["details"].get("engine_bs1"),):
        if eng:
            eng.pop("tokens", None)  # only needed for the comparison with HF
    write_json(res, a.out)
    drew = plot(res, a.plot)
    print()
    print(render(res))
    print(f"\nwrote {a.out}" + (f" and {a.plot}" if drew else "") + f" in {res['elapsed_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
