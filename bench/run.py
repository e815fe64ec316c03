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
from pathlib import Path
from typing import Any

import torch

from app.settings import Settings
from bench.prompts import make_prompts
from bench.report import plot, ratios, render
from bench.sections import SECTIONS, Context, run_sections
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.transformer import Transformer

log = logging.getLogger("bench")

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MAX_BATCH: int = Settings.model_fields["max_batch_size"].default
SHIPPED = Path(__file__).resolve().parent.parent / "model" / "checkpoints" / "shakespeare.safetensors"
SHIPPED_CONFIG = ModelConfig(n_layer=16, n_head=4, d_model=128, d_ff=512, block_size=256)


def sections_help() -> str:
    """The --help text's list of sections, one line each, in the order they run."""
    width = max(map(len, SECTIONS))
    return "sections, in the order they run:\n" + "\n".join(
        f"  {name:<{width}}  {sec.help}" for name, sec in SECTIONS.items()
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --quick swaps in tiny sizes for any option left at its default."""
    p = argparse.ArgumentParser(
        description="Benchmark Shortcut against Hugging Face generate baselines.",
        epilog=sections_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    unknown = [s for s in a.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections: {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
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
            "batch": a.batch,
            "mid": a.mid,
            "threads": a.threads,
            "sections": a.sections,
            "server_max_batch_size": a.server_max_batch,
        },
        "metrics": {},
        "details": {},
    }
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
    ctx = Context(a, model, ckpt_path, prompts, list(prompts[0].encode()), tmp, res["metrics"], res["details"])
    run_sections(ctx)
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["ratios"] = ratios(res["metrics"], a)
    return res


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
