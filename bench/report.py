"""The results of `python -m bench.run` as read by people: the headline ratios against their targets, the printed
report and the concurrency plot."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.stats import meets, ratio


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
