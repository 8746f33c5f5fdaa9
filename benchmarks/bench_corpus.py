"""Throughput of the corpus runner: passages per second on SmolLM2-135M, 40-word passages.

    python benchmarks/bench_corpus.py [--passages 12] [--conditions only]

Runs :func:`tl_strace.corpus.run_corpus` over the first ``--passages`` passages of the shipped
``austen-40`` set (40 words each, the next word as target; paper B's setup) into a fresh
directory, and, side by side on the same passages, a bare loop of :func:`tl_strace.strace` calls
(the same options) and a loop of plain single forwards. Prints passages/s, the runner's overhead
over the bare calls (writing records with fsync, the per-passage component projections, the
progress bar) and the cost of a passage in plain forwards. Writes
``benchmarks/results/corpus-<device>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from _util import write  # noqa: E402

import tl_strace as ts  # noqa: E402
from tl_strace.corpus import load_run, run_corpus  # noqa: E402
from tl_strace.io.datasets import load_passages  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--passages", type=int, default=12)
    ap.add_argument("--conditions", nargs="+", default=["only"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = ts.load_model("smollm2-135m", device=args.device, dtype=getattr(torch, args.dtype))
    ps = load_passages("austen-40").with_limit(args.passages)
    texts = [p.text for p in ps.passages]
    targets = [p.target for p in ps.passages]
    ts.strace(model, texts[0], conditions=args.conditions)  # warm (the once-per-model checks)

    with tempfile.TemporaryDirectory(prefix="tl_strace_bench_corpus_") as tmp:
        t = time.perf_counter()
        summary = run_corpus(model, "austen-40", Path(tmp) / "run", limit=args.passages,
                             conditions=args.conditions, progress=False)
        t_runner = time.perf_counter() - t
        run = load_run(Path(tmp) / "run")
        n_done = len(run.table)
    if summary.n_skipped:
        print(f"  note: {summary.n_skipped} passage(s) skipped by the runner")

    per_call = []
    t = time.perf_counter()
    for text, target in zip(texts, targets):
        s = time.perf_counter()
        ts.strace(model, text, conditions=args.conditions, target=target)
        per_call.append(time.perf_counter() - s)
    t_bare = time.perf_counter() - t

    toks = [model.to_tokens(x) for x in texts]
    t = time.perf_counter()
    for x in toks:
        model(x)
    t_fwd = (time.perf_counter() - t) / len(toks)

    n = args.passages
    n_tokens = statistics.median(int(x.shape[-1]) for x in toks)
    res = {
        "passages": n, "recorded": n_done, "conditions": args.conditions, "median_tokens": n_tokens,
        "runner_s": t_runner, "runner_passages_per_s": n_done / t_runner,
        "bare_strace_s": t_bare, "bare_passages_per_s": n / t_bare, "median_strace_s": statistics.median(per_call),
        "runner_overhead": t_runner / t_bare, "single_forward_s": t_fwd,
        "passage_cost_in_forwards": (t_runner / max(1, n_done)) / t_fwd,
        "device": args.device, "dtype": args.dtype,
    }
    print(f"SmolLM2-135M on {args.device} ({args.dtype}), austen-40, {n} passages (median {n_tokens:.0f} tokens), "
          f"conditions {args.conditions}")
    print(f"  corpus runner: {t_runner:.1f} s → {res['runner_passages_per_s']:.2f} passages/s "
          f"({t_runner / max(1, n_done):.2f} s per passage)")
    print(f"  bare strace loop: {t_bare:.1f} s → {res['bare_passages_per_s']:.2f} passages/s "
          f"(median call {res['median_strace_s']:.2f} s); runner / bare = {res['runner_overhead']:.3f}")
    print(f"  one plain forward: {t_fwd * 1000:.0f} ms; a recorded passage costs {res['passage_cost_in_forwards']:.1f} "
          f"single forwards ({len(ts.DEFAULT_SIZES) * len(args.conditions) + 1} if each stratum took its own)")
    print(f"wrote {write('corpus', res)}")


if __name__ == "__main__":
    main()
