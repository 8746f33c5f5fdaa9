"""s-Trace cost against input length (issue 17): time per stage, peak memory, bytes per causal edge.

    python benchmarks/bench_length.py [--lengths 64,128,256,512,1024,2048] [--conditions only]

For SmolLM2-135M on Austen text cut to each length (tokens), it runs one ``strace`` call with the
default options and reports, side by side:

* the time of each stage (``res.timings``: clean forward, graph + weights, search, masked
  evaluation) and the share of graph + weights + search in the whole call (target ≤ 10 %);
* the whole call against its *dense floor*: one clean forward plus the plain batched forwards of
  the same number of rows at that length with no hooks (target ≤ 1.15×);
* the peak extra memory (``_util.peak_memory``: the kernel's peak resident set above the resident
  set before the call) and that peak per causal edge (target ≤ 16 B);
* the estimate of :func:`tl_strace.memory.estimate_memory` for the rows the call used, and its
  edge-space part per causal edge (the bytes the weights, labels and search state take per edge:
  the issue's ≤ 16 B target; the measured peak per edge also holds the masked rows, which dominate
  short inputs). A length whose
  estimate exceeds the memory available is not run: its row says how much it would need.

Writes ``benchmarks/results/length-<device>.json`` and prints the growth exponent of the whole call
(slope of log time against log T over the lengths that ran).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from _util import exact_rss, peak_memory, write  # noqa: E402

exact_rss()

import numpy as np  # noqa: E402
import torch  # noqa: E402

import tl_strace as ts  # noqa: E402
from tl_strace.io.datasets import load_passages  # noqa: E402
from tl_strace.memory import estimate_memory, rows_for_budget  # noqa: E402
from tl_strace.model import describe_model, model_dtype  # noqa: E402


def text_tokens(model: object, n: int) -> torch.Tensor:
    """The first ``n`` tokens of the shipped Austen passages, concatenated (BOS first, as the model tokenises)."""
    text = " ".join(p.text for p in load_passages("austen-40").passages[:400])
    toks = model.to_tokens(text)[0]
    if toks.numel() < n:
        raise SystemExit(f"only {toks.numel()} tokens of text; lengths up to that are possible")
    return toks[:n]


def causal_edges(spec: object, T: int) -> int:
    """Edges of the token graph: per block, attention H·T(T+1)/2, T residual into each of its nodes, T MLP."""
    L, H = spec.n_layers, spec.n_heads
    per_block = H * T * (T + 1) // 2 + (T if spec.parallel else 2 * T) + T
    return L * per_block


def available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def dense_floor(model: object, tokens: torch.Tensor, n_rows: int, chunk: int) -> float:
    """One clean forward plus ``n_rows`` plain rows in forwards of ``chunk`` rows (no hooks)."""
    t = time.perf_counter()
    with torch.inference_mode():
        model(tokens[None])
        left = n_rows
        while left > 0:
            b = min(chunk, left)
            model(tokens[None].expand(b, -1))
            left -= b
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="64,128,256,512,1024,2048")
    ap.add_argument("--conditions", nargs="+", default=["only", "random", "inverse"])
    args = ap.parse_args()
    model = ts.load_model("smollm2-135m")
    spec = describe_model(model)
    dtype = model_dtype(model)
    rows_out = []
    head = (f"{'T':>5} {'edges':>12} {'forward':>8} {'graph':>7} {'search':>7} {'eval':>8} {'total':>8} "
            f"{'g+w+s %':>7} {'floor':>8} {'/floor':>7} {'peak':>8} {'est.':>8} {'B/edge':>7}")
    print(head)
    for T in [int(x) for x in args.lengths.split(",")]:
        tokens = text_tokens(model, T)
        conds = tuple(dict.fromkeys(("only", *args.conditions)))
        n_rows = len(conds) * (len(ts.DEFAULT_SIZES) + 1)
        rnd = "random" in conds
        rows = rows_for_budget(spec, T, dtype, memory_budget=None, batch_size=None, n_rows=n_rows, random=rnd)
        est = estimate_memory(spec, T, rows, dtype=dtype, random=rnd)
        E = causal_edges(spec, T)
        row: dict = {"n_tokens": T, "causal_edges": E, "conditions": list(conds), "rows_per_forward": rows,
                     "estimate": est.total, "estimate_edge_space": est.edge_space}
        if est.total > 0.9 * available():
            row["skipped"] = f"needs {est.total / 2**30:.1f} GiB by the estimate; {available() / 2**30:.1f} GiB available"
            print(f"{T:>5} {E:>12,}  not run: {row['skipped']}", flush=True)
            rows_out.append(row)
            continue
        t0 = time.perf_counter()
        res, peak = peak_memory(lambda: ts.strace(model, tokens, conditions=conds))
        total = time.perf_counter() - t0
        tm = res.timings
        floor = dense_floor(model, tokens, len(conds) * len(res.sizes), rows)
        gws = tm.get("graph", 0.0) + tm.get("search", 0.0)
        row.update(n_edges=int(res.n_edges), timings=tm, total=total, floor=floor, ratio_floor=total / floor, share_graph_search=gws / total,
                   peak=peak, bytes_per_causal_edge=peak / E)
        print(f"{T:>5} {E:>12,} {tm['forward']:>8.2f} {tm['graph']:>7.2f} {tm['search']:>7.2f} {tm['evaluate']:>8.2f} "
              f"{total:>8.2f} {100 * gws / total:>6.1f}% {floor:>8.2f} {total / floor:>7.2f} "
              f"{peak / 2**30:>7.2f}G {est.total / 2**30:>7.2f}G {peak / E:>7.1f} {est.edge_space / E:>17.1f}", flush=True)
        rows_out.append(row)
        del res
    ran = [r for r in rows_out if "total" in r]
    if len(ran) > 1:
        slope = float(np.polyfit(np.log([r["n_tokens"] for r in ran]), np.log([r["total"] for r in ran]), 1)[0])
        print(f"growth exponent (log total time / log T): {slope:.2f}")
    else:
        slope = math.nan
    write("length", {"model": "smollm2-135m", "rows": rows_out, "growth_exponent": slope})


if __name__ == "__main__":
    main()
