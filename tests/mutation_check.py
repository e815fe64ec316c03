"""A small mutation check, run before a release: `python -m tests.mutation_check` (or `make mutation`; a few minutes).

Each mutation is one small deliberate bug, applied as a textual replacement in one source file; the test files named
with it run (`pytest -x -q`), the file is restored, and the mutation is *killed* if a test failed, *survived* if all
passed. A survivor is a documented behaviour no test checks: add a test that fails for it (docs/testing.md). Exit
status 1 if any survived. Mutations of the fused C step rebuild it (`python -m model.fast.build`) before and after.

    python -m tests.mutation_check            # all of them
    python -m tests.mutation_check --list     # what they are
    python -m tests.mutation_check temperature-multiplied header-deadline-rearmed

Run it on a clean checkout: the files are restored byte for byte after each mutation (also on Ctrl-C), but a file
edited by hand while it runs would be overwritten.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SAMPLING_TESTS = (
    "tests/model/test_sampling_numbers.py",
    "tests/model/test_sampling_controls.py",
    "tests/app/test_api_numbers.py",
    "tests/model/test_engine.py",
)
TRACE_TESTS = (
    "tests/model/test_sampling_numbers.py",
    "tests/app/test_api_numbers.py",
    "tests/model/test_diagnostics.py",
    "tests/app/test_interventions_api.py",
)
DEADLINE_TESTS = ("tests/reliability/test_deadlines.py",)
KV_TESTS = ("tests/model/test_fused_numbers.py", "tests/model/test_transformer.py")


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]
    what: str

    @property
    def rebuild(self) -> bool:
        return self.path.endswith(".c")


MUTATIONS = [
    Mutation(
        "temperature-multiplied",
        "model/sampling.py",
        "/ temperature[idx, None]",
        "* temperature[idx, None]",
        SAMPLING_TESTS,
        "logits multiplied by the temperature instead of divided",
    ),
    Mutation(
        "top-k-off-by-one",
        "model/sampling.py",
        "keep = rank[None, :] < k[:, None]",
        "keep = rank[None, :] <= k[:, None]",
        SAMPLING_TESTS,
        "top_k keeps k + 1 tokens",
    ),
    Mutation(
        "top-p-after-the-token",
        "model/sampling.py",
        "before = probs.cumsum(dim=-1) - probs",
        "before = probs.cumsum(dim=-1)",
        SAMPLING_TESTS,
        "the nucleus stops one token early (mass up to and including each token)",
    ),
    Mutation(
        "min-p-absolute",
        "model/sampling.py",
        "keep = probs >= min_p[:, None] * probs.amax(dim=-1, keepdim=True)",
        "keep = probs >= min_p[:, None]",
        SAMPLING_TESTS,
        "min_p compared with the probability itself, not relative to the best token",
    ),
    Mutation(
        "repetition-penalty-inverted",
        "model/sampling.py",
        "torch.where(logits > 0, logits / repetition[:, None], logits * repetition[:, None])",
        "torch.where(logits > 0, logits * repetition[:, None], logits / repetition[:, None])",
        SAMPLING_TESTS,
        "repetition penalty raises repeated tokens instead of lowering them",
    ),
    Mutation(
        "presence-penalty-sign",
        "model/sampling.py",
        "- presence[:, None] * (counts > 0)",
        "+ presence[:, None] * (counts > 0)",
        SAMPLING_TESTS,
        "presence penalty added instead of subtracted",
    ),
    Mutation(
        "logprobs-after-controls",
        "model/engine/sampler.py",
        "top_logprobs(logits, chosen",
        "top_logprobs(adjusted, chosen",
        SAMPLING_TESTS,
        "logprobs taken after logit_bias and penalties (the docs promise the model's raw distribution)",
    ),
    Mutation(
        "lens-softmax-over-top-k",
        "model/diagnostics.py",
        "            top_p, top_i = probs.topk(k, dim=-1)  # (L, R, k)\n",
        "            top_p, top_i = probs.topk(k, dim=-1)  # (L, R, k)\n"
        "            top_p = top_p / top_p.sum(-1, keepdim=True)\n",
        TRACE_TESTS,
        "the trace's logit-lens probabilities renormalised over the top k only",
    ),
    Mutation(
        "trace-update-ratio-denominator",
        "model/diagnostics.py",
        "ratio = torch.linalg.vector_norm(s[1:] - s[:-1], dim=-1) / norms[:-1].clamp_min(EPS)",
        "ratio = torch.linalg.vector_norm(s[1:] - s[:-1], dim=-1) / norms[1:].clamp_min(EPS)",
        TRACE_TESTS,
        "the trace's update ratio divided by |resid_post| instead of |resid_pre|",
    ),
    Mutation(
        "header-deadline-rearmed",
        "app/connection.py",
        "if receiving and self._phase is None:",
        "if receiving:",
        DEADLINE_TESTS,
        "the header deadline re-armed on every received chunk (a drip holds a connection for ever)",
    ),
    Mutation(
        "body-deadline-rearmed",
        "app/connection.py",
        'if self._phase != "body":',
        "if True:",
        DEADLINE_TESTS,
        "the body deadline re-armed on every received chunk",
    ),
    Mutation(
        "body-deadline-is-the-header-one",
        "app/connection.py",
        'self._arm("body", self.body_timeout_s)',
        'self._arm("body", self.header_timeout_s)',
        DEADLINE_TESTS,
        "the body gets the header deadline",
    ),
    Mutation(
        "fused-kv-rounds-toward-zero",
        "model/fast/fused_step.c",
        "_MM_FROUND_TO_NEAREST_INT));",
        "_MM_FROUND_TO_ZERO));",
        KV_TESTS,
        "the fused step writes float16 keys and values rounded toward zero (F16C), not to nearest even",
    ),
    Mutation(
        "reference-kv-rounds-ties-down",
        "model/transformer.py",
        "k_cache[rows, :, positions] = k.to(k_cache.dtype)",
        "k_cache[rows, :, positions] = (k * (1 - 2**-13) if k_cache.dtype == torch.float16 else k).to(k_cache.dtype)",
        KV_TESTS,
        "the reference forward's float16 keys: a tie rounds down (the key shrunk by 1/8 of a float16 ulp first)",
    ),
]


def rebuild() -> None:
    subprocess.run([sys.executable, "-m", "model.fast.build"], cwd=ROOT, check=True, capture_output=True)


def run_tests(tests: tuple[str, ...], timeout_s: float) -> tuple[bool, str]:
    """(passed, the first failing test or the reason) for `pytest -x -q` over `tests`."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout_s:.0f} s"
    out = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return True, ""
    if proc.returncode == 5:
        raise SystemExit(f"no tests collected from {tests}")
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    return False, failed.group(1) if failed else f"pytest exit status {proc.returncode}"


def check(m: Mutation, timeout_s: float) -> tuple[bool, str, float]:
    """Apply `m`, run its tests, restore the file; (killed, by what, seconds)."""
    path = ROOT / m.path
    original = path.read_bytes()
    text = original.decode()
    if text.count(m.old) != 1:
        raise SystemExit(
            f"{m.name}: the text to replace occurs {text.count(m.old)} times in {m.path} (update the list)"
        )
    start = time.monotonic()
    try:
        path.write_text(text.replace(m.old, m.new))
        if m.rebuild:
            rebuild()
        passed, why = run_tests(m.tests, timeout_s)
    finally:
        path.write_bytes(original)
        if m.rebuild:
            rebuild()
    return not passed, why, time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutation's tests (a timeout kills it)")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        ap.error(f"unknown mutations: {sorted(unknown)}")
    if args.list:
        for m in chosen:
            print(f"{m.name:34} {m.path:26} {m.what}")
        return 0
    survived = []
    for m in chosen:
        killed, why, secs = check(m, args.timeout)
        print(f"{'killed  ' if killed else 'SURVIVED'} {m.name:34} {secs:6.1f} s  {why or m.what}", flush=True)
        if not killed:
            survived.append(m.name)
    print(f"\n{len(chosen) - len(survived)} of {len(chosen)} killed" + (f"; survived: {survived}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
