"""Peak memory of one call against the documented bound (tl_strace.memory.estimate_memory).

    python benchmarks/bench_memory.py [--lengths 59,150] [--gpt2-lengths 150] [--quick]

For SmolLM2-135M at several input lengths (59 and 150 tokens by default; ``--lengths 59,150,300``
adds a minute and a half), and for a randomly initialised model shaped like
GPT-2 small (12 layers × 12 heads, d_model 768, 50,257-token vocabulary: other proportions of
heads, width and vocabulary), it measures the peak extra memory of

* ``strace`` with the *only* condition and (up to 160 tokens) with all three conditions, without a
  budget (the default rows) and with ``memory_budget`` set to the estimate's fixed part plus 4 rows;
* ``component_strace`` (zero ablation, ``l1`` and ``attribution`` scorers, 27 sizes; SmolLM2 at 59
  tokens) with a budget of the fixed part plus 16 rows;

and checks each peak against the estimate for the rows that call used and against the budget
it was given. Every call is made once beforehand at the same length (the first call at a new
length leaves Python and allocator caches that later calls reuse). Writes
``benchmarks/results/memory-<device>.json``; exits non-zero if any peak exceeds its bound.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from _util import exact_rss, peak_memory, write  # noqa: E402

exact_rss()

import torch  # noqa: E402

import tl_strace as ts  # noqa: E402
from tl_strace.memory import estimate_memory, rows_for_budget  # noqa: E402
from tl_strace.model import describe_model, model_dtype  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "passages_en.txt"


def gpt2_small_shaped() -> object:
    """GPT-2 small's shape with random weights (no download): 12 × 12 heads, 768 wide, V = 50,257."""
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny import save_tiny_tokenizer

    cfg = transformers.GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    tok_dir = tempfile.mkdtemp(prefix="tl_strace_bench_tok_")
    save_tiny_tokenizer(tok_dir)
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tok)
    bridge.eval()
    return bridge


def _ok(r: dict) -> bool:
    return r["peak"] <= r["estimate"] and (r["budget"] is None or r["peak"] <= r["budget"])


def show(r: dict) -> None:
    mib = lambda b: "—" if b is None else f"{b / 2**20:,.0f}M"  # noqa: E731
    print(f"{r['model']:>26} {r['call']:>22} {len(r['conditions']):>5} {r['n_tokens']:>4} {mib(r['budget']):>9} "
          f"{r['rows']:>4} {mib(r['peak']):>9} {mib(r['estimate']):>9} {r['peak'] / r['estimate']:>10.2f}"
          f"{'' if _ok(r) else '  OVER'}", flush=True)


def measure(model: object, tokens: torch.Tensor, label: str, quick: bool, components: bool) -> list[dict]:
    spec = describe_model(model)
    T = int(tokens.numel())
    dtype = model_dtype(model)
    rows_out = []
    cond_sets = [("only",)] if quick or T > 160 else [("only",), ("only", "random", "inverse")]
    for conds in cond_sets:
        n_rows = len(conds) * len(ts.DEFAULT_SIZES)
        rnd = "random" in conds
        fixed = estimate_memory(spec, T, 0, dtype=dtype, random=rnd).fixed
        per_row = estimate_memory(spec, T, 1, dtype=dtype, random=rnd).per_row
        # The budgeted call first: right after a call of many rows, a model's freed activations can
        # still be resident when the next call starts (seen on the GPT-2-shaped model), which hides
        # the next call's memory from the measurement.
        budgets: list[int | None] = [fixed + 4 * per_row, None]
        ts.strace(model, tokens, conditions=conds, memory_budget=budgets[0])  # warm this length
        for budget in budgets:
            rows = rows_for_budget(spec, T, dtype, memory_budget=budget, batch_size=None, n_rows=n_rows, random=rnd)
            t = time.perf_counter()
            _, peak = peak_memory(lambda b=budget: ts.strace(model, tokens, conditions=conds, memory_budget=b))
            dt = time.perf_counter() - t
            est = estimate_memory(spec, T, rows, dtype=dtype, random=rnd)
            rows_out.append({"model": label, "call": "strace", "conditions": list(conds), "n_tokens": T,
                             "budget": budget, "rows": rows, "peak": peak, "estimate": est.total,
                             "estimate_parts": {"edge_space": est.edge_space, "activations": est.activations,
                                                "rows": est.rows, "overhead": est.overhead},
                             "seconds": dt})
            show(rows_out[-1])
    if components and not quick:
        C = spec.n_layers * (spec.n_heads + 1)
        for scorer in ("l1", "attribution"):
            kw = {"dtype": dtype, "edge_space": False, "backward": scorer == "attribution"}
            est1 = estimate_memory(spec, T, 1, **kw)
            budget = est1.fixed + 16 * est1.per_row
            kw_call = {"scorer": scorer, "memory_budget": budget, "sizes": ts.DEFAULT_SIZES}
            ts.component_strace(model, tokens, **kw_call)  # warm this length
            rows = rows_for_budget(spec, T, dtype, memory_budget=budget, batch_size=None, n_rows=3 * C,
                                   edge_space=False, backward=scorer == "attribution")
            _, peak = peak_memory(lambda k=kw_call: ts.component_strace(model, tokens, **k))
            est = estimate_memory(spec, T, rows, **kw)
            rows_out.append({"model": label, "call": f"component ({scorer})", "conditions": ["only"],
                             "n_tokens": T, "budget": budget, "rows": rows, "peak": peak, "estimate": est.total,
                             "estimate_parts": {"edge_space": est.edge_space, "activations": est.activations,
                                                "rows": est.rows, "overhead": est.overhead}, "seconds": None})
            show(rows_out[-1])
    return rows_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", default="59,150", help="SmolLM2 input lengths in tokens (BENCHMARKS.md adds 300)")
    ap.add_argument("--gpt2-lengths", default="150", help="lengths for the GPT-2-small-shaped model")
    ap.add_argument("--component-lengths", default="59", help="SmolLM2 lengths at which component calls are measured")
    ap.add_argument("--quick", action="store_true", help="only-condition calls without budgets' extremes")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    results = []
    print(f"{'model':>26} {'call':>22} {'conds':>5} {'T':>4} {'budget':>9} {'rows':>4} {'peak':>9} "
          f"{'bound':>9} {'peak/bound':>10}", flush=True)
    model = ts.load_model("smollm2-135m")
    ids = model.to_tokens(" ".join(TEXT.read_text().split()))[0]
    comp_lengths = {int(x) for x in args.component_lengths.split(",") if x}
    for T in (int(x) for x in args.lengths.split(",") if x):
        results += measure(model, ids[:T], "smollm2-135m", args.quick, T in comp_lengths)
    if args.gpt2_lengths:
        g = gpt2_small_shaped()
        gen = torch.Generator().manual_seed(0)
        for T in (int(x) for x in args.gpt2_lengths.split(",")):
            results += measure(g, torch.randint(2, 97, (T,), generator=gen), "gpt2-small-shape (random)", args.quick, False)

    bad = [r for r in results if not _ok(r)]
    path = write("memory", {"results": results, "all_within_bound": not bad,
                            "wall_s": time.perf_counter() - t0})
    print(f"{len(results) - len(bad)}/{len(results)} calls within their bound; wrote {path} "
          f"({time.perf_counter() - t0:.0f} s)")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
